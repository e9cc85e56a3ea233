"""How well suspicion scores find the poisoned rows: evaluation only (benchmarks, tests).

Detectors never import this module: it is the only place scores meet the true poison flags.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch

from unbackdoor.data.types import PoisonFlags
from unbackdoor.detect.base import Detection


def auroc(scores: Sequence[float] | torch.Tensor, positive: Sequence[bool] | torch.Tensor) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting ½
    (the Mann-Whitney statistic, from average ranks)."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    pos = torch.as_tensor(positive, dtype=torch.bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s, stable=True)
    ranks = torch.empty_like(s)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detection_metrics(detection: Detection, flags: PoisonFlags) -> dict[str, float | int]:
    """Precision and recall of the flagged rows, and AUROC of the scores, against the true flags.

    ``flags`` must describe exactly the detection's rows (same count, no unknown ids).
    """
    if not isinstance(flags, PoisonFlags):
        raise TypeError(f"flags must be PoisonFlags, got {type(flags).__name__}")
    ids = detection.rows.ids
    if flags.n_rows != len(ids) or not flags.poisoned_ids <= set(ids):
        raise ValueError(f"the flags describe {flags.n_rows} rows, not the detection's {len(ids)}")
    return _quality(ids, detection.scores.tolist(), set(detection.flagged_ids), flags)


def scores_file_metrics(path: str | Path, flags: PoisonFlags) -> dict[str, float | int]:
    """:func:`detection_metrics` of a written ``unbackdoor detect`` output (its ``scores.csv``), whose
    rows may be a subsample of those ``flags`` describe."""
    if not isinstance(flags, PoisonFlags):
        raise TypeError(f"flags must be PoisonFlags, got {type(flags).__name__}")
    with Path(path).open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path}: no scored rows")
    return _quality([r["id"] for r in rows], [float(r["score"]) for r in rows],
                    {r["id"] for r in rows if r["flagged"] == "1"}, flags)


def _quality(ids: Sequence[str], scores: Sequence[float], chosen: set[str], flags: PoisonFlags) -> dict[str, float | int]:
    truth = [flags.is_poisoned(i) for i in ids]
    hits = sum(1 for i, t in zip(ids, truth, strict=True) if t and i in chosen)
    n_poisoned = sum(truth)
    return {
        "precision": hits / len(chosen) if chosen else float("nan"),
        "recall": hits / n_poisoned if n_poisoned else float("nan"),
        "auroc": auroc(scores, truth),
        "n_rows": len(ids),
        "n_flagged": len(chosen),
        "n_poisoned": n_poisoned,
        "n_true_positive": hits,
    }
