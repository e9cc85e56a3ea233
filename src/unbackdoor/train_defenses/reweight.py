"""``unbackdoor train --defense reweight``: learn per-row weights by multilevel optimisation, then
train the full model with them (``docs/methods/multilevel.md`` §3-4).

Steps of :meth:`ReweightDefense._fit`:

1. [RECON] split the clean dev set: a share for level 1 of the reweighting (the defender's clean
   set), the rest held out for epoch selection (integrity rule 1: selection on data the method did
   not fit);
2. (§2-3) learn one weight per training row on frozen features of the model to be trained (the
   clean pre-trained base, before any training): :class:`~unbackdoor.detect.reweight.ReweightDetector`;
3. (§3 last point) train every parameter with the one loop, either
   ``use=weights``: each row's loss × its weight (weights rescaled to mean 1), or
   ``use=drop``: the rows the weights flag (lowest weights, at ``drop_rate`` or ``drop_threshold``
   on 1 − w) removed, the rest trained on normally;
4. keep the epoch with the best accuracy on the held-out clean rows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset
from unbackdoor.detect.base import DetectInputs, FlagRule, flag_indices
from unbackdoor.detect.reweight import ReweightConfig, ReweightDetector
from unbackdoor.errors import DataError
from unbackdoor.models.loading import Classifier
from unbackdoor.training.callbacks import Callback
from unbackdoor.training.config import TrainConfig, victim_train_config
from unbackdoor.train_defenses.base import TRAIN_DEFENSES, TrainDefense, TrainDefenseResult, TrainInputs
from unbackdoor.training.config import merge_train
from unbackdoor.training.loop import train_classifier

logger = logging.getLogger(__name__)


class ReweightDefenseConfig(ReweightConfig):
    """The reweighting options (:class:`ReweightConfig`) and how the weights are used [RECON]."""

    use: Literal["weights", "drop"] = Field("weights", description="train with the learned per-row weights, "
                                            "or drop the flagged rows and train normally on the rest")
    drop_rate: float = Field(0.1, gt=0, lt=1, description="use=drop: share of rows dropped (lowest weights)")
    drop_threshold: float | None = Field(None, gt=0, le=1, description="use=drop: instead of drop_rate, drop "
                                         "every row with 1 - w >= this")
    selection_fraction: float = Field(0.5, gt=0, lt=1, description="share of the clean dev set held out for "
                                      "epoch selection; the rest is the reweighting's clean set")
    train: TrainConfig | None = Field(None, description="training-loop settings; keys given override the victim "
                                      "defaults (3 epochs, batch 32, lr 1e-4)")

    def reweight_config(self) -> ReweightConfig:
        return ReweightConfig(**self.model_dump(include=set(ReweightConfig.model_fields)))

    def drop_rule(self) -> FlagRule:
        if self.drop_threshold is not None:
            return FlagRule(threshold=self.drop_threshold)
        return FlagRule(rate=self.drop_rate)


@TRAIN_DEFENSES.register("reweight")
class ReweightDefense(TrainDefense[ReweightDefenseConfig]):
    """Multilevel per-row reweighting on frozen features, then full fine-tuning with the weights."""

    name = "reweight"
    config_class = ReweightDefenseConfig

    def train_config(self, clf: Classifier) -> TrainConfig:
        return merge_train(victim_train_config(), self.config.train)

    def check(self, inputs: TrainInputs) -> None:
        if len(inputs.dev) < 4:
            raise DataError(f"{inputs.dev.name}: the clean dev set has {len(inputs.dev)} rows; reweighting needs "
                            "at least 4 (a clean set for the weights and held-out rows for selection)")

    def _fit(self, inputs: TrainInputs, work_dir: Path | None, observers: list[Callback]) -> TrainDefenseResult:
        cfg, train = self.config, self.train_config(inputs.model)
        # step 1: the defender's clean set and the held-out selection rows, both from the clean dev set
        clean, selection = holdout_split(inputs.dev, cfg.selection_fraction, cfg.seed)
        # step 2: weights on frozen features of the model before training
        result, report = ReweightDetector(cfg.reweight_config()).learn(DetectInputs(inputs.rows, clean, inputs.model))
        weights = result.weights
        # step 3: the full model, with the weights or without the flagged rows
        rows, sample_weights, dropped = self._training_rows(inputs.rows, weights, result.last_gradient)
        fingerprint = {"defense": self.name, "config": cfg.model_dump(mode="json"), "clean": clean.ids}
        training = train_classifier(inputs.model, rows, train, dev=selection, callbacks=observers, work_dir=work_dir,
                                    fingerprint=fingerprint, sample_weights=sample_weights)
        report = {
            "method": self.name, "config": cfg.model_dump(mode="json"), "train": train.model_dump(), **report,
            "use": cfg.use, "n_clean": len(clean), "n_selection": len(selection), "n_dropped": len(dropped),
            "dropped_ids": dropped, "selected_epoch": training.best_epoch,
            "selection_accuracy": training.best_dev_accuracy,
        }
        return TrainDefenseResult(inputs.model, training, report)

    def _training_rows(self, rows: Dataset, weights: torch.Tensor,
                       tiebreak: torch.Tensor) -> tuple[Dataset, list[float] | None, list[str]]:
        """Step 3: (rows trained on, their sample weights or None, ids dropped)."""
        if self.config.use == "weights":
            if float(weights.sum()) <= 0:
                raise DataError("reweighting gave every training row weight 0; nothing to train on "
                                "(lower outer_lr or epochs)")
            return rows, (weights / weights.mean()).tolist(), []
        ids = rows.ids
        dropped = [ids[i] for i in flag_indices(1.0 - weights, self.config.drop_rule(), tiebreak)]
        if len(dropped) == len(rows):
            raise DataError("the drop rule flags every training row; raise drop_threshold or lower drop_rate")
        logger.info("reweight: dropping %d of %d training rows", len(dropped), len(rows))
        return rows.without(dropped, f"{rows.name}[reweight-kept]"), None, dropped
