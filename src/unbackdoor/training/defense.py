"""The train-time defence contract (``unbackdoor train --defense NAME``).

A train-time defence gets what a user who must fine-tune on possibly poisoned data holds: the clean
pre-trained model (loaded as a classifier), the training rows **without poison flags** (a
:class:`~unbackdoor.data.Dataset`) and a clean dev set. :class:`TrainInputs` refuses poisoned tasks,
poison flags and triggered sets by type, so no defence can read which rows are bad.

Registry :data:`TRAIN_DEFENSES`: ``none`` (plain full fine-tuning, here), ``lora`` /
``musclelora`` (:mod:`unbackdoor.musclelora`) and ``reweight`` (:mod:`unbackdoor.detect`), each
registered when its package is imported (:mod:`unbackdoor.pipeline` imports both).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.data.types import Dataset
from unbackdoor.models.loading import Classifier
from unbackdoor.registry import Registry
from unbackdoor.training.callbacks import Callback
from unbackdoor.training.config import TrainConfig, victim_train_config
from unbackdoor.training.loop import TrainResult, require_clean_dataset, train_classifier


@dataclass(frozen=True)
class TrainInputs:
    """The model to train, the (possibly poisoned) training rows without flags, clean dev data."""

    model: Classifier
    rows: Dataset
    dev: Dataset

    def __post_init__(self) -> None:
        if not isinstance(self.model, Classifier):
            raise TypeError(f"model must be a Classifier, got {type(self.model).__name__}")
        require_clean_dataset(self.rows, "training rows")
        require_clean_dataset(self.dev, "the clean dev set")


@dataclass
class TrainDefenseResult:
    """The trained classifier (a plain Hugging Face model), the loop's record and the defence's report."""

    model: Classifier
    training: TrainResult
    report: dict[str, Any] = field(default_factory=dict)


C = TypeVar("C", bound=StrictConfig)


class TrainDefense(ABC, Generic[C]):
    """A defence for the train situation. ``__init__`` only stores the validated config."""

    name: ClassVar[str]
    config_class: ClassVar[type[StrictConfig]]

    def __init__(self, config: C | None = None) -> None:
        self.config: C = config if config is not None else self.config_class()  # type: ignore[assignment]

    def check(self, inputs: TrainInputs) -> None:
        """Raise an :class:`~unbackdoor.errors.UnbackdoorError` if ``inputs`` cannot be used (cheap)."""

    def train_config(self, clf: Classifier) -> TrainConfig:
        """The training-loop settings this defence uses on ``clf``."""
        return victim_train_config()

    def fit(self, inputs: TrainInputs, work_dir: str | Path | None = None,
            observers: Sequence[Callback] = ()) -> TrainDefenseResult:
        """Train ``inputs.model`` (in place) and return it; checkpoints go to ``work_dir``.

        ``observers`` are extra loop callbacks of the caller (e.g. measurements during training).
        """
        if not isinstance(inputs, TrainInputs):
            raise TypeError(f"fit takes TrainInputs, got {type(inputs).__name__}")
        self.check(inputs)
        return self._fit(inputs, Path(work_dir) if work_dir is not None else None, list(observers))

    @abstractmethod
    def _fit(self, inputs: TrainInputs, work_dir: Path | None, observers: list[Callback]) -> TrainDefenseResult:
        """The method itself."""


TRAIN_DEFENSES: Registry[TrainDefense] = Registry("training defence")


def given_keys(config: TrainConfig | None) -> dict[str, Any]:
    """The keys that were set on ``config`` (pydantic's ``model_fields_set``), not its defaults."""
    return config.model_dump(include=set(config.model_fields_set)) if config is not None else {}


def merge_train(defaults: TrainConfig, given: TrainConfig | None) -> TrainConfig:
    """``defaults`` overridden by the keys set in ``given``."""
    return defaults.model_copy(update=given_keys(given))


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
