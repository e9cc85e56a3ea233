"""The train-time defence contract (``unbackdoor train --defense NAME``).

A train-time defence gets what a user who must fine-tune on possibly poisoned data holds: the clean
pre-trained model (loaded as a classifier), the training rows **without poison flags** (a
:class:`~unbackdoor.data.Dataset`) and a clean dev set. :class:`TrainInputs` refuses poisoned tasks,
poison flags and triggered sets by type, so no defence can read which rows are bad.

Registry :data:`TRAIN_DEFENSES`, complete once :mod:`unbackdoor.train_defenses` is imported (its
``__init__`` imports every member): ``none`` (plain full fine-tuning, :mod:`.finetune`), ``lora`` and
``musclelora`` (:mod:`.musclelora`), ``reweight`` (:mod:`.reweight`), ``abl`` (:mod:`.abl`), ``auto`` (:mod:`.auto`),
``clean-only`` (:mod:`.clean_only`, the baseline that never reads the training rows).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from unbackdoor.config import StrictConfig, build_config
from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset, Example, require_clean_dataset
from unbackdoor.models.loading import Classifier
from unbackdoor.registry import Method, Registry
from unbackdoor.training.callbacks import Callback
from unbackdoor.training.config import TrainConfig, given_keys, victim_train_config
from unbackdoor.training.loop import TrainResult


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


class TrainDefense(Method[C], ABC):
    """A defence for the train situation. ``__init__`` only stores the validated config."""


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


def build_train_defense(name: str, params: dict[str, Any], train: TrainConfig | None = None) -> TrainDefense:
    """Validate a train-time defence request before any work. ``train`` (e.g. from ``--lr``) overrides
    the keys it sets on top of ``params["train"]``; keys nobody sets keep the defence's defaults."""
    cls = TRAIN_DEFENSES.get(name)
    values = {**params, "train": {**(params.get("train") or {}), **given_keys(train)}}
    return cls(build_config(cls.config_class, values, f"training defence {name}"))


def clean_split(dev: Dataset, share: float, seed: int) -> tuple[list[Example], Dataset]:
    """``share`` of the clean ``dev`` set (stratified, seeded) as training rows, their ids marked
    so none clashes with a training row's, and the rest, which selects. ``auto``'s step 3a and ``clean-only``
    use it, so with the same seed both train on the same clean rows (``benchmarks/floor_clean_rows.py``
    trains its reference on them too)."""
    fit, select = holdout_split(dev, 1 - share, seed)
    return [dataclasses.replace(e, id=f"clean:{e.id}") for e in fit], select
