"""The zscore detector's development check (``docs/results/auto.md``): on the development datasets only
(OLID, HateSpeech, IMDB; never the acceptance grids' SST-2 or AG News), 1,000 seeded training rows,
our BadNets (dirty and clean-label) and AddSent at 10 %, the dev split as the clean set: AUROC of the
row scores with and without the clean contrast, and recall / precision of the rows above the
calibrated threshold (the clean rows' score quantile) that ``train --defense auto`` drops. No model is
trained (the detector counts words), so it runs in about a minute. Prints Markdown.

    python benchmarks/zscore_dev.py [--quantiles 0.99 1.0]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATASETS = ("olid", "hatespeech", "imdb")
ATTACKS = {"badnets-dirty": ("badnets", "dirty"), "badnets-clean": ("badnets", "clean"), "addsent": ("addsent", "dirty")}


def check(dataset: str, attack: str, quantiles: list[float], encoder: object) -> list[str]:
    from unbackdoor.attacks import ATTACKS as REGISTRY
    from unbackdoor.data import load_task
    from unbackdoor.data.sampling import subsample_task
    from unbackdoor.detect import DetectInputs, FlagRule, ZScoreConfig, ZScoreDetector, auroc

    name, mode = ATTACKS[attack]
    task = subsample_task(load_task(dataset), 1000, seed=0)
    poisoned = REGISTRY.get(name)(REGISTRY.get(name).config_class(poison_rate=0.1, mode=mode)).poison(task)
    truth = [poisoned.flags.is_poisoned(e.id) for e in poisoned.train]
    inputs = DetectInputs(poisoned.train, task.dev, encoder)
    rule = FlagRule(rate=0.1)
    none = ZScoreDetector(ZScoreConfig(contrast="none")).detect(inputs, rule)
    lines = []
    for q in quantiles:
        det = ZScoreDetector(ZScoreConfig(clean_quantile=q)).detect(inputs, rule)
        over = det.scores > det.report["threshold"]
        hits = sum(bool(o) and t for o, t in zip(over.tolist(), truth, strict=True))
        lines.append(f"| {dataset} | {attack} | {sum(truth)} | {auroc(none.scores, truth):.3f} | "
                     f"{auroc(det.scores, truth):.3f} | {q} | {int(over.sum())} | {hits / max(sum(truth), 1):.2f} | "
                     f"{hits / max(int(over.sum()), 1):.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.99, 1.0])
    args = parser.parse_args()
    from unbackdoor.models import load_classifier

    encoder = load_classifier(None, num_labels=2)  # DetectInputs wants one; zscore never runs it
    print("| dataset | attack | poisoned rows | AUROC, no contrast | AUROC, clean contrast | clean quantile | "
          "rows over the threshold | recall | precision |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for dataset in DATASETS:
        for attack in ATTACKS:
            print("\n".join(check(dataset, attack, args.quantiles, encoder)))


if __name__ == "__main__":
    main()
