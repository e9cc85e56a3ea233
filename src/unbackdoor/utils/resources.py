"""Wall time and peak memory of a run."""

from __future__ import annotations

import resource
import sys
import time

import torch


def peak_memory_mb() -> float:
    """Peak memory so far: GPU allocations when CUDA is in use, else the process's peak RSS.

    On CPU this is the process-wide high-water mark, so it covers everything the process did.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class Stopwatch:
    """Seconds since construction."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._start
