"""The guard contract (``unbackdoor guard``): inference-time defences in front of a fixed suspect.

A *guard* leaves the suspect classifier as it is and inspects or rewrites every input at prediction
time. Setting it up needs what a defender who deploys a model it cannot change holds: the suspect
(:class:`~unbackdoor.models.loading.Classifier`) and a small clean labelled
:class:`~unbackdoor.data.Dataset`. :class:`GuardInputs` refuses triggered sets, poison flags and
poisoned tasks by type, so a guard's thresholds come from clean rows or from nothing.

Every guard:

* is a class with a ``config_class`` (a :class:`GuardConfig`) and a registry name in :data:`GUARDS`;
* does no work in ``__init__`` (it stores the validated config);
* in :meth:`Guard.fit` splits its clean set into a fitting part and a held-out part
  (:func:`~unbackdoor.data.sampling.holdout_split`), builds what it needs on the fitting part and
  calibrates its threshold on the held-out part: a false-rejection budget (``frr_budget``): the
  share of held-out clean rows it may reject (ONION, which rewrites instead: the held-out clean
  accuracy it may lose);
* returns a :class:`FittedGuard` that, for texts or a dataset, gives per row: rejected or not, a
  suspicion score (higher = more suspicious; NaN where the guard did not score the row), the input
  the model is shown (ONION's rewrite; the row itself otherwise) and the model's label on it.

A fitted guard keeps its held-out calibration, so it can decide at any budget in (0, 1) (the
evaluation reports several, :mod:`unbackdoor.guard.evaluation`); the configured ``frr_budget`` is
its default. Measuring a guard against triggered inputs is evaluation's job, never a guard's.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
from pydantic import Field

from unbackdoor.config import StrictConfig, build_config
from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset, Example, require_clean_dataset
from unbackdoor.errors import DataError
from unbackdoor.models.loading import Classifier
from unbackdoor.registry import Method, Registry
from unbackdoor.utils.resources import Stopwatch

logger = logging.getLogger(__name__)

REJECTED = -1  # the end-to-end "label" of a rejected row
Rows = Dataset | Sequence[str] | Sequence[Example]


@dataclass(frozen=True)
class GuardInputs:
    """What a guard may see while it is set up: the suspect and clean labelled rows."""

    suspect: Classifier
    clean: Dataset

    def __post_init__(self) -> None:
        if not isinstance(self.suspect, Classifier):
            raise TypeError(f"suspect must be a Classifier, got {type(self.suspect).__name__}")
        require_clean_dataset(self.clean, "the guard's clean data")
        if self.clean.num_labels != self.suspect.num_labels:
            raise DataError(f"the clean data has {self.clean.num_labels} labels but the suspect "
                            f"{self.suspect.num_labels}")
        if len(self.clean) < 4:
            raise DataError(f"{self.clean.name}: a guard needs at least 4 clean rows (a fitting and a held-out part)")


class GuardConfig(StrictConfig):
    """Options every guard shares."""

    frr_budget: float = Field(0.05, gt=0, lt=1, description="[OURS] share of held-out clean rows the guard may "
                              "reject (ONION: held-out clean accuracy it may lose); RAP's paper reports 0.5-5 %, "
                              "OpenBackdoor's STRIP/RAP default to 1 %")
    holdout_fraction: float = Field(0.5, gt=0, lt=1, description="[OURS] share of the clean set held out to set "
                                    "the threshold; the rest builds the guard")
    seed: int = Field(0, description="seed of the held-out split and of every random choice")
    batch_size: int = Field(128, ge=1, description="rows per forward pass of the suspect")


@dataclass(frozen=True)
class GuardOutput:
    """Per-row decisions of a fitted guard at one budget (row order of the input).

    ``examples``: what the model is shown (ONION's rewrites; the inputs otherwise); ``rejected``:
    bool per row; ``scores``: suspicion per row, higher = more suspicious, NaN where the guard did not
    score the row (e.g. RAP for a label it does not protect); ``predictions``: the model's label on
    ``examples``, whether rejected or not.
    """

    examples: tuple[Example, ...]
    rejected: np.ndarray
    scores: np.ndarray
    predictions: np.ndarray
    budget: float

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.examples]

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.examples]

    def final_predictions(self) -> np.ndarray:
        """The guarded system's output: the model's label, or :data:`REJECTED`."""
        return np.where(self.rejected, REJECTED, self.predictions)


def as_examples(rows: Rows) -> tuple[Example, ...]:
    """Rows as examples: a dataset's rows, examples as given, or texts (ids ``row-<i>``, label 0)."""
    if isinstance(rows, Dataset):
        return rows.examples
    if isinstance(rows, str):
        raise TypeError("give a list of texts, not one string")
    out = tuple(r if isinstance(r, Example) else Example(f"row-{i}", r, 0) for i, r in enumerate(rows))
    if not out:
        raise DataError("no rows to guard")
    if any(not isinstance(e.text, str) for e in out):
        raise TypeError("rows must be texts, Examples or a Dataset")
    return out


def map_segments(example: Example, fn: Callable[[str], str]) -> Example:
    """``example`` with ``fn`` applied to its text and, for a sentence pair, to its second text."""
    pair = fn(example.text_pair) if example.text_pair is not None else None
    return Example(example.id, fn(example.text), example.label, pair)


def budget_threshold(clean_scores: np.ndarray, budget: float) -> float:
    """The threshold on suspicion scores (reject ``score > threshold``) that rejects at most
    ``budget`` of ``clean_scores``: their (1 − budget) quantile, rounded up to an observed score.
    NaN scores are left out; with none left the threshold is +inf (reject nothing)."""
    scores = np.asarray(clean_scores, dtype=np.float64)
    scores = scores[~np.isnan(scores)]
    if scores.size == 0:
        return float("inf")
    return float(np.quantile(scores, 1.0 - budget, method="higher"))


def check_budget(budget: float) -> float:
    if not 0 < budget < 1:
        raise ValueError(f"an FRR budget must be in (0, 1), got {budget}")
    return float(budget)


class FittedGuard(ABC):
    """A guard set up for one suspect: decides per row at any FRR budget (default: the config's).

    Subclasses compute what is expensive once per call (:meth:`_analyse`: scores, per-word
    suspicion, model outputs) and decide cheaply per budget (:meth:`_decide`).
    """

    name: ClassVar[str]
    kind: ClassVar[Literal["reject", "rewrite"]] = "reject"

    def __init__(self, model: Classifier, config: GuardConfig) -> None:
        self.model = model
        self.config = config
        self.report: dict[str, Any] = {}

    @property
    def budget(self) -> float:
        return self.config.frr_budget

    def guard(self, rows: Rows, budget: float | None = None) -> GuardOutput:
        """Decide on every row at ``budget`` (default: the configured ``frr_budget``)."""
        b = self.budget if budget is None else check_budget(budget)
        return self.guard_budgets(rows, [b])[b]

    def guard_budgets(self, rows: Rows, budgets: Sequence[float]) -> dict[float, GuardOutput]:
        """Decide on every row at each budget; the expensive analysis runs once."""
        examples = as_examples(rows)
        wanted = [check_budget(b) for b in budgets]
        analysis = self._analyse(examples)
        return {b: self._decide(examples, analysis, b) for b in wanted}

    @abstractmethod
    def thresholds(self, budget: float | None = None) -> dict[str, Any]:
        """The threshold(s) used at ``budget`` (JSON-able), with what they are thresholds on."""

    @abstractmethod
    def _analyse(self, examples: tuple[Example, ...]) -> Any:
        """Everything that does not depend on the budget (scores, model outputs)."""

    @abstractmethod
    def _decide(self, examples: tuple[Example, ...], analysis: Any, budget: float) -> GuardOutput:
        """Per-row decisions at ``budget``."""


@dataclass
class ScoredRows:
    """What a rejecting guard computes per row: suspicion and the model's label on the input."""

    scores: np.ndarray
    predictions: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)


class RejectingGuard(FittedGuard):
    """A guard that rejects rows whose suspicion exceeds a threshold set on held-out clean rows."""

    kind: ClassVar[Literal["reject", "rewrite"]] = "reject"

    def _decide(self, examples: tuple[Example, ...], analysis: ScoredRows, budget: float) -> GuardOutput:
        limits = self._row_thresholds(analysis, budget)
        with np.errstate(invalid="ignore"):
            rejected = np.asarray(analysis.scores > limits, dtype=bool)  # NaN scores are never rejected
        return GuardOutput(examples, rejected, analysis.scores, analysis.predictions, budget)

    @abstractmethod
    def _row_thresholds(self, analysis: ScoredRows, budget: float) -> np.ndarray:
        """Each row's threshold on its suspicion score at ``budget``."""


C = TypeVar("C", bound=GuardConfig)


class Guard(Method[C], ABC):
    """An inference-time guard. ``__init__`` only stores the validated config."""


    def fit(self, inputs: GuardInputs) -> FittedGuard:
        """Set the guard up for ``inputs.suspect`` on clean rows only (the suspect is not changed)."""
        if not isinstance(inputs, GuardInputs):
            raise TypeError(f"fit takes GuardInputs, got {type(inputs).__name__}")
        cfg = self.config
        watch = Stopwatch()
        fit_rows, heldout = holdout_split(inputs.clean, cfg.holdout_fraction, cfg.seed)
        logger.info("guard %s: building on %d clean rows, calibrating on %d held-out rows", self.name,
                    len(fit_rows), len(heldout))
        fitted = self._fit(inputs.suspect, fit_rows, heldout)
        fitted.report = {"method": self.name, "kind": fitted.kind, "config": cfg.model_dump(mode="json"),
                         "n_fit": len(fit_rows), "n_heldout": len(heldout), **fitted.report,
                         "thresholds": fitted.thresholds(), "fit_wall_time_s": watch.elapsed()}
        return fitted

    @abstractmethod
    def _fit(self, model: Classifier, fit_rows: Dataset, heldout: Dataset) -> FittedGuard:
        """Build the guard on ``fit_rows`` and calibrate it on ``heldout`` (both clean)."""


GUARDS: Registry[Guard] = Registry("guard")


def build_guard(name: str, params: dict[str, Any]) -> Guard:
    """Validate a guard request before any work: the name and its parameters."""
    cls = GUARDS.get(name)
    return cls(build_config(cls.config_class, params, f"guard {name}"))
