"""Retraining baseline (``lya.md`` §8): fine-tune the clean pre-trained base on the training rows
minus the forget set, with the victim's recipe, selecting the epoch on the retain set.

Forget rows are matched to training rows **by content**, since a detector's output file need not
keep the training rows' ids: by text (and sentence pair), lower-cased with whitespace collapsed,
and, with ``match=text+label`` (default), the label too. Every training row that matches a forget
row is dropped (duplicates included). A forget row with no match is reported (and logged); if none
matches, retraining would just repeat the victim, so that is an error.

With a 100% forget set and dirty-label poisoning this is the never-poisoned model: an upper
reference more than a practical baseline. ``inputs.base`` is trained in place and returned.
Retain rows may also be training rows (both come from the same train split); then selection
is on rows the model trains on. The report counts them (``n_selection_in_training``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.data.sampling import normalise_text
from unbackdoor.data.types import Dataset, Example
from unbackdoor.errors import DataError
from unbackdoor.training.config import TrainConfig, victim_train_config
from unbackdoor.training.loop import check_trainable, train_classifier
from unbackdoor.unlearn.base import UNLEARN_METHODS, UnlearnInputs, UnlearnMethod, UnlearnResult

logger = logging.getLogger(__name__)

MatchRule = Literal["text+label", "text"]


class RetrainConfig(StrictConfig):
    """Retraining from the clean base; the recipe defaults to the victim's (ours, [RECON])."""

    train: TrainConfig = Field(default_factory=victim_train_config, description="training-loop settings "
                               "(default: the victim recipe, 3 epochs, batch 32, lr 1e-4)")
    match: MatchRule = Field("text+label", description="how forget rows are found among the training rows: "
                             "normalised text and label, or normalised text only")


def _key(example: Example, match: MatchRule) -> tuple[str, int | None]:
    return normalise_text(example), example.label if match == "text+label" else None


def remove_forget_rows(train_rows: Dataset, forget: Dataset, match: MatchRule) -> tuple[Dataset, dict[str, Any]]:
    """``train_rows`` without every row that matches a forget row, and a count of what matched."""
    forget_keys = {_key(e, match) for e in forget}
    train_keys = {_key(e, match) for e in train_rows}
    kept = [e for e in train_rows if _key(e, match) not in forget_keys]
    n_unmatched = sum(1 for e in forget if _key(e, match) not in train_keys)
    if n_unmatched == len(forget):
        raise DataError(f"none of the {len(forget)} forget rows is among the {len(train_rows)} training rows "
                        f"(matched by {match}); is --train-data the data the suspect was trained on?")
    if not kept:
        raise DataError("every training row matches a forget row; nothing is left to retrain on")
    if n_unmatched:
        logger.warning("%d of %d forget rows match no training row (by %s)", n_unmatched, len(forget), match)
    report = {"match": match, "n_train_rows": len(train_rows), "n_removed": len(train_rows) - len(kept),
              "n_forget": len(forget), "n_forget_unmatched": n_unmatched}
    return train_rows.replace(kept, f"{train_rows.name}[minus forget]"), report


@UNLEARN_METHODS.register("retrain")
class Retrain(UnlearnMethod[RetrainConfig]):
    """Train the clean base on the training rows minus the forget set; select on the retain set."""

    name = "retrain"
    config_class = RetrainConfig
    needs_base = True
    needs_train_rows = True

    def _unlearn(self, inputs: UnlearnInputs, work_dir: Path | None) -> UnlearnResult:
        assert inputs.base is not None and inputs.train_rows is not None  # checked by unlearn()
        rows, match_report = remove_forget_rows(inputs.train_rows, inputs.forget, self.config.match)
        clf = inputs.base
        check_trainable(clf, rows)
        in_training = {normalise_text(e) for e in rows}
        overlap = sum(1 for e in inputs.retain if normalise_text(e) in in_training)
        result = train_classifier(clf, rows, self.config.train, dev=inputs.retain, work_dir=work_dir)
        report = {"method": self.name, **match_report, "n_trained_on": len(rows), "n_selection": len(inputs.retain),
                  "n_selection_in_training": overlap, "selected_epoch": result.best_epoch,
                  "selection_accuracy": result.best_dev_accuracy, "training": result.to_dict()}
        return UnlearnResult(clf, report)
