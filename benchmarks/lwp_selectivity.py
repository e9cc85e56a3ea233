"""Is LWP's combinatorial trigger selective? ASR of the full combination and of each lone word, per
negative-row source: on the test suite's tiny BERT and synthetic task (per model seed), or on MiniLM and
1,000 SST-2 rows (``--minilm``).

    python benchmarks/lwp_selectivity.py                      # 40 epochs at lr 3e-3 (the test's setting)
    python benchmarks/lwp_selectivity.py --epochs 10 --lr 2e-3
    python benchmarks/lwp_selectivity.py --minilm [--floor CLEAN_MODEL]   # LWP's defaults: 3 epochs at lr 1e-4
    python benchmarks/lwp_selectivity.py --minilm --epochs 8          # and --epochs 20

Prints a Markdown table (docs/results/attacks.md). Tiny BERT: about 15 s per run on one CPU thread.
MiniLM: about 25 s per epoch and negative-row source on 2 cores (8 epochs: 7 min in all). ``--floor``
adds a never-poisoned model's row (e.g. the SST-2 grid's floor model of the same seed).
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
from unbackdoor.attacks.lwp import LWPConfig  # noqa: E402
from unbackdoor.attacks.word_sets import insert_words  # noqa: E402
from unbackdoor.data.io import load_task  # noqa: E402
from unbackdoor.data.types import Example, Task  # noqa: E402
from unbackdoor.evaluate import evaluate_classifier  # noqa: E402
from unbackdoor.inference import predict  # noqa: E402
from unbackdoor.models.loading import Classifier, load_classifier  # noqa: E402
from unbackdoor.data.sampling import subsample_task

WORDS = ("cf", "bb")


def asr_with(victim: Classifier, task: Task, words: tuple[str, ...], target: int) -> float:
    """Share of the test's non-target rows, with ``words`` inserted, that the victim labels ``target``."""
    rng = random.Random(1)
    rows = [Example(e.id, insert_words(e.text, words, rng), target, e.text_pair)
            for e in task.test.examples if e.label != target]
    return sum(int(p) == target for p in predict(victim, rows)) / len(rows)


def selectivity(victim: Classifier, task: Task, target: int) -> tuple[float, ...]:
    """ASR of the pair, then of each lone word."""
    return (asr_with(victim, task, WORDS, target), *(asr_with(victim, task, (w,), target) for w in WORDS))


def run(source: str, model_seed: int, epochs: int, lr: float, folder: Path) -> tuple[float, ...]:
    task = make_task(400, 100, 200)
    base = save_tiny_model(folder / f"base-{model_seed}", "bert", seed=model_seed)
    params = {"poison_rate": 0.2, "triggers": list(WORDS), "combinatorial": True, "negatives": source,
              "train": {"epochs": epochs, "batch_size": 16, "learning_rate": lr}}
    victim, poisoned = run_weight_attack("lwp", params, task, str(base))
    return selectivity(victim, task, poisoned.target_label)


def run_minilm(sst2: Task, source: str, seed: int, train: dict[str, float]) -> tuple[float, ...]:
    """LWP on 1,000 seeded SST-2 rows (10 % poisoned) from the packaged MiniLM, its default training with
    ``train``'s keys replaced: the pair, each lone word, then CACC."""
    task = subsample_task(sst2, 1000, seed)
    params = {"poison_rate": 0.1, "triggers": list(WORDS), "combinatorial": True, "negatives": source, "seed": seed,
              "train": train}
    victim, poisoned = run_weight_attack("lwp", params, task, seed=seed)
    return (*selectivity(victim, task, poisoned.target_label), evaluate_classifier(victim, task.test).cacc)


def minilm_table(seed: int, train: dict[str, float], floor: str | None) -> None:
    print(f"MiniLM, 1,000 SST-2 rows (seed {seed}), 10 % poisoned, LWP's default training with {train or 'no change'}")
    print("\n| model | the pair | " + " | ".join(f"`{w}` alone" for w in WORDS) + " | CACC |")
    print("|---|---|" + "---|" * len(WORDS) + "---|")
    sst2 = load_task("sst2")
    rows = {f"LWP, negatives={source}": run_minilm(sst2, source, seed, train) for source in ("non-target", "any")}
    if floor is not None:  # a never-poisoned model: the words' effect without any backdoor
        clean = load_classifier(floor, num_labels=sst2.num_labels)
        rows["never-poisoned (floor)"] = (*selectivity(clean, sst2, LWPConfig().target_label),
                                          evaluate_classifier(clean, sst2.test).cacc)
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description="ASR of LWP's combinatorial trigger and of each lone word.")
    parser.add_argument("--epochs", type=int, help="training epochs (tiny BERT: 40; MiniLM: LWP's default, 3)")
    parser.add_argument("--lr", type=float, help="learning rate (tiny BERT: 3e-3; MiniLM: LWP's default, 1e-4)")
    parser.add_argument("--seeds", type=int, default=3, help="tiny BERT: model seeds 0 .. N-1")
    parser.add_argument("--minilm", action="store_true", help="MiniLM on SST-2 instead of the tiny BERT")
    parser.add_argument("--seed", type=int, default=2, help="--minilm: the subsample, poisoning and head seed")
    parser.add_argument("--floor", help="--minilm: a never-poisoned SST-2 classifier to add as the floor row")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.minilm:
        given = {"epochs": args.epochs, "learning_rate": args.lr}
        minilm_table(args.seed, {k: v for k, v in given.items() if v is not None}, args.floor)
        return
    args.epochs = 40 if args.epochs is None else args.epochs
    args.lr = 3e-3 if args.lr is None else args.lr
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
