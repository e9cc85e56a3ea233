"""Compute precision: bf16 autocast where the processor runs bf16 natively, fp32 otherwise.

``auto`` (the default of every command) resolves once, at load time, to ``bf16`` on a CPU with
native bf16 dot products (``avx512_bf16`` or ``amx_bf16``) or a GPU that supports bf16, for a model
whose hidden size is at least :data:`BF16_MIN_HIDDEN`; else to ``fp32``. ``--precision fp32`` opts
out. Small models gain nothing: their matrix products are too small to pay for the casts (a 2-layer
BERT of hidden size 32 trains at 1,900 rows/s in bf16 vs 2,600 in fp32 here). The resolved value travels with the
:class:`~unbackdoor.models.loading.Classifier` (its ``precision``), so training, prediction and every
defence built on them use it without being told, and every result record states it.

Autocast keeps the weights, gradients and optimizer state in fp32 and runs matrix products in bf16
(measured on MiniLM, 2 cores: training 1.4-1.8x, prediction about 3x the fp32 throughput). Methods
that read gradients or curvature of single rows (Fisher information, gradient alignment, neuron
weight change) compute them outside autocast or from fp32 gradients: see ``docs/benchmarks.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

from unbackdoor.errors import ConfigError

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_MIN_HIDDEN = 256  # auto keeps smaller models in fp32


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU advertises native bf16 arithmetic (Linux ``/proc/cpuinfo`` flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = {word for line in text.splitlines() if line.startswith("flags") for word in line.split()}
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(precision: str, hidden_size: int | None = None) -> Literal["bf16", "fp32"]:
    """``auto`` -> what this machine runs well for a model of ``hidden_size``; ``bf16``/``fp32`` as given."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision  # type: ignore[return-value]
    if hidden_size is not None and hidden_size < BF16_MIN_HIDDEN:
        return "fp32"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager[None]:
    """The autocast region of a resolved precision (a no-op for fp32)."""
    if precision == "bf16":
        kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def full_precision(device: torch.device | str = "cpu") -> Iterator[None]:
    """An fp32 island inside an autocast region (per-row gradients, curvature)."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    with torch.autocast(kind, enabled=False):
        yield
