"""Measuring a fitted guard: the only place a guard meets triggered inputs (evaluation only).

With the guard in front of the model, at each FRR budget:

* **FRR**: the share of clean test rows rejected. A rewriting guard (ONION) rejects nothing; its FRR
  is the clean accuracy it costs: CACC without the guard minus CACC with it (negative when the
  rewriting helps);
* **FAR**: the share of triggered rows accepted (not rejected). For a rewriting guard: the share of
  triggered rows still predicted as the target after rewriting (its ASR);
* **CACC**: the share of clean test rows accepted *and* predicted correctly (a rejected clean row is
  an error);
* **ASR**: the share of triggered rows accepted *and* predicted as the target (a rejected triggered
  row is a failed attack). The triggered set holds only rows whose true label is not the target.

Every evaluation also reports the model without the guard on the same rows (``unguarded``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from unbackdoor.data.sampling import sample_subset
from unbackdoor.data.types import Dataset, PoisonedTask, Task, TriggeredSet, require_clean_dataset
from unbackdoor.evaluate import accuracy, attack_success_rate
from unbackdoor.guard.base import FittedGuard, GuardOutput, check_budget
from unbackdoor.inference import predict
from unbackdoor.models.loading import Classifier
from unbackdoor.utils.resources import Stopwatch

DEFAULT_BUDGETS = (0.01, 0.05)


@dataclass
class GuardMetrics:
    """End-to-end metrics of the guarded model at one FRR budget (see the module docstring)."""

    budget: float
    frr: float
    cacc: float
    rejected_clean: int
    far: float | None = None
    asr: float | None = None
    rejected_triggered: int | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)


@dataclass
class GuardEvaluation:
    """A guard measured on a clean test set and (optionally) a triggered set, at several budgets."""

    method: str
    kind: str
    budget: float
    metrics: GuardMetrics
    by_budget: list[GuardMetrics]
    unguarded: dict[str, float | None]
    n_clean: int
    n_triggered: int | None
    target_label: int | None
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def clean_metrics(out: GuardOutput, labels: Sequence[int], unguarded_cacc: float, kind: str) -> dict[str, Any]:
    """FRR and end-to-end CACC on clean rows."""
    final = out.final_predictions()
    cacc = accuracy(labels, final)
    frr = unguarded_cacc - cacc if kind == "rewrite" else float(out.rejected.mean())
    return {"frr": float(frr), "cacc": cacc, "rejected_clean": int(out.rejected.sum())}


def triggered_metrics(out: GuardOutput, target: int, kind: str) -> dict[str, Any]:
    """FAR and end-to-end ASR on triggered rows."""
    asr = attack_success_rate(out.final_predictions(), target)
    far = asr if kind == "rewrite" else float(1.0 - out.rejected.mean())
    return {"far": float(far), "asr": asr, "rejected_triggered": int(out.rejected.sum())}


def evaluate_guard(
    fitted: FittedGuard,
    model: Classifier,
    clean_test: Dataset,
    triggered: TriggeredSet | None = None,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
) -> GuardEvaluation:
    """FRR, FAR, end-to-end CACC and ASR of ``fitted`` in front of ``model`` (the model it was fitted
    for) at each of ``budgets`` and the guard's own budget; the latter is :attr:`GuardEvaluation.metrics`."""
    if not isinstance(fitted, FittedGuard):
        raise TypeError(f"fitted must be a FittedGuard, got {type(fitted).__name__}")
    if model is not fitted.model:
        raise ValueError("the guard was fitted for another model: its thresholds hold for that model only")
    require_clean_dataset(clean_test, "clean_test")
    if triggered is not None and not isinstance(triggered, TriggeredSet):
        raise TypeError(f"triggered must be a TriggeredSet, got {type(triggered).__name__}")
    watch = Stopwatch()
    wanted = sorted({*(check_budget(b) for b in budgets), fitted.budget})
    batch = fitted.config.batch_size
    unguarded_cacc = accuracy(clean_test.labels, predict(model, clean_test.examples, batch))
    clean_out = fitted.guard_budgets(clean_test, wanted)
    trig_out = fitted.guard_budgets(triggered.examples, wanted) if triggered is not None else None
    by_budget = []
    for b in wanted:
        values = clean_metrics(clean_out[b], clean_test.labels, unguarded_cacc, fitted.kind)
        if trig_out is not None:
            assert triggered is not None
            values.update(triggered_metrics(trig_out[b], triggered.target_label, fitted.kind))
        by_budget.append(GuardMetrics(budget=b, thresholds=fitted.thresholds(b), **values))
    unguarded_asr = (attack_success_rate(predict(model, triggered.examples, batch), triggered.target_label)
                     if triggered is not None else None)
    return GuardEvaluation(
        method=fitted.name, kind=fitted.kind, budget=fitted.budget,
        metrics=next(m for m in by_budget if m.budget == fitted.budget), by_budget=by_budget,
        unguarded={"cacc": unguarded_cacc, "asr": unguarded_asr}, n_clean=len(clean_test),
        n_triggered=len(triggered) if triggered is not None else None,
        target_label=triggered.target_label if triggered is not None else None, wall_time_s=watch.elapsed(),
    )


RECORD_FILE, THRESHOLDS_FILE = "guard.json", "thresholds.json"  # what ``unbackdoor guard`` writes


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinite floats as None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def subsample_triggered(triggered: TriggeredSet, n: int | None, seed: int) -> TriggeredSet:
    """At most ``n`` rows of ``triggered``, drawn with ``seed`` (evaluation only)."""
    if n is None or n >= len(triggered):
        return triggered
    keep = sorted(random.Random(f"{seed}-guard-eval").sample(range(len(triggered)), n))
    return TriggeredSet(tuple(triggered.examples[i] for i in keep), triggered.target_label, triggered.num_labels,
                        tuple(triggered.original_labels[i] for i in keep), f"{triggered.name}[{n} rows]")


def evaluation_sets(data: Task | PoisonedTask, max_eval: int | None, seed: int) -> tuple[Dataset, TriggeredSet | None]:
    """The clean test split and, for poisoned data, the triggered test set (each subsampled to ``max_eval``)."""
    clean_test, triggered = (data.clean.test, data.triggered_test) if isinstance(data, PoisonedTask) else (data.test, None)
    if max_eval is not None and max_eval < len(clean_test):
        clean_test = sample_subset(clean_test, size=max_eval, seed=seed, name=f"{clean_test.name}[{max_eval} rows]")
    return clean_test, subsample_triggered(triggered, max_eval, seed) if triggered is not None else None


def guard_metric_summary(evaluation: GuardEvaluation) -> dict[str, Any]:
    """The headline numbers at the guard's own budget, next to the unguarded model's."""
    m = evaluation.metrics
    return {"budget": m.budget, "frr": m.frr, "far": m.far, "cacc": m.cacc, "asr": m.asr,
            "unguarded_cacc": evaluation.unguarded["cacc"], "unguarded_asr": evaluation.unguarded["asr"],
            "n_clean": evaluation.n_clean, "n_triggered": evaluation.n_triggered,
            "target_label": evaluation.target_label}


def thresholds_record(fitted: FittedGuard, budgets: tuple[float, ...]) -> dict[str, Any]:
    wanted = sorted({*budgets, fitted.budget})
    return {"method": fitted.name, "kind": fitted.kind, "budget": fitted.budget,
            "thresholds": fitted.thresholds(), "by_budget": {f"{b:g}": fitted.thresholds(b) for b in wanted}}
