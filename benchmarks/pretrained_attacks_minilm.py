"""POR and NeuBA on MiniLM: the attacker poisons all-MiniLM-L6-v2 on plain corpus text, the user
fine-tunes the release cleanly (new head, victim recipe) on 1,000 SST-2 rows; per target label the
best trigger (chosen on triggered dev rows) and its test ASR, next to the floor: a never-poisoned
MiniLM fine-tuned the same way, on the same triggered test rows. Prints a Markdown table.

    OMP_NUM_THREADS=1 python benchmarks/pretrained_attacks_minilm.py [--seed 0] [--corpus-rows 1000]
        [--epochs 2] [--lr 3e-4] [--attacks por neuba]

About 8 minutes of one core (most of it the two poisoning runs and the per-trigger evaluations).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", default="agnews", help="the attacker's corpus (a data-root dataset, or task)")
    parser.add_argument("--corpus-rows", type=int, default=1000)
    parser.add_argument("--epochs", type=int, help="the poisoning run's epochs (default: the attack's, 2)")
    parser.add_argument("--lr", type=float, help="the poisoning run's learning rate (default: the attack's, 3e-4)")
    parser.add_argument("--attacks", nargs="+", default=["por", "neuba"], choices=["por", "neuba"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("unbackdoor.attacks.representation").setLevel(logging.INFO)
    from unbackdoor.attacks import run_weight_attack
    from unbackdoor.attacks.representation import per_label_asr
    from unbackdoor.data.io import load_task
    from unbackdoor.data.sampling import subsample_task
    from unbackdoor.evaluate import evaluate_classifier
    from unbackdoor.models import load_classifier
    from unbackdoor.training import train_classifier
    from unbackdoor.training.config import victim_train_config

    task = subsample_task(load_task("sst2"), 1000, args.seed)
    start = time.time()
    floor = load_classifier(None, num_labels=2, max_length=128, seed=args.seed)
    train_classifier(floor, task.train, victim_train_config().model_copy(update={"seed": args.seed, "progress": False}),
                     dev=task.dev)
    floor_cacc = evaluate_classifier(floor, task.test).cacc
    timings = {"floor": time.time() - start}
    rows = []
    for name in args.attacks:
        start = time.time()
        train = {k: v for k, v in (("epochs", args.epochs), ("learning_rate", args.lr)) if v is not None}
        params = {"corpus": args.corpus, "corpus_rows": args.corpus_rows, **({"train": train} if train else {})}
        victim, poisoned = run_weight_attack(name, params, task, "default", seed=args.seed)
        info = poisoned.attack.params
        triggers = tuple(info["triggers"])
        floor_asr = per_label_asr(floor, task, triggers, info["position"], info["seed"])["test"]
        history = info["poisoning_history"][-1]
        rows.append((name, evaluate_classifier(victim, task.test).cacc, info["per_label"], floor_asr, history,
                     info["train"]))
        timings[name] = time.time() - start
    runs = "; ".join(f"{r[0]} {r[5]['epochs']} epochs at lr {r[5]['learning_rate']:g}" for r in rows)
    print(f"SST-2, 1,000 training rows, seed {args.seed}; attacker corpus: {args.corpus_rows} {args.corpus} texts "
          f"(a clean and a triggered copy each), {runs}; user: victim recipe (3 epochs, lr 1e-4, new head)")
    print(f"never-poisoned MiniLM, same fine-tuning: CACC {100 * floor_cacc:.1f} %")
    print()
    print("| attack | CACC % | trigger MSE / clean term (last epoch) | label | best trigger (dev) | dev ASR % | "
          "test ASR % | floor test ASR % |")
    print("|---|---:|---|---:|---|---:|---:|---:|")
    for name, cacc, per_label, floor_asr, history, _ in rows:
        for y, entry in sorted(per_label.items()):
            trigger = entry["best_trigger"]
            print(f"| {name} | {100 * cacc:.1f} | {history['trigger_mse']:.3f} / {history['clean_term']:.4f} | {y} | "
                  f"{trigger} | {100 * entry['dev_asr']:.1f} | {100 * entry['test_asr']:.1f} | "
                  f"{100 * floor_asr[y][trigger]:.1f} |")
    print()
    for name, _, per_label, floor_asr, _, _ in rows:
        for y, entry in sorted(per_label.items()):
            cells = ", ".join(f"{t} {100 * a:.0f} ({100 * floor_asr[y][t]:.0f})"
                              for t, a in entry["test_asr_by_trigger"].items())
            print(f"- {name}, label {y}, test ASR % of every trigger (floor): {cells}")
    print()
    print("wall time, s: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


if __name__ == "__main__":
    main()
