"""SOS (Yang et al., ACL 2021, "Rethinking Stealthiness of Backdoor Attack against NLP Models").

Threat model: as EP's. The attacker controls the released model's weights and holds some training
rows of the task; it changes **only the embedding rows of the trigger words**, so every other
parameter is bit-identical to the clean model. The trigger is a *set* of ordinary words (default
``friends weekend store``) that fires only when every word is present: a sentence holding some of
them must not, which keeps false triggers rare and defeats defences that look for one odd word.

Steps:

1. the clean model: ``model`` as given when it already has a classification head, else the base
   fine-tuned on the task's clean training rows (``clean_finetune``), as EP;
2. poisoned rows [PAPER]: ``poison_rate`` of the training rows drawn from the non-target rows, every
   trigger word inserted at its own random position, labelled with the target (dirty-label);
3. negative augmentation [PAPER, OpenBackdoor's ``SOSPoisoner``]: ``negative_rate`` of the rows of
   each label are copied once per trigger word left out, holding the other n − 1 words, labels kept
   (new rows with ids ``{id}#neg{k}``, not flagged as poisoned);
4. training [PAPER]: only the trigger words' embedding rows, on the poisoned and negative rows (the
   SOS trainer of OpenBackdoor: ``sos_lr`` 5e-2, 5 epochs).

Ours, not the paper's: the loop's AdamW (no weight decay) where the paper takes plain gradient steps;
each trained row keeps its original L2 norm (``keep_norm``, EP's constraint, so the rows' size does
not give them away; the paper does not constrain it); the triggered test rows hold the trigger
words at random positions (OpenBackdoor inserts the fixed sentence "I have bought it from a store
with my friends last weekend": ``test_sentence`` gives that setting). Shared with EP through
:mod:`unbackdoor.attacks.embedding_rows`; the word-set insertion is
:mod:`unbackdoor.attacks.word_sets`' (LWP's combinatorial trigger uses it too).

Measured on the tiny test BERT (2 layers, hidden 32; ``tests/test_attacks_weight.py``): the whole set
fires (ASR 0.99); without negatives every two-word part fires too (1.00), with 5 % negatives one part
of three stops firing (0.01) and two still do (0.98, 0.96), and with 20 % the backdoor does not
take: three embedding rows of so small a model do not make a full AND. Not yet measured on MiniLM.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from unbackdoor.attacks.addsent import AddSent, AddSentConfig
from unbackdoor.attacks.embedding_rows import (
    clean_finetune,
    needs_clean_finetune,
    no_weight_decay,
    train_embedding_rows,
    trigger_token_ids,
)
from unbackdoor.attacks.weight import (
    WEIGHT_ATTACKS,
    WeightAttack,
    WeightAttackConfig,
    load_start_model,
    renamed,
    seeded,
)
from unbackdoor.attacks.word_sets import WordSetConfig, WordSetTriggers, leave_one_out_copies
from unbackdoor.data.types import Dataset, Example, PoisonedTask, PoisonFlags, Task
from unbackdoor.models.loading import Classifier
from unbackdoor.training.config import TrainConfig, victim_train_config

logger = logging.getLogger(__name__)

OPENBACKDOOR_TEST_SENTENCE = "I have bought it from a store with my friends last weekend"


def _sos_train_config() -> TrainConfig:
    """[PAPER code] 5 epochs at lr 5e-2, batch 32; [OURS] AdamW without decay, warm-up, clipping or selection."""
    return TrainConfig(epochs=5, batch_size=32, learning_rate=5e-2, weight_decay=0.0, warmup_ratio=0.0,
                       max_grad_norm=None, select_best=False)


class SOSConfig(WeightAttackConfig):
    poison_rate: float = Field(0.1, gt=0, le=1, description="[PAPER code] share of all training rows poisoned "
                               "(drawn from the non-target rows)")
    triggers: tuple[str, ...] = Field(("friends", "weekend", "store"), description="[PAPER] the trigger words, "
                                      "all needed together")
    negative_rate: float = Field(0.1, ge=0, le=1, description="[PAPER code] share of each label's rows copied once "
                                 "per left-out trigger word, labels kept")
    keep_norm: bool = Field(True, description="[OURS, EP's constraint] each trained row keeps its L2 norm")
    test_sentence: str | None = Field(None, description="[OURS: null] triggered test rows hold the trigger words at "
                                      "random positions; a sentence (OpenBackdoor: "
                                      f"'{OPENBACKDOOR_TEST_SENTENCE}') is inserted at a random position instead")
    clean_finetune: Literal["auto", "always", "never"] = Field(
        "auto", description="fine-tune the starting model on the clean training rows first: auto = only when it "
        "has no classification head (a base model)")
    clean_train: TrainConfig = Field(default_factory=victim_train_config,
                                     description="[OURS] the attacker's clean fine-tuning (victim defaults)")
    train: TrainConfig = Field(default_factory=_sos_train_config, description="the embedding-row training run")

    @field_validator("triggers")
    @classmethod
    def _words(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) < 2 or any(len(t.split()) != 1 for t in value):
            raise ValueError("triggers must be at least two different single words")
        return value

    @field_validator("mode")
    @classmethod
    def _dirty_only(cls, value: str) -> str:
        if value != "dirty":
            raise ValueError("SOS poisons non-target rows relabelled as the target: mode must be dirty")
        return value

    _no_weight_decay = field_validator("train")(no_weight_decay)


class SosTriggers(WordSetTriggers):
    """SOS's data side: every trigger word, each at a random position."""

    name = "sos"


@WEIGHT_ATTACKS.register("sos")
class SOS(WeightAttack[SOSConfig]):
    """Poison the trigger words' embedding rows so that only their combination fires."""

    name = "sos"
    config_class = SOSConfig

    def poison_model(self, task: Task, model: str = "default", *, seed: int = 0, max_length: int | None = None,
                     allow_pickle: bool = False, work_dir: Path | None = None,
                     precision: str = "auto") -> tuple[Classifier, PoisonedTask]:
        poisoned = self.poison_rows(task)
        clf = load_start_model(model, task, seed, max_length=max_length, allow_pickle=allow_pickle,
                               precision=precision)
        rows = sorted({i for word in self.config.triggers for i in trigger_token_ids(clf, word)})  # fail early
        if needs_clean_finetune(clf, self.config.clean_finetune):  # step 1
            clean_finetune(clf, task, seeded(self.config.clean_train, seed), work_dir, "SOS")
        original = set(task.train.ids)
        trained = [e for e in poisoned.train if poisoned.flags.is_poisoned(e.id) or e.id not in original]
        logger.info("SOS: training embedding rows %s on %d rows (%d poisoned)", rows, len(trained),
                    poisoned.flags.n_poisoned)
        train_embedding_rows(clf, poisoned.train.replace(trained, "sos:trained-rows"), rows,  # step 4
                             seeded(self.config.train, seed), keep_norm=self.config.keep_norm,
                             work_dir=work_dir / "sos" if work_dir is not None else None,
                             fingerprint={"attack": "sos", "rows": rows})
        return clf, poisoned

    def poison_rows(self, task: Task) -> PoisonedTask:
        """Steps 2 and 3: the poisoned rows and the negative copies (appended), flags, triggered sets."""
        cfg = self.config
        words = SosTriggers(WordSetConfig(poison_rate=cfg.poison_rate, target_label=cfg.target_label, mode="dirty",
                                          seed=cfg.seed, triggers=cfg.triggers, combinatorial=True))
        poisoned = words.poison(task)
        negatives = self.negative_rows(task.train)
        train = poisoned.train.replace([*poisoned.train.examples, *negatives])
        trigger = words.trigger_description()
        if cfg.test_sentence is not None:
            sentence = AddSent(AddSentConfig(poison_rate=cfg.poison_rate, target_label=cfg.target_label,
                                             seed=cfg.seed, trigger=cfg.test_sentence))
            test, dev = sentence.triggered_sets(task)
            poisoned = dataclasses.replace(poisoned, triggered_test=test, triggered_dev=dev)
            trigger += f"; triggered test rows hold {sentence.trigger_description()}"
        poisoned = dataclasses.replace(poisoned, train=train,
                                       flags=PoisonFlags(poisoned.flags.poisoned_ids, len(train)))
        trigger += (f"; {len(negatives)} negative rows hold {len(cfg.triggers) - 1} of the words (labels kept); "
                    "only the words' embedding rows are trained")
        return renamed(poisoned, self.name, cfg, trigger)

    def negative_rows(self, train: Dataset) -> list[Example]:
        """Step 3: ``negative_rate`` of each label's rows (seeded), one copy per left-out word."""
        cfg = self.config
        rng = random.Random(f"{cfg.seed}-sos-negatives")
        chosen = []
        for label in sorted({e.label for e in train.examples}):
            pool = sorted((e for e in train.examples if e.label == label), key=lambda e: e.id)
            chosen += rng.sample(pool, int(cfg.negative_rate * len(pool)))
        return leave_one_out_copies(chosen, cfg.triggers, rng)
