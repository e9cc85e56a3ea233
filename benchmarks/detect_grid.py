"""Issue-7 acceptance grid: find the poisoned rows without flags, then unlearn them.

    python benchmarks/detect_grid.py run [--out runs/detect_grid] [--workers 2] [--victims runs/unlearn_grid/models]
    python benchmarks/detect_grid.py report [--out runs/detect_grid] [--md docs/results/detect.md]

Cells (``benchmarks/cells.py``; each one ``unbackdoor`` call): ``detect`` with bilevel and trilevel
reweighting and the per-row loss baseline on each poisoned SST-2 training set (1 % clean set, flag
rate 10 %: the defender does not know the poison rate); reweighted training (``train --defense
reweight``); LYA with the detected forget set (``flagged.tsv``) on the victims of
``unlearn_grid.py``. Only this script's report reads the true flags, to score the detections.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

from cells import Cell, fixed, record, spawn, wall_times, work

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DETECTORS = {"reweight-2": ("reweight", ["-p", "levels=2"]), "reweight-3": ("reweight", ["-p", "levels=3"]),
             "loss": ("loss", [])}
UNLEARN_DETECTOR = "loss"  # whose flagged rows LYA unlearns (the cheapest; see the report for the others)


def datasets(out: Path) -> dict[str, str]:
    return {"badnets-onion-p1": "sst2/badnets_onion_p1", "addsent": "sst2/addsent_openbackdoor_p10",
            "synbkd-hiddenkiller": "sst2/synbkd_hiddenkiller_p20", "badnets-dirty": str(out / "data" / "badnets-dirty")}


def grid(out: Path, victims: Path) -> list[Cell]:
    cells = [Cell("data-badnets-dirty", out / "data" / "badnets-dirty",
                  fixed(["-q", "attack", "--data", "sst2", "--attack", "badnets", "--poison-rate", "0.1",
                         "--out", str(out / "data" / "badnets-dirty")]))]
    for name, data in datasets(out).items():
        for label, (method, params) in DETECTORS.items():
            target = out / "detect" / f"{name}-{label}"
            cells.append(Cell(f"detect-{name}-{label}", target,
                              fixed(["-q", "detect", "--data", data, "--clean", "sst2", "--clean-fraction", "0.01",
                                     "--method", method, *params, "--rate", "0.1", "--out", str(target)])))
    for name, data in datasets(out).items():
        victim, flagged = victims / name, out / "detect" / f"{name}-{UNLEARN_DETECTOR}"
        if not victim.exists():  # victims come from unlearn_grid.py (our BadNets, SynBkd)
            continue
        target = out / "unlearned" / f"{name}-lya-detected"
        cells.append(Cell(f"lya-detected-{name}", target,
                          fixed(["-q", "unlearn", "-m", str(victim), "--forget", str(flagged / "flagged.tsv"),
                                 "--retain", "sst2", "--retain-fraction", "0.05", "--method", "lya",
                                 "--eval-data", data, "--out", str(target)]), after=flagged))
    for name, data in datasets(out).items():
        target = out / "models" / f"{name}-reweight"
        cells.append(Cell(f"reweight-{name}", target,
                          fixed(["-q", "train", "--data", data, "--defense", "reweight", "--out", str(target)])))
    return cells


def run_grid(args: argparse.Namespace) -> None:
    (Path(args.out) / "data").mkdir(parents=True, exist_ok=True)
    spawn(__file__, args.out, args.workers, extra=["--victims", args.victims])


def run_worker(args: argparse.Namespace) -> None:
    work(Path(args.out), grid(Path(args.out), Path(args.victims)))


def detection_scores(folder: Path, data: str) -> dict[str, float]:
    """Precision, recall and AUROC of a ``detect`` output against the true flags (evaluation only)."""
    from unbackdoor.data import load_poisoned_task
    from unbackdoor.detect.metrics import auroc

    flags = load_poisoned_task(data).flags
    with (folder / "scores.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    truth = [flags.is_poisoned(r["id"]) for r in rows]
    flagged = [r["flagged"] == "1" for r in rows]
    hits = sum(t and f for t, f in zip(truth, flagged, strict=True))
    return {"precision": hits / max(1, sum(flagged)), "recall": hits / max(1, sum(truth)),
            "auroc": auroc([float(r["score"]) for r in rows], truth), "n_poisoned": sum(truth), "n_rows": len(rows)}


def write_report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    walls = {r["cell"]: r["wall_s"] for r in wall_times(out)}
    lines = ["# Detecting poisoned rows, then unlearning them", "",
             "Command: `python benchmarks/detect_grid.py run --workers 2 --victims runs/unlearn_grid/models` then "
             "`... report`. Detection: 1 % clean SST-2 rows (69), MiniLM features, 10 % of rows flagged. Precision, "
             "recall and AUROC against the true flags (read here only).", "",
             "| data | detector | poisoned rows | precision % | recall % | AUROC | s |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, data in datasets(out).items():
        for label in DETECTORS:
            folder = out / "detect" / f"{name}-{label}"
            if not folder.exists():
                continue
            m = detection_scores(folder, data)
            lines.append(f"| {name} | {label} | {m['n_poisoned']} / {m['n_rows']} | {100 * m['precision']:.1f} | "
                         f"{100 * m['recall']:.1f} | {m['auroc']:.3f} | {walls.get(f'detect-{name}-{label}', float('nan')):.0f} |")
    lines += ["", "| data | model | CACC % | ASR % | s |", "|---|---|---:|---:|---:|"]
    for name in datasets(out):
        for folder in (out / "unlearned" / f"{name}-lya-detected", out / "models" / f"{name}-reweight"):
            if folder.exists():
                rec = record(folder)
                m = rec["metrics"]
                lines.append(f"| {name} | {folder.name} | {100 * m['cacc']:.1f} | {100 * m.get('asr', float('nan')):.1f} | "
                             f"{rec.get('wall_time_s') or rec['training']['wall_time_s']:.0f} |")
    lines += ["", "## Commands of the cells", "", "```", *[r["command"] for r in wall_times(out)], "```", ""]
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(json.dumps({"wrote": args.md}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "work", "report"):
        p = sub.add_parser(name)
        p.add_argument("--out", default="runs/detect_grid")
        if name in ("run", "work"):
            p.add_argument("--victims", default="runs/unlearn_grid/models")
        if name == "run":
            p.add_argument("--workers", type=int, default=2)
        if name == "report":
            p.add_argument("--md", default="docs/results/detect.md")
    args = parser.parse_args()
    {"run": run_grid, "work": run_worker, "report": write_report}[args.command](args)


if __name__ == "__main__":
    main()
