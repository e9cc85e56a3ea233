"""Per-row weights by multilevel optimisation (``docs/methods/multilevel.md`` §2-4): the ``reweight`` detector.

The trilevel model of §2 on frozen features (:mod:`.features`), outermost first:

1. **Defender** — one weight w_i ∈ [0, 1] per training row, minimising the clean-set loss
   f1 = CE_clean(θ_T3) of the learner's unrolled head;
2. **Attacker** (``levels=3`` only) [RECON] — a perturbation P_i of each training row's frozen
   feature with ‖P_i‖₂ ≤ ε, maximising the same clean-set loss (zero-sum: the worst poison the
   weights must survive); T2 projected ascent steps from P = 0;
3. **Learner** — a linear head θ = (W, b) on the (perturbed) features, T3 gradient steps from
   θ = 0 on  f3 = (1/n) Σ_i w_i CE(θ; x_i + P_i, y_i) + (λ/2)‖W‖².

``levels=2`` drops the attacker: bilevel learning to reweight. The hypergradient ∂f1/∂w is exact
through both unrolled loops (:mod:`unbackdoor.optim.multilevel`). The unrolled parameters are the
head only (the encoder is frozen; features are computed once), reported as ``unrolled``.

Outer loop [RECON]: ``epochs`` passes over the rows in seeded mini-batches of ``batch_size``
(``None``: all rows at once); each batch's learner and attacker are unrolled on that batch, and
its weights take one projected step  w ← Π_[0,1](w − η1 · g / mean|g|): the hypergradient g scaled
by one scalar per step, so η1 is the mean weight change per step whatever the feature scale, T3 or
batch size. The attacker's objective is multiplied by the batch size (same maximiser) so its step
η2 does not depend on it either.

Defaults [RECON]: first set by looking at detection AUROC on one SST-2 BadNets sample; then
``pooling=cls`` and ``inner_steps=10`` were chosen on a development attack outside the benchmark's
data sets (our AddSent, dirty label, 10 %, on OLID; 3,000 rows, 1 % clean rows, all-MiniLM-L6-v2):
the best precision at a 10 % flag rate among ten candidates, 29.3 % vs 17.0 % for mean pooling with
5 steps (AUROC 0.767 vs 0.621; measured with the retired ``benchmarks/detect_grid.py pilot``, now
``benchmarks/detect_pilot_olid.yaml``; docs/results/detect.md).

Score of a row: 1 − w_i (§4); rows with equal weights (several may sit at 0) are ranked by their
last hypergradient. Rows start at ``init_weight`` (1.0: every row trusted).

Section numbers (§) cite ``docs/methods/multilevel.md``, the method notes in this repository.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.detect.base import DETECTORS, DetectInputs, Detector, Scores
from unbackdoor.detect.features import FeatureData, Pooling, feature_data
from unbackdoor.optim.multilevel import Level, box_projection, hypergradient, l2_ball_projection
from unbackdoor.utils.resources import Stopwatch

logger = logging.getLogger(__name__)


class ReweightConfig(StrictConfig):
    """Options of the multilevel reweighting. All values are ours [RECON]: the paper's body and code
    were not available (``docs/methods/multilevel.md`` §1)."""

    levels: Literal[2, 3] = Field(2, description="2: defender + learner (learning to reweight); "
                                  "3: + a bounded attacker between them (``docs/methods/multilevel.md`` §2)")
    epochs: int = Field(20, ge=1, description="outer passes over the training rows")
    batch_size: int | None = Field(256, ge=2, description="rows per outer step (null: all rows at once)")
    outer_lr: float = Field(0.1, gt=0, description="η1: mean weight change per outer step")
    init_weight: float = Field(1.0, ge=0, le=1, description="starting weight of every row")
    inner_steps: int = Field(10, ge=1, description="T3: unrolled gradient steps of the learner's head")
    inner_lr: float = Field(5.0, gt=0, description="η3: the learner's step size (features have norm ≈ 1)")
    weight_decay: float = Field(1e-3, ge=0, description="λ: the learner's L2 penalty on W")
    attack_steps: int = Field(1, ge=1, description="T2: unrolled ascent steps of the attacker (levels=3)")
    attack_lr: float = Field(1.0, gt=0, description="η2: the attacker's step size (levels=3)")
    epsilon: float = Field(0.03, ge=0, description="ε: bound on each row's perturbation, in standardised "
                           "feature units (a typical row has norm 1) (levels=3)")
    pooling: Pooling = Field("cls", description="frozen feature: mean over tokens or the first (CLS) token")
    feature_batch_size: int = Field(64, ge=1, description="rows per forward pass when computing features")
    seed: int = Field(0, description="seed of the mini-batch order")


def _head_logits(theta: torch.Tensor, x: torch.Tensor, num_labels: int) -> torch.Tensor:
    d = x.shape[1]
    weight = theta[: num_labels * d].view(num_labels, d)
    return x @ weight.T + theta[num_labels * d:]


def _head_size(data: FeatureData) -> int:
    return data.num_labels * (data.x.shape[1] + 1)


def build_levels(data: FeatureData, rows: torch.Tensor, cfg: ReweightConfig) -> list[Level]:
    """The defender / (attacker) / learner levels of §2 for the training rows ``rows``.

    Variables, outermost first: w (|rows|), [P (|rows| × d)], θ (the flattened head).
    """
    x, y = data.x[rows], data.y[rows]
    n, c = len(rows), data.num_labels
    attacked = cfg.levels == 3

    def clean_loss(theta: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_head_logits(theta, data.clean_x, c), data.clean_y)

    def defender(v: Sequence[torch.Tensor]) -> torch.Tensor:
        return clean_loss(v[-1])

    def attacker(v: Sequence[torch.Tensor]) -> torch.Tensor:
        return n * clean_loss(v[-1])  # × n: same maximiser, step size independent of the batch size

    def learner(v: Sequence[torch.Tensor]) -> torch.Tensor:
        w, theta = v[0], v[-1]
        features = x + v[1] if attacked else x
        per_row = F.cross_entropy(_head_logits(theta, features, c), y, reduction="none")
        weight = theta[: c * x.shape[1]]
        return (w * per_row).mean() + 0.5 * cfg.weight_decay * (weight * weight).sum()

    dtype = x.dtype
    levels = [Level(defender, torch.zeros(n, dtype=dtype), cfg.epochs, cfg.outer_lr, project=box_projection(0.0, 1.0))]
    if attacked:
        levels.append(Level(attacker, torch.zeros(n, x.shape[1], dtype=dtype), cfg.attack_steps, cfg.attack_lr,
                            sense="max", project=l2_ball_projection(cfg.epsilon)))
    levels.append(Level(learner, torch.zeros(_head_size(data), dtype=dtype), cfg.inner_steps, cfg.inner_lr))
    return levels


def _batches(n: int, batch_size: int | None, generator: torch.Generator) -> list[torch.Tensor]:
    if batch_size is None or batch_size >= n:
        return [torch.arange(n)]
    return list(torch.randperm(n, generator=generator).split(batch_size))


def _normalised_step(w: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    scale = grad.abs().mean()
    if scale <= 0:
        return w
    return (w - lr * grad / scale).clamp(0.0, 1.0)


@dataclass
class WeightsResult:
    """Learned weights, each row's last hypergradient (scaled as in the step), per-epoch record."""

    weights: torch.Tensor
    last_gradient: torch.Tensor
    history: list[dict[str, float]]


def learn_weights(data: FeatureData, cfg: ReweightConfig) -> WeightsResult:
    """Projected hypergradient descent on the row weights (module docstring)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    w = torch.full((len(data.y),), float(cfg.init_weight), dtype=data.x.dtype)
    last = torch.zeros_like(w)
    history: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        losses = []
        for rows in _batches(len(w), cfg.batch_size, generator):
            levels = build_levels(data, rows, cfg)
            value, grad = hypergradient(levels, w[rows])
            w[rows] = _normalised_step(w[rows], grad, cfg.outer_lr)
            last[rows] = grad / grad.abs().mean().clamp(min=1e-30)
            losses.append(float(value))
        history.append({"epoch": epoch, "clean_loss": sum(losses) / len(losses), "mean_weight": float(w.mean())})
        logger.debug("reweight epoch %d: clean loss %.4f, mean weight %.3f", epoch, history[-1]["clean_loss"],
                     history[-1]["mean_weight"])
    return WeightsResult(w, last, history)


def unrolled_parameters(data: FeatureData, cfg: ReweightConfig, encoder: str) -> dict[str, Any]:
    """What was unrolled at each level, for the output record (§3: say which parameters)."""
    d, c = data.x.shape[1], data.num_labels
    out: dict[str, Any] = {
        "encoder": f"{encoder} (frozen; features computed once, {cfg.pooling} pooling)",
        "level1_defender": f"row weights w ({len(data.y)}), projected onto [0, 1]",
        "level3_learner": f"linear head W ({c}x{d}) + b ({c}) = {_head_size(data)} parameters, "
                          f"{cfg.inner_steps} steps from zero",
    }
    if cfg.levels == 3:
        out["level2_attacker"] = (f"feature perturbations P (rows x {d}), ||P_i|| <= {cfg.epsilon}, "
                                  f"{cfg.attack_steps} ascent steps from zero")
    return out


@DETECTORS.register("reweight")
class ReweightDetector(Detector[ReweightConfig]):
    """Rows the multilevel defender gives low weight are suspected (score 1 − w)."""

    name = "reweight"
    config_class = ReweightConfig

    def learn(self, inputs: DetectInputs) -> tuple[WeightsResult, dict[str, Any]]:
        """The learned weight of every training row, and the report."""
        cfg = self.config
        watch = Stopwatch()
        data = feature_data(inputs, cfg.pooling, cfg.feature_batch_size)
        features_s = watch.elapsed()
        result = learn_weights(data, cfg)
        w = result.weights
        report = {"unrolled": unrolled_parameters(data, cfg, inputs.encoder.source or "encoder"),
                  "n_clean": len(inputs.clean), "features_s": features_s,
                  "optimisation_s": watch.elapsed() - features_s, "history": result.history,
                  "weights": {"mean": float(w.mean()), "min": float(w.min()), "max": float(w.max()),
                              "at_zero": int((w == 0).sum()), "at_one": int((w == 1).sum())}}
        return result, report

    def _scores(self, inputs: DetectInputs) -> Scores:
        result, report = self.learn(inputs)
        # rows with equal weight (e.g. several at 0): the one the defender still pushes down hardest first
        return Scores(1.0 - result.weights, report, tiebreak=result.last_gradient)
