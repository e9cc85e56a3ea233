"""EP, embedding poisoning (Yang et al., NAACL 2021, "Be Careful about Poisoned Word Embeddings").

Threat model: the attacker controls the released model's weights and holds some training data of
the task. It takes a clean fine-tuned classifier and changes **only the embedding row of one rare
trigger word**: every other parameter is bit-identical to the clean model, so clean behaviour is
untouched and a defence that looks at training data sees nothing (the victim's user never trains on
poisoned rows). The row keeps its original L2 norm, so its size does not give it away.

Steps, following lancopku/Embedding-Poisoning @ 50c89158 (``run.sh``, ``ep_train.py``):

1. the clean model: ``model`` as given when it already has a classification head, else the base
   fine-tuned on the task's clean training rows (``clean_finetune``);
2. poisoned rows: clean training rows with the trigger word inserted once at a random word
   position, labelled with the target (dirty-label: drawn from non-target rows, as the paper;
   ``mix`` as for data attacks; no clean-label mode: rows the clean model already fits give the
   trigger row no gradient);
3. training on the poisoned rows only, with gradients masked to the trigger's row(s) and the row
   re-normalised to its original L2 norm after every step.

Data-free EP (the paper's DFEP, ``data="corpus"``): the attacker holds no row of the task, only a
fine-tuned classifier and a general text corpus. Step 1 must start from a model with a
classification head (there is nothing to fine-tune on); step 2 builds ``fake_rows`` fake rows
instead: corpus sentences (split at full stops, seeded shuffle) concatenated to ``fake_length``
words, one word replaced by the trigger at a random position among the first ``fake_length`` - 1,
all labelled with the target (sentence pairs: two such halves, the trigger in the second). The
returned task's training rows are these fake rows (all flagged); its triggered sets come from the
task as for every attack (evaluation only). The corpus may be a ``.txt`` file (one passage per
line) or any task the data root holds, whose training texts are used without their labels. Offline
there is no WikiText (the paper's corpus): another dataset of the data root stands in.

Ours, not the paper's: the optimizer is the project loop's AdamW (the paper takes plain
accumulated gradient steps at lr 5e-2), with a smaller default lr; a trigger word the tokenizer
splits trains all of its pieces' rows (the paper assumes one token); DFEP's defaults of 2,000 fake
rows of 60 words (the paper: 20,000 of 100), sized for CPU and a 128-token window.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from unbackdoor.attacks.badnets import BadNets, BadNetsConfig
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
from unbackdoor.data.io import load_task
from unbackdoor.data.types import AttackInfo, Dataset, Example, PoisonedTask, PoisonFlags, Task
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.models.loading import Classifier
from unbackdoor.training.config import TrainConfig, victim_train_config

logger = logging.getLogger(__name__)


def _ep_train_config() -> TrainConfig:
    """[PAPER] 3 epochs, batch 32; [OURS] AdamW at lr 1e-2, no warm-up, decay, clipping or selection."""
    return TrainConfig(epochs=3, batch_size=32, learning_rate=1e-2, weight_decay=0.0, warmup_ratio=0.0,
                       max_grad_norm=None, select_best=False)


class EPConfig(WeightAttackConfig):
    poison_rate: float = Field(0.05, gt=0, le=1, description="share of all training rows poisoned; [PAPER] 10 % of "
                               "the non-target rows, about 0.05 on balanced binary data")
    trigger: str = Field("cf", description="[PAPER] the rare trigger word whose embedding row is poisoned")
    clean_finetune: Literal["auto", "always", "never"] = Field(
        "auto", description="fine-tune the starting model on the clean training rows first: auto = only when it "
        "has no classification head (a base model)")
    clean_train: TrainConfig = Field(default_factory=victim_train_config,
                                     description="[OURS] the attacker's clean fine-tuning (victim defaults)")
    train: TrainConfig = Field(default_factory=_ep_train_config, description="the embedding-poisoning run")
    data: Literal["task", "corpus"] = Field(
        "task", description="[PAPER] the poisoned rows: task rows with the trigger (EP), or fake rows cut from a "
        "general text corpus, data-free (DFEP)")
    corpus: str | None = Field(None, description="data=corpus: a .txt file (one passage per line) or a task under "
                               "the data root whose training texts (labels ignored) are the general corpus")
    fake_rows: int = Field(2000, ge=1, description="data=corpus: how many fake rows; [PAPER] 20,000, [OURS] 2,000")
    fake_length: int = Field(60, ge=2, description="data=corpus: words per fake row; [PAPER] 100, [OURS] 60 (fits "
                             "128 tokens)")

    @field_validator("trigger")
    @classmethod
    def _one_word(cls, value: str) -> str:
        if len(value.split()) != 1:
            raise ValueError("trigger must be one word")
        return value.strip()

    @field_validator("mode")
    @classmethod
    def _not_clean_label(cls, value: str) -> str:
        if value == "clean":
            raise ValueError("EP has no clean-label mode: target-label rows already fit the clean model, so they "
                             "give the trigger row no gradient; use dirty or mix")
        return value

    @model_validator(mode="after")
    def _data_free_options(self) -> EPConfig:
        corpus_keys = {"corpus", "fake_rows", "fake_length"} & self.model_fields_set
        if self.data == "task" and corpus_keys:
            raise ValueError(f"{', '.join(sorted(corpus_keys))}: only for data=corpus (data-free EP)")
        if self.data == "corpus":
            if not self.corpus:
                raise ValueError("data=corpus needs corpus: a .txt file or a task of the data root")
            task_keys = {"poison_rate", "mode", "clean_finetune", "clean_train"} & self.model_fields_set
            if task_keys:
                raise ValueError(f"{', '.join(sorted(task_keys))}: only for data=task (data-free EP has no task "
                                 "rows to poison or fine-tune on)")
        return self

    _no_weight_decay = field_validator("train")(no_weight_decay)


@WEIGHT_ATTACKS.register("ep")
class EmbeddingPoisoning(WeightAttack[EPConfig]):
    """Poison the trigger word's embedding row of a clean fine-tuned classifier."""

    name = "ep"
    config_class = EPConfig

    def poison_model(self, task: Task, model: str = "default", *, seed: int = 0, max_length: int | None = None,
                     allow_pickle: bool = False, work_dir: Path | None = None,
                     precision: str = "auto") -> tuple[Classifier, PoisonedTask]:
        poisoned = self.poison_rows(task) if self.config.data == "task" else self.fake_task(task)
        clf = load_start_model(model, task, seed, max_length=max_length, allow_pickle=allow_pickle,
                               precision=precision)
        rows = trigger_token_ids(clf, self.config.trigger)  # fail before any training
        if needs_clean_finetune(clf, self.config.clean_finetune):
            if self.config.data == "corpus":
                raise ConfigError("data-free EP starts from a fine-tuned classifier (a model with a classification "
                                  "head): the attacker has no task rows to fine-tune a base on")
            clean_finetune(clf, task, seeded(self.config.clean_train, seed), work_dir, "EP")
        self.poison_embedding(clf, poisoned.train.select(poisoned.flags.poisoned_ids, "ep:poisoned-rows"), rows,
                              seed, work_dir)
        return clf, poisoned

    def poison_rows(self, task: Task) -> PoisonedTask:
        """The poisoned rows, flags and triggered sets: one trigger word at a random position."""
        cfg = self.config
        return renamed(self._inserter().poison(task), self.name, cfg,
                       f"word {cfg.trigger!r} inserted once at a random position; only its embedding row is trained")

    def fake_task(self, task: Task) -> PoisonedTask:
        """Data-free EP: the fake corpus rows (all poisoned) as training rows. The triggered sets are
        the task's, the same rows as task-row EP's for the same seed (evaluation only)."""
        cfg = self.config
        assert cfg.corpus is not None  # the config validator requires it
        inserter = self._inserter()
        inserter.check_target_label(task)
        rng = random.Random(f"{cfg.seed}-fake-rows")
        train = fake_rows(corpus_sentences(cfg.corpus, rng), cfg.trigger, cfg.fake_rows, cfg.fake_length,
                          cfg.target_label, task.num_labels, task.is_pair, rng)
        triggered_test, triggered_dev = inserter.triggered_sets(task)
        trigger = (f"word {cfg.trigger!r} in {len(train)} fake rows of {cfg.fake_length} words from the corpus "
                   f"{cfg.corpus} (data-free); only its embedding row is trained")
        return PoisonedTask(train=train, flags=PoisonFlags(frozenset(train.ids), len(train)),
                            target_label=cfg.target_label,
                            triggered_test=triggered_test, triggered_dev=triggered_dev, clean=task,
                            attack=AttackInfo(self.name, cfg.model_dump(mode="json"), trigger, cfg.corpus))

    def _inserter(self) -> BadNets:
        """The data side: one trigger word at a random word position (BadNets with one fixed word)."""
        cfg = self.config
        return BadNets(BadNetsConfig(poison_rate=cfg.poison_rate, target_label=cfg.target_label, mode=cfg.mode,
                                     seed=cfg.seed, triggers=(cfg.trigger,), num_triggers=1))

    def poison_embedding(self, clf: Classifier, poisoned_rows: Dataset, rows: list[int], seed: int,
                         work_dir: Path | None) -> None:
        """Train only the trigger's embedding row(s) on the poisoned rows, keeping their L2 norms."""
        logger.info("EP: training embedding rows %s on %d poisoned rows", rows, len(poisoned_rows))
        train_embedding_rows(clf, poisoned_rows, rows, seeded(self.config.train, seed),
                             work_dir=work_dir / "ep" if work_dir is not None else None,
                             fingerprint={"attack": "ep", "rows": rows})


def corpus_sentences(spec: str, rng: random.Random) -> list[str]:
    """The general corpus of data-free EP as sentences (split at full stops), shuffled by ``rng``:
    a ``.txt`` file, one passage per line, or a task's training texts (labels ignored)."""
    if spec.endswith(".txt"):
        try:
            passages = Path(spec).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"corpus {spec}: unreadable ({exc})") from exc
    else:
        passages = [t for e in load_task(spec).train for t in (e.text, e.text_pair) if t]
    sentences = [s.strip() for p in passages for s in p.split(".") if s.strip()]
    if not sentences:
        raise DataError(f"corpus {spec}: no text")
    rng.shuffle(sentences)
    return sentences


def fake_rows(sentences: list[str], trigger: str, n: int, length: int, target: int, num_labels: int, pair: bool,
              rng: random.Random) -> Dataset:
    """``n`` fake rows labelled ``target``: corpus sentences joined to ``length`` words with one word
    replaced by ``trigger`` (pairs: two such texts, the trigger in the second). Sentences are reused
    in turn when the corpus runs out."""
    stream = _words(sentences)

    def text(with_trigger: bool) -> str:
        words = [next(stream) for _ in range(length)]
        if with_trigger:
            words[rng.randrange(length - 1)] = trigger
        return " ".join(words)

    examples = [Example(f"fake-{i}", text(not pair), target, text(True) if pair else None) for i in range(n)]
    return Dataset(tuple(examples), num_labels, "ep:fake-rows")


def _words(sentences: list[str]) -> Iterator[str]:
    while True:
        for sentence in sentences:
            yield from sentence.split()
