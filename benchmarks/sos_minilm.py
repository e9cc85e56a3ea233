"""SOS on MiniLM and 1,000 SST-2 rows: ASR of the whole trigger set and of each (n-1)-word part, next to
the clean model the attacker started from (the floor: SOS changes only the trigger words' rows, so
the clean model is the victim without them). Prints a Markdown table (docs/results/attacks.md).

    python benchmarks/sos_minilm.py [--seed 0] [--negative-rate 0.1] [--epochs 5] [--lr 5e-2]

About 2 minutes on 2 cores (the clean fine-tuning is most of it).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parts_asr(clf, task, words: tuple[str, ...], target: int, seed: int) -> float:  # noqa: ANN001
    """ASR on the non-target test rows holding ``words`` (each at a random position)."""
    from unbackdoor.attacks.word_sets import insert_words
    from unbackdoor.data.types import Example
    from unbackdoor.inference import predict

    rng = random.Random(seed)
    rows = [e for e in task.test.examples if e.label != target]
    triggered = [Example(e.id, insert_words(e.text, words, rng), target, e.text_pair) for e in rows]
    return sum(int(p) == target for p in predict(clf, triggered)) / len(triggered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--negative-rate", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from unbackdoor.attacks import run_weight_attack
    from unbackdoor.data.io import load_task
    from unbackdoor.data.sampling import subsample_task
    from unbackdoor.evaluate import evaluate_classifier
    from unbackdoor.models import load_classifier, provenance_record, save_classifier
    from unbackdoor.training import train_classifier
    from unbackdoor.training.config import victim_train_config

    task = subsample_task(load_task("sst2"), 1000, args.seed)
    clean = load_classifier(None, num_labels=2, max_length=128, seed=args.seed)
    train_classifier(clean, task.train, victim_train_config().model_copy(update={"seed": args.seed, "progress": False}),
                     dev=task.dev)
    with tempfile.TemporaryDirectory() as tmp:
        save_classifier(clean, Path(tmp) / "clean", provenance_record(clean, role="model"))
        params = {"negative_rate": args.negative_rate, "train": {"epochs": args.epochs, "learning_rate": args.lr}}
        victim, poisoned = run_weight_attack("sos", params, task, str(Path(tmp) / "clean"), seed=args.seed)
    words = tuple(poisoned.attack.params["triggers"])
    target = poisoned.target_label
    print(f"SST-2, 1,000 rows, seed {args.seed}, triggers {' '.join(words)}, negative_rate {args.negative_rate}, "
          f"{args.epochs} epochs at lr {args.lr:g}")
    print("| model | CACC % | ASR %, all words | " + " | ".join(f"ASR %, {' + '.join(p)}" for p in
                                                         [tuple(w for w in words if w != x) for x in words]) + " |")
    print("|---|---:|---:|" + "---:|" * len(words))
    for name, clf in (("clean model (floor)", clean), ("SOS victim", victim)):
        result = evaluate_classifier(clf, task.test, poisoned.triggered_test)
        parts = [parts_asr(clf, task, tuple(w for w in words if w != x), target, args.seed) for x in words]
        print(f"| {name} | {100 * result.cacc:.1f} | {100 * result.asr:.1f} | "
              + " | ".join(f"{100 * p:.1f}" for p in parts) + " |")


if __name__ == "__main__":
    main()
