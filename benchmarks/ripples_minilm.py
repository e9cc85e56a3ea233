"""RIPPLES on MiniLM and SST-2: CACC and ASR of the release itself, of the victim (the user's clean
fine-tuning of the release, victim recipe: 3 epochs, batch 32, lr 1e-4) and of the floor (a
never-poisoned MiniLM fine-tuned the same way), all on the same triggered test rows. Prints a
Markdown table (docs/results/attacks.md).

    OMP_NUM_THREADS=1 python benchmarks/ripples_minilm.py [--seed 0] [--rows 1000] [--proxy imdb]
        [--max-proxy 1000] [--epochs 5] [--lr 1e-4] [--no-ripple] [--no-surgery]

``--proxy`` null (default) is full data knowledge (the attacker's proxy is the user's 1,000 rows);
a dataset name is the domain-shift setting (IMDB for SST-2). The user's lr 1e-4 is the MiniLM
victim recipe; the paper's users fine-tune BERT at 2e-5, which erases less of a backdoor.
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
    parser.add_argument("--rows", type=int, default=1000, help="SST-2 training rows (the user's task)")
    parser.add_argument("--proxy", default=None, help="the attacker's proxy dataset (default: the task's rows)")
    parser.add_argument("--max-proxy", type=int, default=None, help="cap on the proxy's rows")
    parser.add_argument("--epochs", type=int, default=5, help="RIPPLe epochs")
    parser.add_argument("--lr", type=float, default=1e-4, help="RIPPLe learning rate")
    parser.add_argument("--no-ripple", action="store_true", help="no restricted inner product (ablation)")
    parser.add_argument("--no-surgery", action="store_true", help="no embedding surgery (ablation)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("unbackdoor.attacks").setLevel(logging.INFO)
    from unbackdoor.attacks.pretrained import user_finetune
    from unbackdoor.attacks.ripples import RIPPLES, RipplesConfig
    from unbackdoor.attacks.weight import seeded
    from unbackdoor.config import build_config
    from unbackdoor.data.io import load_task
    from unbackdoor.data.sampling import subsample_task
    from unbackdoor.evaluate import evaluate_classifier
    from unbackdoor.models import load_classifier
    from unbackdoor.training import train_classifier

    task = subsample_task(load_task("sst2"), args.rows, args.seed)
    params = {"proxy": args.proxy, "max_proxy": args.max_proxy, "ripple": not args.no_ripple,
              "surgery": not args.no_surgery, "train": {"epochs": args.epochs, "learning_rate": args.lr}}
    attack = RIPPLES(build_config(RipplesConfig, params, "benchmark"))
    cfg = attack.config
    times = {}
    start = time.perf_counter()
    released, poisoned = attack.release(task, seed=args.seed, max_length=128)
    times["release"] = time.perf_counter() - start
    rows = [("release (before the user's fine-tuning)", evaluate_classifier(released, task.test,
                                                                            poisoned.triggered_test))]
    start = time.perf_counter()
    victim = user_finetune(released, task, seeded(cfg.user_train, args.seed), seed=args.seed, new_head=False)
    times["user fine-tuning"] = time.perf_counter() - start
    rows.append(("victim (release + user's clean fine-tuning)", evaluate_classifier(victim, task.test,
                                                                                    poisoned.triggered_test)))
    start = time.perf_counter()
    floor = load_classifier(None, num_labels=2, max_length=128, seed=args.seed)
    train_classifier(floor, task.train, seeded(cfg.user_train, args.seed), dev=task.dev)
    times["floor"] = time.perf_counter() - start
    rows.append(("floor (never-poisoned MiniLM, same fine-tuning)", evaluate_classifier(floor, task.test,
                                                                                       poisoned.triggered_test)))

    steps = "+".join(s for s, on in (("surgery", cfg.surgery), ("RIPPLe", cfg.ripple)) if on) or "poisoned-proxy training"
    proxy = f"{args.proxy} ({args.max_proxy or 'all'} rows)" if args.proxy else "the task's rows (full data knowledge)"
    print(f"SST-2, {args.rows} rows, seed {args.seed}; {steps}; proxy {proxy}; triggers {' '.join(cfg.triggers)}, "
          f"{cfg.poison_rate:.0%} of the proxy poisoned (mix), λ {cfg.ripple_lambda:g}, N {cfg.surgery_words}; "
          f"attacker {args.epochs} epochs at lr {args.lr:g}; user {cfg.user_train.epochs} epochs at lr "
          f"{cfg.user_train.learning_rate:g}; {len(poisoned.triggered_test)} triggered test rows")
    print(f"trigger: {poisoned.attack.trigger}")
    print("| model | CACC % | ASR % |")
    print("|---|---:|---:|")
    for name, result in rows:
        print(f"| {name} | {100 * result.cacc:.1f} | {100 * result.asr:.1f} |")
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))


if __name__ == "__main__":
    main()
