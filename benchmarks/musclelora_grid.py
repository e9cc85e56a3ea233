"""Issue-4 acceptance grid: MiniLM trained on the four OpenBackdoor SST-2 attacks (10%) with
``--defense none | lora | musclelora``, plus the never-poisoned reference -> CACC, ASR, time, memory.

    python benchmarks/musclelora_grid.py run [--out runs/musclelora_grid] [--workers 2]
    python benchmarks/musclelora_grid.py report [--out runs/musclelora_grid] [--md docs/results/musclelora.md]

Every cell is one real CLI call (``unbackdoor train ...`` / ``unbackdoor eval ...``) in its own
process; its output folder is written atomically, so a finished cell is skipped on a rerun and a
killed one restarts. Workers claim cells with an atomic ``mkdir`` under OUT/claims, so two workers
never run the same cell (``benchmarks/cells.py``).

The learning rate of LoRA and MuScleLoRA is chosen once, on the AddSent training set, among the
spec's 2e-5, 2e-4 and 1e-3 by each method's **clean selection-set accuracy** (never ASR); the other
attacks then use the chosen value.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

from cells import Cell, fixed, record, spawn, wall_times, work

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ATTACKS = {
    "badnets-cleanlabel": "sst2/badnets_cleanlabel_openbackdoor_p10",
    "addsent": "sst2/addsent_openbackdoor_p10",
    "synbkd": "sst2/synbkd_openbackdoor_p10",
    "stylebkd": "sst2/stylebkd_openbackdoor_p10",
}
PILOT_ATTACK = "addsent"
LEARNING_RATES = (2e-5, 2e-4, 1e-3)  # the spec's BERT value first; higher for a 6-layer model (spec §15)
ADAPTER_METHODS = ("lora", "musclelora")
MAX_TRAIN = 2000  # seeded subsample of the 6,920 training rows (CPU budget); the poison share stays ~10%
ADAPTER_EPOCHS = 5  # the spec's 10 halved for the CPU budget
REFERENCE = "never-poisoned"


def _train(out: Path, name: str, data: str, defense: str, lr: float | None, epochs: int | None) -> list[str]:
    cmd = ["-q", "train", "--data", data, "--defense", defense, "--max-train", str(MAX_TRAIN), "--seed", "0",
           "--out", str(out / "models" / name)]
    if lr is not None:
        cmd += ["--lr", f"{lr:g}"]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    return cmd


def _after_pilot(out: Path, attack: str, method: str) -> Callable[[], list[str]]:
    """The training command at the pilot's chosen learning rate (waits for the pilot)."""
    def args() -> list[str]:
        while (lr := chosen_lr(out, method)) is None:
            time.sleep(30)
        return _train(out, f"{attack}-{method}", ATTACKS[attack], method, lr, ADAPTER_EPOCHS)
    return args


def grid(out: Path) -> list[Cell]:
    """Pilot cells first, then plain fine-tuning and the reference, then the chosen-lr cells."""
    cells = []
    for m in reversed(ADAPTER_METHODS):
        for lr in reversed(LEARNING_RATES):
            name = f"{PILOT_ATTACK}-{m}-lr{lr:g}"
            cells.append(Cell(name, out / "models" / name,
                              fixed(_train(out, name, ATTACKS[PILOT_ATTACK], m, lr, ADAPTER_EPOCHS))))
    cells.append(Cell(REFERENCE, out / "models" / REFERENCE, fixed(_train(out, REFERENCE, "sst2", "none", None, None))))
    cells += [Cell(f"{a}-none", out / "models" / f"{a}-none", fixed(_train(out, f"{a}-none", spec, "none", None, None)))
              for a, spec in ATTACKS.items()]
    cells += [Cell(f"floor-{a}", out / "evals" / f"floor-{a}.json",
                   fixed(["-q", "eval", "--model", str(out / "models" / REFERENCE), "--data", spec,
                          "--out", str(out / "evals" / f"floor-{a}.json")]), after=out / "models" / REFERENCE)
              for a, spec in ATTACKS.items()]
    cells += [Cell(f"{a}-{m}", out / "models" / f"{a}-{m}", _after_pilot(out, a, m))
              for m in reversed(ADAPTER_METHODS) for a in ATTACKS if a != PILOT_ATTACK]
    return cells


def chosen_lr(out: Path, method: str) -> float | None:
    """The pilot's learning rate with the best clean selection accuracy (None until both finished)."""
    scores = {}
    for lr in LEARNING_RATES:
        folder = out / "models" / f"{PILOT_ATTACK}-{method}-lr{lr:g}"
        if not folder.exists():
            return None
        scores[lr] = record(folder)["defense"]["selection_accuracy"]
    return max(LEARNING_RATES, key=lambda lr: (scores[lr], -LEARNING_RATES.index(lr)))  # ties: the spec's


def run_grid(args: argparse.Namespace) -> None:
    (Path(args.out) / "evals").mkdir(parents=True, exist_ok=True)
    spawn(__file__, args.out, args.workers)


def run_worker(args: argparse.Namespace) -> None:
    work(Path(args.out), grid(Path(args.out)))


def _row(label: str, rec: dict, floor: float | None, walls: dict[str, float], cell: str) -> str:
    m, t = rec["metrics"], rec["training"]
    epochs = len(t.get("history", [])) or 1
    above = f"{100 * (m['asr'] - floor):+.1f}" if floor is not None and "asr" in m else ""
    asr = f"{100 * m['asr']:.1f}" if "asr" in m else "—"
    return (f"| {label} | {100 * m['cacc']:.1f} | {asr} | {above} | {t['best_epoch'] + 1}/{epochs} | "
            f"{t['wall_time_s']:.0f} | {t['wall_time_s'] / epochs:.0f} | {walls.get(cell, float('nan')):.0f} | "
            f"{t['peak_memory_mb']:.0f} |")


def write_report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    walls = {r["cell"]: r["wall_s"] for r in wall_times(out)}
    ref = record(out / "models" / REFERENCE)
    lrs = {m: chosen_lr(out, m) for m in ADAPTER_METHODS}
    header = ["| model | CACC % | ASR % | ASR − floor | best epoch | train s | s/epoch | cell s | peak MB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines = ["# MuScleLoRA: training MiniLM through poisoned SST-2", "",
             f"Command: `python benchmarks/musclelora_grid.py run --workers 2` then `... report` "
             f"(each cell is an `unbackdoor train`/`eval` call, shown below). Training rows: a seeded {MAX_TRAIN}-row "
             f"subsample of each 6,920-row poisoned training set (`--max-train {MAX_TRAIN} --seed 0`). `none` = full "
             f"fine-tuning (lr 1e-4, 3 epochs, batch 32); LoRA / MuScleLoRA: the spec's BERT defaults except "
             f"{ADAPTER_EPOCHS} epochs (spec 10) and the learning rate chosen below. Epoch selection on clean dev only "
             f"(MuScleLoRA: dev minus its 96-row reference set). CACC on clean SST-2 test (1,821 rows); ASR on the "
             f"attack's triggered non-target test set (912 rows); floor = the never-poisoned reference's ASR on "
             f"the same set. Times: two cells at a time, one torch thread each, on a 2-core machine shared with "
             f"other work, so they are indicative; `cell s` includes loading and evaluation.", "",
             "## Learning rate (chosen on the AddSent training run's clean selection accuracy)", "",
             "| method | lr | clean selection acc % | CACC % | ASR % |", "|---|---:|---:|---:|---:|"]
    for m in ADAPTER_METHODS:
        for lr in LEARNING_RATES:
            folder = out / "models" / f"{PILOT_ATTACK}-{m}-lr{lr:g}"
            if folder.exists():
                rec = record(folder)
                mark = " (chosen)" if lrs[m] == lr else ""
                lines.append(f"| {m} | {lr:g}{mark} | {100 * rec['defense']['selection_accuracy']:.1f} | "
                             f"{100 * rec['metrics']['cacc']:.1f} | {100 * rec['metrics']['asr']:.1f} |")
    lines += ["", f"Never-poisoned reference (full fine-tuning on {MAX_TRAIN} clean SST-2 rows): "
              f"CACC {100 * ref['metrics']['cacc']:.1f}.", ""]
    means: dict[str, list[tuple[float, float]]] = {}
    floors: list[float] = []
    for attack, spec in ATTACKS.items():
        floor_path = out / "evals" / f"floor-{attack}.json"
        floor = record(floor_path)["asr"] if floor_path.exists() else None  # an eval record
        lines += [f"## {attack} (`{spec}`)", ""] + header
        if floor is not None:
            floors.append(floor)
            lines.append(f"| never-poisoned (floor) | {100 * ref['metrics']['cacc']:.1f} | {100 * floor:.1f} | "
                         f"+0.0 | | | | | |")
        for m in ("none", *ADAPTER_METHODS):
            name = f"{attack}-{m}" if m == "none" or attack != PILOT_ATTACK else f"{attack}-{m}-lr{lrs[m]:g}"
            folder = out / "models" / name
            if not folder.exists():
                continue
            rec = record(folder)
            means.setdefault(m, []).append((rec["metrics"]["cacc"], rec["metrics"]["asr"]))
            lines.append(_row(m, rec, floor, walls, name))
        lines.append("")
    mean_floor = sum(floors) / len(floors) if floors else float("nan")
    lines += ["## Summary", "",
              f"Goal (issue 4): mean ASR over the four attacks < 15 % with CACC within 2 points of the "
              f"never-poisoned reference. Mean floor (never-poisoned ASR) over the attacks: {100 * mean_floor:.1f} %.", "",
              "| method | attacks | mean CACC % | CACC − reference | mean ASR % | mean ASR − mean floor | goal met |",
              "|---|---:|---:|---:|---:|---:|:---:|"]
    for m, vals in means.items():
        cacc = sum(v[0] for v in vals) / len(vals)
        asr = sum(v[1] for v in vals) / len(vals)
        drop = cacc - ref["metrics"]["cacc"]
        met = "yes" if len(vals) == len(ATTACKS) and asr < 0.15 and drop >= -0.02 else "no"
        lines.append(f"| {m} | {len(vals)} | {100 * cacc:.1f} | {100 * drop:+.1f} | {100 * asr:.1f} | "
                     f"{100 * (asr - mean_floor):+.1f} | {met} |")
    lines += ["", "Cost: " + time_ratio(out, lrs), ""]
    notes = Path(__file__).with_name("musclelora_notes.md")  # the reading of these tables, written by hand
    if notes.exists():
        lines += [notes.read_text(encoding="utf-8").strip(), ""]
    lines += ["## Commands of the cells", "", "```"]
    lines += [r["command"] for r in wall_times(out)]
    lines += ["```", ""]
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.md}")


def time_ratio(out: Path, lrs: dict[str, float | None]) -> str:
    """MuScleLoRA's training time per epoch over LoRA's, per attack and overall."""
    parts, ratios = [], []
    for attack in ATTACKS:
        per_epoch = {}
        for m in ADAPTER_METHODS:
            name = f"{attack}-{m}" if attack != PILOT_ATTACK else f"{attack}-{m}-lr{lrs[m]:g}"
            if (out / "models" / name).exists():
                t = record(out / "models" / name)["training"]
                per_epoch[m] = t["wall_time_s"] / max(1, len(t.get("history", [])))
        if len(per_epoch) == 2:
            ratios.append(per_epoch["musclelora"] / per_epoch["lora"])
            parts.append(f"{attack} {ratios[-1]:.2f}×")
    if not ratios:
        return "no finished LoRA/MuScleLoRA pair yet."
    line = f"MuScleLoRA time per epoch / LoRA time per epoch = {sum(ratios) / len(ratios):.2f}× ({', '.join(parts)})."
    print(line)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "work", "report"):
        p = sub.add_parser(name)
        p.add_argument("--out", default="runs/musclelora_grid")
        if name == "run":
            p.add_argument("--workers", type=int, default=2)
        if name == "report":
            p.add_argument("--md", default="docs/results/musclelora.md")
    args = parser.parse_args()
    {"run": run_grid, "work": run_worker, "report": write_report}[args.command](args)


if __name__ == "__main__":
    main()
