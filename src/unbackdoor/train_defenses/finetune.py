"""No defence (``train --defense none``): full fine-tuning of every parameter on the training rows,
the epoch chosen on clean dev accuracy. What a victim is, and the baseline every train-time defence
must beat."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.data.types import Dataset, require_several_labels
from unbackdoor.models.loading import Classifier, load_classifier
from unbackdoor.train_defenses.base import TRAIN_DEFENSES, TrainDefense, TrainDefenseResult, TrainInputs
from unbackdoor.training.callbacks import Callback
from unbackdoor.training.config import TrainConfig, merge_train, victim_train_config
from unbackdoor.training.loop import TrainResult, check_trainable, train_classifier


class NoDefenseConfig(StrictConfig):
    train: TrainConfig | None = Field(None, description="training-loop settings; keys given override the victim "
                                      "defaults (3 epochs, batch 32, lr 1e-4)")


@TRAIN_DEFENSES.register("none")
class PlainFinetune(TrainDefense[NoDefenseConfig]):
    """No defence: full fine-tuning of every parameter, epoch chosen on clean dev accuracy."""

    name = "none"
    config_class = NoDefenseConfig

    def train_config(self, clf: Classifier) -> TrainConfig:
        return merge_train(victim_train_config(), self.config.train)

    def _fit(self, inputs: TrainInputs, work_dir: Path | None, observers: list[Callback]) -> TrainDefenseResult:
        config = self.train_config(inputs.model)
        result = train_classifier(inputs.model, inputs.rows, config, dev=inputs.dev, callbacks=observers,
                                  work_dir=work_dir)
        return TrainDefenseResult(inputs.model, result, {"method": self.name, "train": config.model_dump()})


def load_for_training(
    base: str | Path | None, train: Dataset, config: TrainConfig, *, allow_pickle: bool = False,
    max_length: int | None = None, precision: str = "auto",
) -> Classifier:
    """Load ``base`` (a new seeded head if it has none) and check it can train on ``train``."""
    require_several_labels(train)
    clf = load_classifier(base, num_labels=train.num_labels, allow_pickle=allow_pickle, data_name=train.name,
                          max_length=max_length, seed=config.seed, precision=precision)
    check_trainable(clf, train)
    return clf


def fit(
    base: str | Path | None,
    train: Dataset,
    dev: Dataset | None,
    config: TrainConfig,
    *,
    work_dir: Path | None = None,
    allow_pickle: bool = False,
    max_length: int | None = None,
    precision: str = "auto",
) -> tuple[Classifier, TrainResult]:
    """Load ``base`` and fine-tune it on ``train``, selecting the epoch on clean ``dev``."""
    clf = load_for_training(base, train, config, allow_pickle=allow_pickle, max_length=max_length,
                            precision=precision)
    result = train_classifier(clf, train, config, dev=dev, work_dir=work_dir)
    return clf, result
