"""Label-share calibration (``unbackdoor.calibration``, train auto's ``shift_bias=dev``) applied to the
models a bench run kept: for each done cell of the named defences whose model folder is still there,
CACC, ASR and the clean → target lean (clean non-target test rows called the target) before and after
shifting the head's bias to the clean dev set's label shares. A model retrained from the base is the
same with or without the step until the step runs (same seed, same training), so this measures the
option without retraining. Prints a Markdown table (docs/results/auto.md). The bench removes a defence
cell's model once measured: run the grid with ``unbackdoor bench ... --keep-models`` first.

    python benchmarks/calibration_posthoc.py RUN_DIR [RUN_DIR ...] [--defences auto,auto-balanced]

About 10 s of one core per model (inference on the dev, test and triggered rows).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def measure(model: Path, data: Path, precision: str) -> dict[str, float]:
    from unbackdoor.calibration import calibrate_to_dev
    from unbackdoor.data import load_poisoned_task
    from unbackdoor.evaluate import evaluate_classifier
    from unbackdoor.models.loading import load_classifier

    task = load_poisoned_task(data)
    clf = load_classifier(model, num_labels=task.clean.num_labels, precision=precision)
    row: dict[str, float] = {}
    for when in ("before", "after"):
        if when == "after":
            report = calibrate_to_dev(clf, task.clean.dev)
            row["offset"] = report["offsets"][task.target_label] if report["applied"] else float("nan")
        result = evaluate_classifier(clf, task.clean.test, task.triggered_test)
        row[f"cacc_{when}"], row[f"asr_{when}"] = result.cacc, result.asr
        row[f"lean_{when}"] = result.clean_to_target
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--defences", default="auto", help="comma-separated defence names of the cells to measure")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from unbackdoor.bench.store import Store

    wanted = set(args.defences.split(","))
    print("| run | cell | recorded CACC / ASR | before: CACC / ASR / lean | after: CACC / ASR / lean | "
          "target offset |")
    print("|---|---|---|---|---|---:|")
    for run in args.runs:
        precision = json.loads((run / "bench.json").read_text()).get("precision", "auto")
        for cell in Store(run).cells("done"):
            model = run / "models" / cell["id"] / "model"
            victim = cell["config"].get("victim")
            if cell["defence"] not in wanted or not model.exists() or victim is None:
                continue
            data = run / "models" / victim / "data"
            if not data.exists():
                continue
            r = measure(model, data, precision)
            print(f"| {run.name} | {cell['id']} | {100 * cell['cacc']:.1f} / {100 * cell['asr']:.1f} | "
                  f"{100 * r['cacc_before']:.1f} / {100 * r['asr_before']:.1f} / {100 * r['lean_before']:.1f} | "
                  f"{100 * r['cacc_after']:.1f} / {100 * r['asr_after']:.1f} / {100 * r['lean_after']:.1f} | "
                  f"{r['offset']:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
