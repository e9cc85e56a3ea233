"""Cheap detectors against paraphrase triggers, on development attacks only (``docs/results/auto.md``):
OpenBackdoor's released SynBkd and StyleBkd SST-2 rows at 10 % ("mix": poisoned rows from both labels,
all relabelled to the target), which the acceptance grid does not use (it takes the HiddenKiller and
StyleAttack releases at 20 %). 1,000 seeded training rows, the clean dev split as the clean set, the
frozen all-MiniLM-L6-v2 base as the feature encoder. No model is fine-tuned, so this runs in about two
minutes. Prints Markdown: AUROC, the recall / precision of the top 10 % and 20 % of the rows, and of the
rows above the detector's calibrated threshold (what ``train --defense auto`` drops), where it has one.

    python benchmarks/paraphrase_detect_dev.py [--seed 0]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = ("synbkd_openbackdoor_p10", "stylebkd_openbackdoor_p10")
WORDS = ["unigram", "bigram", "start"]
DETECTORS = {"zscore, word features only (before the shape feature)": ("zscore", {"features": WORDS, "top_tie": "keep"}),
             "zscore + shape, plain quantile": ("zscore", {"top_tie": "keep"}),
             "zscore + shape + top tie (the default)": ("zscore", {}),
             "loss, head fit on the rows": ("loss", {"fit_on": "rows"}),
             "loss, head fit on the clean set": ("loss", {"fit_on": "clean"})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from unbackdoor.data.io import data_root, load_poisoned_task
    from unbackdoor.data.sampling import subsample_poisoned
    from unbackdoor.detect import DetectInputs, FlagRule, auroc
    from unbackdoor.detect.base import build_detector
    from unbackdoor.models import load_classifier

    encoder = load_classifier(None, num_labels=2, max_length=128)
    print("| dev attack | detector | AUROC | recall / precision, top 10 % | recall / precision, top 20 % | "
          "rows over the calibrated threshold (what auto drops): n, recall / precision |")
    print("|---|---|---:|---:|---:|---:|")
    for variant in VARIANTS:
        poisoned = subsample_poisoned(load_poisoned_task(data_root() / "sst2" / variant), 1000, args.seed)
        truth = [poisoned.flags.is_poisoned(e.id) for e in poisoned.train]
        inputs = DetectInputs(poisoned.train, poisoned.clean.dev, encoder)
        for shown, (name, params) in DETECTORS.items():
            cells = []
            for rate in (0.1, 0.2):
                det = build_detector(name, params).detect(inputs, FlagRule(rate=rate))
                hits = sum(poisoned.flags.is_poisoned(i) for i in det.flagged_ids)
                cells.append(f"{hits / sum(truth):.2f} / {hits / len(det.flagged_ids):.2f}")
            if "threshold" in det.report:
                over = (det.scores > det.report["threshold"]).tolist()
                hits = sum(o and t for o, t in zip(over, truth, strict=True))
                cells.append(f"{sum(over)}, {hits / sum(truth):.2f} / {hits / max(sum(over), 1):.2f}")
            else:
                cells.append("(no threshold)")
            print(f"| {variant} s{args.seed} ({sum(truth)} poisoned) | {shown} | {auroc(det.scores, truth):.3f} | "
                  f"{' | '.join(cells)} |")

if __name__ == "__main__":
    main()
