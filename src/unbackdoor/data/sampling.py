"""Seeded subsets of data: a defender's small clean set (:class:`CleanSetConfig`), held-out selection
splits, subsampled training rows, and a dev split kept apart from test."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

import dataclasses
import logging

from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.data.types import Dataset, Example, PoisonedTask, PoisonFlags, Task
from unbackdoor.errors import ConfigError, DataError

logger = logging.getLogger(__name__)
CARVED_DEV_SHARE = 0.1  # a dev split carved out of train takes this share of it (at most the old dev's size)
CARVED_DEV_SEED = 0  # fixed: the task's splits must not depend on a run's seed


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


def overlap_count(rows: Dataset, other: Dataset) -> int:
    """How many of ``rows`` repeat a text of ``other`` (case and spacing ignored)."""
    seen = {normalise_text(e) for e in other.examples}
    return sum(normalise_text(e) in seen for e in rows.examples)


def separate_dev_from_test(task: Task) -> Task:
    """The task with a dev split that shares no text with test, so that selecting on dev never
    selects on test; the overlaps and what was done go to ``task.integrity`` (and one warning line).

    Dev rows that repeat a test row are dropped; when that would leave less than half of dev (HSOL
    as released has dev = test), a dev split is carved out of train instead: a seeded, stratified
    :data:`CARVED_DEV_SHARE` of it, disjoint from test, removed from train. Train rows that repeat
    test rows are only counted (duplicates in the released data)."""
    test_texts = {normalise_text(e) for e in task.test.examples}
    dev_in_test = [e.id for e in task.dev.examples if normalise_text(e) in test_texts]
    integrity = {"dev_rows_in_test": len(dev_in_test), "train_rows_in_test": overlap_count(task.train, task.test),
                 "train_rows_in_dev": overlap_count(task.train, task.dev), "dev": "as released"}
    train, dev = task.train, task.dev
    if dev_in_test and len(dev_in_test) <= len(task.dev) / 2:
        dev = task.dev.without(dev_in_test, task.dev.name)
        integrity["dev"] = f"released dev less the {len(dev_in_test)} of its {len(task.dev)} rows that repeat test rows"
    elif dev_in_test:
        size = min(len(task.dev), max(2 * task.num_labels, round(CARVED_DEV_SHARE * len(task.train))))
        try:
            dev = sample_subset(task.train, size=size, seed=CARVED_DEV_SEED, exclude=[task.test],
                                name=f"{task.name}:dev (carved from train)")
        except DataError:
            raise DataError(f"{task.name}: {len(dev_in_test)} of the {len(task.dev)} dev rows repeat test rows, and "
                            "train has too few other rows to carve a dev split from; selecting on this dev would "
                            "select on the test set: give a dev split disjoint from test") from None
        train = task.train.without(dev.ids, task.train.name)
        integrity["dev"] = (f"{len(dev)} rows carved from train (seed {CARVED_DEV_SEED}, disjoint from test), "
                            f"because {len(dev_in_test)} of the {len(task.dev)} released dev rows repeat test rows")
    if dev_in_test:
        logger.warning("%s: selection uses %s", task.name, integrity["dev"])
    return dataclasses.replace(task, train=train, dev=dev, integrity=integrity)


def subsample_task(task: Task, max_train: int | None, seed: int) -> Task:
    """The task with its training split cut to ``max_train`` rows (stratified, seeded)."""
    if max_train is None or max_train >= len(task.train):
        return task
    train = sample_subset(task.train, size=max_train, seed=seed, name=f"{task.train.name}[{max_train} rows]")
    return dataclasses.replace(task, train=train)


EVAL_CAP_SEED = 0  # fixed: every run of a grid evaluates the same capped dev and test rows


def cap_eval_splits(task: Task, max_dev: int | None, max_test: int | None) -> Task:
    """The task with dev and test cut to seeded, stratified subsets of at most ``max_dev`` and
    ``max_test`` rows (a large test split, e.g. AG News' 7,600, costs a grid more than its training).
    The seed is fixed, not the run's, so every cell evaluates the same rows."""
    splits = {"dev": (task.dev, max_dev), "test": (task.test, max_test)}
    cut = {split: data if cap is None or cap >= len(data) else
           sample_subset(data, size=cap, seed=EVAL_CAP_SEED, name=f"{data.name}[{cap} rows]")
           for split, (data, cap) in splits.items()}
    return dataclasses.replace(task, dev=cut["dev"], test=cut["test"])


def subsample_poisoned(task: PoisonedTask, max_train: int | None, seed: int) -> PoisonedTask:
    """A poisoned task with its training rows cut to ``max_train`` (flags follow the rows by id)."""
    if max_train is None or max_train >= len(task.train):
        return task
    train = sample_subset(task.train, size=max_train, seed=seed, name=f"{task.train.name}[{max_train} rows]")
    kept = task.flags.poisoned_ids & set(train.ids)
    return dataclasses.replace(task, train=train, flags=PoisonFlags(frozenset(kept), len(train)))


class CleanSetConfig(StrictConfig):
    """How the defender's small clean set is drawn (from a clean task's train split)."""

    fraction: float | None = Field(0.01, gt=0, le=1, description="share of the clean train split")
    size: int | None = Field(None, ge=2, description="number of rows (instead of fraction)")
    per_class: int | None = Field(None, ge=1, description="rows per label (instead of fraction)")
    seed: int = 0


def draw_clean_set(task: Task, spec: CleanSetConfig) -> Dataset:
    """A seeded clean subset of ``task.train``, disjoint from its dev and test texts."""
    fraction = None if (spec.size or spec.per_class) else spec.fraction
    return sample_subset(task.train, fraction=fraction, size=spec.size, per_class=spec.per_class,
                         seed=spec.seed, exclude=[task.test, task.dev], name=f"{task.name}:clean-set")
