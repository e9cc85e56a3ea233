"""LWS on MiniLM and 1,000 SST-2 rows: CACC and ASR of the victim next to the floor, a never-poisoned
MiniLM fine-tuned with the victim recipe on the same rows (the clean model the attacker starts from)
measured on the same triggered test rows; the mean number of words substituted per triggered
sentence and a few examples. Prints Markdown.

    OMP_NUM_THREADS=1 python benchmarks/lws_minilm.py [--seed 0] [--epochs 10] [--n-substitutes 4]
        [--inserter-lr 1e-2] [--unfrozen] [--examples 5]

The synonym source is MiniLM's own embedding neighbours (not the paper's HowNet sememes); epochs are
capped at 10 (the paper: 20), candidates at 4 per word. About 13 minutes with one thread on a busy
2-core machine (clean fine-tuning, the joint run, evaluations).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10, help="joint LWS epochs (the paper: 20)")
    parser.add_argument("--n-substitutes", type=int, default=4)
    parser.add_argument("--inserter-lr", type=float, default=1e-2)
    parser.add_argument("--unfrozen", action="store_true", help="train the input embeddings too")
    parser.add_argument("--poison-rate", type=float, default=0.1)
    parser.add_argument("--examples", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("unbackdoor.attacks.lws").setLevel(logging.INFO)
    from unbackdoor.attacks import run_weight_attack
    from unbackdoor.attacks.lws import substituted_words
    from unbackdoor.data.io import load_task
    from unbackdoor.data.sampling import subsample_task
    from unbackdoor.evaluate import evaluate_classifier
    from unbackdoor.models import load_classifier, provenance_record, save_classifier
    from unbackdoor.training import train_classifier
    from unbackdoor.training.config import victim_train_config

    watch = time.monotonic()
    task = subsample_task(load_task("sst2"), args.rows, args.seed)
    clean = load_classifier(None, num_labels=2, max_length=128, seed=args.seed)
    train_classifier(clean, task.train, victim_train_config().model_copy(update={"seed": args.seed, "progress": False}),
                     dev=task.dev)
    params = {"n_substitutes": args.n_substitutes, "inserter_lr": args.inserter_lr,
              "freeze_embeddings": not args.unfrozen, "poison_rate": args.poison_rate, "train": {"epochs": args.epochs}}
    with tempfile.TemporaryDirectory() as tmp:
        save_classifier(clean, Path(tmp) / "clean", provenance_record(clean, role="model"))
        victim, poisoned = run_weight_attack("lws", params, task, str(Path(tmp) / "clean"), seed=args.seed)
    originals = {e.id: e.text for e in task.test}
    triggered = poisoned.triggered_test.examples
    counts = [substituted_words(originals[e.id], e.text) for e in triggered]
    print(f"SST-2, {args.rows} training rows, seed {args.seed}; LWS: embedding-neighbour candidates (MiniLM's own "
          f"input embeddings, {args.n_substitutes} per word), {args.epochs} joint epochs, inserter lr "
          f"{args.inserter_lr:g}, embeddings {'trained' if args.unfrozen else 'frozen'}; "
          f"{poisoned.flags.n_poisoned} poisoned rows ({args.poison_rate:g}); {len(triggered)} triggered test rows "
          f"({poisoned.attack.n_failed} rows without a substitutable word left out)")
    print()
    print("| model | CACC % | ASR % |")
    print("|---|---:|---:|")
    for name, clf in (("never-poisoned MiniLM (floor)", clean), ("LWS victim", victim)):
        result = evaluate_classifier(clf, task.test, poisoned.triggered_test)
        print(f"| {name} | {100 * result.cacc:.1f} | {100 * result.asr:.1f} |")
    print()
    print(f"Words substituted per triggered test sentence: mean {sum(counts) / len(counts):.2f}, "
          f"{sum(c == 0 for c in counts)} sentences unchanged.")
    print()
    for e in triggered[: args.examples]:
        print(f"- {originals[e.id]}\n  -> {e.text}")
    print(f"\n({(time.monotonic() - watch) / 60:.1f} min)")


if __name__ == "__main__":
    main()
