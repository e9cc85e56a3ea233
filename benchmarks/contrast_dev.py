"""How the ``contrast`` detector's settings were chosen: recall / precision of its cut and its AUROC on
development attacks (never the acceptance grids), counted against the poison flags for reading only.

For each poisoned folder and seed (1,000 seeded training rows, the clean dev split as the clean set): the
detector alone under each setting given, and zscore's calibrated cut followed by contrast on the rows
left (what train auto does). No task model is trained; a few seconds per setting.

    python benchmarks/contrast_dev.py sst2/stylebkd_openbackdoor_p10 sst2/synbkd_openbackdoor_p10 --seeds 0 1
    python benchmarks/contrast_dev.py runs/devdata/sst2/stylebkd_ob_retok --seeds 0 1 2   # retokenise_variant.py
    python benchmarks/contrast_dev.py PATH/TO/poisoned/data --grid  # per_label x l2 x fdr

Prints Markdown.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import torch


def rates(selected: set[str], poisoned: set[str]) -> str:
    hit = len(selected & poisoned)
    return f"{len(selected)}, {hit / max(1, len(poisoned)):.2f} / {hit / max(1, len(selected)):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", help="poisoned data folders (names under the data root or paths)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--grid", action="store_true", help="per_label x l2 {0.01, 0.03, 0.1} x fdr {0.1, 0.2, 0.3}")
    args = parser.parse_args()
    from unbackdoor.data import load_poisoned_task
    from unbackdoor.data.sampling import subsample_poisoned
    from unbackdoor.detect import DetectInputs, FlagRule, auroc
    from unbackdoor.detect.base import build_detector
    from unbackdoor.models.loading import load_classifier

    torch.set_num_threads(1)
    settings: list[dict[str, Any]] = [{}]
    if args.grid:
        settings = [{"per_label": p, "l2": l2, "fdr": q}
                    for p, l2, q in itertools.product((True, False), (0.01, 0.03, 0.1), (0.1, 0.2, 0.3))]
    print("| data | seed | poisoned | setting | AUROC | contrast alone: n, recall / precision | zscore's cut | zscore, then contrast |")
    print("|---|---:|---:|---|---:|---|---|---|")
    encoder = None
    for spec, seed in itertools.product(args.data, args.seeds):
        task = subsample_poisoned(load_poisoned_task(spec), args.max_train, seed)
        rows, clean, poisoned = task.train, task.clean.dev, set(task.flags.poisoned_ids)
        encoder = encoder or load_classifier(None, num_labels=rows.num_labels)  # not used by either detector
        flags = [e.id in poisoned for e in rows]
        z = build_detector("zscore", {}).detect(DetectInputs(rows, clean, encoder), FlagRule(rate=0.35))
        by_z = {rows.examples[i].id for i, s in enumerate(z.scores.tolist()) if s > z.report["threshold"]}
        rest = rows.replace([e for e in rows if e.id not in by_z])
        for params in settings:
            alone = build_detector("contrast", params).detect(DetectInputs(rows, clean, encoder), FlagRule(threshold=0.0))
            after = build_detector("contrast", params).detect(DetectInputs(rest, clean, encoder), FlagRule(threshold=0.0))
            shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"
            print(f"| {spec} | {seed} | {len(poisoned)} | {shown} | {auroc(alone.scores, flags):.3f} | "
                  f"{rates(set(alone.flagged_ids), poisoned)} | {rates(by_z, poisoned)} | "
                  f"{rates(by_z | set(after.flagged_ids), poisoned)} |", flush=True)


if __name__ == "__main__":
    main()
