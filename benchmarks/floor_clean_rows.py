"""The never-poisoned model trained on the clean rows a train defence with ``clean_rows`` adds: the victim recipe on
a bench run's clean training rows plus the same share of the clean dev set (auto's own split,
``unbackdoor.train_defenses.base.clean_split``), the epoch chosen on the rest. Its "ASR" on each attack's triggered
test set is the floor for a model that also learnt from those clean rows (the bench's floor model did not), so a
reader can tell a removed backdoor from a better classifier. Prints Markdown: per seed and attack, this model's
CACC / ASR and the bench floor's.

    python benchmarks/floor_clean_rows.py RUN_DIR [--share 0.5] [--seeds 0,1,2]

About one victim training per seed (bf16 where the bench ran in it); nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--seeds", default=None, help="comma-separated (default: the run's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from unbackdoor.bench.runner import victim_data
    from unbackdoor.bench.store import Store
    from unbackdoor.data import load_poisoned_task
    from unbackdoor.data.io import load_any
    from unbackdoor.data.sampling import subsample_task
    from unbackdoor.evaluate import evaluate_classifier
    from unbackdoor.train_defenses.base import clean_split
    from unbackdoor.train_defenses.finetune import load_for_training
    from unbackdoor.training.config import TrainConfig
    from unbackdoor.training.loop import train_classifier

    bench = json.loads((args.run_dir / "bench.json").read_text(encoding="utf-8"))
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else bench["seeds"]
    cells = list(Store(args.run_dir).cells("done"))
    print(f"| dataset | seed | attack | with {args.share:.0%} of the clean dev set: CACC / ASR | bench floor: CACC / ASR |")
    print("|---|---:|---|---:|---:|")
    for floor in (c for c in cells if c["kind"] == "floor-model" and c["seed"] in seeds):
        config, seed = floor["config"], floor["seed"]
        task = subsample_task(load_any(config["dataset"]["spec"]), config["max_train"], seed)
        added, select = clean_split(task.dev, args.share, seed)
        rows = task.train.replace([*task.train.examples, *added], f"{task.train.name} + {len(added)} clean dev rows")
        train = TrainConfig(**{**config["train"], "seed": seed, "progress": False})
        clf = load_for_training(config["model"], rows, train, max_length=config["max_length"],
                                precision=config.get("precision", "auto"))
        train_classifier(clf, rows, train, dev=select)
        for cell in cells:
            if cell["kind"] != "floor" or cell["seed"] != seed or cell["dataset"] != floor["dataset"]:
                continue
            poisoned = load_poisoned_task(victim_data(args.run_dir, cell["config"]))
            result = evaluate_classifier(clf, poisoned.clean.test, poisoned.triggered_test)
            print(f"| {floor['dataset']} | {seed} | {cell['attack']} | {100 * result.cacc:.1f} / {100 * result.asr:.1f} "
                  f"| {100 * cell['cacc']:.1f} / {100 * cell['asr']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
