"""``train --defense clean-only``: ignore the training rows, fine-tune the base on the clean set alone.

The baseline a defender always has [OURS as a named defence; "train on the trusted data only" is the
reference point of the data-filtering literature, rarely reported by the backdoor toolkits]: whatever the
training set holds, a model that never saw it cannot have learnt its backdoor. Its ASR is therefore a floor
(of a model trained on fewer rows), and its clean accuracy is the bar a train-time defence must clear:
a defence that uses the poisoned rows is only worth running where it keeps more clean accuracy than this
at an ASR as low. Steps:

1. split the clean dev set with :func:`~unbackdoor.train_defenses.base.clean_split`: ``clean_rows`` of it
   (stratified, seeded by the training seed) is trained on, the rest selects the epoch; with the same seed
   and share these are exactly the clean rows ``auto`` adds to the kept rows (its step 3a), so the two are
   comparable row for row;
2. fine-tune the base on those rows with the small-clean-set recipe of the purify defences
   (:func:`~unbackdoor.training.config.small_set_train_config`: 10 epochs, batch 16, lr 1e-4, warm-up
   0.1), the epoch chosen on the held-out clean rows.

Our choices: the share 0.5 is ``auto``'s ``clean_rows`` default (chosen on its development grids,
docs/results/auto.md), the recipe is the existing one for a few hundred clean rows; nothing was tuned
for this defence. The training rows are read for nothing but their count (the report's ``n_rows_ignored``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.data.types import require_several_labels
from unbackdoor.models.loading import Classifier
from unbackdoor.train_defenses.base import TRAIN_DEFENSES, TrainDefense, TrainDefenseResult, TrainInputs, clean_split
from unbackdoor.training.callbacks import Callback
from unbackdoor.training.config import TrainConfig, merge_train, small_set_train_config
from unbackdoor.training.loop import train_classifier

logger = logging.getLogger(__name__)


class CleanOnlyConfig(StrictConfig):
    """Options of ``clean-only`` (all [OURS]; module docstring)."""

    clean_rows: float = Field(0.5, gt=0, lt=1, description="share of the clean dev set trained on (stratified, "
                              "seeded); the rest selects the epoch. 0.5 = auto's clean_rows, so both train on the "
                              "same clean rows")
    train: TrainConfig | None = Field(None, description="training-loop settings; keys given override the small "
                                      "clean-set recipe (10 epochs, batch 16, lr 1e-4, warm-up 0.1)")


@TRAIN_DEFENSES.register("clean-only")
class CleanOnly(TrainDefense[CleanOnlyConfig]):
    """The baseline that never reads the training rows: the base fine-tuned on part of the clean dev set."""

    name = "clean-only"
    config_class = CleanOnlyConfig

    def train_config(self, clf: Classifier) -> TrainConfig:
        return merge_train(small_set_train_config(), self.config.train)

    def _fit(self, inputs: TrainInputs, work_dir: Path | None, observers: list[Callback]) -> TrainDefenseResult:
        train = self.train_config(inputs.model)
        added, select = clean_split(inputs.dev, self.config.clean_rows, train.seed)  # step 1
        rows = inputs.dev.replace(added, f"{inputs.dev.name}[clean-only: {len(added)} rows]")
        require_several_labels(rows, "clean rows trained on")
        logger.info("clean-only: training on %d clean rows, %d select; the %d training rows are not used",
                    len(added), len(select), len(inputs.rows))
        training = train_classifier(inputs.model, rows, train, dev=select, callbacks=observers,  # step 2
                                    work_dir=work_dir)
        report = {"method": self.name, "config": self.config.model_dump(mode="json"), "train": train.model_dump(),
                  "n_clean_trained": len(added), "clean_trained_ids": [e.id for e in added],
                  "n_clean_selecting": len(select),
                  "n_rows_ignored": len(inputs.rows), "selected_epoch": training.best_epoch,
                  "selection_accuracy": training.best_dev_accuracy}
        return TrainDefenseResult(inputs.model, training, report)
