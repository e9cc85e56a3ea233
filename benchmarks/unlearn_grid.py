"""Issue-5 acceptance grid: unlearn (LYA, gradient ascent, retrain, fine-tune) with oracle forget
sets of 10 / 50 / 100 % of the truly poisoned rows, and TSBD with 1 % / 5 % clean data, on MiniLM
victims -> CACC, ASR, robust accuracy, wall time, peak memory.

    python benchmarks/unlearn_grid.py run [--out runs/unlearn_grid] [--workers 2] [--reuse runs/purify_grid/models]
    python benchmarks/unlearn_grid.py report [--out runs/unlearn_grid] [--md docs/results/unlearn.md]

Every cell is one real CLI call (``unbackdoor attack|train|unlearn|purify|eval``) in its own process
(``benchmarks/cells.py``: atomic outputs, resumable, workers never share a cell). Forget files are the
only place ground-truth flags are read (``unbackdoor.unlearn.oracle``, benchmark-only): they stand in
for a user's identification of the trojaned rows, which the unlearn situation presupposes.
``--reuse DIR`` copies victims already trained with the same recipe (``purify_grid.py``) instead of
training them again.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cells import Cell, copy_if_missing, fixed, record, spawn, wall_times, work

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Victim:
    data: str  # poisoned data spec (for ``our`` attack: the folder this grid writes)
    clean: str  # the clean task the retain / TSBD sets are drawn from
    train_args: tuple[str, ...] = ()  # extra ``unbackdoor train`` flags
    reuse_as: str | None = None  # the victim's name in a purify_grid models folder

    @property
    def floor_model(self) -> str:
        """The never-poisoned model of the same recipe on the clean task (its ASR is the floor)."""
        return f"never-poisoned-{self.clean}"


def victims(out: Path) -> dict[str, Victim]:
    return {
        "badnets-dirty": Victim(str(out / "data" / "badnets-dirty"), "sst2", reuse_as="badnets-dirty-ours"),
        "synbkd-hiddenkiller": Victim("sst2/synbkd_hiddenkiller_p20", "sst2", reuse_as="synbkd-hiddenkiller"),
        # code: 2,000 training rows at 256 tokens (CPU budget); the trigger survives truncation in ~62 %
        "devign-dci": Victim("devign/dci_trojanedcm_p5", "devign", ("--max-train", "2000", "--max-length", "256")),
    }


FORGET_FRACTIONS = (0.1, 0.5, 1.0)
RETRAIN_FRACTIONS = (1.0, 0.5)
ASCENT_METHODS = ("lya", "gradient-ascent")
RETAIN_FRACTION = 0.05
TSBD_FRACTIONS = (0.01, 0.05)


def _victim_task(v: Victim):  # -> PoisonedTask, as the victim was trained
    from unbackdoor.data import load_poisoned_task
    from unbackdoor.data.sampling import subsample_poisoned

    max_train = int(v.train_args[v.train_args.index("--max-train") + 1]) if "--max-train" in v.train_args else None
    return subsample_poisoned(load_poisoned_task(v.data), max_train, 0)


def _forget_file(out: Path, name: str, v: Victim, fraction: float, benign: float = 0.0) -> Callable[[], list[str]]:
    """Write the oracle forget file first (benchmark-only truth), then return its path. ``benign``:
    add this many clean training rows per poisoned row (an imperfect identification, for repair's
    claim that erase-only methods suffer when benign rows are flagged too)."""
    def args() -> list[str]:
        import random

        from unbackdoor.unlearn.oracle import forget_from_flags, write_forget_file

        path = out / "forget" / (f"{name}-{fraction:g}" + (f"-benign{benign:g}" if benign else "") + ".jsonl")
        if not path.exists():
            task = _victim_task(v)
            forget = forget_from_flags(task, fraction, seed=0)
            if benign:
                clean_ids = sorted(set(task.train.ids) - task.flags.poisoned_ids)
                extra = random.Random(1).sample(clean_ids, round(benign * len(forget)))
                forget = task.train.select(sorted(set(forget.ids) | set(extra)), f"{forget.name}+{benign:g} benign")
            write_forget_file(forget, path)
        return [str(path)]
    return args


def _unlearn(out: Path, name: str, v: Victim, method: str, fraction: float | None, benign: float = 0.0) -> Cell:
    label = f"{name}-{method}" + (f"-{fraction:g}" if fraction is not None else "") + (f"-benign{benign:g}" if benign else "")
    target = out / "unlearned" / label
    forget = _forget_file(out, name, v, fraction if fraction is not None else 1.0, benign)

    def args() -> list[str]:
        cmd = ["-q", "unlearn", "-m", str(out / "models" / name), "--forget", *forget(), "--retain", v.clean,
               "--retain-fraction", str(RETAIN_FRACTION), "--method", method, "--eval-data", v.data, "--out", str(target)]
        if method == "repair":  # experimental; its default reference model is trained from the base
            cmd += ["--base", "default"]
        if method == "retrain":
            cmd += ["--base", "default", "--train-data", v.data]
            if "--max-train" in v.train_args:  # the victim's seeded subsample
                cmd += ["--max-train", v.train_args[v.train_args.index("--max-train") + 1]]
        return cmd
    return Cell(label, target, args, after=out / "models" / name)


def _floor_cells(out: Path, name: str, v: Victim) -> list[Cell]:
    """Train the never-poisoned model once per clean task (unless reused), evaluate it on the attack."""
    model = out / "models" / v.floor_model
    return [Cell(f"model-{v.floor_model}", model,
                 fixed(["-q", "train", "--data", v.clean, *v.train_args, "--out", str(model)])),
            Cell(f"floor-{name}", out / "evals" / f"floor-{name}.json",
                 fixed(["-q", "eval", "-m", str(model), "--data", v.data, "--out", str(out / "evals" / f"floor-{name}.json")]),
                 after=model)]


def grid(out: Path) -> list[Cell]:
    cells = [Cell("data-badnets-dirty", out / "data" / "badnets-dirty",
                  fixed(["-q", "attack", "--data", "sst2", "--attack", "badnets", "--poison-rate", "0.1",
                         "--out", str(out / "data" / "badnets-dirty")]))]
    # retraining (one full training per cell) after the cheaper cells: 100 % first, the code task last;
    # not 10 %: with half the poisoned rows left in, retraining already keeps the whole backdoor
    retrain = [_unlearn(out, name, v, "retrain", f) for f in RETRAIN_FRACTIONS for name, v in victims(out).items()]
    retrain.sort(key=lambda c: c.name.startswith("devign"))
    for name, v in victims(out).items():
        if name == "devign-dci":  # the SST-2 retraining baseline with every poisoned row before the code task
            cells += [c for c in retrain if c.name.endswith("-retrain-1") and not c.name.startswith("devign")]
        cells += _floor_cells(out, name, v)
        cells.append(Cell(f"victim-{name}", out / "models" / name,
                          fixed(["-q", "train", "--data", v.data, *v.train_args, "--out", str(out / "models" / name)])))
        cells.append(Cell(f"eval-{name}", out / "evals" / f"{name}.json",
                          fixed(["-q", "eval", "-m", str(out / "models" / name), "--data", v.data,
                                 "--out", str(out / "evals" / f"{name}.json")]), after=out / "models" / name))
        for fraction in FORGET_FRACTIONS:
            cells += [_unlearn(out, name, v, m, fraction) for m in ASCENT_METHODS]
        cells.append(_unlearn(out, name, v, "finetune", None))
        for fraction in TSBD_FRACTIONS:
            label = f"{name}-tsbd-{fraction:g}"
            cells.append(Cell(label, out / "purified" / label,
                              fixed(["-q", "purify", "-m", str(out / "models" / name), "--clean", v.clean,
                                     "--clean-fraction", str(fraction), "--method", "tsbd",
                                     "--out", str(out / "purified" / label)]), after=out / "models" / name))
            cells.append(Cell(f"eval-{label}", out / "evals" / f"{label}.json",
                              fixed(["-q", "eval", "-m", str(out / "purified" / label), "--data", v.data,
                                     "--out", str(out / "evals" / f"{label}.json")]), after=out / "purified" / label))
    # experimental repair (issue 5's optional part): the SST-2 victims, 10 % / 100 % forget sets, and
    # the claim it rests on: a forget set holding as many benign rows as poisoned ones, vs LYA
    repair = [_unlearn(out, name, v, "repair", f) for name, v in victims(out).items() if name != "devign-dci"
              for f in (1.0, 0.1)]
    repair += [_unlearn(out, "badnets-dirty", victims(out)["badnets-dirty"], m, 1.0, benign=1.0) for m in ("repair", "lya")]
    late = [c for c in retrain if c not in cells]
    return cells + [c for c in late if not c.name.startswith("devign")] + repair + [c for c in late if c.name.startswith("devign")]


def reuse_victims(out: Path, source: Path) -> None:
    """Copy victims (and the never-poisoned SST-2 model) trained by purify_grid.py with the same
    recipe; models already here are kept."""
    pairs = [(v.reuse_as, name) for name, v in victims(out).items() if v.reuse_as]
    pairs.append(("never-poisoned", "never-poisoned-sst2"))
    for src_name, name in pairs:
        copy_if_missing(source / src_name, out / "models" / name)


def run_grid(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for sub in ("evals", "forget", "unlearned", "purified", "models", "data"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if args.reuse:
        reuse_victims(out, Path(args.reuse))
    spawn(__file__, args.out, args.workers)


def run_worker(args: argparse.Namespace) -> None:
    work(Path(args.out), grid(Path(args.out)))


def _metrics(path: Path) -> dict | None:
    """An ``unbackdoor eval`` record (its metrics are top-level keys), if written."""
    return record(path) if path.exists() else None


def _fmt(m: dict, key: str) -> str:
    return f"{100 * m[key]:.1f}" if m.get(key) is not None else "—"


def _lean(m: dict, target: int) -> str:
    """The share of clean non-target test rows predicted as the target (the model's own lean, which a
    near-chance model's ASR includes), when the record allows it."""
    from unbackdoor.evaluate import recorded_clean_to_target

    lean = recorded_clean_to_target(m, target)
    return "—" if lean is None else f"{100 * lean:.1f}"


def write_report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    lines = ["# Unlearning and TSBD on MiniLM victims", "",
             "Command: `python benchmarks/unlearn_grid.py run --workers 2 --reuse runs/purify_grid/models` then "
             "`... report`; every cell is one `unbackdoor` call, listed at the end. Forget sets (oracle, the unlearn "
             f"situation's premise): a seeded 10 / 50 / 100 % of the truly poisoned training rows, as trained. Retain "
             f"set: {100 * RETAIN_FRACTION:.0f} % of the clean train split (seed 0). TSBD: 1 % / 5 % clean data, "
             "no forget set. CACC on the clean test split; ASR on the triggered non-target test set; clean → target = "
             "the share of *clean* non-target test rows predicted as the target (the model's own lean, part of a "
             "near-chance model's ASR; — where the record predates it); RA (robust "
             "accuracy) = accuracy on those triggered rows w.r.t. their true labels. Times: two cells at a time, one "
             "torch thread each, on a shared 2-core machine (indicative).", ""]
    notes = Path(__file__).with_name("unlearn_notes.md")
    if notes.exists():
        lines += [notes.read_text(encoding="utf-8").strip(), ""]
    for name, v in victims(out).items():
        vic = _metrics(out / "evals" / f"{name}.json")
        if vic is None:
            continue
        target = _victim_task(v).target_label
        lines += [f"## {name} (`{v.data if not v.data.startswith(str(out)) else 'unbackdoor attack --attack badnets'}`)",
                  "", "| method | forget / clean | CACC % | ASR % | clean → target % | RA % | stopped at | s | peak MB |",
                  "|---|---:|---:|---:|---:|---:|---|---:|---:|",
                  f"| victim | — | {_fmt(vic, 'cacc')} | {_fmt(vic, 'asr')} | {_lean(vic, target)} | "
                  f"{_fmt(vic, 'robust_accuracy')} | | | |"]
        floor = _metrics(out / "evals" / f"floor-{name}.json")
        if floor is not None:
            lines.append(f"| never-poisoned (floor) | — | {_fmt(floor, 'cacc')} | {_fmt(floor, 'asr')} | "
                         f"{_lean(floor, target)} | {_fmt(floor, 'robust_accuracy')} | | | |")
        for folder in sorted((out / "unlearned").glob(f"{name}-*")):
            if folder.name.startswith("."):
                continue
            rec = record(folder)
            m, rep = rec["metrics"], rec["defense"]
            stop = rep.get("stop_reason") or ""
            if rep.get("stopped_at_step") is not None:
                stop += f" @{rep['stopped_at_step']}, kept step {rep.get('chosen_step')}"
            size = f"{rec['n_forget']} rows" if rec["defense"]["method"] != "finetune" else "—"
            method = rep["method"] + (" (experimental)" if rep.get("experimental") else "")
            if "-benign" in folder.name:
                size += f" ({rec['n_forget'] // 2} poisoned + as many clean)"
            # records written before unlearn kept per-class accuracy: a clean-only ``unbackdoor eval`` of the model
            lean = _lean({**(_metrics(out / "evals" / f"clean-{folder.name}.json") or {}), **m}, target)
            lines.append(f"| {method} | {size} | {_fmt(m, 'cacc')} | {_fmt(m, 'asr')} | {lean} | "
                         f"{_fmt(m, 'robust_accuracy')} | {stop} | {rec['wall_time_s']:.0f} | "
                         f"{rec['peak_memory_mb']:.0f} |")
        for fraction in TSBD_FRACTIONS:
            label = f"{name}-tsbd-{fraction:g}"
            m = _metrics(out / "evals" / f"{label}.json")
            if m is None:
                continue
            rec = record(out / "purified" / label)
            lines.append(f"| tsbd | {rec.get('n_clean', '?')} clean | {_fmt(m, 'cacc')} | {_fmt(m, 'asr')} | "
                         f"{_lean(m, target)} | {_fmt(m, 'robust_accuracy')} | | {rec.get('wall_time_s', float('nan')):.0f} | "
                         f"{rec.get('peak_memory_mb', float('nan')):.0f} |")
        lines.append("")
    lines += ["## Commands of the cells", "", "```", *{r["cell"]: r["command"] for r in wall_times(out)}.values(), "```", ""]
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.md}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "work", "report"):
        p = sub.add_parser(name)
        p.add_argument("--out", default="runs/unlearn_grid")
        if name == "run":
            p.add_argument("--workers", type=int, default=2)
            p.add_argument("--reuse", help="a purify_grid models folder with victims of the same recipe")
        if name == "report":
            p.add_argument("--md", default="docs/results/unlearn.md")
    args = parser.parse_args()
    {"run": run_grid, "work": run_worker, "report": write_report}[args.command](args)


if __name__ == "__main__":
    main()
