"""Seeded subsets of clean data: a small clean set for a defence, a held-out selection split."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

from unbackdoor.data.types import Dataset, Example
from unbackdoor.errors import ConfigError, DataError


def normalise_text(example: Example) -> str:
    """Text key used to keep subsets disjoint from evaluation data (case and spacing ignored)."""
    parts = [example.text] if example.text_pair is None else [example.text, example.text_pair]
    return " || ".join(" ".join(p.lower().split()) for p in parts)


def _by_label(examples: Iterable[Example]) -> dict[int, list[Example]]:
    groups: dict[int, list[Example]] = {}
    for e in examples:
        groups.setdefault(e.label, []).append(e)
    return groups


def sample_subset(
    data: Dataset,
    *,
    fraction: float | None = None,
    size: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    exclude: Iterable[Dataset] = (),
    name: str | None = None,
) -> Dataset:
    """A seeded, stratified subset of ``data``, disjoint from every dataset in ``exclude``.

    Exactly one of ``fraction`` (share of ``data``), ``size`` (rows) or ``per_class`` (rows per
    label) is given. Rows whose text (case and spacing ignored) occurs in an excluded dataset,
    e.g. the test split, are never drawn.
    """
    given = [v is not None for v in (fraction, size, per_class)]
    if sum(given) != 1:
        raise ConfigError("give exactly one of fraction, size or per_class for a clean subset")
    if fraction is not None and not 0 < fraction <= 1:
        raise ConfigError(f"subset fraction must be in (0, 1], got {fraction}")
    if (size is not None and size < 1) or (per_class is not None and per_class < 1):
        raise ConfigError("subset size and per_class must be at least 1")
    banned = {normalise_text(e) for d in exclude for e in d.examples}
    pool = [e for e in data.examples if normalise_text(e) not in banned]
    groups = _by_label(pool)
    rng = random.Random(seed)
    if per_class is not None:
        quota = {label: per_class for label in groups}
    else:
        total = size if size is not None else max(1, round(fraction * len(data)))  # type: ignore[operator]
        if total > len(pool):
            raise DataError(f"{data.name}: asked for {total} rows, only {len(pool)} available")
        quota = _stratified_quota({k: len(v) for k, v in groups.items()}, total)
    chosen: set[str] = set()
    for label in sorted(groups):
        rows = sorted(groups[label], key=lambda e: e.id)
        if quota[label] > len(rows):
            raise DataError(f"{data.name}: asked for {quota[label]} rows of label {label}, only {len(rows)}")
        chosen.update(e.id for e in rng.sample(rows, quota[label]))
    return data.select(chosen, name or f"{data.name}[subset seed={seed}]")


def _stratified_quota(counts: dict[int, int], total: int) -> dict[int, int]:
    """Largest-remainder allocation of ``total`` rows proportional to ``counts``."""
    n = sum(counts.values())
    exact = {k: total * c / n for k, c in counts.items()}
    quota = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (quota[k] - exact[k], k))[: total - sum(quota.values())]:
        quota[k] += 1
    return quota


def holdout_split(data: Dataset, fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split clean data into a fitting part and a held-out selection part (stratified, seeded).

    Every label keeps at least one row on the fitting side; the held-out side gets at least one
    row overall.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"holdout fraction must be in (0, 1), got {fraction}")
    if len(data) < 2:
        raise DataError(f"{data.name}: need at least 2 rows to hold some out for selection")
    rng = random.Random(seed)
    held: set[str] = set()
    for label, rows in sorted(_by_label(data.examples).items()):
        rows = sorted(rows, key=lambda e: e.id)
        k = min(len(rows) - 1, round(fraction * len(rows)))
        held.update(e.id for e in rng.sample(rows, k))
    if not held:
        spare = [e.id for rows in _by_label(data.examples).values() if len(rows) > 1 for e in rows]
        if not spare:
            raise DataError(f"{data.name}: every label has a single row; nothing can be held out")
        held.add(rng.choice(sorted(spare)))
    return data.without(held, f"{data.name}[fit]"), data.select(held, f"{data.name}[select]")
