"""Copy one defence's finished cells from a side run into a grid's store, without rebuilding the grid's victims.

A defence added to a published grid would, run there, first rebuild every victim its cells read (the model
folders are not kept with the store), and a victim rebuilt at another commit differs from the published one, so
its numbers would change under the other defences. A defence that does not read the victim's model (a train-time
defence reads only the attack's data) can instead run in a side grid with the same top-level settings and attacks
(e.g. ``benchmarks/clean_only_sst2.yaml``); this script then adds the grid's new cells to its store (as ``unbackdoor
bench`` would, without touching any other cell) and copies the side run's results into the named defence's cells.

    python benchmarks/merge_cells.py SIDE_RUN_DIR GRID_RUN_DIR GRID_CONFIG.yaml --defence NAME

Checks: every cell of the defence in the grid has a finished cell of the same id in the side run, whose config is
the grid's except for the dataset's path (a capped dataset lives under its run folder), and whose attack, seed and
victim are the grid's; otherwise nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

COPIED = ("status", "attempts", "host", "started_at", "finished_at", "wall_s", "peak_memory_mb", "peak_memory_scope",
          "cacc", "asr", "robust_accuracy", "macro_f1", "metrics", "version", "git_commit", "error")


def comparable(config: dict) -> dict:
    """A cell's config without its dataset's path."""
    return {**config, "dataset": {k: v for k, v in config["dataset"].items() if k != "spec"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("side", type=Path, help="the side run folder (its results.sqlite)")
    parser.add_argument("grid", type=Path, help="the grid's run folder (its results.sqlite is updated)")
    parser.add_argument("config", type=Path, help="the grid's config, which lists the defence")
    parser.add_argument("--defence", required=True)
    args = parser.parse_args()
    from unbackdoor.bench.config import load_bench_config
    from unbackdoor.bench.runner import capped_datasets, expand
    from unbackdoor.bench.store import Store

    config = load_bench_config(args.config)
    grid = expand(config, capped_datasets(config, args.grid))
    wanted = {cell.id: cell for cell in grid if cell.defence == args.defence}
    if not wanted:
        sys.exit(f"{args.config}: no cell of defence {args.defence}")
    side = sqlite3.connect(args.side / "results.sqlite")
    side.row_factory = sqlite3.Row
    found = {r["id"]: dict(r) for r in side.execute("SELECT * FROM cells WHERE defence = ?", (args.defence,))}
    problems = []
    for cid, cell in wanted.items():
        row = found.get(cid)
        if row is None or row["status"] != "done":
            problems.append(f"{cid}: not finished in {args.side}")
        elif comparable(json.loads(row["config"])) != comparable(json.loads(json.dumps(cell.config))):
            problems.append(f"{cid}: the side run's config differs from the grid's")
    if problems:
        sys.exit("nothing merged:\n" + "\n".join(problems))
    changed = Store(args.grid).add_cells(grid)
    if changed:
        sys.exit(f"{args.grid}: holds cells of another config ({', '.join(changed[:3])}); nothing merged")
    with sqlite3.connect(args.grid / "results.sqlite") as con:
        for cid in wanted:
            row = found[cid]
            con.execute(f"UPDATE cells SET {', '.join(f'{k} = ?' for k in COPIED)}, pid = NULL WHERE id = ?",
                        (*(row[k] for k in COPIED), cid))
            con.execute("INSERT INTO attempts (cell_id, attempt, pid, host, started_at, finished_at, outcome) "
                        "VALUES (?, ?, NULL, ?, ?, ?, ?)", (cid, row["attempts"], row["host"], row["started_at"],
                                                             row["finished_at"], row["status"]))
    print(f"merged {len(wanted)} cells of {args.defence} from {args.side} into {args.grid}")


if __name__ == "__main__":
    main()
