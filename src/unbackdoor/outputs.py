"""Outputs that never look finished before they are: write into a work dir, rename at the end."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from unbackdoor.errors import UnbackdoorError


def partial_dir(out: Path) -> Path:
    """The work dir of ``out``: kept after a crash so a rerun can resume from its checkpoints."""
    return out.parent / f".{out.name}.partial"


def check_output_free(out: str | Path, overwrite: bool = False) -> Path:
    """Fail early when ``out`` exists (unless ``overwrite``), before any work is done."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UnbackdoorError(f"{out}: already exists; choose another output or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UnbackdoorError(f"{out}: exists and is not a folder")
    return out


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a work dir; on success it becomes ``out``. On failure it stays as ``.<name>.partial``."""
    out = check_output_free(out, overwrite)
    work = partial_dir(out)
    work.mkdir(parents=True, exist_ok=True)  # parents too: only now that the inputs are validated
    yield work
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
