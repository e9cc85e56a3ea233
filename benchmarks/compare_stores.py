"""Compare two bench stores cell by cell: per (dataset, attack, defence) and metric (CACC, ASR), the
mean and standard deviation over seeds in each store, and whether the new mean lies within the seed
spread of the old (|delta mean| <= 2 x max(std old, std new, 0.5 point)). Also per cell kind the mean
wall time in each store. Prints Markdown.

    python benchmarks/compare_stores.py docs/results/sst2_grid/fp32_v1/results.sqlite docs/results/sst2_grid/results.sqlite
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
from collections import defaultdict


def load(path: str, ids: set[str] | None = None) -> dict[str, dict]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT id, kind, dataset, attack, defence, seed, wall_s, cacc, asr, peak_memory_mb "
                          "FROM cells WHERE status = 'done'").fetchall()
    keys = ("id", "kind", "dataset", "attack", "defence", "seed", "wall_s", "cacc", "asr", "peak_memory_mb")
    return {r[0]: dict(zip(keys, r, strict=True)) for r in rows if ids is None or r[0] in ids}


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare(old: dict[str, dict], new: dict[str, dict]) -> tuple[list[str], int, int]:
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cid in old.keys() & new.keys():
        key = (old[cid]["dataset"], old[cid]["attack"], old[cid]["defence"])
        for metric in ("cacc", "asr"):
            if old[cid][metric] is not None and new[cid][metric] is not None:
                groups[(*key, metric)]["old"].append(100 * old[cid][metric])
                groups[(*key, metric)]["new"].append(100 * new[cid][metric])
    lines, within = [], 0
    for key in sorted(groups):
        (mo, so), (mn, sn) = spread(groups[key]["old"]), spread(groups[key]["new"])
        ok = abs(mn - mo) <= 2 * max(so, sn, 0.5)
        within += ok
        lines.append(f"| {' | '.join(key[1:3])} | {key[3].upper()} | {mo:.1f} ± {so:.1f} | {mn:.1f} ± {sn:.1f} | "
                     f"{mn - mo:+.1f} | {'yes' if ok else '**no**'} |")
    return lines, within, len(groups)


def kind_times(old: dict[str, dict], new: dict[str, dict]) -> list[str]:
    lines = []
    for kind in sorted({c["kind"] for c in old.values()}):
        ids = [cid for cid in old.keys() & new.keys() if old[cid]["kind"] == kind]
        if ids:
            o = statistics.mean(old[i]["wall_s"] for i in ids)
            n = statistics.mean(new[i]["wall_s"] for i in ids)
            po = max(old[i]["peak_memory_mb"] or 0 for i in ids)
            pn = max(new[i]["peak_memory_mb"] or 0 for i in ids)
            lines.append(f"| {kind} | {len(ids)} | {o:.0f} | {n:.0f} | {o / n:.2f}x | {po:.0f} | {pn:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    args = parser.parse_args()
    old, new = load(args.old), load(args.new)
    lines, within, total = compare(old, new)
    print("| attack | defence | metric | old mean ± std | new mean ± std | delta | within |")
    print("|---|---|---|---:|---:|---:|---|")
    print("\n".join(lines))
    print(f"\n{within} of {total} (attack, defence, metric) means within the seed spread\n")
    print("| cell kind | cells | old mean s | new mean s | speed-up | old max peak MB | new max peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(kind_times(old, new)))
    common = old.keys() & new.keys()
    print(f"\nworker-seconds over the {len(common)} common cells: old {sum(old[i]['wall_s'] for i in common):,.0f}, "
          f"new {sum(new[i]['wall_s'] for i in common):,.0f}")


if __name__ == "__main__":
    main()
