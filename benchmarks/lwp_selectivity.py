"""Is LWP's combinatorial trigger selective? ASR of the full combination and of each lone word, on the
test suite's tiny BERT and synthetic task, per negative-row source and model seed.

    python benchmarks/lwp_selectivity.py                      # 40 epochs at lr 3e-3 (the test's setting)
    python benchmarks/lwp_selectivity.py --epochs 10 --lr 2e-3

Prints a Markdown table (docs/results/attacks.md). About 15 s per run on one CPU thread.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic import make_task, save_tiny_model  # noqa: E402  (the test suite's tiny model and task)

from unbackdoor.attacks import run_weight_attack  # noqa: E402
from unbackdoor.attacks.lwp import insert_words  # noqa: E402
from unbackdoor.data.types import Example, Task  # noqa: E402
from unbackdoor.inference import predict  # noqa: E402
from unbackdoor.models.loading import Classifier  # noqa: E402

WORDS = ("cf", "bb")


def asr_with(victim: Classifier, task: Task, words: tuple[str, ...], target: int) -> float:
    """Share of the test's non-target rows, with ``words`` inserted, that the victim labels ``target``."""
    rng = random.Random(1)
    rows = [Example(e.id, insert_words(e.text, words, rng), target, e.text_pair)
            for e in task.test.examples if e.label != target]
    return sum(int(p) == target for p in predict(victim, rows)) / len(rows)


def run(source: str, model_seed: int, epochs: int, lr: float, folder: Path) -> tuple[float, ...]:
    task = make_task(400, 100, 200)
    base = save_tiny_model(folder / f"base-{model_seed}", "bert", seed=model_seed)
    params = {"poison_rate": 0.2, "triggers": list(WORDS), "combinatorial": True, "negatives": source,
              "train": {"epochs": epochs, "batch_size": 16, "learning_rate": lr}}
    victim, poisoned = run_weight_attack("lwp", params, task, str(base))
    target = poisoned.target_label
    return (asr_with(victim, task, WORDS, target), *(asr_with(victim, task, (w,), target) for w in WORDS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, default=3, help="model seeds 0 .. N-1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    print(f"{args.epochs} epochs at lr {args.lr:g}; ASR per model seed " + " / ".join(map(str, range(args.seeds))))
    print("\n| negative rows | the pair | " + " | ".join(f"`{w}` alone" for w in WORDS) + " |")
    print("|---|---|" + "---|" * len(WORDS))
    with tempfile.TemporaryDirectory() as tmp:
        for source in ("non-target", "any"):
            results = [run(source, s, args.epochs, args.lr, Path(tmp)) for s in range(args.seeds)]
            cells = [" / ".join(f"{r[i]:.2f}" for r in results) for i in range(len(WORDS) + 1)]
            print(f"| {source} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
