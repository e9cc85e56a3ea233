"""Choosing on held-out clean data: a defence's strength (the one search every method uses) and the
epoch of a clean fine-tuning (:func:`finetune_with_selection`).

A method that has a strength knob (how much to mix, reset, prune or zero) tries candidates, measures
each one's accuracy on a held-out part of its clean data, and keeps the strongest whose accuracy is
within ``tolerance`` of the suspect's own (``reference``). Only clean held-out data is read: the
search has no way to see poisoned rows or the trigger.

Two walks:

* ``strongest_first`` (Fine-mixing's ρ, Fine-purifying's ρ, reinit's k, TSBD's n, E-PUR's N): try
  the strongest first and stop at the first that qualifies; if none does, take the most accurate
  (ties -> the stronger) and say so (``fallback``). ``exhaustive`` tries every candidate and makes
  the same choice.
* ``weakest_first`` (fine-pruning's nested pruning steps): try the weakest first and stop at the
  first that fails; keep the last that passed. ``exhaustive`` tries every candidate and keeps the
  strongest that passed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset
from unbackdoor.models.loading import Classifier
from unbackdoor.training.callbacks import Callback
from unbackdoor.training.config import TrainConfig
from unbackdoor.training.loop import TrainResult, train_classifier

logger = logging.getLogger(__name__)

T = TypeVar("T")
Walk = Literal["strongest_first", "weakest_first"]
SLACK = 1e-9  # accuracies are ratios of small integers: a drop exactly at the tolerance passes
TOLERANCE_HELP = "allowed drop of held-out clean accuracy below the suspect's (0.02 = 2 points)"


def within_tolerance(accuracy: float, reference: float, tolerance: float) -> bool:
    """Whether ``accuracy`` is at most ``tolerance`` below ``reference`` (gains always pass)."""
    return reference - accuracy <= tolerance + SLACK


@dataclass
class Trial(Generic[T]):
    """One candidate, its held-out accuracy and whatever the method wants recorded with it."""

    value: T
    accuracy: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Search(Generic[T]):
    """What a search tried and chose."""

    chosen: T
    reference: float
    tolerance: float
    walk: str
    trials: list[Trial[T]]
    fallback: bool  # nothing qualified: the most accurate candidate was taken

    def record(self, name: str) -> dict[str, Any]:
        """The search as a JSON-able report, each candidate under ``name``."""
        return {"chosen": self.chosen, "reference_accuracy": self.reference, "tolerance": self.tolerance,
                "walk": self.walk, "fallback": self.fallback,
                "candidates": [{name: t.value, "heldout_accuracy": t.accuracy, **t.details} for t in self.trials]}


def choose(trials: Sequence[Trial[T]], reference: float, tolerance: float, walk: Walk = "strongest_first",
           exhaustive: bool = False) -> tuple[T, bool]:
    """The choice over ``trials`` (in the walk's order) and whether it is a fallback."""
    if not trials:
        raise ValueError("no candidates to choose from")
    passed = [within_tolerance(t.accuracy, reference, tolerance) for t in trials]
    if walk == "weakest_first":
        last = -1
        for i, ok in enumerate(passed):
            if not ok and not exhaustive:
                break
            last = i if ok else last
        if last < 0:
            return _most_accurate(trials, prefer_later=False), True
        return trials[last].value, False
    if any(passed):
        return trials[passed.index(True)].value, False
    return _most_accurate(trials, prefer_later=False), True


def _most_accurate(trials: Sequence[Trial[T]], prefer_later: bool) -> T:
    order = range(len(trials))
    best = max(order, key=lambda i: (trials[i].accuracy, i if prefer_later else -i))
    return trials[best].value


def search_within_tolerance(
    candidates: Sequence[T],
    try_candidate: Callable[[T], tuple[float, dict[str, Any]]],
    reference: float,
    tolerance: float,
    *,
    walk: Walk = "strongest_first",
    exhaustive: bool = False,
    on_choice: Callable[[T], None] | None = None,
    label: str = "search",
) -> Search[T]:
    """Try ``candidates`` in the given order (strongest first, or weakest first) until the walk's
    stopping rule; ``try_candidate(value)`` applies it and returns (held-out accuracy, details).
    ``on_choice(value)`` is called right after a trial that is, so far, the one to be chosen (a
    method keeps that model state instead of redoing the trial)."""
    trials: list[Trial[T]] = []
    for value in candidates:
        accuracy, details = try_candidate(value)
        trials.append(Trial(value, accuracy, details))
        logger.info("%s: %s -> held-out accuracy %.4f (suspect %.4f, tolerance %.3f)", label, value, accuracy,
                    reference, tolerance)
        current, _ = choose(trials, reference, tolerance, walk, exhaustive)
        if on_choice is not None and current == value:
            on_choice(value)
        passed = within_tolerance(accuracy, reference, tolerance)
        if not exhaustive and (passed if walk == "strongest_first" else not passed):
            break
    chosen, fallback = choose(trials, reference, tolerance, walk, exhaustive)
    if fallback:
        logger.warning("%s: no candidate within %.3f of the suspect's held-out accuracy %.4f; taking %s",
                       label, tolerance, reference, chosen)
    return Search(chosen, reference, tolerance, walk, trials, fallback)


def finetune_with_selection(
    clf: Classifier,
    clean: Dataset,
    config: TrainConfig,
    *,
    holdout_fraction: float,
    seed: int,
    callbacks: Sequence[Callback] = (),
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune ``clf`` on a fitting part of ``clean``; pick the epoch on the held-out part.

    Returns a report (split sizes, chosen epoch, its held-out accuracy, the training record).
    """
    fit, held_out = holdout_split(clean, holdout_fraction, seed)
    result = train_classifier(clf, fit, config, dev=held_out, callbacks=callbacks, work_dir=work_dir)
    return selection_report(len(fit), held_out, result)


def selection_report(n_fit: int, held_out: Dataset, result: TrainResult) -> dict[str, Any]:
    """What a training with the epoch chosen on ``held_out`` reports: split sizes, the chosen epoch, its
    held-out accuracy and the training record."""
    return {
        "n_fit": n_fit,
        "n_selection": len(held_out),
        "selected_epoch": result.best_epoch,
        "selection_accuracy": result.best_dev_accuracy,
        "training": result.to_dict(),
    }
