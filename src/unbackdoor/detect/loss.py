"""The ``loss`` detector: per-row loss of a briefly trained head on frozen features [RECON].

A baseline for :mod:`.reweight` with the same features (:mod:`.features`) and the same head. A
linear head is trained by full-batch gradient descent from zero, then each training row's
cross-entropy under it is its suspicion score (higher = more suspicious):

* ``fit_on=rows`` (default): ``steps`` steps on the training rows themselves; stopped early, the
  head follows the majority of rows, so rows whose label disagrees with their features (a
  dirty-label poisoned row looks like a mislabelled row in a clean encoder's feature space) keep a
  high loss. Trained long, it memorises them (the score loses its meaning): keep ``steps`` small.
* ``fit_on=clean``: the head is trained on the clean set only; the score is then how much a row's
  label disagrees with a clean classifier.

Neither catches clean-label attacks (their labels agree with the content), nor a trigger the
frozen encoder cannot see.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.detect.base import DETECTORS, DetectInputs, Detector, Scores
from unbackdoor.detect.features import FeatureData, Pooling, feature_data

logger = logging.getLogger(__name__)


class LossConfig(StrictConfig):
    """Options of the loss baseline (all ours [RECON])."""

    fit_on: Literal["rows", "clean"] = Field("rows", description="train the head on the training rows "
                                             "(briefly) or on the clean set")
    steps: int = Field(10, ge=1, description="full-batch gradient steps of the head")
    lr: float = Field(5.0, gt=0, description="step size (features have norm ≈ 1)")
    weight_decay: float = Field(1e-3, ge=0, description="L2 penalty on the head's weights")
    pooling: Pooling = Field("mean", description="frozen feature: mean over tokens or the first (CLS) token")
    feature_batch_size: int = Field(64, ge=1, description="rows per forward pass when computing features")


def fit_head(x: torch.Tensor, y: torch.Tensor, num_labels: int, steps: int, lr: float,
             weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head (W, b) by ``steps`` full-batch gradient-descent steps from zero."""
    weight = torch.zeros(num_labels, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_labels, requires_grad=True)
    for _ in range(steps):
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * weight_decay * (weight * weight).sum()
        gw, gb = torch.autograd.grad(loss, (weight, bias))
        with torch.no_grad():
            weight -= lr * gw
            bias -= lr * gb
    return weight.detach(), bias.detach()


def row_losses(data: FeatureData, cfg: LossConfig) -> torch.Tensor:
    """Each training row's cross-entropy under the head trained as ``cfg`` says."""
    x, y = (data.x, data.y) if cfg.fit_on == "rows" else (data.clean_x, data.clean_y)
    weight, bias = fit_head(x, y, data.num_labels, cfg.steps, cfg.lr, cfg.weight_decay)
    return F.cross_entropy(data.x @ weight.T + bias, data.y, reduction="none")


@DETECTORS.register("loss")
class LossDetector(Detector[LossConfig]):
    """Rows with a high loss under a briefly trained head on frozen features are suspected."""

    name = "loss"
    config_class = LossConfig

    def _scores(self, inputs: DetectInputs) -> Scores:
        cfg = self.config
        data = feature_data(inputs, cfg.pooling, cfg.feature_batch_size)
        losses = row_losses(data, cfg)
        d, c = data.x.shape[1], data.num_labels
        report: dict[str, Any] = {
            "trained": {"encoder": f"{inputs.encoder.source or 'encoder'} (frozen; {cfg.pooling} pooling)",
                        "head": f"linear W ({c}x{d}) + b ({c}), {cfg.steps} steps on the "
                                f"{'training rows' if cfg.fit_on == 'rows' else 'clean set'}"},
            "n_clean": len(inputs.clean),
            "loss": {"mean": float(losses.mean()), "max": float(losses.max())},
        }
        return Scores(losses, report)
