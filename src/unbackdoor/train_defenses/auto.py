"""``unbackdoor train --defense auto``: find the training rows that are easy to fit, then train from the
base without them [OURS].

What the defender has here: the training rows (no flags), the clean pre-trained base and a clean dev
set. Nothing about the attack. Steps:

1. **Score** every training row with a registered detector on a copy of the base (default
   ``isolation``: ABL's early-loss isolation, where the rows a trigger makes easy to fit keep
   falling below γ while clean rows are held near it; :mod:`unbackdoor.detect.isolation`).
2. **Choose the rows to drop** from the scores alone (``drop``):
   ``gap`` [OURS]: among the ``max_drop`` most suspicious rows, cut where the sorted scores jump
   most, if the jump is large for these scores (a separate group: a trigger easier to fit than the
   task gives one, and the cut falls at its edge), else drop only ``min_drop``; ``rate``: the
   ``rate`` most suspicious rows. Every choice is logged.
3. **Retrain** the base on the remaining rows with the victim recipe, the epoch chosen on clean dev
   accuracy (the rows the detector trained on are never used for selection).

The report (``unbackdoor.json``'s ``defense``) records the detector's report, the drop rule, the
score at the cut, how many rows were dropped and which.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from unbackdoor.config import StrictConfig
from unbackdoor.detect.base import DetectInputs, FlagRule, build_detector
from unbackdoor.models.loading import Classifier
from unbackdoor.models.surgery import restore_state, snapshot_state
from unbackdoor.train_defenses.base import TRAIN_DEFENSES, TrainDefense, TrainDefenseResult, TrainInputs
from unbackdoor.training.callbacks import Callback
from unbackdoor.training.config import TrainConfig, merge_train, victim_train_config
from unbackdoor.training.loop import train_classifier

logger = logging.getLogger(__name__)


class AutoTrainConfig(StrictConfig):
    """Options of ``auto`` (all [OURS]; defaults chosen on the development grid
    ``benchmarks/dev_olid.yaml``, see ``docs/results/auto.md``)."""

    detector: str = Field("isolation", description="detector scoring the rows (unbackdoor.detect.DETECTORS)")
    detector_params: dict[str, Any] = Field(default_factory=dict, description="the detector's options")
    drop: Literal["gap", "rate"] = Field("gap", description="gap: cut the sorted scores where they jump most among "
                                         "the max_drop most suspicious rows; rate: drop the rate most suspicious")
    rate: float = Field(0.2, gt=0, lt=1, description="drop=rate: share of rows dropped")
    max_drop: float = Field(0.35, gt=0, lt=1, description="drop=gap: never drop more than this share of rows")
    min_drop: float = Field(0.01, ge=0, lt=1, description="drop=gap: drop at least this share of rows (also what is "
                            "dropped when no separate group shows)")
    significance: float = Field(0.25, gt=0, description="drop=gap: a jump counts as a group's edge when it is at "
                                "least this many interquartile ranges of the scores")
    train: TrainConfig | None = Field(None, description="the retraining; keys given override the victim defaults "
                                      "(3 epochs, batch 32, lr 1e-4)")

    @model_validator(mode="after")
    def _detector(self) -> AutoTrainConfig:
        build_detector(self.detector, self.detector_params)  # an unknown detector or option fails here
        if self.min_drop > self.max_drop:
            raise ValueError("min_drop must not exceed max_drop")
        return self


def gap_cut(scores: torch.Tensor, min_share: float, max_share: float, significance: float = 0.25) -> tuple[int, float]:
    """How many of the most suspicious rows to drop: where consecutive sorted scores jump most among the
    first ``max_share`` of rows, if that jump is at least ``significance`` × the scores' interquartile
    range (a separate group); else ``min_share`` of the rows (no group: keep almost everything).
    Returns (count, score at the cut)."""
    ordered = torch.sort(scores.double(), descending=True).values
    n = len(ordered)
    lo, hi = max(1, int(min_share * n)), max(1, min(n - 1, int(max_share * n)))
    if hi > lo:
        gaps = ordered[lo - 1:hi] - ordered[lo:hi + 1]  # gaps[j] separates rank lo + j from the next
        j = int(torch.argmax(gaps))
        spread = float(torch.quantile(ordered, 0.75) - torch.quantile(ordered, 0.25))
        if float(gaps[j]) >= significance * spread and float(gaps[j]) > 0:
            k = lo + j
            return k, float(ordered[k - 1])
    return lo, float(ordered[lo - 1])


@TRAIN_DEFENSES.register("auto")
class AutoTrain(TrainDefense[AutoTrainConfig]):
    """Score the rows, drop the easily fitted group, retrain from the base on the rest."""

    name = "auto"
    config_class = AutoTrainConfig

    def train_config(self, clf: Classifier) -> TrainConfig:
        return merge_train(victim_train_config(), self.config.train)

    def _fit(self, inputs: TrainInputs, work_dir: Path | None, observers: list[Callback]) -> TrainDefenseResult:
        cfg = self.config
        start = snapshot_state(inputs.model.model)  # the base (with its seeded head), kept for step 3
        detector = build_detector(cfg.detector, cfg.detector_params)
        rule = FlagRule(rate=cfg.rate if cfg.drop == "rate" else cfg.max_drop)  # under gap, the cut below is ours
        detection = detector.detect(DetectInputs(inputs.rows, inputs.dev, inputs.model), rule)  # step 1
        k, cut = (len(detection.flagged_ids), None) if cfg.drop == "rate" else \
            gap_cut(detection.scores, cfg.min_drop, cfg.max_drop, cfg.significance)  # step 2
        order = sorted(range(len(inputs.rows)), key=lambda i: -float(detection.scores[i]))
        dropped = [inputs.rows.examples[i].id for i in order[:k]]
        kept = inputs.rows.without(dropped, f"{inputs.rows.name}[auto: {k} rows dropped]")
        logger.info("auto: %s scored %d rows; dropping %d (%s%s); retraining on %d", cfg.detector, len(inputs.rows), k,
                    cfg.drop, "" if cut is None else f", cut at score {cut:.4g}", len(kept))
        restore_state(inputs.model.model, start)  # step 3: from the base, on the rows kept
        train = self.train_config(inputs.model)
        training = train_classifier(inputs.model, kept, train, dev=inputs.dev, callbacks=observers, work_dir=work_dir,
                                    fingerprint={"defense": self.name, "config": cfg.model_dump(mode="json"),
                                                 "dropped": dropped})
        report = {"method": self.name, "config": cfg.model_dump(mode="json"), "train": train.model_dump(),
                  "choices": {"detector": cfg.detector, "drop_rule": cfg.drop, "n_dropped": k,
                              "share_dropped": k / len(inputs.rows), "score_at_cut": cut},
                  "detector": detection.report, "dropped_ids": dropped, "n_trained": len(kept),
                  "selected_epoch": training.best_epoch, "selection_accuracy": training.best_dev_accuracy}
        return TrainDefenseResult(inputs.model, training, report)
