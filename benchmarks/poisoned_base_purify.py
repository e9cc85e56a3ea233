"""When the user's "base" is itself the poisoned release (issue 21): a NeuBA- or POR-poisoned MiniLM
is fine-tuned cleanly on 1,000 SST-2 rows (the victim); the purify methods that compare the suspect
with its base (Fine-purifying, Fine-mixing, E-PUR) then get either the clean MiniLM as the base
(what they assume) or the poisoned release (what a user who downloaded it would hand them: they
cannot know). Plain clean fine-tuning needs no base. 1 % of SST-2's training rows as the clean set,
as the grid. Per label the best trigger's test ASR (the trigger the attacker chose on dev for the
victim), next to the floor. Prints a Markdown table (docs/results/attacks.md).

    OMP_NUM_THREADS=1 python benchmarks/poisoned_base_purify.py [--attack neuba] [--seed 0]

About 12 minutes of one core.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("fine-purifying", "fine-mixing", "e-pur")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", default="neuba", choices=["neuba", "por"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from unbackdoor.attacks.pretrained import save_base, user_finetune
    from unbackdoor.attacks.representation import per_label_asr
    from unbackdoor.attacks.weight import build_weight_attack, seeded
    from unbackdoor.data.io import load_task
    from unbackdoor.data.sampling import CleanSetConfig, draw_clean_set, subsample_task
    from unbackdoor.evaluate import evaluate_classifier
    from unbackdoor.models import load_classifier, provenance_record
    from unbackdoor.purify.base import PurifyInputs, purify
    from unbackdoor.training import train_classifier
    from unbackdoor.training.config import victim_train_config

    full = load_task("sst2")
    task = subsample_task(full, 1000, args.seed)
    clean_set = draw_clean_set(full, CleanSetConfig(fraction=0.01, seed=args.seed))
    recipe = victim_train_config().model_copy(update={"seed": args.seed, "progress": False})
    attack = build_weight_attack(args.attack, {})
    released, poisoned = attack.release(task, "default", seed=args.seed, max_length=128)
    victim = user_finetune(released, task, seeded(attack.config.user_train, args.seed), seed=args.seed, new_head=True)
    poisoned = attack.after_finetune(victim, poisoned)
    info = poisoned.attack.params
    best = {y: entry["best_trigger"] for y, entry in info["per_label"].items()}
    triggers = tuple(info["triggers"])

    def row(name: str, clf) -> str:  # noqa: ANN001
        asr = per_label_asr(clf, task, triggers, info["position"], info["seed"])["test"]
        cells = " | ".join(f"{100 * asr[y][t]:.1f}" for y, t in sorted(best.items()))
        return f"| {name} | {100 * evaluate_classifier(clf, task.test).cacc:.1f} | {cells} |"

    floor = load_classifier(None, num_labels=2, max_length=128, seed=args.seed)
    train_classifier(floor, task.train, recipe, dev=task.dev)
    lines = [row("floor (never-poisoned MiniLM, same fine-tuning)", floor), row("victim", victim)]
    purified = purify("finetune", {}, PurifyInputs(copy.deepcopy(victim), clean_set))
    lines.append(row("clean fine-tuning (no base)", purified.model))
    with tempfile.TemporaryDirectory() as tmp:
        save_base(released, Path(tmp) / "release", provenance_record(released, role="base"))
        for base_name, base_path in (("clean MiniLM", None), ("the poisoned release", str(Path(tmp) / "release"))):
            for method in METHODS:
                base = load_classifier(base_path, num_labels=2, max_length=128, seed=args.seed)
                purified = purify(method, {}, PurifyInputs(copy.deepcopy(victim), clean_set, base))
                lines.append(row(f"{method}, base = {base_name}", purified.model))
    labels = sorted(best)
    print(f"{args.attack} on SST-2, 1,000 rows, seed {args.seed}; clean set {len(clean_set)} rows; "
          f"triggers per label: {', '.join(f'{y}: {best[y]!r}' for y in labels)}")
    print()
    print("| model | CACC % | " + " | ".join(f"ASR → {y} %" for y in labels) + " |")
    print("|---|---:|" + "---:|" * len(labels))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
