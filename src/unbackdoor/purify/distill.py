"""Distillation into the clean base: teach the suspect's clean behaviour to its own clean base.

Where the backdoor sits everywhere in the suspect's weights (a poisoned pre-trained encoder that the
user fine-tuned: NeuBA, POR), every method that starts from the suspect keeps part of it, and
re-initialising everything to the base (``reinit``) removes it but leaves only a few hundred clean
labels to learn the task from. Distillation keeps the suspect as a *teacher* of its task and never
as the student's weights: the student is the clean base, and it only ever sees clean text, so the
teacher can pass on what it does on clean inputs but not what a trigger does. The student never
sees a trigger, a flag or triggered data.

Steps ([OURS] throughout: the combination is ours; knowledge distillation is Hinton et al. 2015,
and "a clean model learns from a suspect teacher on clean data" is the idea behind the field's
distillation defences, e.g. NAD, which however fine-tunes the *suspect* as the student):

1. split the clean set into a fitting part and a held-out part (stratified, seeded) for selection;
2. the transfer set: the fitting rows and ``views`` recombinations of each (``recombined_views``:
   with probability ``splice`` the row's first words joined to another fitting row's last words,
   then every word dropped with probability ``word_drop`` (at least one word kept), then every
   remaining word replaced with probability ``substitute`` by one of its ``neighbours`` nearest
   whole words in the *clean base's* input-embedding space (``models.vocabulary``: alphabetic
   tokens of 3+ letters). With ``substitute=0`` its words are the clean rows' words only, so no
   trigger can enter it; with substitution a word of the base's vocabulary can, with the small
   chance of a neighbour draw (a symbol, a word piece or a 2-letter token never);
3. the teacher's probabilities on the transfer set at temperature ``temperature`` (the suspect,
   before it is touched); a recombined row's hard label is the teacher's argmax;
4. the student: the suspect's weights reset to the base's everywhere, with a fresh head (as
   ``reinit`` with ``scope=all``);
5. train the student on the transfer set with (1 − ``weight``) · CE + ``weight`` · T² · KL(teacher ‖
   student) per row; pick the epoch by accuracy on the held-out clean rows (never on the teacher).

Not a published method: the recombination, the defaults and the use for purification are our
choices, measured on the development grid ``benchmarks/dev_distill.yaml`` (OLID, HSOL;
``docs/results/distill.md``). ``views=0`` is the ablation "the teacher's soft labels on the clean
rows alone".
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset, Example
from unbackdoor.inference import predict_logits
from unbackdoor.models.surgery import config_fingerprint, reinitialise
from unbackdoor.models.vocabulary import word_neighbours
from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyDefense, PurifyInputs, PurifyResult
from unbackdoor.selection import selection_report
from unbackdoor.training.config import CLEAN_FT_LEARNING_RATE, TrainConfig
from unbackdoor.training.loop import SoftTargets, train_classifier

logger = logging.getLogger(__name__)


def distill_train_config() -> TrainConfig:
    """[OURS] The student's training: batch 16, 5 epochs (the transfer set is ``views`` + 1 times the
    fitting rows, so more steps than clean fine-tuning's 10 epochs on them), lr
    :data:`CLEAN_FT_LEARNING_RATE`, warm-up 10 %, ties keep the last epoch."""
    return TrainConfig(epochs=5, batch_size=16, learning_rate=CLEAN_FT_LEARNING_RATE, warmup_ratio=0.1,
                       selection_ties="last")


class DistillConfig(StrictConfig):
    """Distillation into the clean base. Every choice is ours [OURS], set on the development grid."""

    views: int = Field(24, ge=0, description="recombined rows per fitting row in the transfer set (0: the clean "
                       "rows only)")
    splice: float = Field(0.5, ge=0, le=1, description="probability that a recombined row joins two rows' halves")
    word_drop: float = Field(0.15, ge=0, lt=1, description="probability that a recombined row loses each word")
    substitute: float = Field(0.3, ge=0, le=1, description="probability that a recombined row's word becomes one of "
                              "its nearest whole words in the clean base's embedding space")
    neighbours: int = Field(10, ge=1, description="how many nearest words a substitute is drawn from")
    temperature: float = Field(2.0, gt=0, description="T of the teacher's and student's softmax in the soft term")
    weight: float = Field(0.5, ge=0, le=1, description="share of the soft (teacher) term in each row's loss")
    train: TrainConfig = Field(default_factory=distill_train_config, description="the student's training")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="clean share held out for epoch selection")
    seed: int = Field(0, description="seed of the split, the recombinations and the student's fresh head")


def _splice(words: list[str], other: list[str], rng: random.Random) -> list[str]:
    """The first words of a row joined to the last words of another (cuts at word boundaries)."""
    return words[: rng.randint(1, len(words))] + other[rng.randint(0, max(0, len(other) - 1)):]


def _dropped(words: list[str], p: float, rng: random.Random) -> list[str]:
    kept = [w for w in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def _substituted(words: list[str], p: float, table: Mapping[str, Sequence[str]], lower: bool,
                 rng: random.Random) -> list[str]:
    out = []
    for w in words:
        options = table.get(w.lower() if lower else w)
        out.append(rng.choice(options) if options and rng.random() < p else w)
    return out


def recombined_views(rows: Sequence[Example], views: int, *, splice: float, word_drop: float, seed: int,
                     substitute: float = 0.0, neighbours: Mapping[str, Sequence[str]] | None = None,
                     lower: bool = False) -> list[Example]:
    """``views`` recombinations of every row (step 2), ids ``view:<id>:<k>``, labels copied (the
    caller replaces them). Sentence pairs: the first text is recombined, the second only loses words.
    ``neighbours``: word -> substitutes (``lower``: looked up lower-cased)."""
    rng = random.Random(seed)
    table = neighbours or {}
    out = []
    for row in rows:
        for k in range(views):
            words = row.text.split() or [row.text]
            if rng.random() < splice:
                other = rows[rng.randrange(len(rows))].text.split()
                words = _splice(words, other or words, rng)
            pair = row.text_pair
            if pair is not None and pair.split():
                pair = " ".join(_dropped(pair.split(), word_drop, rng))
            words = _dropped(words, word_drop, rng)
            if substitute:
                words = _substituted(words, substitute, table, lower, rng)
            out.append(Example(f"view:{row.id}:{k}", " ".join(words), row.label, pair))
    return out


def transfer_views(fit: Dataset, base: Any, cfg: DistillConfig) -> list[Example]:
    """Step 2: the recombined rows, their substitutes drawn from the clean ``base``'s word neighbours."""
    table: dict[str, list[str]] = {}
    if cfg.substitute and cfg.views:
        table = word_neighbours(base, (w for e in fit for w in e.text.split()), cfg.neighbours)
    return recombined_views(fit.examples, cfg.views, splice=cfg.splice, word_drop=cfg.word_drop, seed=cfg.seed,
                            substitute=cfg.substitute, neighbours=table,
                            lower=base.input_format()["lowercase"])


def teacher_targets(teacher: Any, transfer: Dataset, n_real: int, cfg: DistillConfig) -> tuple[Dataset, SoftTargets]:
    """Step 3: the teacher's tempered probabilities on every transfer row; the recombined rows (after
    the first ``n_real``) take the teacher's argmax as their hard label."""
    logits = torch.from_numpy(predict_logits(teacher, transfer.examples))
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    hard = logits.argmax(dim=1).tolist()
    rows = [e if i < n_real else Example(e.id, e.text, hard[i], e.text_pair) for i, e in enumerate(transfer.examples)]
    return transfer.replace(rows), SoftTargets(probs, cfg.weight, cfg.temperature)


@PURIFY_DEFENSES.register("distill")
class Distill(PurifyDefense[DistillConfig]):
    """The clean base, taught by the suspect on clean rows and their recombinations."""

    name = "distill"
    config_class = DistillConfig
    needs_base = True

    def _purify(self, inputs: PurifyInputs, work_dir: Path | None) -> PurifyResult:
        cfg, clf = self.config, inputs.suspect
        fit, held_out = holdout_split(inputs.clean, cfg.holdout_fraction, cfg.seed)  # step 1
        views = transfer_views(fit, inputs.base, cfg)  # step 2
        transfer, soft = teacher_targets(clf, fit.replace([*fit.examples, *views], f"{fit.name}+views"),
                                         len(fit), cfg)  # step 3
        teacher_agreement = float(sum(e.label == int(p.argmax()) for e, p in zip(fit, soft.probs)) / len(fit))
        reset = reinitialise(clf, inputs.base, "all", "pretrained", seed=cfg.seed)  # step 4
        key = config_fingerprint(cfg.model_dump(), inputs.base.source if inputs.base is not None else None)
        result = train_classifier(clf, transfer, cfg.train, dev=held_out, soft_targets=soft,
                                  work_dir=None if work_dir is None else work_dir / f"student-{key}")  # step 5
        logger.info("distill: %d transfer rows (%d clean, %d recombined); teacher agrees with %.3f of the clean "
                    "labels; student's held-out accuracy %.4f", len(transfer), len(fit), len(views),
                    teacher_agreement, result.best_dev_accuracy or 0.0)
        report: dict[str, Any] = {"method": self.name, "n_views": len(views),
                                  "teacher_fit_agreement": teacher_agreement, "reset": reset.to_dict(),
                                  **selection_report(len(fit), held_out, result)}
        return PurifyResult(clf, report)
