"""Issue-3 acceptance grid: MiniLM victims x purify methods x clean-set sizes -> CACC, ASR, cost.

    python benchmarks/purify_grid.py models [--out runs/purify_grid]   # victims + reference only
    python benchmarks/purify_grid.py run    [--out runs/purify_grid] [--methods ...] [--fractions 0.01 0.05]
    python benchmarks/purify_grid.py scan   [--out runs/purify_grid]   # unbackdoor scan of each model
    python benchmarks/purify_grid.py report [--out runs/purify_grid] [--md docs/results/purify.md]

`run` is resumable: victims and the never-poisoned reference are trained once and kept under
OUT/models; every (victim, method, fraction, seed) cell runs in its own process (so its peak
memory is its own) and appends one JSON line to OUT/results.jsonl; finished cells are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name -> data spec: published poisoned variants, plus our own BadNets dirty-label attack
VICTIMS = {
    "badnets-cleanlabel": "sst2/badnets_cleanlabel_openbackdoor_p10",
    "addsent": "sst2/addsent_openbackdoor_p10",
    "synbkd-hiddenkiller": "sst2/synbkd_hiddenkiller_p20",
    "stylebkd-bible": "sst2/stylebkd_bible_styleattack_p20",
    "badnets-dirty-ours": "attack:badnets",
}
METHODS = ["finetune", "reinit", "fine-pruning", "e-pur", "fine-mixing", "fine-purifying"]
# label -> (method, params, --epur): variants run with --methods LABEL
VARIANTS: dict[str, tuple[str, dict, bool]] = {
    "e-pur+fine-mixing": ("fine-mixing", {}, True),
    "e-pur+fine-purifying": ("fine-purifying", {}, True),
    "fine-mixing(search)": ("fine-mixing", {"rho_mode": "search"}, False),
    "fine-purifying(search)": ("fine-purifying", {"rho_mode": "search"}, False),
}


def method_spec(label: str, extra_params: str = "") -> tuple[str, dict, bool]:
    """(registry method, params, epur) of a grid label; ``extra_params`` (JSON) overrides params."""
    method, params, epur = VARIANTS.get(label, (label, {}, False))
    return method, {**params, **(json.loads(extra_params) if extra_params else {})}, epur


def load_victim_data(spec: str):  # noqa: ANN201
    from unbackdoor.data import load_poisoned_task, load_task
    from unbackdoor.attacks.base import attack_task

    if spec.startswith("attack:"):
        return attack_task(load_task("sst2"), spec.split(":", 1)[1], {"poison_rate": 0.1, "mode": "dirty", "seed": 0})
    return load_poisoned_task(spec)


def train_model(name: str, spec: str | None, out: Path) -> None:
    """Train a victim (or the never-poisoned reference when spec is None) once."""
    from unbackdoor.data import load_task
    from unbackdoor.models import provenance_record, save_classifier
    from unbackdoor.outputs import atomic_output_dir
    from unbackdoor.train_defenses.finetune import fit
    from unbackdoor.training.config import victim_train_config

    target = out / "models" / name
    if target.exists():
        return
    clean = load_task("sst2")
    rows = clean.train if spec is None else load_victim_data(spec).train  # flags never reach training
    config = victim_train_config()
    start = time.perf_counter()
    with atomic_output_dir(target) as work:
        clf, result = fit(None, rows, clean.dev, config, work_dir=work / "_work")
        import shutil

        shutil.rmtree(work / "_work", ignore_errors=True)
        save_classifier(clf, work, provenance_record(clf, role="victim" if spec else "model", data=spec or "sst2",
                                                     training=result.to_dict(),
                                                     wall_time_s=time.perf_counter() - start))


def run_cell(args: argparse.Namespace) -> None:
    """One cell, in its own process: purify (or just evaluate, method 'none') and print a JSON line."""
    from unbackdoor.data import load_task
    from unbackdoor.purify import PurifyInputs
    from unbackdoor.models import load_classifier
    from unbackdoor.data.sampling import CleanSetConfig, draw_clean_set
    from unbackdoor.evaluate import evaluate_on
    from unbackdoor.purify.base import purify
    from unbackdoor.utils.resources import peak_memory_mb

    data = load_victim_data(VICTIMS[args.victim])
    model_dir = Path(args.out) / "models" / (args.model or args.victim)
    start = time.perf_counter()
    clf = load_classifier(model_dir)
    report: dict = {}
    n_clean = 0
    if args.method != "none":
        clean = draw_clean_set(load_task("sst2"), CleanSetConfig(fraction=args.fraction, seed=args.seed))
        n_clean = len(clean)
        base = load_classifier(None, num_labels=2, max_length=clf.max_length, seed=args.seed)
        method, params, epur = method_spec(args.method, args.params)
        report = purify(method, params, PurifyInputs(suspect=clf, clean=clean, base=base),
                        epur={} if epur else None).report
    defend_s = time.perf_counter() - start
    result = evaluate_on(clf, data, name=args.method)
    print(json.dumps({
        "victim": args.victim, "model": args.model or args.victim, "method": args.method,
        "fraction": args.fraction, "seed": args.seed, "params": args.params or "", "n_clean": n_clean,
        "cacc": result.cacc, "macro_f1": result.macro_f1, "asr": result.asr, "robust_accuracy": result.robust_accuracy,
        "defense_wall_s": defend_s, "peak_memory_mb": peak_memory_mb(),
        "report": {k: v for k, v in report.items() if k != "training"},
    }))


def scan_models(args: argparse.Namespace) -> None:
    """``unbackdoor scan`` (the real CLI) of every trained model against the packaged base, 1% clean set."""
    out = Path(args.out)
    for name in ["never-poisoned", *args.victims]:
        model, target = out / "models" / name, out / "scans" / name
        if not model.exists() or target.exists():
            continue
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "unbackdoor.cli", "-q", "scan", "--model", str(model), "--base", "default",
               "--clean", "sst2", "--clean-fraction", "0.01", "--top", "10", "--out", str(target)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"scan {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        (target / "wall_time_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
        print(f"scanned {name}", flush=True)


def scan_lines(out: Path) -> list[str]:
    """Markdown: each model's top-10 suspected tokens and what stands out."""
    lines = ["## Scan: suspected trigger tokens (E-PUR-style ratio score, 1% clean set for frequencies)", "",
             "Command per model: `unbackdoor scan --model MODEL --base default --clean sst2 --clean-fraction 0.01 "
             "--top 10 --out DIR` (run by `purify_grid.py scan`).", "",
             "| model | stands out | top 10 tokens (rank order) | top-1% Fine-purifying dims: top layers | s |",
             "|---|---|---|---|---:|"]
    for folder in sorted((out / "scans").glob("*")):
        record = json.loads((folder / "scan.json").read_text())
        stands = ", ".join(f"`{t['token']}`" for t in record["standing_out"]) or "nothing"
        top = " ".join(f"`{t['token']}`" for t in record["top_tokens"])
        fp = record["fine_purifying"]
        layers = ", ".join(f"{r['layer']} {100 * r['share']:.0f}%" for r in fp.get("layers", [])[:3]) or "—"
        wall = (folder / "wall_time_s.txt").read_text().strip()
        lines.append(f"| {folder.name} | {stands} | {top} | {layers} | {float(wall):.0f} |")
    return lines + [""]


def _done(results: Path) -> set[tuple]:
    if not results.exists():
        return set()
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {(r["victim"], r["model"], r["method"], r["fraction"], r["seed"], r["params"]) for r in rows}


def train_models(args: argparse.Namespace) -> None:
    """Train the never-poisoned reference and every victim once (skipped when already saved)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_model("never-poisoned", None, out)
    for name in args.victims:
        train_model(name, VICTIMS[name], out)
        print(f"trained {name}", flush=True)


def run_grid(args: argparse.Namespace) -> None:
    out = Path(args.out)
    train_models(args)
    results = out / "results.jsonl"
    cells = [(v, "never-poisoned", "none", 0.0, 0) for v in args.victims]
    cells += [(v, v, "none", 0.0, 0) for v in args.victims]
    # every victim at the smallest clean set first, so an interrupted run still covers all attacks
    cells += [(v, v, m, f, s) for f in args.fractions for v in args.victims for m in args.methods for s in args.seeds]
    for victim, model, method, fraction, seed in cells:
        params = "" if method == "none" else args.params
        if (victim, model, method, fraction, seed, params) in _done(results):
            continue
        cmd = [sys.executable, __file__, "cell", "--out", str(out), "--victim", victim, "--model", model,
               "--method", method, "--fraction", str(fraction), "--seed", str(seed), "--params", params]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"cell {victim}/{method}/{fraction}/{seed} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        with results.open("a") as fh:
            fh.write(proc.stdout.strip().splitlines()[-1] + "\n")
        print(f"done {victim} {method} {fraction} {seed}", flush=True)


def _chosen(report: dict) -> str:
    """What the defence chose, in a few words (ρ, rows reset, pruning ratio, epoch)."""
    parts = []
    if "epur_first" in report:
        parts.append(f"E-PUR reset {report['epur_first']['n_reset']} rows")
    if report.get("rho") is not None:
        parts.append(f"ρ {report['rho']}")
    if report.get("method") == "e-pur":
        parts.append(f"{report['n_reset']} rows: " + " ".join(t["token"] for t in report["reset_tokens"][:6]) + " …")
    if report.get("pruning_ratio") is not None:
        parts.append(f"pruned {100 * report['pruning_ratio']:.0f}%")
    if report.get("scope") and report.get("method") == "reinit":
        parts.append(f"scope {report['scope']}")
    return "; ".join(parts)


def _table(rows: list[dict], floor: dict | None, vic: dict | None) -> list[str]:
    lines = ["| method | clean set | CACC % | ASR % | ASR − floor | goal met | chosen | defence s | peak MB |",
             "|---|---:|---:|---:|---:|:---:|---|---:|---:|"]
    for r in rows:
        label = "never-poisoned (floor)" if r is floor else ("victim (no defence)" if r is vic else r["method"])
        if r["params"]:
            label += f" `{r['params']}`"
        above = 100 * (r["asr"] - floor["asr"]) if floor else float("nan")
        met = ""
        if floor and vic and r["method"] != "none":
            met = "**yes**" if above <= 5 and r["cacc"] >= vic["cacc"] - 0.015 else "no"
        size = f"{r['n_clean']} ({100 * r['fraction']:.0f}%)" if r["n_clean"] else "—"
        lines.append(f"| {label} | {size} | {100 * r['cacc']:.1f} | {100 * r['asr']:.1f} | {above:+.1f} | {met} | "
                     f"{_chosen(r['report'])} | {r['defense_wall_s']:.0f} | {r['peak_memory_mb']:.0f} |")
    return lines + [""]


def write_report(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in (Path(args.out) / "results.jsonl").read_text().splitlines() if line.strip()]
    order = {m: i for i, m in enumerate(METHODS + list(VARIANTS))}
    lines = ["# Purify: MiniLM victims on SST-2", "",
             "Commands: `python benchmarks/purify_grid.py run` (trains the victims and the never-poisoned "
             "reference once, then every victim × method × clean-set cell in its own process), "
             "`python benchmarks/purify_grid.py scan`, `python benchmarks/purify_grid.py report`. "
             "Pilot rows: `run --victims badnets-cleanlabel --fractions 0.01 --methods M --params JSON`.", "",
             "Victims: all-MiniLM-L6-v2 fully fine-tuned on the poisoned SST-2 training set (6,920 rows, lr 1e-4, "
             "batch 32, 3 epochs, best epoch on clean dev). CACC on the attack's clean test split (1,821 rows); "
             "ASR on its triggered non-target test set. Floor = a never-poisoned MiniLM trained with the same recipe "
             "on clean SST-2. Clean set: 1% (69 rows) or 5% (346 rows) of clean SST-2 train, seed 0, disjoint from "
             "dev/test; each defence holds out 20% of it for its own choices. Goal per attack: ASR ≤ floor + 5 "
             "points with CACC ≥ victim CACC − 1.5 points. Defaults unless params are shown. One seed; CPU "
             "(2 cores, shared with other cells), so times are indicative.", ""]
    notes = Path(__file__).with_name("purify_notes.md")  # the reading of these tables, written by hand
    if notes.exists():
        lines += [notes.read_text(encoding="utf-8").strip(), ""]
    for victim in dict.fromkeys(r["victim"] for r in rows):
        mine = [r for r in rows if r["victim"] == victim]
        floor = next((r for r in mine if r["model"] == "never-poisoned"), None)
        vic = next((r for r in mine if r["model"] == victim and r["method"] == "none"), None)
        defaults = sorted((r for r in mine if r["method"] != "none" and not r["params"]),
                          key=lambda r: (r["fraction"], order.get(r["method"], 99)))
        pilots = [r for r in mine if r["method"] != "none" and r["params"]]
        lines += [f"## {victim} (`{VICTIMS[victim]}`)", ""]
        lines += _table([r for r in (floor, vic) if r is not None] + defaults, floor, vic)
        if pilots:
            lines += ["Pilot and variants (1% clean set):", ""] + _table(pilots, floor, vic)
    if (Path(args.out) / "scans").is_dir():
        lines += scan_lines(Path(args.out))
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.md}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--out", default="runs/purify_grid")
    run.add_argument("--victims", nargs="+", default=list(VICTIMS), choices=list(VICTIMS))
    run.add_argument("--methods", nargs="+", default=METHODS)
    run.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.05])
    run.add_argument("--seeds", nargs="+", type=int, default=[0])
    run.add_argument("--params", default="", help="JSON parameters added to every method's (e.g. a pilot's lr)")
    models = sub.add_parser("models")
    models.add_argument("--out", default="runs/purify_grid")
    models.add_argument("--victims", nargs="+", default=list(VICTIMS), choices=list(VICTIMS))
    scans = sub.add_parser("scan")
    scans.add_argument("--out", default="runs/purify_grid")
    scans.add_argument("--victims", nargs="+", default=list(VICTIMS), choices=list(VICTIMS))
    cell = sub.add_parser("cell")
    cell.add_argument("--out", required=True)
    cell.add_argument("--victim", required=True, choices=list(VICTIMS))
    cell.add_argument("--model")
    cell.add_argument("--method", required=True)
    cell.add_argument("--fraction", type=float, default=0.01)
    cell.add_argument("--seed", type=int, default=0)
    cell.add_argument("--params", default="")
    rep = sub.add_parser("report")
    rep.add_argument("--out", default="runs/purify_grid")
    rep.add_argument("--md", default="docs/results/purify.md")
    args = parser.parse_args()
    {"run": run_grid, "models": train_models, "scan": scan_models, "cell": run_cell, "report": write_report}[args.command](args)


if __name__ == "__main__":
    main()
