"""Does a defence turn the attacker's trigger into an *anti*-trigger? For each kept model of a bench run:
the share of clean target-label test rows it calls the target that it no longer calls the target once the
attack's trigger is inserted (the trigger pushing *away* from the target), next to the same share for the
never-poisoned model of that seed (the floor: inserting any words moves some predictions) and the usual
ASR. Train auto's ``suspects=relabel`` gives dirty-label rows back with their true label, so their trigger
is taught against the target; this measures what that costs on triggered target-label inputs. The bench
removes a defence cell's model once measured: run the grid with ``unbackdoor bench ... --keep-models``.

    python benchmarks/reverse_trigger.py RUN_DIR [--defences none,auto-relabel-clean,auto-drop]

Prints a Markdown table; the ASR column is the one the bench recorded. Inference only (a few seconds per model;
each victim's data and floor measured once). The trigger is placed with a fixed seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def away_rate(model: Path, task: Any, precision: str) -> tuple[float, int]:
    """(share of ``task``'s clean target rows called the target that the trigger moves away from it, rows counted)."""
    from unbackdoor.attacks.base import ATTACKS, build_attack
    from unbackdoor.inference import predict_logits
    from unbackdoor.models.loading import load_classifier

    clf = load_classifier(model, num_labels=task.clean.num_labels, precision=precision)
    fields = ATTACKS.get(task.attack.name).config_class.model_fields  # the data folder also records counts
    attack = build_attack(task.attack.name, {k: v for k, v in task.attack.params.items() if k in fields})
    rng = random.Random(0)
    rows = [e for e in task.clean.test if e.label == task.target_label]
    clean = predict_logits(clf, rows).argmax(1)
    kept = [e for e, y in zip(rows, clean.tolist(), strict=True) if y == task.target_label]
    triggered = [dataclasses.replace(e, text=attack.insert_trigger(e.text, rng)) for e in kept]
    moved = float((predict_logits(clf, triggered).argmax(1) != task.target_label).mean())
    return moved, len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--defences", default="none,auto-relabel-clean,auto-drop", help="comma-separated defence names")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from unbackdoor.bench.store import Store
    from unbackdoor.data import load_poisoned_task

    wanted = set(args.defences.split(","))
    precision = json.loads((args.run / "bench.json").read_text()).get("precision", "auto")
    tasks: dict[str, Any] = {}  # by victim: its poisoned data, loaded once
    floors: dict[str, float] = {}  # by victim: the never-poisoned model's share, measured once
    print("| cell | ASR | target rows moved away from the target by the trigger | the floor model's |")
    print("|---|---:|---:|---:|")
    for cell in Store(args.run).cells("done"):
        victim, model = cell["config"].get("victim"), args.run / "models" / cell["id"] / "model"
        if cell["defence"] not in wanted or victim is None or not model.exists():
            continue
        task = tasks.setdefault(victim, load_poisoned_task(args.run / "models" / victim / "data"))
        if victim not in floors:
            floor = args.run / "models" / cell["dataset"] / f"s{cell['seed']}" / "floor-model" / "model"
            floors[victim] = away_rate(floor, task, precision)[0]
        moved, n = away_rate(model, task, precision)
        print(f"| {cell['id']} | {100 * cell['asr']:.1f} | {100 * moved:.1f} (of {n}) | {100 * floors[victim]:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
