"""Issue-7 acceptance grid: find the poisoned rows without flags, then unlearn them.

    python benchmarks/detect_grid.py pilot [--out runs/detect_grid]   # the reweight defaults, on a development attack
    python benchmarks/detect_grid.py run [--out runs/detect_grid] [--workers 2] [--reuse runs]
    python benchmarks/detect_grid.py report [--out runs/detect_grid] [--md docs/results/detect.md]

Cells (``benchmarks/cells.py``; each one ``unbackdoor`` call): ``detect`` with bilevel and trilevel
reweighting and the per-row loss baseline on each poisoned SST-2 training set (1 % clean set, flag
rate 10 %: the defender does not know the poison rate); the victims (copied from the other grids
with ``--reuse``, else trained) and the never-poisoned floor, evaluated; LYA with the detected
forget set (``flagged.tsv``) and with the oracle one (every truly poisoned row); the experimental
``repair`` with the detected rows on our BadNets; reweighted training (``train --defense
reweight``). Only the oracle forget files and this script's report read the true flags.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

from cells import Cell, copy_if_missing, fixed, record, spawn, wall_times, work

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DETECTORS = {"reweight-2": ("reweight", ["-p", "levels=2"]), "reweight-3": ("reweight", ["-p", "levels=3"]),
             "loss": ("loss", [])}
UNLEARN_DETECTOR = "loss"  # whose flagged rows LYA unlearns (the cheapest; see the report for the others)


def datasets(out: Path) -> dict[str, str]:
    return {"badnets-onion-p1": "sst2/badnets_onion_p1", "addsent": "sst2/addsent_openbackdoor_p10",
            "synbkd-hiddenkiller": "sst2/synbkd_hiddenkiller_p20", "badnets-dirty": str(out / "data" / "badnets-dirty")}


# Development attack for choosing the reweight detector's defaults: our AddSent on OLID (another task,
# another trigger than the four acceptance sets), 3,000 training rows. Its flags score the candidates.
DEV_DATA = "olid-addsent-dev"
DEV_CANDIDATES = {"default": [], "outer_lr=0.3": ["-p", "outer_lr=0.3"], "outer_lr=0.03": ["-p", "outer_lr=0.03"],
                  "inner_steps=10": ["-p", "inner_steps=10"], "pooling=cls": ["-p", "pooling=cls"],
                  "epochs=40": ["-p", "epochs=40"], "levels=3": ["-p", "levels=3"],
                  # second round: the two best single changes of the first round, combined
                  "pooling=cls+outer_lr=0.3": ["-p", "pooling=cls", "-p", "outer_lr=0.3"],
                  "pooling=cls+inner_steps=10": ["-p", "pooling=cls", "-p", "inner_steps=10"]}


def pilot_grid(out: Path) -> list[Cell]:
    data = out / "data" / DEV_DATA
    cells = [Cell(f"data-{DEV_DATA}", data,
                  fixed(["-q", "attack", "--data", "olid", "--attack", "addsent", "--poison-rate", "0.1",
                         "--out", str(data)]))]
    for label, params in DEV_CANDIDATES.items():
        target = out / "pilot" / f"reweight-{label}"
        cells.append(Cell(f"pilot-reweight-{label}", target,
                          fixed(["-q", "detect", "--data", str(data), "--clean", "olid", "--clean-fraction", "0.01",
                                 "--max-train", "3000", "--method", "reweight", *params, "--rate", "0.1",
                                 "--out", str(target)]), after=data))
    target = out / "pilot" / "loss"
    cells.append(Cell("pilot-loss", target,
                      fixed(["-q", "detect", "--data", str(data), "--clean", "olid", "--clean-fraction", "0.01",
                             "--max-train", "3000", "--method", "loss", "--rate", "0.1", "--out", str(target)]),
                      after=data))
    return cells


def _victim(out: Path, name: str, data: str) -> tuple[Path, list[Cell]]:
    """The MiniLM victim trained on ``data`` (copied in by ``--reuse`` when another grid has it)."""
    victim = out / "victims" / name
    return victim, [Cell(f"victim-{name}", victim, fixed(["-q", "train", "--data", data, "--out", str(victim)]))]


def _oracle_forget(out: Path, data: str, name: str) -> Callable[[], list[str]]:
    """All truly poisoned rows as a forget file (benchmark-only truth: the oracle baseline (c))."""
    def args() -> list[str]:
        from unbackdoor.data import load_poisoned_task
        from unbackdoor.unlearn.oracle import forget_from_flags, write_forget_file

        path = out / "forget" / f"{name}-oracle.jsonl"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_forget_file(forget_from_flags(load_poisoned_task(data), 1.0, seed=0), path)
        return [str(path)]
    return args


def _lya(out: Path, name: str, data: str, victim: Path, label: str, forget: Callable[[], list[str]],
         after: tuple[Path, ...]) -> Cell:
    target = out / "unlearned" / f"{name}-lya-{label}"
    return Cell(f"lya-{label}-{name}", target,
                lambda: ["-q", "unlearn", "-m", str(victim), "--forget", *forget(), "--retain", "sst2",
                         "--retain-fraction", "0.05", "--method", "lya", "--eval-data", data, "--out", str(target)],
                after=after)


def grid(out: Path) -> list[Cell]:
    """Detection (cheap) first, then LYA with detected and oracle forget sets, then reweighted
    training (one full training per set)."""
    cells = [Cell("data-badnets-dirty", out / "data" / "badnets-dirty",
                  fixed(["-q", "attack", "--data", "sst2", "--attack", "badnets", "--poison-rate", "0.1",
                         "--out", str(out / "data" / "badnets-dirty")]))]
    for name, data in datasets(out).items():
        for label, (method, params) in DETECTORS.items():
            target = out / "detect" / f"{name}-{label}"
            cells.append(Cell(f"detect-{name}-{label}", target,
                              fixed(["-q", "detect", "--data", data, "--clean", "sst2", "--clean-fraction", "0.01",
                                     "--method", method, *params, "--rate", "0.1", "--out", str(target)])))
    floor_model, train_floor = _victim(out, "never-poisoned", "sst2")
    cells += train_floor
    for name, data in datasets(out).items():
        victim, train = _victim(out, name, data)
        cells += train
        for role, model in (("victim", victim), ("floor", floor_model)):
            target = out / "evals" / f"{role}-{name}.json"
            cells.append(Cell(f"eval-{role}-{name}", target,
                              fixed(["-q", "eval", "-m", str(model), "--data", data, "--out", str(target)]), after=model))
        flagged = out / "detect" / f"{name}-{UNLEARN_DETECTOR}"
        cells.append(_lya(out, name, data, victim, "detected", fixed([str(flagged / "flagged.tsv")]),
                          after=(victim, flagged)))
        cells.append(_lya(out, name, data, victim, "oracle", _oracle_forget(out, data, name), after=(victim,)))
    # (d) the experimental repair method with the detected forget set (relabel with a reference trained
    # from the base on the retain rows), where LYA with the detected rows failed
    victim, flagged = out / "victims" / "badnets-dirty", out / "detect" / f"badnets-dirty-{UNLEARN_DETECTOR}"
    target = out / "unlearned" / "badnets-dirty-repair-detected"
    cells.append(Cell("repair-detected-badnets-dirty", target,
                      fixed(["-q", "unlearn", "-m", str(victim), "--forget", str(flagged / "flagged.tsv"), "--retain",
                             "sst2", "--retain-fraction", "0.05", "--method", "repair", "--base", "default",
                             "--eval-data", datasets(out)["badnets-dirty"], "--out", str(target)]),
                      after=(victim, flagged)))
    for name, data in datasets(out).items():
        target = out / "models" / f"{name}-reweight"
        cells.append(Cell(f"reweight-{name}", target,
                          fixed(["-q", "train", "--data", data, "--defense", "reweight", "--out", str(target)])))
        cells.append(Cell(f"eval-reweight-{name}", out / "evals" / f"{name}-reweight.json",
                          fixed(["-q", "eval", "-m", str(target), "--data", data,
                                 "--out", str(out / "evals" / f"{name}-reweight.json")]), after=target))
    return cells


REUSE = {"badnets-dirty": "unlearn_grid/models/badnets-dirty", "synbkd-hiddenkiller": "unlearn_grid/models/synbkd-hiddenkiller",
         "addsent": "purify_grid/models/addsent", "never-poisoned": "purify_grid/models/never-poisoned"}
# (victims of the same recipe under runs/)


def reuse_victims(out: Path, runs: Path) -> None:
    """Copy victims trained with the same recipe by the other grids; victims already here are kept."""
    for name, rel in REUSE.items():
        copy_if_missing(runs / rel, out / "victims" / name)


def run_grid(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for sub in ("data", "victims", "evals"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if args.reuse:
        reuse_victims(out, Path(args.reuse))
    spawn(__file__, args.out, args.workers)


def run_worker(args: argparse.Namespace) -> None:
    work(Path(args.out), grid(Path(args.out)))


def run_pilot(args: argparse.Namespace) -> None:
    """The development-attack cells only (one worker), then their scores."""
    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    work(out, pilot_grid(out))
    for line in pilot_lines(out):
        print(line)


def pilot_lines(out: Path) -> list[str]:
    walls = {r["cell"]: r["wall_s"] for r in wall_times(out)}
    lines = ["| candidate | precision % | recall % | AUROC | s |", "|---|---:|---:|---:|---:|"]
    for folder in sorted((out / "pilot").glob("[!.]*")):
        m = detection_scores(folder, str(out / "data" / DEV_DATA))
        lines.append(f"| {folder.name} | {100 * m['precision']:.1f} | {100 * m['recall']:.1f} | {m['auroc']:.3f} | "
                     f"{walls.get(f'pilot-{folder.name}', float('nan')):.0f} |")
    return lines


def detection_scores(folder: Path, data: str) -> dict[str, float]:
    """Precision, recall and AUROC of a ``detect`` output against the true flags (evaluation only)."""
    from unbackdoor.data import load_poisoned_task
    from unbackdoor.detect.metrics import scores_file_metrics

    return scores_file_metrics(folder / "scores.csv", load_poisoned_task(data).flags)


def _row(label: str, m: dict, wall: float | None = None, peak: float | None = None) -> str:
    def pct(key: str) -> str:
        return f"{100 * m[key]:.1f}" if m.get(key) is not None else "—"
    num = (lambda v: f"{v:.0f}" if v is not None else "")
    return f"| {label} | {pct('cacc')} | {pct('asr')} | {pct('robust_accuracy')} | {num(wall)} | {num(peak)} |"


def outcome_lines(out: Path, name: str) -> list[str]:
    """Victim, floor, LYA (detected / oracle forget set) and reweighted training on one data set."""
    lines = [f"### {name}", "", "| model | CACC % | ASR % | RA % | s | peak MB |", "|---|---:|---:|---:|---:|---:|"]
    for role, label in (("victim", "victim (no defence)"), ("floor", "never-poisoned (floor)")):
        path = out / "evals" / f"{role}-{name}.json"
        if path.exists():
            lines.append(_row(label, record(path)))
    for tag, label in (("b", "detected"), ("c", "oracle"), ("d", "repair-detected")):
        folder = out / "unlearned" / (f"{name}-{label}" if label.startswith("repair") else f"{name}-lya-{label}")
        if folder.exists():
            rec = record(folder)
            stop = rec["defense"]
            what = ("experimental repair (relabel), detected forget set" if label.startswith("repair")
                    else f"LYA, {label} forget set")
            how = ("" if stop.get("stop_reason") is None else
                   f"; {stop['stop_reason']} @{stop.get('stopped_at_step')}, kept step {stop.get('chosen_step')}")
            lines.append(_row(f"({tag}) {what} ({rec['n_forget']} rows{how})", rec["metrics"],
                              rec["wall_time_s"], rec["peak_memory_mb"]))
    path = out / "evals" / f"{name}-reweight.json"
    if path.exists():
        rec = record(out / "models" / f"{name}-reweight")
        training = rec.get("training", {})
        lines.append(_row("(a) reweighted training", record(path), training.get("wall_time_s"),
                          training.get("peak_memory_mb", rec.get("peak_memory_mb"))))
    return lines + [""]


def write_report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    walls = {r["cell"]: r["wall_s"] for r in wall_times(out)}
    lines = ["# Detecting poisoned rows, then unlearning them", "",
             "Command: `python benchmarks/detect_grid.py pilot`, then `python benchmarks/detect_grid.py run --workers 2 "
             "--reuse runs` (victims of the same recipe from `unlearn_grid.py` / `purify_grid.py` are copied, the "
             "others trained), then `... report`. Every cell is one `unbackdoor` call, listed at the end. Detection: "
             "1 % clean SST-2 rows (69) as the defender's clean set, frozen MiniLM features, 10 % of rows flagged "
             "(the defender does not know the poison rate). Precision, recall and AUROC against the true flags, "
             "read by this report only. One seed; times are on a shared 2-core machine (indicative).", ""]
    notes = Path(__file__).with_name("detect_notes.md")
    if notes.exists():
        lines += [notes.read_text(encoding="utf-8").strip(), ""]
    lines += ["## Detection", "", "| data | detector | poisoned rows | precision % | recall % | AUROC | s | peak MB |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, data in datasets(out).items():
        for label in DETECTORS:
            folder = out / "detect" / f"{name}-{label}"
            if not folder.exists():
                continue
            m = detection_scores(folder, data)
            peak = record(folder / "detect.json").get("peak_memory_mb", float("nan"))
            lines.append(f"| {name} | {label} | {m['n_poisoned']} / {m['n_rows']} | {100 * m['precision']:.1f} | "
                         f"{100 * m['recall']:.1f} | {m['auroc']:.3f} | "
                         f"{walls.get(f'detect-{name}-{label}', float('nan')):.0f} | {peak:.0f} |")
    lines += ["", "## Defences: (a) reweighted training, (b) LYA with the detected forget set, (c) LYA with the "
              "oracle forget set, (d) experimental repair with the detected forget set (our BadNets only)", "",
              f"LYA's detected forget set is the `{UNLEARN_DETECTOR}` detector's flagged rows; the oracle one is every "
              "truly poisoned row. Retain set: 5 % of clean SST-2 (346 rows). RA = accuracy on the triggered test "
              "rows w.r.t. their true labels.", ""]
    for name in datasets(out):
        lines += outcome_lines(out, name)
    if (out / "pilot").exists():
        lines += ["## Choosing the reweight defaults on a development attack", "",
                  "Our AddSent (dirty label, 10 %) on OLID, 3,000 training rows, 1 % clean OLID rows: another task and "
                  "trigger than the four sets above. Candidates (`-p` changes from the defaults before this pilot: "
                  "outer_lr 0.1, inner_steps 5, epochs 20, mean pooling, levels 2):", "", *pilot_lines(out), ""]
    lines += ["## Commands of the cells", "", "```", *{r["cell"]: r["command"] for r in wall_times(out)}.values(), "```", ""]
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(json.dumps({"wrote": args.md}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "work", "pilot", "report"):
        p = sub.add_parser(name)
        p.add_argument("--out", default="runs/detect_grid")
        if name == "run":
            p.add_argument("--workers", type=int, default=2)
            p.add_argument("--reuse", help="the runs/ folder of unlearn_grid.py and purify_grid.py, whose victims "
                           "(same recipe) are copied instead of trained again")
        if name == "report":
            p.add_argument("--md", default="docs/results/detect.md")
    args = parser.parse_args()
    {"run": run_grid, "work": run_worker, "pilot": run_pilot, "report": write_report}[args.command](args)


if __name__ == "__main__":
    main()
