"""The results store: one SQLite file per run dir, one row per cell, one row per attempt.

Cells move ``pending -> running -> done | failed``. A claim is one ``BEGIN IMMEDIATE`` transaction
(SQLite's write lock), so two workers never take the same cell; a cell whose ``after`` cells are not
all done is not claimable; a cell whose dependency failed fails too. A running cell whose worker
(same host) is dead goes back to pending at the next claim: that is how a killed run resumes.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STORE_FILE = "results.sqlite"
METRICS = ("cacc", "asr", "robust_accuracy", "macro_f1")

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    kind TEXT NOT NULL,
    dataset TEXT NOT NULL,
    attack TEXT NOT NULL,
    defence TEXT NOT NULL,
    seed INTEGER NOT NULL,
    after TEXT NOT NULL,              -- JSON list of cell ids that must be done first
    config TEXT NOT NULL,             -- JSON: everything needed to run the cell
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    pid INTEGER, host TEXT, started_at REAL, finished_at REAL,
    wall_s REAL, peak_memory_mb REAL, peak_memory_scope TEXT,
    cacc REAL, asr REAL, robust_accuracy REAL, macro_f1 REAL,
    metrics TEXT,                     -- JSON: every metric and count
    version TEXT, git_commit TEXT, error TEXT
);
CREATE TABLE IF NOT EXISTS attempts (
    cell_id TEXT NOT NULL, attempt INTEGER NOT NULL, pid INTEGER, host TEXT,
    started_at REAL, finished_at REAL, outcome TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


@dataclass(frozen=True)
class Slice:
    """The cells one run works on: those of ``seeds`` and of ``attacks`` (None: all). An attack slice
    also holds the never-poisoned model cells (attack ``""``), whose models every floor row reads."""

    seeds: tuple[int, ...] | None = None
    attacks: tuple[str, ...] | None = None

    def where(self) -> tuple[str, tuple[Any, ...]]:
        """``AND ...`` clauses selecting the slice's cells, and their parameters."""
        clause, params = "", ()
        if self.seeds is not None:
            clause += f" AND seed IN ({', '.join('?' * len(self.seeds))})"
            params += tuple(self.seeds)
        if self.attacks is not None:
            clause += f" AND attack IN ({', '.join('?' * (len(self.attacks) + 1))})"
            params += (*self.attacks, "")
        return clause, params

    def holds(self, cell: dict[str, Any]) -> bool:
        """Whether a store row (``seed``, ``attack``) is in the slice."""
        return ((self.seeds is None or cell["seed"] in self.seeds)
                and (self.attacks is None or cell["attack"] in (*self.attacks, "")))


EVERY_CELL = Slice()


@dataclass(frozen=True)
class CellSpec:
    """A cell as the runner expands it from the config."""

    id: str
    kind: str
    dataset: str
    attack: str
    defence: str
    seed: int
    config: dict[str, Any]
    after: tuple[str, ...] = ()


@dataclass(frozen=True)
class Claimed:
    """A cell a worker holds: its identity, config and attempt number."""

    id: str
    kind: str
    config: dict[str, Any]
    attempt: int


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """The run dir's SQLite results store; the file and its tables are created on first use."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / STORE_FILE
        self.host = socket.gethostname()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.executescript(SCHEMA)  # idempotent (IF NOT EXISTS)
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                if con.in_transaction:  # SQLite has already rolled back after some errors (a full disk)
                    con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # ------------------------------------------------------------------ grid
    def add_cells(self, cells: Sequence[CellSpec]) -> list[str]:
        """Insert cells not yet stored and return []; or, when stored cells are gone from ``cells`` or hold
        another config, return their ids and write nothing (a refused config leaves the store as it was)."""
        with self._transaction() as con:
            stored = {r["id"]: r["config"] for r in con.execute("SELECT id, config FROM cells")}
            configs = {cell.id: json.dumps(cell.config, sort_keys=True) for cell in cells}
            changed = [cid for cid in stored if cid not in configs]
            changed += [cell.id for cell in cells if cell.id in stored and stored[cell.id] != configs[cell.id]]
            if changed:
                return changed
            for position, cell in enumerate(cells):
                if cell.id in stored:
                    con.execute("UPDATE cells SET position = ? WHERE id = ?", (position, cell.id))
                    continue
                con.execute(
                    "INSERT INTO cells (id, position, kind, dataset, attack, defence, seed, after, config) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (cell.id, position, cell.kind, cell.dataset, cell.attack, cell.defence, cell.seed,
                     json.dumps(list(cell.after)), configs[cell.id]))
        return []

    def set_meta(self, key: str, value: Any) -> None:
        with self._transaction() as con:
            con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str) -> Any:
        with self._connect() as con:
            row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row is not None else None

    def requeue(self, ids: Sequence[str]) -> None:
        """Put finished cells back to pending (their outputs are gone); their metrics are replaced
        when they finish again."""
        with self._transaction() as con:
            con.executemany("UPDATE cells SET status = 'pending', error = NULL WHERE id = ?", [(i,) for i in ids])

    def retry_failed(self) -> int:
        """Re-queue failed cells; return how many."""
        with self._transaction() as con:
            return con.execute("UPDATE cells SET status = 'pending', error = NULL WHERE status = 'failed'").rowcount

    # ------------------------------------------------------------------ claiming
    def claim(self, pid: int | None = None, cells: Slice = EVERY_CELL) -> Claimed | None:
        """Take the first pending cell (of the slice ``cells``) whose dependencies are done (one write
        transaction), or None."""
        pid = os.getpid() if pid is None else pid
        with self._transaction() as con:
            self._reset_dead(con)
            status = {r["id"]: r["status"] for r in con.execute("SELECT id, status FROM cells")}
            where, params = cells.where()
            for row in con.execute(f"SELECT id, kind, after, config, attempts FROM cells WHERE status = 'pending'{where} "
                                   "ORDER BY position", params).fetchall():
                after = json.loads(row["after"])
                failed = [a for a in after if status.get(a) == "failed"]
                if failed:
                    self._fail_dependent(con, row["id"], failed)
                    status[row["id"]] = "failed"
                    continue
                if any(status.get(a) != "done" for a in after):
                    continue
                attempt = row["attempts"] + 1
                now = time.time()
                con.execute("UPDATE cells SET status = 'running', attempts = ?, pid = ?, host = ?, started_at = ?, "
                            "finished_at = NULL, error = NULL WHERE id = ?", (attempt, pid, self.host, now, row["id"]))
                con.execute("INSERT INTO attempts (cell_id, attempt, pid, host, started_at, outcome) "
                            "VALUES (?, ?, ?, ?, ?, 'running')", (row["id"], attempt, pid, self.host, now))
                return Claimed(row["id"], row["kind"], json.loads(row["config"]), attempt)
        return None

    def _reset_dead(self, con: sqlite3.Connection) -> None:
        """Running cells of this host whose worker process is gone go back to pending."""
        for row in con.execute("SELECT id, pid, attempts FROM cells WHERE status = 'running' AND host = ?",
                               (self.host,)).fetchall():
            if row["pid"] is not None and not pid_alive(row["pid"]):
                con.execute("UPDATE cells SET status = 'pending', pid = NULL WHERE id = ?", (row["id"],))
                con.execute("UPDATE attempts SET outcome = 'lost', finished_at = ? WHERE cell_id = ? AND attempt = ?",
                            (time.time(), row["id"], row["attempts"]))

    def _fail_dependent(self, con: sqlite3.Connection, cell_id: str, failed: list[str]) -> None:
        con.execute("UPDATE cells SET status = 'failed', error = ?, finished_at = ? WHERE id = ?",
                    (f"not run: dependency failed ({', '.join(failed)})", time.time(), cell_id))

    def other_workers(self) -> list[int]:
        """Live processes of this host, other than this one, running a cell of this store."""
        with self._connect() as con:
            pids = {r["pid"] for r in con.execute("SELECT pid FROM cells WHERE status = 'running' AND host = ?",
                                                  (self.host,))}
        return sorted(p for p in pids if p is not None and p != os.getpid() and pid_alive(p))

    def reset_dead_workers(self) -> None:
        """Reset running cells whose worker died (done at every claim too)."""
        with self._transaction() as con:
            self._reset_dead(con)

    # ------------------------------------------------------------------ results
    def finish(self, cell: Claimed, *, metrics: dict[str, Any] | None, error: str | None, wall_s: float,
               peak_memory_mb: float | None, peak_memory_scope: str, version: str, git_commit: str | None) -> None:
        """Record a cell's outcome: done with its metrics, or failed with its error."""
        status = "failed" if error is not None else "done"
        metrics = metrics or {}
        now = time.time()
        with self._transaction() as con:
            con.execute(
                "UPDATE cells SET status = ?, finished_at = ?, wall_s = ?, peak_memory_mb = ?, peak_memory_scope = ?, "
                "cacc = ?, asr = ?, robust_accuracy = ?, macro_f1 = ?, metrics = ?, version = ?, git_commit = ?, "
                "error = ? WHERE id = ? AND attempts = ?",
                (status, now, wall_s, peak_memory_mb, peak_memory_scope, *(metrics.get(k) for k in METRICS),
                 json.dumps(metrics), version, git_commit, error, cell.id, cell.attempt))
            con.execute("UPDATE attempts SET outcome = ?, finished_at = ? WHERE cell_id = ? AND attempt = ?",
                        (status, now, cell.id, cell.attempt))

    def counts(self, cells: Slice = EVERY_CELL) -> dict[str, int]:
        """Number of cells per status (of the slice ``cells``)."""
        where, params = cells.where()
        with self._connect() as con:
            return {r["status"]: r["n"] for r in con.execute(
                f"SELECT status, COUNT(*) AS n FROM cells WHERE 1{where} GROUP BY status", params)}

    def cells(self, status: str | None = None) -> list[dict[str, Any]]:
        """Every cell (or those with ``status``) as a dict, JSON columns decoded, in grid order."""
        query = "SELECT * FROM cells" + (" WHERE status = ?" if status else "") + " ORDER BY position"
        with self._connect() as con:
            rows = con.execute(query, (status,) if status else ()).fetchall()
        return [_decode(dict(r)) for r in rows]

    def attempts(self) -> list[dict[str, Any]]:
        with self._connect() as con:
            return [dict(r) for r in con.execute("SELECT * FROM attempts ORDER BY started_at").fetchall()]


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("after", "config", "metrics"):
        if row.get(key) is not None:
            row[key] = json.loads(row[key])
    return row


def export_json(store: Store, path: Path) -> None:
    """Every cell and attempt as one JSON file (written atomically)."""
    from unbackdoor.outputs import write_json

    write_json(path, {"cells": store.cells(), "attempts": store.attempts()})
