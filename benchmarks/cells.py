"""Shared by the benchmark grids: cells run as real ``unbackdoor`` CLI calls, claimed by workers.

A cell is finished when its output exists (every command writes it atomically), so a rerun skips
it and an interrupted one starts again. Workers claim a cell with an atomic ``mkdir`` under
OUT/claims, so two workers never run the same cell; delete OUT/claims to retry cells whose worker
died. Each finished cell appends its wall time and command to OUT/wall_times.jsonl; a failed one
writes its error to OUT/failed/NAME (delete it and its claim to retry).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cell:
    name: str
    output: Path
    args: Callable[[], list[str]]  # ``unbackdoor`` arguments; may wait for the cells it depends on
    after: Path | tuple[Path, ...] | None = None  # outputs this cell reads: not claimed before they exist

    def ready(self) -> bool:
        needed = (self.after,) if isinstance(self.after, Path) else (self.after or ())
        return all(p.exists() for p in needed)


def fixed(args: list[str]) -> Callable[[], list[str]]:
    return lambda: args


def claim(out: Path, cell: Cell) -> bool:
    (out / "claims").mkdir(parents=True, exist_ok=True)
    try:
        (out / "claims" / cell.name).mkdir()
        return True
    except FileExistsError:
        return False


def work(out: Path, grid: Sequence[Cell], poll_s: float = 30.0) -> None:
    """One worker: claim unfinished cells in order and run each as a CLI process. A cell whose
    ``after`` output is missing is passed over and tried again on the next pass, as long as some
    other cell of the grid is still claimed without output (i.e. may be running)."""
    while True:
        waiting = _one_pass(out, grid)
        running = [c for c in grid if (out / "claims" / c.name).exists() and not c.output.exists()
                   and not (out / "failed" / c.name).exists()]
        if not waiting or not running:
            return
        time.sleep(poll_s)


def _one_pass(out: Path, grid: Sequence[Cell]) -> list[Cell]:
    """Run every claimable cell once; return the cells left waiting for their ``after`` output."""
    waiting = []
    for cell in grid:
        if cell.output.exists():
            continue
        if not cell.ready():
            waiting.append(cell)
            continue
        if not claim(out, cell):
            continue
        args = cell.args()
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "unbackdoor.cli", *args], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"cell {cell.name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
            (out / "failed").mkdir(exist_ok=True)
            (out / "failed" / cell.name).write_text(proc.stderr[-2000:])
            continue
        with (out / "wall_times.jsonl").open("a") as fh:
            fh.write(json.dumps({"cell": cell.name, "wall_s": wall, "command": " ".join(["unbackdoor", *args])}) + "\n")
        print(f"done {cell.name} in {wall:.0f} s", flush=True)
    return waiting


def spawn(script: str, out: str, workers: int, extra: Sequence[str] = ()) -> None:
    """Run ``script work --out OUT [EXTRA]`` in ``workers`` processes (one torch thread each when
    more than one); wait for them."""
    env = dict(os.environ)
    if workers > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    procs = [subprocess.Popen([sys.executable, script, "work", "--out", out, *extra], env=env) for _ in range(workers)]
    sys.exit(max(p.wait() for p in procs))


def wall_times(out: Path) -> list[dict]:
    path = out / "wall_times.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def record(folder: Path) -> dict:
    """A model folder's ``unbackdoor.json``, or an eval JSON file."""
    path = folder / "unbackdoor.json" if folder.is_dir() else folder
    return json.loads(path.read_text())


def copy_if_missing(src: Path, dst: Path) -> None:
    """Copy a finished model folder of another grid (same recipe) to ``dst`` atomically, unless
    ``dst`` exists or ``src`` does not."""
    if src.exists() and not dst.exists():
        partial = dst.with_name(f".{dst.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(src, partial)
        partial.rename(dst)
