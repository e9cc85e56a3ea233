"""The detector contract (``unbackdoor detect``): suspicion scores for training rows, no flags.

A detector gets what a defender who holds a possibly poisoned training set holds (architecture
§"inspect"): the training rows **without poison flags** (a :class:`~unbackdoor.data.Dataset`), a
small clean :class:`~unbackdoor.data.Dataset`, and an encoder whose frozen features it may use.
:class:`DetectInputs` refuses poisoned tasks, poison flags and triggered sets by type. It returns one
suspicion score per row (higher = more suspicious) and the flagged subset at a rate or threshold
(:class:`FlagRule`). Comparing scores with the true flags is evaluation's job
(:func:`unbackdoor.detect.metrics.detection_metrics`), never a detector's.

Registry :data:`DETECTORS`: ``reweight`` (:mod:`.reweight`), ``loss`` (:mod:`.loss`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from pydantic import Field, model_validator

from unbackdoor.config import StrictConfig, build_config
from unbackdoor.data.types import Dataset, Example, require_clean_dataset
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.models.loading import Classifier
from unbackdoor.registry import Method, Registry
from unbackdoor.utils.resources import Stopwatch


@dataclass(frozen=True)
class DetectInputs:
    """The (possibly poisoned) training rows without flags, a clean set, the feature encoder."""

    rows: Dataset
    clean: Dataset
    encoder: Classifier

    def __post_init__(self) -> None:
        require_clean_dataset(self.rows, "training rows")
        require_clean_dataset(self.clean, "the clean set")
        if not isinstance(self.encoder, Classifier):
            raise TypeError(f"encoder must be a Classifier, got {type(self.encoder).__name__}")
        if self.rows.num_labels != self.clean.num_labels:
            raise DataError(f"the training rows have {self.rows.num_labels} labels, the clean set "
                            f"{self.clean.num_labels}")
        if self.rows.is_pair != self.clean.is_pair:
            raise DataError("the training rows and the clean set disagree on sentence pairs")


class FlagRule(StrictConfig):
    """Which rows are flagged: the ``rate`` share with the highest scores, or every row whose score
    is at least ``threshold``. Exactly one is given."""

    rate: float | None = Field(None, gt=0, le=1, description="share of rows flagged (highest scores first)")
    threshold: float | None = Field(None, description="flag rows with score >= threshold")

    @model_validator(mode="after")
    def _one_rule(self) -> FlagRule:
        if (self.rate is None) == (self.threshold is None):
            raise ValueError("give exactly one of rate or threshold")
        return self


DEFAULT_RULE = FlagRule(rate=0.1)


def suspicion_order(scores: torch.Tensor, tiebreak: torch.Tensor | None = None) -> list[int]:
    """Row indices, most suspicious first: by score, then by ``tiebreak`` (higher first), then row order."""
    s = scores.tolist()
    t = tiebreak.tolist() if tiebreak is not None else [0.0] * len(s)
    return sorted(range(len(s)), key=lambda i: (-s[i], -t[i], i))


def flag_indices(scores: torch.Tensor, rule: FlagRule, tiebreak: torch.Tensor | None = None) -> list[int]:
    """Row indices flagged by ``rule``, in row order. At a rate: the round(rate·N) (at least one)
    first rows of :func:`suspicion_order`."""
    if rule.threshold is not None:
        return [i for i, s in enumerate(scores.tolist()) if s >= rule.threshold]
    assert rule.rate is not None
    k = max(1, min(len(scores), math.floor(rule.rate * len(scores) + 0.5)))
    return sorted(suspicion_order(scores, tiebreak)[:k])


@dataclass
class Scores:
    """What a method computes: one score per row (higher = more suspicious), an optional secondary
    key that orders rows with equal scores, and the method's report."""

    scores: torch.Tensor
    report: dict[str, Any] = field(default_factory=dict)
    tiebreak: torch.Tensor | None = None


@dataclass
class Detection:
    """Per-row suspicion scores (row order of the input), the flagged ids, and what the method did."""

    rows: Dataset
    scores: torch.Tensor
    flagged_ids: list[str]
    rule: FlagRule
    report: dict[str, Any] = field(default_factory=dict)
    tiebreak: torch.Tensor | None = None

    def ranks(self) -> list[int]:
        """Each row's rank, 1 = most suspicious (ties in score ordered by the method's tie-break)."""
        ranks = [0] * len(self.rows)
        for rank, i in enumerate(suspicion_order(self.scores, self.tiebreak), start=1):
            ranks[i] = rank
        return ranks

    @property
    def flagged(self) -> Dataset | None:
        """The flagged rows as a dataset (labels as trained), or None when nothing is flagged."""
        return self.rows.select(self.flagged_ids, f"{self.rows.name}[flagged]") if self.flagged_ids else None

    def counts(self) -> dict[str, int]:
        return {"rows": len(self.rows), "flagged": len(self.flagged_ids)}


C = TypeVar("C", bound=StrictConfig)


class Detector(Method[C], ABC):
    """A poisoned-row detector. ``__init__`` only stores the validated config."""


    def detect(self, inputs: DetectInputs, rule: FlagRule = DEFAULT_RULE) -> Detection:
        """Score every row of ``inputs.rows`` and flag some by ``rule``."""
        if not isinstance(inputs, DetectInputs):
            raise TypeError(f"detect takes DetectInputs, got {type(inputs).__name__}")
        if not isinstance(rule, FlagRule):
            raise TypeError(f"rule must be a FlagRule, got {type(rule).__name__}")
        watch = Stopwatch()
        out = self._scores(inputs)
        if out.scores.shape != (len(inputs.rows),):
            raise RuntimeError(f"{self.name}: {tuple(out.scores.shape)} scores for {len(inputs.rows)} rows")
        ids = inputs.rows.ids
        flagged = [ids[i] for i in flag_indices(out.scores, rule, out.tiebreak)]
        report = {"method": self.name, "config": self.config.model_dump(mode="json"), **out.report,
                  "wall_time_s": watch.elapsed()}
        tiebreak = out.tiebreak.detach().cpu() if out.tiebreak is not None else None
        return Detection(inputs.rows, out.scores.detach().cpu(), flagged, rule, report, tiebreak)

    @abstractmethod
    def _scores(self, inputs: DetectInputs) -> Scores:
        """One suspicion score per row (higher = more suspicious) and the method's report."""

    def strip(self, rows: list[Example]) -> list[Example | None]:
        """After :meth:`detect`: each row with the trigger this detector found in it removed, or None where
        it names none that can be removed (the row then stays suspect). Only a detector that names its
        trigger as removable text implements it (``zscore``); the others cannot."""
        raise NotImplementedError(f"detector {self.name} names no trigger it could remove from a row")

    @property
    def strips(self) -> bool:
        """Whether :meth:`strip` is implemented."""
        return type(self).strip is not Detector.strip


DETECTORS: Registry[Detector] = Registry("detector")


DEFAULT_RATE = 0.1  # the share of rows flagged when neither a rate nor a threshold is given


def build_detector(method: str, params: dict[str, Any]) -> Detector:
    """Validate a detector request before any work."""
    cls = DETECTORS.get(method)
    return cls(build_config(cls.config_class, params, f"detector {method}"))


def flag_rule(rate: float | None, threshold: float | None) -> FlagRule:
    if rate is not None and threshold is not None:
        raise ConfigError("give --rate or --threshold, not both")
    return FlagRule(threshold=threshold) if threshold is not None else FlagRule(rate=rate or DEFAULT_RATE)
