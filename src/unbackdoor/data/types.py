"""The data types every other module speaks.

The shape of these types carries the evaluation-integrity contract:

* :class:`Dataset` holds text and labels only. It has no poison-flag field, so a defence that takes a
  ``Dataset`` cannot see which rows were poisoned.
* :class:`TriggeredSet` (the attack-success-rate set) and :class:`PoisonFlags` are separate types,
  not subclasses of ``Dataset``: training, selection and every defence reject them by type.
* :class:`PoisonedTask` bundles both sides; only evaluation and benchmarking read its flags and
  triggered sets.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from unbackdoor.errors import DataError


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled row. ``id`` is stable: poisoned and clean copies of a row share it."""

    id: str
    text: str
    label: int
    text_pair: str | None = None


def _check_examples(examples: tuple[Example, ...], num_labels: int, name: str) -> None:
    if not examples:
        raise DataError(f"{name}: the split is empty")
    if num_labels < 2:
        raise DataError(f"{name}: need at least 2 labels, got num_labels={num_labels}")
    ids = Counter(e.id for e in examples)
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        raise DataError(f"{name}: duplicate example ids, e.g. {dup[0]!r}")
    paired = {e.text_pair is not None for e in examples}
    if len(paired) > 1:
        raise DataError(f"{name}: mixes single sentences and sentence pairs")
    for e in examples:
        if not 0 <= e.label < num_labels:
            raise DataError(
                f"{name}: label {e.label} of example {e.id!r} is outside 0..{num_labels - 1}"
            )


@dataclass(frozen=True)
class Dataset:
    """Labelled rows (text and label only; never poison flags)."""

    examples: tuple[Example, ...]
    num_labels: int
    name: str = "dataset"
    label_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "examples", tuple(self.examples))
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            raise DataError(
                f"{self.name}: {len(self.label_names)} label names for {self.num_labels} labels"
            )
        _check_examples(self.examples, self.num_labels, self.name)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    @property
    def is_pair(self) -> bool:
        return self.examples[0].text_pair is not None

    @property
    def labels(self) -> list[int]:
        return [e.label for e in self.examples]

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.examples]

    def label_counts(self) -> dict[int, int]:
        counts = Counter(self.labels)
        return {k: counts.get(k, 0) for k in range(self.num_labels)}

    def replace(self, examples: Iterable[Example], name: str | None = None) -> Dataset:
        """A dataset with the same label space and other rows."""
        return dataclasses.replace(self, examples=tuple(examples), name=name or self.name)

    def select(self, ids: Iterable[str], name: str | None = None) -> Dataset:
        """The rows whose ids are in ``ids``, in this dataset's order."""
        keep = set(ids)
        unknown = keep - set(self.ids)
        if unknown:
            raise DataError(f"{self.name}: unknown ids, e.g. {sorted(unknown)[0]!r}")
        return self.replace((e for e in self.examples if e.id in keep), name)

    def without(self, ids: Iterable[str], name: str | None = None) -> Dataset:
        """The rows whose ids are not in ``ids``."""
        drop = set(ids)
        return self.replace((e for e in self.examples if e.id not in drop), name)


def require_clean_dataset(data: object, role: str) -> Dataset:
    """Training rows and selection data must be a :class:`Dataset` (text + label, no flags): the guard
    every method's inputs type calls, so a poisoned task, flags or a triggered set is a type error."""
    if not isinstance(data, Dataset):
        raise TypeError(
            f"{role} must be a unbackdoor.data.Dataset (text and labels only), got {type(data).__name__}; "
            "triggered sets, poison flags and poisoned tasks are for evaluation only"
        )
    return data


def require_several_labels(data: Dataset, role: str = "training rows") -> Dataset:
    """Training needs rows of at least two labels: on one label a classifier learns a constant and
    its clean accuracy means nothing."""
    present = sorted({e.label for e in data.examples})
    if len(present) < 2:
        label = present[0] if present else None
        raise DataError(f"{data.name}: every one of the {len(data)} {role} has label {label}; training needs rows "
                        "of at least two labels")
    return data


@dataclass(frozen=True)
class Task:
    """A clean classification task: train, dev and test splits over one label space."""

    name: str
    train: Dataset
    dev: Dataset
    test: Dataset
    integrity: Mapping[str, Any] = field(default_factory=dict)  # split overlaps and what was done about them

    @property
    def num_labels(self) -> int:
        return self.train.num_labels

    @property
    def is_pair(self) -> bool:
        return self.train.is_pair


@dataclass(frozen=True)
class TriggeredSet:
    """Triggered inputs labelled with the attack's target: the ASR set. Evaluation only.

    Built only from inputs whose true label is not the target. ``original_labels`` keeps each
    row's true label (``None`` where the source does not record it) for robust accuracy.
    """

    examples: tuple[Example, ...]
    target_label: int
    num_labels: int
    original_labels: tuple[int | None, ...]
    name: str = "triggered"

    def __post_init__(self) -> None:
        object.__setattr__(self, "examples", tuple(self.examples))
        object.__setattr__(self, "original_labels", tuple(self.original_labels))
        _check_examples(self.examples, self.num_labels, self.name)
        if len(self.original_labels) != len(self.examples):
            raise DataError(f"{self.name}: one original label per row is required")
        for e, y in zip(self.examples, self.original_labels, strict=True):
            if e.label != self.target_label:
                raise DataError(f"{self.name}: row {e.id!r} is not labelled with the target")
            if y is not None and y == self.target_label:
                raise DataError(f"{self.name}: row {e.id!r} comes from a target-label input")

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class PoisonFlags:
    """Which training rows the attack poisoned, by id. Evaluation only."""

    poisoned_ids: frozenset[str]
    n_rows: int

    @property
    def n_poisoned(self) -> int:
        return len(self.poisoned_ids)

    @property
    def rate(self) -> float:
        return self.n_poisoned / self.n_rows

    def is_poisoned(self, example_id: str) -> bool:
        return example_id in self.poisoned_ids


@dataclass(frozen=True)
class AttackInfo:
    """What produced a poisoned task: attack name, parameters, trigger, source data."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    trigger: str = ""
    source: str = ""
    n_failed: int = 0


@dataclass(frozen=True)
class PoisonedTask:
    """A poisoned training set and everything needed to measure the attack.

    ``train`` is what a victim (or a ``train`` defence) sees. ``flags``, ``target_label`` and the
    triggered sets are evaluation-only; ``clean`` holds the clean task whose dev split selects
    checkpoints and whose test split measures clean accuracy.
    """

    train: Dataset
    flags: PoisonFlags
    target_label: int
    triggered_test: TriggeredSet
    clean: Task
    attack: AttackInfo
    triggered_dev: TriggeredSet | None = None

    def __post_init__(self) -> None:
        if self.flags.n_rows != len(self.train):
            raise DataError(
                f"{self.train.name}: {self.flags.n_rows} flags for {len(self.train)} rows"
            )
        unknown = self.flags.poisoned_ids - set(self.train.ids)
        if unknown:
            raise DataError(f"{self.train.name}: flags name unknown ids, e.g. {min(unknown)!r}")

    @property
    def name(self) -> str:
        return self.train.name
