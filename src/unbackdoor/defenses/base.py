"""The defence contract.

A *purify* defence receives what a user in that situation holds and nothing else: the suspect
classifier, optionally its clean pre-trained base, and a small clean labelled :class:`Dataset`.
There is no parameter for poison flags, the target label, the trigger or triggered data, and
:func:`PurifyInputs` rejects those types outright, so a leak is a type error, not a review note.

Every defence:

* is a class with a ``Config`` (a :class:`~unbackdoor.config.StrictConfig`) and a registry name;
* does no work in ``__init__`` (it stores the validated config);
* chooses every hyperparameter and checkpoint on a held-out part of its clean data only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from unbackdoor.config import StrictConfig
from unbackdoor.data.types import Dataset
from unbackdoor.models.loading import Classifier, check_same_architecture
from unbackdoor.registry import Registry
from unbackdoor.training.loop import require_clean_dataset


@dataclass(frozen=True)
class PurifyInputs:
    """What a purify defence may see: the suspect, its clean base (optional), clean data."""

    suspect: Classifier
    clean: Dataset
    base: Classifier | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.suspect, Classifier):
            raise TypeError(f"suspect must be a Classifier, got {type(self.suspect).__name__}")
        require_clean_dataset(self.clean, "the defence's clean data")
        if self.base is not None:
            if not isinstance(self.base, Classifier):
                raise TypeError(f"base must be a Classifier, got {type(self.base).__name__}")
            check_same_architecture(self.suspect, self.base)


@dataclass
class DefenseResult:
    """The purified classifier and a report of what the defence did and chose."""

    model: Classifier
    report: dict[str, Any] = field(default_factory=dict)


C = TypeVar("C", bound=StrictConfig)


class PurifyDefense(ABC, Generic[C]):
    """A defence for the purify situation."""

    name: ClassVar[str]
    config_class: ClassVar[type[StrictConfig]]
    needs_base: ClassVar[bool] = False

    def __init__(self, config: C | None = None) -> None:
        self.config: C = config if config is not None else self.config_class()  # type: ignore[assignment]

    def purify(self, inputs: PurifyInputs, work_dir: str | Path | None = None) -> DefenseResult:
        """Purify ``inputs.suspect`` (modified in place and returned)."""
        if not isinstance(inputs, PurifyInputs):
            raise TypeError(f"purify takes PurifyInputs, got {type(inputs).__name__}")
        if self.needs_base and inputs.base is None:
            raise TypeError(f"defence {self.name!r} needs the clean base model")
        return self._purify(inputs, Path(work_dir) if work_dir is not None else None)

    @abstractmethod
    def _purify(self, inputs: PurifyInputs, work_dir: Path | None) -> DefenseResult:
        """The method itself."""


PURIFY_DEFENSES: Registry[PurifyDefense] = Registry("purify method")
