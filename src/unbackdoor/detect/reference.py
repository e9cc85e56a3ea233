"""The ``reference`` detector: rows whose label a clean reference classifier rejects [OURS; the idea is
confident learning's, Northcutt et al., "Confident Learning: Estimating Uncertainty in Dataset Labels",
JAIR 2021, with a classifier that never saw a training row].

A dirty-label attack takes texts of the other labels, adds its trigger and gives them the target label;
a style or a syntactic template changes the wording but mostly keeps the meaning. To a classifier trained
only on the clean set, such a row reads as its original label, so the label it carries looks wrong.

1. **Reference**: fit a classifier on the clean set only (``model``): ``finetuned``, a copy of the encoder
   fine-tuned on it with the victim recipe (last epoch kept, as the field's filters keep theirs), or
   ``frozen``, a logistic regression on the frozen encoder's mean-pooled sentence features (its L2
   penalty by 5-fold accuracy on the clean set; seconds).
2. **Score** each training row by how far the reference prefers another label over the given one:
   ``max_{y' != y} log p(y' | x) - log p(y | x)`` (higher = more suspicious; > 0 where the reference
   predicts another label).
3. **Threshold** (``margin``, reported as ``threshold`` so :mod:`unbackdoor.train_defenses.auto`'s
   calibrated rule uses it): the rows scoring above it. Not calibrated on the clean set, unlike zscore's
   and contrast's cuts: the clean rows the reference gets wrong (the task's hard and mislabelled rows) are
   as far from their label as a poisoned row, so a null drawn from clean rows leaves nothing to select
   (docs/results/auto.md: an FDR cut on a cross-fitted reference selected nothing even on OLID's AddSent).
   The rule drops them too, as the price of the poisoned rows: about the reference's error rate of
   the clean rows.
4. **Gate** (``min_accuracy``, off by default [OURS]): the reference is only as good as its accuracy. With
   ``min_accuracy`` > 0 the fine-tuned reference learns from 80 % of the clean set (stratified, seeded) and
   is scored on the other 20 % (the frozen one: its 5-fold accuracy); below ``min_accuracy`` it drops
   nothing (the threshold becomes the highest score). 0.75 was fixed before its development round.

Measured in train auto on the development grids (docs/results/reference_dev/, two rounds, rules written
before the runs; neither passed, so it is not among auto's default detectors): on OpenBackdoor's StyleBkd
SST-2 rows re-tokenised ASR -9.4 ungated, -6.5 gated; on QNLI, where MiniLM reaches about 65-70 % from
1,000 rows, the ungated reference dropped 200-250 clean rows per seed after zscore had found every
poisoned one (ASR +7.3 / +7.8); gated, QNLI was untouched but OLID's BadNets rose 1.7 points.

Cannot see a clean-label attack (its rows' labels fit their text) nor a dirty-label row whose
triggered text the reference also reads as the target.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.data.sampling import holdout_split
from unbackdoor.detect.base import DETECTORS, DetectInputs, Detector, Scores
from unbackdoor.detect.features import clean_classifier, feature_data
from unbackdoor.detect.finetuned import TRAIN_DESCRIPTION, fine_tuned_copy
from unbackdoor.inference import predict_logits
from unbackdoor.training.config import TrainConfig, merge_train, victim_train_config

logger = logging.getLogger(__name__)

HELD_OUT = 0.2  # min_accuracy > 0, model=finetuned: the share of the clean set held out to measure the reference


class ReferenceConfig(StrictConfig):
    """Options of the clean-reference detector (all [OURS])."""

    model: Literal["finetuned", "frozen"] = Field(
        "finetuned", description="the reference: the encoder fine-tuned on the clean set (victim recipe, last epoch), "
        "or a logistic regression on its frozen mean-pooled features")
    margin: float = Field(0.0, ge=0, description="flag rows whose best other label beats the given one by more than "
                          "this (log-probability); 0: every row the reference labels otherwise")
    min_accuracy: float = Field(0.0, ge=0, le=1, description="gate: drop nothing when the reference's accuracy "
                                "on held-out clean rows (finetuned: 20 % held out; frozen: 5-fold) is below this; "
                                "0: no gate (the finetuned reference then learns from every clean row). It sets the threshold the "
                                "detector reports (train auto's cut); a rate or threshold given to detect still flags")
    train: TrainConfig | None = Field(None, description=f"model=finetuned: the {TRAIN_DESCRIPTION}")
    feature_batch_size: int = Field(64, ge=1, description="model=frozen: rows per forward pass")

    def train_config(self) -> TrainConfig:
        return merge_train(victim_train_config(), self.train)


def rejection_scores(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Step 2: ``max_{y' != y} log p(y') - log p(y)`` per row."""
    given = log_probs.gather(1, labels[:, None]).squeeze(1)
    others = log_probs.scatter(1, labels[:, None], float("-inf")).max(dim=1).values
    return others - given


def _finetuned_log_probs(inputs: DetectInputs, cfg: ReferenceConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    train = cfg.train_config()
    fit, held = (holdout_split(inputs.clean, HELD_OUT, train.seed) if cfg.min_accuracy > 0
                 else (inputs.clean, None))
    clf, result = fine_tuned_copy(inputs.encoder, fit, train)
    logits = torch.from_numpy(np.asarray(predict_logits(clf, inputs.rows.examples), dtype=np.float32))
    record: dict[str, Any] = {
        "trained": f"copy of {inputs.encoder.source or 'the encoder'} fine-tuned on {len(fit)} of the "
                   f"{len(inputs.clean)} clean rows (last epoch)",
        "train": train.model_dump(), "steps": result.steps}
    if held is not None:
        predicted = np.asarray(predict_logits(clf, held.examples)).argmax(1)
        record["held_out_accuracy"] = float((predicted == np.asarray(held.labels)).mean())
        record["n_held_out"] = len(held)
    return torch.log_softmax(logits, dim=1), record


def _frozen_log_probs(inputs: DetectInputs, cfg: ReferenceConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    data = feature_data(inputs, "mean", cfg.feature_batch_size)
    weight, bias, l2, accuracy = clean_classifier(data.clean_x, data.clean_y, data.num_labels)
    return torch.log_softmax(data.x @ weight.T + bias, dim=1), {
        "trained": f"logistic regression on the frozen {inputs.encoder.source or 'encoder'}'s mean-pooled features "
                   f"of the {len(inputs.clean)} clean rows",
        "l2": l2, "held_out_accuracy": accuracy, "n_held_out": len(inputs.clean)}


@DETECTORS.register("reference")
class ReferenceDetector(Detector[ReferenceConfig]):
    """Rows whose label a classifier trained on the clean set alone rejects are suspected."""

    name = "reference"
    config_class = ReferenceConfig

    def _scores(self, inputs: DetectInputs) -> Scores:
        cfg = self.config
        fit = _finetuned_log_probs if cfg.model == "finetuned" else _frozen_log_probs
        log_probs, record = fit(inputs, cfg)  # step 1
        scores = rejection_scores(log_probs, torch.tensor(inputs.rows.labels))  # step 2
        rejected = int((scores > cfg.margin).sum())
        gated = cfg.min_accuracy > 0 and record["held_out_accuracy"] < cfg.min_accuracy  # step 4
        threshold = float(scores.max()) if gated else cfg.margin  # step 3 (gated: no row above it)
        logger.info("reference (%s): rejects the label of %d of %d rows (margin %g)%s", cfg.model, rejected,
                    len(scores), cfg.margin, f"; held-out accuracy {record['held_out_accuracy']:.4f} < "
                    f"{cfg.min_accuracy}: drops nothing" if gated else "")
        report = {**record, "n_clean": len(inputs.clean), "threshold": threshold, "gated": gated,
                  "n_rejected": rejected, "share_rejected": rejected / max(1, len(scores))}
        return Scores(scores, report)
