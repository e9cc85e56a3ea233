"""What ``train --defense auto`` dropped in a bench run, counted against the poison flags after the run
(for reading results only: auto never sees the flags). For every finished ``auto`` train cell: the
poisoned rows among its training rows, the rows it dropped, recall and precision, the rows each
detector dropped, whether zscore's top-tie rule fired and zscore's two top features, and
(``suspects=relabel`` or ``strip``) the dropped rows given back: poisoned ones (how many with their true
label, the clean copy's) and clean ones (their given label changed). Prints Markdown.

    python benchmarks/auto_drops.py RUN_DIR [--defence auto]

Reads the report the bench keeps in the cell folder (``unbackdoor.json``); no model is run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--defence", default="auto")
    args = parser.parse_args()
    from unbackdoor.bench.runner import model_dir, victim_data
    from unbackdoor.bench.store import Store
    from unbackdoor.data import load_poisoned_task
    from unbackdoor.data.sampling import subsample_poisoned

    print("| attack | seed | poisoned rows | dropped | recall | precision | by detector | top tie | zscore's top features "
          "| given back: poisoned (with the true label), clean |")
    print("|---|---:|---:|---:|---:|---:|---|---|---|---|")
    for cell in Store(args.run_dir).cells():
        if cell["defence"] != args.defence or cell["kind"] != "train" or cell["status"] != "done":
            continue
        folder = model_dir(args.run_dir, cell["id"])  # the report moves up when the bench removes the model
        report_file = next((p for p in (folder / "unbackdoor.json", folder / "model" / "unbackdoor.json") if p.exists()),
                           None)
        if report_file is None:
            print(f"| {cell['attack']} | {cell['seed']} | (no unbackdoor.json in {folder}) |")
            continue
        report = json.loads(report_file.read_text(encoding="utf-8"))["defense"]
        task = load_poisoned_task(victim_data(args.run_dir, cell["config"]))
        if cell["config"]["max_train"] is not None:
            task = subsample_poisoned(task, cell["config"]["max_train"], cell["seed"])
        poisoned = {e.id for e in task.train if task.flags.is_poisoned(e.id)}
        dropped = set(report["dropped_ids"])
        hits = len(dropped & poisoned)
        steps = ", ".join(f"{s['detector']} {s['n_dropped']}" for s in report["choices"]["steps"])
        zscore = report["detectors"].get("zscore", {})
        tops = "; ".join(t["feature"] for t in zscore.get("top_features", [])[:2])
        true = {e.id: e.label for e in task.clean.train}
        back = [r for r in report.get("returned", []) if r["id"] in poisoned]
        right = sum(r["label"] == true.get(r["id"]) for r in back)
        given_back = f"{len(back)} ({right}), {len(report.get('returned', [])) - len(back)}"
        print(f"| {cell['attack']} | {cell['seed']} | {len(poisoned)} | {len(dropped)} | "
              f"{hits / max(len(poisoned), 1):.2f} | {hits / max(len(dropped), 1):.2f} | {steps} | "
              f"{zscore.get('threshold_at_top_tie', '—')} | {tops} | {given_back} |")


if __name__ == "__main__":
    main()
