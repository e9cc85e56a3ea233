"""Metrics: CACC, macro-F1 and per-class accuracy on clean test data; ASR and robust accuracy on
the triggered set; results as a JSON-able record and a Markdown table.

Definitions follow ``docs/evaluation.md``: ASR counts, among triggered inputs whose true label is
not the target, the share predicted as the target; robust accuracy (RA) is accuracy on the same
inputs w.r.t. their true labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from unbackdoor.data.types import Dataset, PoisonedTask, Task, TriggeredSet
from unbackdoor.inference import predict
from unbackdoor.models.loading import Classifier
from unbackdoor.utils.resources import Stopwatch, peak_memory_mb


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.size == 0:
        raise ValueError("accuracy of an empty set")
    return float((t == p).mean())


def per_class_accuracy(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> list[float | None]:
    """Recall of each class (``None`` for a class absent from ``y_true``)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return [float((p[t == k] == k).mean()) if (t == k).any() else None for k in range(num_labels)]


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> float:
    """Unweighted mean over classes of per-class F1 (a class with no true and no predicted row
    is left out; a class with either but no hit scores 0)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    scores = []
    for k in range(num_labels):
        tp = int(((t == k) & (p == k)).sum())
        fp = int(((t != k) & (p == k)).sum())
        fn = int(((t == k) & (p != k)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def attack_success_rate(y_pred: Sequence[int], target_label: int) -> float:
    """Share of triggered non-target inputs predicted as the target."""
    p = np.asarray(y_pred)
    if p.size == 0:
        raise ValueError("ASR of an empty triggered set")
    return float((p == target_label).mean())


def clean_to_target(y_true: Sequence[int], y_pred: Sequence[int], target_label: int) -> float | None:
    """Share of *clean* rows whose true label is not the target that are predicted as the target:
    the model's own lean, which its ASR includes (None when every row is of the target class)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    other = t != target_label
    return float((p[other] == target_label).mean()) if other.any() else None


def recorded_clean_to_target(metrics: dict[str, Any], target_label: int | None = None) -> float | None:
    """``clean_to_target`` of a metrics record; for a record written before it was kept, derived on a
    binary task from the per-class accuracy and the target (the record's own, else ``target_label``)."""
    if metrics.get("clean_to_target") is not None:
        return float(metrics["clean_to_target"])
    target = metrics.get("target_label", target_label)
    per_class = metrics.get("per_class_accuracy")
    if target not in (0, 1) or not per_class or len(per_class) != 2 or per_class[1 - target] is None:
        return None
    return 1.0 - per_class[1 - target]


def robust_accuracy(y_pred: Sequence[int], original_labels: Sequence[int | None]) -> float | None:
    """Accuracy on triggered inputs w.r.t. their true labels (None if those are unknown)."""
    known = [(p, y) for p, y in zip(y_pred, original_labels, strict=True) if y is not None]
    if not known:
        return None
    return float(np.mean([p == y for p, y in known]))


def defence_effectiveness_rating(asr_before: float, asr_after: float, acc_before: float, acc_after: float) -> float:
    """DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2 (BackdoorBench's docstring formula)."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1) / 2


@dataclass
class EvalResult:
    """Metrics of one model on one clean test set and, optionally, one triggered set."""

    model: str
    cacc: float
    macro_f1: float
    per_class_accuracy: list[float | None]
    n_clean: int
    asr: float | None = None
    robust_accuracy: float | None = None
    n_triggered: int | None = None
    target_label: int | None = None
    clean_to_target: float | None = None
    confusion: list[list[int]] | None = None  # clean test counts, [true label][predicted label]
    data_integrity: dict[str, Any] | None = None  # the task's split overlaps and what was done about them
    precision: str | None = None  # the compute precision of the predictions
    wall_time_s: float = 0.0
    peak_memory_mb: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_classifier(
    clf: Classifier,
    clean_test: Dataset,
    triggered: TriggeredSet | None = None,
    *,
    name: str = "",
    batch_size: int = 128,
) -> EvalResult:
    """CACC/F1/per-class accuracy on ``clean_test``; ASR/RA on ``triggered`` when given."""
    if not isinstance(clean_test, Dataset):
        raise TypeError(f"clean_test must be a Dataset, got {type(clean_test).__name__}")
    if triggered is not None and not isinstance(triggered, TriggeredSet):
        raise TypeError(f"triggered must be a TriggeredSet, got {type(triggered).__name__}")
    watch = Stopwatch()
    preds = predict(clf, clean_test.examples, batch_size)
    result = clean_result(name or clf.source, clean_test, preds, clf.precision)
    if triggered is not None:
        add_triggered(result, triggered, predict(clf, triggered.examples, batch_size))
    result.wall_time_s = watch.elapsed()
    result.peak_memory_mb = peak_memory_mb()
    return result


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> list[list[int]]:
    """Counts ``[true][predicted]``."""
    counts = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(counts, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return counts.tolist()


def clean_result(name: str, clean_test: Dataset, preds: Sequence[int], precision: str | None = None) -> EvalResult:
    """The clean-test part of an evaluation, from its predictions."""
    return EvalResult(
        model=name,
        cacc=accuracy(clean_test.labels, preds),
        macro_f1=macro_f1(clean_test.labels, preds, clean_test.num_labels),
        per_class_accuracy=per_class_accuracy(clean_test.labels, preds, clean_test.num_labels),
        n_clean=len(clean_test),
        confusion=confusion_matrix(clean_test.labels, preds, clean_test.num_labels),
        precision=precision,
    )


def add_triggered(result: EvalResult, triggered: TriggeredSet, preds: Sequence[int]) -> EvalResult:
    """ASR, robust accuracy and the clean → target lean (from the clean confusion counts)."""
    preds = np.asarray(preds)
    result.asr = attack_success_rate(preds, triggered.target_label)
    result.robust_accuracy = robust_accuracy(preds.tolist(), triggered.original_labels)
    result.n_triggered = len(triggered)
    result.target_label = triggered.target_label
    result.clean_to_target = lean_from_confusion(result.confusion, triggered.target_label)
    return result


def lean_from_confusion(confusion: list[list[int]] | None, target_label: int) -> float | None:
    """Share of clean non-target rows predicted as the target (``None`` without such rows)."""
    if confusion is None:
        return None
    other = [row for true, row in enumerate(confusion) if true != target_label]
    total = sum(sum(row) for row in other)
    return sum(row[target_label] for row in other) / total if total else None


def result_from_record(record: dict[str, Any], name: str) -> EvalResult:
    """The clean part of an evaluation recorded earlier (a metrics summary with its confusion counts),
    so the same model is not evaluated on the same clean set again."""
    keys = ("cacc", "macro_f1", "per_class_accuracy", "n_clean", "confusion", "data_integrity", "precision")
    return EvalResult(model=name, **{k: record.get(k) for k in keys})


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def markdown_table(rows: Sequence[tuple[str, EvalResult]], floor: EvalResult | None = None) -> str:
    """A Markdown table of CACC / F1 / ASR / RA (percent), with the never-poisoned floor row."""
    lines = [
        "| model | CACC % | macro-F1 % | ASR % | RA % | ASR − floor (pts) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    all_rows = list(rows) + ([("never-poisoned floor", floor)] if floor is not None else [])
    for label, r in all_rows:
        above = "—"
        if floor is not None and floor.asr is not None and r.asr is not None:
            above = f"{100 * (r.asr - floor.asr):+.1f}"
        lines.append(f"| {label} | {_pct(r.cacc)} | {_pct(r.macro_f1)} | {_pct(r.asr)} | {_pct(r.robust_accuracy)} | {above} |")
    return "\n".join(lines) + "\n"


def evaluate_on(clf: Classifier, data: Task | PoisonedTask, name: str = "") -> EvalResult:
    """CACC on the clean test split; ASR too when ``data`` is poisoned."""
    task = data.clean if isinstance(data, PoisonedTask) else data
    triggered = data.triggered_test if isinstance(data, PoisonedTask) else None
    result = evaluate_classifier(clf, task.test, triggered, name=name)
    result.data_integrity = dict(task.integrity) or None
    return result
