"""The purify contract: inputs, result, the :data:`PURIFY_DEFENSES` registry, build and run.

A *purify* defence receives what a user in that situation holds and nothing else: the suspect
classifier, optionally its clean pre-trained base, and a small clean labelled :class:`Dataset`.
There is no parameter for poison flags, the target label, the trigger or triggered data, and
:func:`PurifyInputs` rejects those types outright, so a leak is a type error, not a review note.

Every defence:

* is a class with a ``Config`` (a :class:`~unbackdoor.config.StrictConfig`) and a registry name;
* does no work in ``__init__`` (it stores the validated config);
* chooses every hyperparameter and checkpoint on a held-out part of its clean data only.

Defences compose: :func:`build_purify_defense` with ``before=[(name, params), ...]`` runs those
first on the same suspect (``--epur``: E-PUR's embedding reset without fine-tuning, then the method).
A request is validated whole, before any model is loaded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from unbackdoor.config import StrictConfig, build_config
from unbackdoor.data.types import Dataset, require_clean_dataset
from unbackdoor.errors import ConfigError
from unbackdoor.models.loading import Classifier, ModelResult, check_same_architecture
from unbackdoor.registry import Method, Registry


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


class PurifyResult(ModelResult):
    """The purified classifier and a report of what the defence did and chose."""


C = TypeVar("C", bound=StrictConfig)


class PurifyDefense(Method[C], ABC):
    """A defence for the purify situation."""

    needs_base: ClassVar[bool] = False
    uses_base: ClassVar[bool] = False  # an optional base changes what it does: callers that hold one give it

    def purify(self, inputs: PurifyInputs, work_dir: str | Path | None = None) -> PurifyResult:
        """Purify ``inputs.suspect`` (modified in place and returned)."""
        if not isinstance(inputs, PurifyInputs):
            raise TypeError(f"purify takes PurifyInputs, got {type(inputs).__name__}")
        if self.needs_base and inputs.base is None:
            raise TypeError(f"defence {self.name!r} needs the clean base model")
        return self._purify(inputs, Path(work_dir) if work_dir is not None else None)

    @abstractmethod
    def _purify(self, inputs: PurifyInputs, work_dir: Path | None) -> PurifyResult:
        """The method itself."""


PURIFY_DEFENSES: Registry[PurifyDefense] = Registry("purify method")


@dataclass(frozen=True)
class PurifyPlan:
    """Validated defences run in order on one suspect; the last one's result is the outcome."""

    steps: tuple[PurifyDefense, ...]

    @property
    def method(self) -> PurifyDefense:
        return self.steps[-1]

    def run(self, inputs: PurifyInputs, work_dir: str | Path | None = None) -> PurifyResult:
        """Run every step (earlier steps change ``inputs.suspect`` in place, as the last one does)."""
        work = Path(work_dir) if work_dir is not None else None
        before = []
        for i, step in enumerate(self.steps[:-1]):
            before.append(step.purify(inputs, None if work is None else work / f"before-{i}-{step.name}").report)
        result = self.method.purify(inputs, work)
        if before:
            result.report = {"before": before, **result.report}
        return result


def build_purify_defense(method: str, params: dict[str, Any], *, have_base: bool = True,
                         before: Sequence[tuple[str, dict[str, Any]]] = ()) -> PurifyPlan:
    """Validate a purify request before any work: each defence's parameters, and the base it needs."""
    steps = []
    for name, values in [*before, (method, params)]:
        cls = PURIFY_DEFENSES.get(name)
        if cls.needs_base and not have_base:
            what = f"method {name!r}" if len(steps) == len(before) else ("--epur" if name == "e-pur" else name)
            raise ConfigError(f"{what} needs the suspect's clean pre-trained base model: give --base")
        steps.append(cls(build_config(cls.config_class, values, f"purify method {name}")))
    return PurifyPlan(tuple(steps))


def epur_first(method: str, epur_params: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """The ``--epur`` composition: E-PUR's embedding reset (no fine-tuning) before ``method``."""
    if epur_params is None:
        return []
    if method == "e-pur":
        raise ConfigError("--epur adds E-PUR's reset before another method; method e-pur already is E-PUR")
    return [("e-pur", {**epur_params, "finetune": False})]


def purify(method: str, params: dict[str, Any], inputs: PurifyInputs, work_dir: Path | None = None,
           epur: dict[str, Any] | None = None) -> PurifyResult:
    """Run the named purify defence (``epur``: E-PUR options for its reset first, ``{}`` for the
    defaults) with validated parameters on ``inputs``."""
    plan = build_purify_defense(method, params, have_base=inputs.base is not None, before=epur_first(method, epur))
    return plan.run(inputs, work_dir)
