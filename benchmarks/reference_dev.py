"""How the ``reference`` detector behaves on development attacks (never the acceptance grids): its AUROC, and
recall / precision of its cut alone and after zscore's and contrast's cuts (what train auto drops before it),
counted against the poison flags for reading only.

For each poisoned folder and seed: 1,000 seeded training rows, the clean dev split as the clean set. The
``finetuned`` reference trains MiniLM on the clean set (about a minute); ``frozen`` takes seconds.

    python benchmarks/reference_dev.py /work/devdata/sst2/stylebkd_ob_retok sst2/stylebkd_openbackdoor_p10 --seeds 0 1 2

(``benchmarks/retokenise_variant.py`` writes the re-tokenised variants.) Prints Markdown.
"""

from __future__ import annotations

import argparse
import itertools

import torch


def rates(selected: set[str], poisoned: set[str], n_rows: int) -> str:
    hit = len(selected & poisoned)
    clean = n_rows - len(poisoned)
    return (f"{len(selected)}, {hit / max(1, len(poisoned)):.2f} / {hit / max(1, len(selected)):.2f} "
            f"(clean rows {len(selected) - hit} = {(len(selected) - hit) / max(1, clean):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", help="poisoned data folders (names under the data root or paths)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--models", nargs="+", default=["frozen", "finetuned"])
    args = parser.parse_args()
    from unbackdoor.data import load_poisoned_task
    from unbackdoor.data.sampling import subsample_poisoned
    from unbackdoor.detect import DetectInputs, FlagRule, auroc
    from unbackdoor.detect.base import build_detector
    from unbackdoor.models.loading import load_classifier

    torch.set_num_threads(1)
    print("| data | seed | poisoned | reference | AUROC | reference alone: n, recall / precision | "
          "zscore + contrast | zscore + contrast, then reference |")
    print("|---|---:|---:|---|---:|---|---|---|")
    for spec, seed in itertools.product(args.data, args.seeds):
        task = subsample_poisoned(load_poisoned_task(spec), args.max_train, seed)
        rows, clean, poisoned = task.train, task.clean.dev, set(task.flags.poisoned_ids)
        encoder = load_classifier(None, num_labels=rows.num_labels)
        flags = [e.id in poisoned for e in rows]
        dropped: set[str] = set()
        for name in ("zscore", "contrast"):  # train auto's first two detectors and their calibrated cuts
            left = rows.replace([e for e in rows if e.id not in dropped])
            d = build_detector(name, {}).detect(DetectInputs(left, clean, encoder), FlagRule(rate=0.35))
            dropped |= {left.examples[i].id for i, s in enumerate(d.scores.tolist()) if s > d.report["threshold"]}
        left = rows.replace([e for e in rows if e.id not in dropped])
        for model in args.models:
            params = {"model": model}
            alone = build_detector("reference", params).detect(DetectInputs(rows, clean, encoder), FlagRule(threshold=1e-12))
            after = build_detector("reference", params).detect(DetectInputs(left, clean, encoder), FlagRule(threshold=1e-12))
            print(f"| {spec} | {seed} | {len(poisoned)} | {model} | {auroc(alone.scores, flags):.3f} | "
                  f"{rates(set(alone.flagged_ids), poisoned, len(rows))} | {rates(dropped, poisoned, len(rows))} | "
                  f"{rates(dropped | set(after.flagged_ids), poisoned, len(rows))} |", flush=True)


if __name__ == "__main__":
    main()
