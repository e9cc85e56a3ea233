"""TSBD: two-stage backdoor defence (Lin et al., NeurIPS 2024; spec ``methods/tsbd.md``).

Purify a suspect with a small clean set only (no base, no poisoned data). Steps, one function each:

Stage 1, NWC-based reinitialisation (``docs/methods/tsbd.md`` §3):

1. **Clean unlearning** on a *copy* of θ_bd: gradient ascent on the clean fitting split until its
   accuracy is ≤ a threshold (:func:`clean_unlearn`);
2. **NWC** per neuron: NWC_k = Σ_j |W_ul[k, j] − W_bd[k, j]| for every row k of every target weight
   (:func:`weight_changes`, :func:`neuron_weight_change`, optionally :func:`normalise_nwc`);
3. **Global ranking**, top ⌊n·K⌋ neurons (at least one; ``docs/methods/tsbd.md`` §8.5) (:func:`select_neurons`);
4. **Zeroing**: of the chosen neurons' subweights, the top share m by |ΔW| (pooled, ties at the
   threshold included, ``docs/methods/tsbd.md`` §3.6) are set to 0 **in θ_bd**, not in θ_ul
   (:func:`zeroing_masks`, :func:`apply_zeroing`).

Stage 2, activeness-aware fine-tuning (``docs/methods/tsbd.md`` §4): clean fine-tuning of all weights (zeroed ones may
regrow) with the gradient-norm penalty's first-order rule g = (1 − α)·g₁ + α·g₂, where
g₁ = ∇L(θ; B) and g₂ = ∇L(θ + r·g₁/‖g₁‖; B) on the same batch, as an ``on_gradients`` callback of
the one training loop (:class:`GradientNormPenalty`). The epoch is chosen on the held-out split.

The neuron ratio n is fixed or chosen on the held-out clean split (``docs/methods/tsbd.md`` §7): the largest n of the
grid whose held-out accuracy after Stage 2 stays within a tolerance of θ_bd's
(:func:`search_neuron_ratio`). The official script sweeps n and chooses nothing (``docs/methods/tsbd.md`` §8.1).

Faithful [CODE] vs ours [RECON] (the method notes' carry-over, §7; unconfirmed for text models):

* m = 0.7, α = 0.7, r = 0.05, per-tensor gradient normalisation, NWC without normalisation, the
  n grid {0.01, …, 0.9}, at most 1000 unlearning epochs, no weight decay: [CODE];
* a neuron = a row of an encoder ``nn.Linear`` weight (biases and LayerNorm untouched); embeddings,
  pooler and head excluded unless ``include`` names them; ``layer_type=layernorm`` (γ entries as
  one-subweight neurons, the analogue of ``bn``): [RECON];
* unlearning stops at clean accuracy ≤ 1/C (chance; the code's 0.10 is chance for CIFAR-10) and is
  checked every ``unlearn_check_every`` steps as well as at epoch ends: [RECON];
* optimisers, both at :data:`~unbackdoor.training.config.CLEAN_FT_LEARNING_RATE` (1e-4, MiniLM):
  unlearning with AdamW, no weight decay (``docs/methods/tsbd.md`` §7; the code's SGD 1e-4 with momentum 0.9 is
  ``unlearn_optimizer=sgd``), Stage 2 with the loop's AdamW and linear decay, 20 epochs (the code:
  SGD 0.01, momentum 0.9, no schedule, 21 passes): [RECON], see :class:`TsbdConfig`;
* batch 32 instead of 256 (the clean sets here are a few hundred rows): [RECON];
* n = 0.1 when fixed (the code sweeps n and picks none), and the n search (largest n within
  ``tolerance``, 2 points): [RECON];
* g₂'s forward pass runs with the RNG state forked, so the rest of training draws the same dropout
  masks as plain fine-tuning (α = 0 reproduces it bit for bit): ours.

Embedding rows of rare trigger tokens get no gradient from clean data, so TSBD cannot see them
(``docs/methods/tsbd.md`` §8.11): pair it with ``--epur`` against rare-token triggers.

Measured: on the tiny 2-layer BERT of the tests, the planted BadNets backdoor sits in the trigger
words' embedding rows and TSBD leaves it (ASR stays ≥ 0.8 for every n tried); on a variant whose
encoder must carry the backdoor, TSBD lowered ASR about as much as plain fine-tuning did, and
NWC-ranked zeroing scored like random zeroing (``tests/test_tsbd.py``). On MiniLM:
``docs/results/unlearn.md`` (TSBD with 1 % / 5 % clean data) and the SST-2 grid
(``docs/results/sst2_grid``).

Stage 1's gradient ascent runs in the one training loop (:func:`unbackdoor.training.ascent.run_ascent`,
configured by :func:`unlearning_ascent`: SGD or AdamW at a constant lr, stopped at an accuracy
threshold checked between steps), as the unlearn methods' ascent does.

Section numbers (§) cite ``docs/methods/tsbd.md``, the method notes in this repository.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field, field_validator, model_validator

from unbackdoor.config import StrictConfig
from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset, require_clean_dataset
from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyResult, PurifyDefense, PurifyInputs
from unbackdoor.training.config import CLEAN_FT_LEARNING_RATE
from unbackdoor.selection import finetune_with_selection
from unbackdoor.models.surgery import (
    HEAD,
    config_fingerprint,
    forked_rng,
    parameter_groups,
    restore_state,
    snapshot_state,
)
from unbackdoor.selection import TOLERANCE_HELP, Search, search_within_tolerance
from unbackdoor.errors import ConfigError, ModelError
from unbackdoor.models.loading import Classifier
from unbackdoor.training.callbacks import Callback, TrainContext
from unbackdoor.training.config import TrainConfig
from unbackdoor.training.ascent import STOP_THRESHOLD, AscentConfig, plan_ascent, run_ascent
from unbackdoor.training.loop import compute_region, evaluate_accuracy

logger = logging.getLogger(__name__)

NEURON_RATIO_GRID = (0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 0.9)
"""[CODE] The official sweep of n (``docs/methods/tsbd.md`` §3.5)."""

LayerType = Literal["linear", "layernorm"]
Extra = Literal["embeddings", "pooler", "head"]
Normalisation = Literal["none", "per_fan_in", "per_layer_zscore"]
GradNormMode = Literal["per_tensor", "global"]


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def tsbd_train_config() -> TrainConfig:
    """Stage 2's loop settings: 20 epochs [CODE ft_epoch; the code's extra 21st pass is its epoch-0
    evaluation], no weight decay [CODE], no warm-up and no clipping [CODE: none]; AdamW with the loop's
    linear decay at :data:`~unbackdoor.training.config.CLEAN_FT_LEARNING_RATE`, batch 32 and ties
    keeping the last epoch [RECON, as the package's other clean fine-tuning]."""
    return TrainConfig(epochs=20, batch_size=32, learning_rate=CLEAN_FT_LEARNING_RATE, weight_decay=0.0,
                       warmup_ratio=0.0, max_grad_norm=None, selection_ties="last")


class TsbdConfig(StrictConfig):
    """TSBD settings; provenance of each default in the module docstring and ``docs/methods/tsbd.md`` §5, §7."""

    # stage 1: clean unlearning
    unlearn_optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="gradient-ascent optimiser: adamw, no weight decay (``docs/methods/tsbd.md`` §7's practical choice) [RECON]; "
        "sgd with momentum is the code's [CODE]")
    unlearn_lr: float = Field(
        CLEAN_FT_LEARNING_RATE, gt=0, description="unlearning lr [RECON]: 1e-4 for MiniLM (the package's clean "
        "fine-tuning lr); ``docs/methods/tsbd.md`` §7 suggests 1e-5 to 5e-5 for BERT-base; the code's SGD 1e-4 barely moves a transformer")
    unlearn_momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum [CODE]")
    unlearn_batch_size: int = Field(32, ge=1, description="unlearning batch [RECON; code 256]")
    unlearn_max_epochs: int = Field(1000, ge=1, description="cap on unlearning epochs [CODE]")
    unlearn_acc_threshold: float | None = Field(
        None, ge=0, le=1,
        description="stop when clean fit-split accuracy ≤ this; null = 1/C, chance [RECON; code 0.10]")
    unlearn_check_every: int = Field(
        1, ge=0, description="also check the threshold every k steps (0: epoch ends only, as the code) [RECON]")
    unlearn_metric: Literal["balanced", "accuracy"] = Field(
        "balanced", description="what the threshold is checked on: balanced accuracy (mean per-class recall; a "
        "model collapsed to one class scores exactly 1/C) [RECON: the MiniLM runs at 5 % clean SST-2 did not "
        "finish under plain accuracy, which a collapsed model keeps at the majority share > 0.5] or plain "
        "accuracy [CODE]")
    # stage 1: NWC and zeroing
    layer_type: LayerType = Field(
        "linear", description="neurons: rows of nn.Linear weights (default), or LayerNorm γ entries (the code's bn "
        "analogue) [RECON]")
    include: tuple[Extra, ...] = Field(
        (), description="also rank rows of embeddings (token vectors; rare triggers get no signal), pooler or head "
        "[RECON: excluded by default]")
    module_filter: str | None = Field(
        None, description="regular expression a target weight's name must match (e.g. 'intermediate\\.dense' for "
        "FFN-intermediate rows only); null = all targets")
    nwc_normalization: Normalisation = Field(
        "none", description="none = raw L1 change, global ranking [CODE]; per_fan_in = divided by fan-in; "
        "per_layer_zscore = standardised within each weight tensor [RECON]")
    neuron_ratio: float = Field(0.1, gt=0, le=1, description="n: share of pooled neurons chosen (ratio_mode=fixed) "
                                "[RECON: the code sweeps n and picks none]")
    ratio_mode: Literal["fixed", "search"] = Field(
        "fixed", description="fixed: use neuron_ratio; search: the largest grid n whose held-out clean accuracy after "
        "stage 2 is within tolerance of the suspect's [RECON]")
    ratio_grid: tuple[float, ...] = Field(NEURON_RATIO_GRID,
                                          description="candidate n for ratio_mode=search [CODE grid]")
    tolerance: float = Field(0.02, ge=0, le=1, validation_alias=AliasChoices("tolerance", "ratio_tolerance"),
                             description=f"ratio_mode=search: {TOLERANCE_HELP}")
    subweight_ratio: float = Field(0.7, gt=0, le=1, description="m: share of the chosen neurons' subweights zeroed, "
                                   "largest |ΔW| first [CODE]")
    # stage 2: activeness-aware fine-tuning
    alpha: float = Field(0.7, ge=0, le=1, description="α in g = (1 − α)·g₁ + α·g₂ (λ = α·r) [CODE]")
    radius: float = Field(0.05, ge=0, description="r: perturbation radius of g₂ [CODE]")
    grad_norm_mode: GradNormMode = Field(
        "per_tensor", description="normalise g₁ per parameter tensor [CODE] or by the global norm (the objective's "
        "‖∇L‖₂) [RECON]")
    finetune: bool = Field(True, description="run stage 2 (off: stage 1 only, for ablations)")
    train: TrainConfig = Field(default_factory=tsbd_train_config, description="stage 2 loop settings")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="clean share held out for n and epoch selection")
    seed: int = Field(0, description="seed of the fit/held-out split and of unlearning's batches and dropout")

    @field_validator("ratio_grid")
    @classmethod
    def _grid(cls, grid: tuple[float, ...]) -> tuple[float, ...]:
        if not grid or any(not 0 < n <= 1 for n in grid):
            raise ValueError("ratio_grid must be a non-empty list of values in (0, 1]")
        return tuple(sorted(set(grid)))

    @field_validator("module_filter")
    @classmethod
    def _regex(cls, pattern: str | None) -> str | None:
        try:
            re.compile(pattern or "")
        except re.error as exc:
            raise ValueError(f"module_filter is not a regular expression: {exc}") from exc
        return pattern

    @field_validator("train")
    @classmethod
    def _single_batch_steps(cls, train: TrainConfig) -> TrainConfig:
        if train.gradient_accumulation_steps != 1:
            raise ValueError("TSBD's two-gradient rule needs gradient_accumulation_steps = 1 (g₂ is one batch's)")
        return train

    @model_validator(mode="after")
    def _search_needs_stage_2(self) -> TsbdConfig:
        if self.ratio_mode == "search" and not self.finetune:
            raise ValueError("ratio_mode=search chooses n after stage 2; it needs finetune=true")
        return self


# --------------------------------------------------------------------------------------------------
# Stage 1, step 1: clean unlearning (``docs/methods/tsbd.md`` §3.2, §7)
# --------------------------------------------------------------------------------------------------


@dataclass
class UnlearnRecord:
    """What :func:`clean_unlearn` did: steps, epochs started, the accuracy at every check."""

    steps: int
    epochs: int
    threshold: float
    start_accuracy: float
    final_accuracy: float
    reached: bool
    checks: list[tuple[int, float]] = field(default_factory=list)  # (step, accuracy)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unlearning_ascent(config: TsbdConfig, threshold: float) -> AscentConfig:
    """Stage 1's clean unlearning as the shared gradient ascent: on the clean rows themselves, model in
    train mode, constant lr, no weight decay or clipping, checked at epoch ends and every
    ``unlearn_check_every`` steps, stopped at the first check at or below ``threshold``, final weights kept."""
    train = TrainConfig(epochs=config.unlearn_max_epochs, batch_size=config.unlearn_batch_size,
                        learning_rate=config.unlearn_lr, optimizer=config.unlearn_optimizer,
                        momentum=config.unlearn_momentum, schedule="constant", weight_decay=0.0, warmup_ratio=0.0,
                        max_grad_norm=None, group_by_length=False, select_best=False, seed=config.seed,
                        progress=False)
    return AscentConfig(train=train, stop_forget_accuracy=threshold, forget_holdout=0,
                        eval_every=config.unlearn_check_every or None, check_epoch_end=True, clean_guard=None,
                        ascent_mode="train", scope="all", keep="last", metric=config.unlearn_metric, seed=config.seed)


def clean_unlearn(clf: Classifier, data: Dataset, config: TsbdConfig) -> UnlearnRecord:
    """Gradient ascent on clean cross-entropy, in place, until (balanced, by default) accuracy on
    ``data`` ≤ the threshold: θ ← θ − η·∇(−L_ce), in the one training loop
    (:func:`unbackdoor.training.ascent.run_ascent`, see :func:`unlearning_ascent`); at most
    ``unlearn_max_epochs``. Seeded batches and dropout."""
    require_clean_dataset(data, "the unlearning data")
    threshold = config.unlearn_acc_threshold if config.unlearn_acc_threshold is not None else 1 / clf.num_labels
    ascent = unlearning_ascent(config, threshold)
    report = run_ascent(clf, plan_ascent(data, data, ascent), ascent)
    checks = [(c["step"], c["forget_accuracy"]) for c in report["checks"]]
    record = UnlearnRecord(report["training"]["steps"], len(report["training"]["history"]), threshold, checks[0][1],
                           checks[-1][1], report["stop_reason"] == STOP_THRESHOLD, checks)
    log = logger.info if record.reached else logger.warning
    log("clean unlearning: accuracy %.4f -> %.4f after %d steps (%d epochs; threshold %.4f%s)", record.start_accuracy,
        record.final_accuracy, record.steps, record.epochs, threshold, "" if record.reached else ", NOT reached")
    return record


# --------------------------------------------------------------------------------------------------
# Stage 1, steps 2-4: NWC, global ranking, zeroing (``docs/methods/tsbd.md`` §3.3-3.6)
# --------------------------------------------------------------------------------------------------


def _owners(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {f"{m}.{p}" if m else p: module for m, module in model.named_modules()
            for p, _ in module.named_parameters(recurse=False)}


def target_weights(model: torch.nn.Module, layer_type: LayerType = "linear", include: Sequence[Extra] = (),
                   module_filter: str | None = None) -> list[str]:
    """Names of the weights whose rows (``linear``) or entries (``layernorm``) are TSBD's neurons.

    ``linear``: every ``nn.Linear`` weight in the encoder blocks, plus pooler/head Linear weights and
    word/position/token-type embedding matrices when ``include`` names them. ``layernorm``: the
    LayerNorm γ of the encoder blocks (plus the embedding LayerNorm with ``embeddings``). Biases are
    never targets. Model order.
    """
    groups, owners = parameter_groups(model), _owners(model)
    pattern = re.compile(module_filter) if module_filter is not None else None
    names = []
    for name, _ in model.named_parameters():
        if not name.endswith("weight") or (pattern is not None and not pattern.search(name)):
            continue
        module, group = owners[name], groups[name]
        if layer_type == "layernorm":
            wanted = group == "layernorm" and ("embeddings" in include or ".embeddings." not in f".{name}")
        elif group in ("encoder", "pooler", HEAD):
            wanted = isinstance(module, torch.nn.Linear) and (group == "encoder" or
                                                              ("pooler" if group == "pooler" else "head") in include)
        else:
            wanted = group == "embeddings" and "embeddings" in include and isinstance(module, torch.nn.Embedding)
        if wanted:
            names.append(name)
    if not names:
        raise ModelError(f"no TSBD target weights in {type(model).__name__} (layer_type={layer_type}, "
                         f"include={list(include)}, module_filter={module_filter!r}); GPT-2's Conv1D is not supported")
    return names


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A weight viewed as [neurons, subweights]: rows of a matrix, or one subweight per γ entry."""
    return tensor.reshape(-1, 1) if tensor.dim() == 1 else tensor.reshape(tensor.shape[0], -1)


def weight_changes(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor],
                   names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Δ_{k,j} = |W_after[k, j] − W_before[k, j]| for each named weight, as [neurons, subweights] (float32, CPU)."""
    return {n: as_rows((after[n].detach().float() - before[n].detach().float()).abs()).cpu() for n in names}


def neuron_weight_change(delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NWC_k = Σ_j Δ_{k,j}: each neuron's L1 weight change (float64), ``docs/methods/tsbd.md`` §3.3."""
    return {n: d.double().sum(dim=1) for n, d in delta.items()}


def normalise_nwc(nwc: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                  mode: Normalisation = "none") -> dict[str, torch.Tensor]:
    """Ranking scores from NWC (``docs/methods/tsbd.md`` §7): ``none`` raw [CODE]; ``per_fan_in`` NWC / fan-in;
    ``per_layer_zscore`` (NWC − mean) / std within each weight (std 0 → 0)."""
    if mode == "none":
        return dict(nwc)
    if mode == "per_fan_in":
        return {n: v / delta[n].shape[1] for n, v in nwc.items()}
    if mode == "per_layer_zscore":
        out = {}
        for n, v in nwc.items():
            std = v.std(unbiased=False) if v.numel() > 1 else v.new_zeros(())
            out[n] = (v - v.mean()) / std if std > 0 else torch.zeros_like(v)
        return out
    raise ConfigError(f"unknown nwc_normalization {mode!r}; choose none, per_fan_in or per_layer_zscore")


def select_neurons(scores: Mapping[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """The top ⌊n·K⌋ neurons (at least one) by score, pooled over all weights; row indices per weight.

    Ties keep model order (weight order, then row), from a stable descending sort (``docs/methods/tsbd.md`` §8.4).
    """
    names = list(scores)
    flat = torch.cat([scores[n].flatten() for n in names])
    k = max(1, math.floor(Fraction(repr(float(ratio))) * flat.numel()))
    if k == 1 and ratio * flat.numel() < 1:
        logger.warning("TSBD: n=%.3f of %d neurons is under one; choosing one neuron (``docs/methods/tsbd.md`` §8.5)", ratio, flat.numel())
    chosen = torch.sort(flat, descending=True, stable=True).indices[:k]
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        rows = chosen[(chosen >= start) & (chosen < start + size)] - start
        out[n] = torch.sort(rows).values
        start += size
    return out


def zeroing_masks(delta: Mapping[str, torch.Tensor], chosen: Mapping[str, torch.Tensor],
                  subweight_ratio: float) -> dict[str, torch.Tensor]:
    """Subweights to zero, as boolean [neurons, subweights] masks (``docs/methods/tsbd.md`` §3.6).

    S = all Δ of the chosen neurons, pooled; τ = the ⌊m·|S|⌋-th largest value of S; every chosen
    subweight with Δ ≥ τ is zeroed (ties at τ make the share slightly ≥ m, as the code).
    """
    pooled = torch.cat([delta[n][rows].flatten() for n, rows in chosen.items()])
    k = math.floor(Fraction(repr(float(subweight_ratio))) * pooled.numel())
    masks = {n: torch.zeros_like(d, dtype=torch.bool) for n, d in delta.items() if n in chosen}
    if k == 0:
        logger.warning("TSBD: m=%.3f of %d subweights is under one; nothing zeroed", subweight_ratio, pooled.numel())
        return masks
    tau = torch.kthvalue(pooled, pooled.numel() - k + 1).values
    for n, rows in chosen.items():
        masks[n][rows] = delta[n][rows] >= tau
    return masks


def apply_zeroing(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> int:
    """W[k, j] ← 0 where the mask is set, in place (the original model; ``docs/methods/tsbd.md`` §3.6, §8.12). Returns the count."""
    params = dict(model.named_parameters())
    count = 0
    with torch.no_grad():
        for name, mask in masks.items():
            p = params[name]
            p.masked_fill_(mask.reshape(p.shape).to(p.device), 0)
            count += int(mask.sum())
    return count


@dataclass
class NeuronScores:
    """Stage 1's ranking, computed once: |ΔW| per target weight, NWC and the ranking scores."""

    delta: dict[str, torch.Tensor]
    nwc: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    unlearning: UnlearnRecord

    @property
    def n_neurons(self) -> int:
        return sum(v.numel() for v in self.nwc.values())


def score_neurons(suspect: Classifier, fit: Dataset, config: TsbdConfig) -> NeuronScores:
    """Steps 1-2: unlearn a copy of the suspect on ``fit``, then NWC of every target neuron."""
    names = target_weights(suspect.model, config.layer_type, config.include, config.module_filter)
    # an fp32 island: NWC compares small weight changes, which bf16 matrix products would blur
    copy_clf = dataclasses.replace(suspect, model=copy.deepcopy(suspect.model), precision="fp32")
    record = clean_unlearn(copy_clf, fit, config)
    before, after = dict(suspect.model.named_parameters()), dict(copy_clf.model.named_parameters())
    delta = weight_changes(before, after, names)
    del copy_clf
    nwc = neuron_weight_change(delta)
    return NeuronScores(delta, nwc, normalise_nwc(nwc, delta, config.nwc_normalization), record)


def reinitialise_neurons(suspect: Classifier, scores: NeuronScores, neuron_ratio: float,
                         subweight_ratio: float) -> dict[str, Any]:
    """Steps 3-4 on ``suspect`` in place: choose the neurons, zero their top subweights; a summary."""
    chosen = select_neurons(scores.scores, neuron_ratio)
    masks = zeroing_masks(scores.delta, chosen, subweight_ratio)
    n_zeroed = apply_zeroing(suspect.model, masks)
    n_chosen = sum(len(r) for r in chosen.values())
    n_sub = sum(scores.delta[n].shape[1] * len(r) for n, r in chosen.items())
    logger.info("TSBD: zeroed %d of %d subweights of %d / %d neurons (n=%.3f, m=%.3f)", n_zeroed, n_sub, n_chosen,
                scores.n_neurons, neuron_ratio, subweight_ratio)
    return {"neuron_ratio": neuron_ratio, "n_neurons": scores.n_neurons, "n_chosen_neurons": n_chosen,
            "n_chosen_subweights": n_sub, "n_zeroed_subweights": n_zeroed,
            "chosen_by_weight": {n: len(r) for n, r in chosen.items() if len(r)}}


# --------------------------------------------------------------------------------------------------
# Stage 2: activeness-aware fine-tuning (``docs/methods/tsbd.md`` §4)
# --------------------------------------------------------------------------------------------------


def perturbation(grads: Sequence[torch.Tensor], radius: float,
                 mode: GradNormMode = "per_tensor") -> list[torch.Tensor]:
    """e = r·g/‖g‖: per tensor by its own norm (zero-norm tensors unperturbed, ``docs/methods/tsbd.md`` §8.2) or by the global norm."""
    if mode == "global":
        norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
        return [torch.zeros_like(g) if norm == 0 else g * (radius / norm) for g in grads]
    if mode != "per_tensor":
        raise ConfigError(f"unknown grad_norm_mode {mode!r}; choose per_tensor or global")
    out = []
    for g in grads:
        norm = g.float().norm()
        out.append(torch.zeros_like(g) if norm == 0 else g * (radius / norm))
    return out


class GradientNormPenalty(Callback):
    """The two-gradient rule (``docs/methods/tsbd.md`` §4): replace each gradient g₁ by (1 − α)·g₁ + α·∇L(θ + e; B).

    ``on_gradients``: save θ and g₁, step to θ′ = θ + r·g₁/‖g₁‖, forward/backward the same batch
    (task loss only; RNG forked so dropout masks elsewhere are unaffected), copy θ back bit for bit,
    combine. A perturbed forward in train mode, like the code. Counts the calls in ``n_calls``.
    """

    def __init__(self, alpha: float, radius: float, mode: GradNormMode = "per_tensor") -> None:
        self.alpha = alpha
        self.radius = radius
        self.mode = mode
        self.n_calls = 0

    def on_gradients(self, ctx: TrainContext, batch: dict[str, torch.Tensor]) -> None:
        params = [p for p in ctx.model.parameters() if p.grad is not None]
        if not params:
            return
        g1 = [p.grad.detach().clone() for p in params]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, perturbation(g1, self.radius, self.mode), strict=True):
                p.add_(e)
                p.grad = None
        with forked_rng(), compute_region(ctx.precision, ctx.config, ctx.accelerator):
            loss = ctx.wrapped_model(**batch).loss
            ctx.accelerator.backward(loss)
        with torch.no_grad():
            for p, theta, grad1 in zip(params, saved, g1, strict=True):
                p.copy_(theta)
                grad2 = p.grad if p.grad is not None else torch.zeros_like(grad1)
                p.grad = (1 - self.alpha) * grad1 + self.alpha * grad2
        self.n_calls += 1


def activeness_aware_finetune(clf: Classifier, clean: Dataset, config: TsbdConfig,
                              work_dir: Path | None = None) -> dict[str, Any]:
    """Stage 2: clean fine-tuning of all weights with :class:`GradientNormPenalty`; epoch on held-out data."""
    penalty = GradientNormPenalty(config.alpha, config.radius, config.grad_norm_mode)
    report = finetune_with_selection(clf, clean, config.train, holdout_fraction=config.holdout_fraction,
                                     seed=config.seed, callbacks=[penalty], work_dir=work_dir)
    return {**report, "alpha": config.alpha, "radius": config.radius, "grad_norm_mode": config.grad_norm_mode,
            "penalised_steps": penalty.n_calls}


# --------------------------------------------------------------------------------------------------
# Choosing n on held-out clean data (``docs/methods/tsbd.md`` §7)
# --------------------------------------------------------------------------------------------------


@dataclass
class RatioSearch:
    """The n search (largest n first) and the chosen candidate's state, reset and fine-tuning report."""

    search: Search[float]
    n_selection: int
    chosen_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    chosen_reset: dict[str, Any] | None = field(default=None, repr=False)
    chosen_finetune: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def chosen(self) -> float:
        return self.search.chosen

    def to_dict(self) -> dict[str, Any]:
        return {**self.search.record("neuron_ratio"), "n_selection": self.n_selection}


def _stage2_dir(work_dir: Path | None, config: TsbdConfig, ratio: float) -> Path | None:
    return None if work_dir is None else work_dir / f"stage2-{config_fingerprint(config.model_dump(), ratio)}"


def search_neuron_ratio(suspect: Classifier, clean: Dataset, scores: NeuronScores, config: TsbdConfig,
                        work_dir: Path | None = None) -> RatioSearch:
    """The largest grid n whose held-out clean accuracy after zeroing + Stage 2 is ≥ θ_bd's − tolerance
    (:func:`unbackdoor.selection.search_within_tolerance`, largest first; if none qualifies, the most
    accurate, ties → larger n). Only the clean held-out split is read. ``suspect`` is left at θ_bd;
    the chosen candidate's state is kept in the result."""
    require_clean_dataset(clean, "the neuron-ratio search's clean data")
    _, held_out = holdout_split(clean, config.holdout_fraction, config.seed)
    theta_bd = snapshot_state(suspect.model)
    tried: dict[float, tuple[dict[str, Any], dict[str, Any]]] = {}
    kept: dict[float, dict[str, torch.Tensor]] = {}

    def try_ratio(ratio: float) -> tuple[float, dict[str, Any]]:
        restore_state(suspect.model, theta_bd)
        reset = reinitialise_neurons(suspect, scores, ratio, config.subweight_ratio)
        ft = activeness_aware_finetune(suspect, clean, config, _stage2_dir(work_dir, config, ratio))
        tried[ratio] = (reset, ft)
        return float(ft["selection_accuracy"]), {"selected_epoch": ft["selected_epoch"],
                                                 "n_zeroed_subweights": reset["n_zeroed_subweights"]}

    def keep(ratio: float) -> None:
        kept.clear()
        kept[ratio] = snapshot_state(suspect.model)

    reference = evaluate_accuracy(suspect, held_out)
    search = search_within_tolerance(sorted(config.ratio_grid, reverse=True), try_ratio, reference, config.tolerance,
                                     on_choice=keep, label="n search")
    restore_state(suspect.model, theta_bd)
    reset, ft = tried[search.chosen]
    return RatioSearch(search, len(held_out), kept[search.chosen], reset, ft)


# --------------------------------------------------------------------------------------------------
# The defence
# --------------------------------------------------------------------------------------------------


def deviations(config: TsbdConfig, num_labels: int) -> list[str]:
    """The settings in effect that differ from the official code's (``docs/methods/tsbd.md`` §5, §8.13), for the model card."""
    out = []
    if config.unlearn_optimizer != "sgd" or config.unlearn_lr != 1e-4 or config.unlearn_momentum != 0.9:
        out.append(f"unlearning {config.unlearn_optimizer} lr {config.unlearn_lr:g} (code: SGD lr 1e-4, momentum 0.9)")
    threshold = config.unlearn_acc_threshold if config.unlearn_acc_threshold is not None else 1 / num_labels
    if threshold != 0.10:
        out.append(f"unlearning stops at clean accuracy <= {threshold:.4g} (code: 0.10)")
    if config.unlearn_check_every:
        out.append(f"threshold also checked every {config.unlearn_check_every} step(s) (code: epoch ends)")
    if config.unlearn_batch_size != 256 or config.train.batch_size != 256:
        out.append(f"batch {config.unlearn_batch_size} / {config.train.batch_size} (code: 256)")
    extra = f" + {'/'.join(config.include)}" if config.include else ""
    only = f" matching {config.module_filter!r}" if config.module_filter else ""
    out.append(f"neurons: {config.layer_type} rows of the encoder{extra}{only} (code: conv channels)")
    if config.nwc_normalization != "none":
        out.append(f"NWC normalisation {config.nwc_normalization} (code: none)")
    if config.ratio_mode == "search":
        out.append(f"n chosen on held-out clean data within {config.tolerance} (code: sweeps, chooses none)")
    if config.grad_norm_mode != "per_tensor":
        out.append("stage 2 perturbation by the global gradient norm (code: per tensor)")
    t = config.train
    out.append(f"stage 2: AdamW lr {t.learning_rate:g}, linear decay, {t.epochs} epochs, epoch chosen on held-out "
               "clean data (code: SGD lr 0.01, momentum 0.9, no schedule, 21 passes, no choice)")
    return out


@PURIFY_DEFENSES.register("tsbd")
class Tsbd(PurifyDefense[TsbdConfig]):
    """TSBD: zero the top subweights of the neurons clean unlearning moves most, then fine-tune with
    a gradient-norm penalty (``docs/methods/tsbd.md``). Needs no base model."""

    name = "tsbd"
    config_class = TsbdConfig
    needs_base = False

    def _purify(self, inputs: PurifyInputs, work_dir: Path | None) -> PurifyResult:
        cfg, clf = self.config, inputs.suspect
        fit, _ = holdout_split(inputs.clean, cfg.holdout_fraction, cfg.seed)
        scores = score_neurons(clf, fit, cfg)  # stage 1, steps 1-2
        search, ratio, ft = None, cfg.neuron_ratio, None
        if cfg.ratio_mode == "search":
            search = search_neuron_ratio(clf, inputs.clean, scores, cfg, work_dir)
            ratio = search.chosen
            assert search.chosen_state is not None and search.chosen_reset is not None
            restore_state(clf.model, search.chosen_state)
            reset, ft = search.chosen_reset, search.chosen_finetune
        else:
            reset = reinitialise_neurons(clf, scores, ratio, cfg.subweight_ratio)  # stage 1, steps 3-4
            if cfg.finetune:
                ft = activeness_aware_finetune(clf, inputs.clean, cfg, _stage2_dir(work_dir, cfg, ratio))  # stage 2
        report = {
            "method": self.name,
            "neuron_ratio": ratio,
            "ratio_mode": cfg.ratio_mode,
            "ratio_search": search.to_dict() if search is not None else None,
            "subweight_ratio": cfg.subweight_ratio,
            "layer_type": cfg.layer_type,
            "include": list(cfg.include),
            "nwc_normalization": cfg.nwc_normalization,
            "unlearning": scores.unlearning.to_dict(),
            "unlearn_steps": scores.unlearning.steps,
            "unlearn_accuracy": scores.unlearning.final_accuracy,
            "n_chosen_neurons": reset["n_chosen_neurons"],
            "n_zeroed_subweights": reset["n_zeroed_subweights"],
            "reset": reset,
            "alpha": cfg.alpha,
            "finetune": ft,
            "deviations_from_code": deviations(cfg, clf.num_labels),
        }
        return PurifyResult(clf, report)
