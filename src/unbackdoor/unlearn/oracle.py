"""BENCHMARK ONLY (oracle): forget sets built from an attack's ground-truth poison flags.

Unlearning presupposes that the trojaned rows have been identified (``lya.md`` §11.7). Benchmarks
stand in for that identification with the truth: a seeded fraction (e.g. 10 / 50 / 100 %) of the
rows the attack poisoned, as they were trained on (triggered text, training label). State it as
the threat model's assumption wherever results are reported. No unlearn method imports this
module: a method receives only the resulting forget :class:`~unbackdoor.data.Dataset`.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from unbackdoor.data.io import write_rows_file
from unbackdoor.data.types import Dataset, PoisonedTask
from unbackdoor.errors import ConfigError


def forget_from_flags(task: PoisonedTask, fraction: float, seed: int = 0) -> Dataset:
    """A seeded ``fraction`` of ``task``'s truly poisoned training rows (at least one), as trained."""
    if not isinstance(task, PoisonedTask):
        raise TypeError(f"forget_from_flags takes a PoisonedTask, got {type(task).__name__}")
    if not 0 < fraction <= 1:
        raise ConfigError(f"forget fraction must be in (0, 1], got {fraction}")
    poisoned = sorted(task.flags.poisoned_ids)
    if not poisoned:
        raise ConfigError(f"{task.name}: no poisoned rows to forget")
    n = max(1, math.ceil(fraction * len(poisoned) - 1e-9))
    chosen = random.Random(seed).sample(poisoned, n)
    return task.train.select(chosen, f"{task.name}:forget[oracle {fraction:g}, seed={seed}]")


def write_forget_file(forget: Dataset, path: str | Path) -> Path:
    """Write a forget set as JSONL (``id``, ``sentence`` or ``sentence1``/``sentence2``, ``label``;
    text kept exactly), the format ``unbackdoor unlearn --forget`` reads."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ConfigError(f"{path}: a forget file is written as .jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_rows_file(path, forget.examples, forget.is_pair)
    return path
