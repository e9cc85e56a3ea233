"""The unlearning contract.

An *unlearn* method receives what a user in that situation holds: the suspect classifier, a
**forget set** (rows identified as trojaned, with the labels they were trained on), a **retain
set** (clean labelled rows) and, for the retraining baseline only, the clean base and the training
rows. All of them are plain :class:`~unbackdoor.data.Dataset` objects: poison flags, triggered
sets and poisoned tasks are refused by type. Flags enter only as the user's forget set, whatever
its source (a user's list, a detector's output file, or, in benchmarks,
:func:`unbackdoor.unlearn.oracle.forget_from_flags`).

Every method:

* is a class with a ``Config`` (a :class:`~unbackdoor.config.StrictConfig`) and a registry name;
* does no work in ``__init__``;
* stops and selects on the retain set and the forget set only, never on test or triggered data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from unbackdoor.config import StrictConfig, build_config
from unbackdoor.data.types import Dataset, require_clean_dataset
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.models.loading import Classifier, ModelResult, check_same_architecture
from unbackdoor.registry import Method, Registry


def _require_classifier(value: object, role: str) -> None:
    if not isinstance(value, Classifier):
        raise TypeError(f"{role} must be a Classifier, got {type(value).__name__}")


@dataclass(frozen=True)
class UnlearnInputs:
    """What an unlearn method may see.

    ``forget``: the rows to unlearn, labelled as trained (for dirty-label poisoning: the target).
    ``retain``: clean labelled rows. ``base`` and ``train_rows`` (the training rows, without
    flags) are needed by the ``retrain`` baseline only.
    """

    suspect: Classifier
    forget: Dataset
    retain: Dataset
    base: Classifier | None = None
    train_rows: Dataset | None = None

    def __post_init__(self) -> None:
        _require_classifier(self.suspect, "suspect")
        require_clean_dataset(self.forget, "the forget set")
        require_clean_dataset(self.retain, "the retain set")
        if self.train_rows is not None:
            require_clean_dataset(self.train_rows, "the training rows")
        if self.base is not None:
            _require_classifier(self.base, "base")
            check_same_architecture(self.suspect, self.base)
        for role, data in (("forget set", self.forget), ("training rows", self.train_rows)):
            if data is None:
                continue
            if data.num_labels != self.retain.num_labels:
                raise DataError(f"the {role} has {data.num_labels} labels but the retain set {self.retain.num_labels}")
            if data.is_pair != self.retain.is_pair:
                raise DataError(f"the {role} and the retain set disagree on sentence pairs")


class UnlearnResult(ModelResult):
    """The unlearned classifier and a report of what the method did and chose."""


C = TypeVar("C", bound=StrictConfig)


class UnlearnMethod(Method[C], ABC):
    """A method for the unlearn situation. ``__init__`` only stores the validated config."""

    needs_base: ClassVar[bool] = False
    needs_train_rows: ClassVar[bool] = False

    def unlearn(self, inputs: UnlearnInputs, work_dir: str | Path | None = None) -> UnlearnResult:
        """Unlearn ``inputs.forget`` from ``inputs.suspect`` (modified in place and returned;
        ``retrain`` trains and returns ``inputs.base`` instead)."""
        if not isinstance(inputs, UnlearnInputs):
            raise TypeError(f"unlearn takes UnlearnInputs, got {type(inputs).__name__}")
        check_requirements(self, have_base=inputs.base is not None, have_train_rows=inputs.train_rows is not None)
        return self._unlearn(inputs, Path(work_dir) if work_dir is not None else None)

    @abstractmethod
    def _unlearn(self, inputs: UnlearnInputs, work_dir: Path | None) -> UnlearnResult:
        """The method itself."""


UNLEARN_METHODS: Registry[UnlearnMethod] = Registry("unlearn method")


def check_requirements(cls: type[UnlearnMethod] | UnlearnMethod, *, have_base: bool, have_train_rows: bool) -> None:
    """Raise a ConfigError naming the missing input (the base, the training rows). Given an instance,
    its config may decide (``repair`` needs the base only for ``reference=base``)."""
    if cls.needs_base and not have_base:
        raise ConfigError(f"unlearn method {cls.name!r} needs the suspect's clean pre-trained base model: give --base")
    if cls.needs_train_rows and not have_train_rows:
        raise ConfigError(f"unlearn method {cls.name!r} needs the training rows: give --train-data")


def build_unlearn_method(method: str, params: dict[str, Any], *, have_base: bool = True,
                         have_train_rows: bool = True) -> UnlearnMethod:
    """Validate an unlearn request before any work: the method, its parameters, its inputs."""
    cls = UNLEARN_METHODS.get(method)
    instance = cls(build_config(cls.config_class, params, f"unlearn method {method}"))
    check_requirements(instance, have_base=have_base, have_train_rows=have_train_rows)
    return instance


def unlearn(method: str, params: dict[str, Any], inputs: UnlearnInputs,
            work_dir: Path | None = None) -> UnlearnResult:
    """Run the named unlearn method with validated parameters."""
    instance = build_unlearn_method(method, params, have_base=inputs.base is not None,
                                    have_train_rows=inputs.train_rows is not None)
    return instance.unlearn(inputs, work_dir)
