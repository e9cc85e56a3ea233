"""The contract of attacks that release poisoned *pre-trained* weights (RIPPLES, POR, NeuBA).

Threat model: the attacker publishes a model (a pre-trained encoder, or a classifier for a task
like the user's); the user downloads it and fine-tunes it **cleanly** on their own task. The
attack's point is that the backdoor survives that fine-tuning, so ASR is measured on the user's
fine-tuned model, the *victim*.

Two steps, kept apart so that the CLI can write what the attacker releases and the bench can
measure what the user ends up with:

1. :meth:`PretrainedAttack.release`: the poisoned model as published, and the poisoned task that
   measures the victim (triggered test rows; the training rows stay the user's clean ones, so no
   row is flagged unless the attack also hands out data);
2. :func:`user_finetune`: the user's clean fine-tuning with our ordinary training loop (victim
   recipe, ``user_train``). A released *base* (``releases_base``) is saved and loaded back the way a
   user loads any base: without the attacker's head, with a new seeded one; a released classifier
   keeps its head (the user fine-tunes it further).

:meth:`PretrainedAttack.poison_model` runs both (what the bench runs); ``unbackdoor attack`` writes
the release (``--victim-out``), which ``train --model`` and ``purify --base`` accept.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from abc import abstractmethod
from pathlib import Path
from typing import ClassVar, Iterator, TypeVar

from pydantic import Field

from unbackdoor.attacks.weight import WeightAttack, WeightAttackConfig, seeded
from unbackdoor.data.types import PoisonedTask, Task
from unbackdoor.models.loading import PROVENANCE_FILE, Classifier, load_classifier
from unbackdoor.models.saving import provenance_record
from unbackdoor.outputs import write_json
from unbackdoor.training.config import TrainConfig, victim_train_config
from unbackdoor.training.loop import train_classifier

logger = logging.getLogger(__name__)


class PretrainedAttackConfig(WeightAttackConfig):
    """Parameters every released-weights attack shares: the data-side ones, the attacker's run
    (``train``) and the user's clean fine-tuning that ASR is measured after."""

    user_train: TrainConfig = Field(default_factory=victim_train_config,
                                    description="the user's clean fine-tuning of the released model (victim "
                                    "recipe; keys given override the defaults)")


C = TypeVar("C", bound=PretrainedAttackConfig)


class PretrainedAttack(WeightAttack[C]):
    """An attack whose product is released weights; the victim is the user's clean fine-tune of them."""

    releases_base: ClassVar[bool] = True
    """True: the release is an encoder without a head (the user adds one); False: a classifier."""

    @abstractmethod
    def release(self, task: Task, model: str = "default", *, seed: int = 0, max_length: int | None = None,
                allow_pickle: bool = False, work_dir: Path | None = None,
                precision: str = "auto") -> tuple[Classifier, PoisonedTask]:
        """The poisoned model as the attacker publishes it, and the poisoned task measuring the victim."""

    def poison_model(self, task: Task, model: str = "default", *, seed: int = 0, max_length: int | None = None,
                     allow_pickle: bool = False, work_dir: Path | None = None,
                     precision: str = "auto") -> tuple[Classifier, PoisonedTask]:
        released, poisoned = self.release(task, model, seed=seed, max_length=max_length, allow_pickle=allow_pickle,
                                          work_dir=work_dir, precision=precision)
        victim = user_finetune(released, task, seeded(self.config.user_train, seed), seed=seed,
                               new_head=self.releases_base, work_dir=work_dir, precision=precision)
        return victim, self.after_finetune(victim, poisoned)

    def after_finetune(self, victim: Classifier, poisoned: PoisonedTask) -> PoisonedTask:
        """Hook for attacks that learn only after fine-tuning which label a trigger forces (POR,
        NeuBA: the attacker does not know the user's labels). Default: ``poisoned`` unchanged."""
        return poisoned


def save_base(clf: Classifier, folder: str | Path, record: dict) -> None:
    """Save ``clf``'s encoder **without** its classification head (safetensors), its tokenizer and
    ``unbackdoor.json``: a base that :func:`load_classifier` gives a new head."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clf.model.base_model.save_pretrained(folder, safe_serialization=True)
    clf.tokenizer.save_pretrained(folder)
    write_json(folder / PROVENANCE_FILE, record)


@contextlib.contextmanager
def _base_folder(work_dir: Path | None) -> Iterator[Path]:
    """Where the release is saved as a base and loaded back: a fixed folder under ``work_dir`` (its
    path is the loaded model's source, which keys the fine-tuning's checkpoint, so a killed run
    resumes), else a temporary one."""
    if work_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)
        return
    folder = work_dir / "released-base"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def user_finetune(released: Classifier, task: Task, train: TrainConfig, *, seed: int, new_head: bool,
                  work_dir: Path | None = None, precision: str = "auto") -> Classifier:
    """Step 2: the user's clean fine-tuning of ``released`` on ``task``'s training rows (epoch chosen
    on clean dev accuracy). With ``new_head`` the release goes through :func:`save_base` and is
    loaded back as a base with a new head seeded by ``seed``."""
    clf = released
    if new_head:
        with _base_folder(work_dir) as folder:
            save_base(released, folder, provenance_record(released, role="base"))
            clf = load_classifier(folder, num_labels=task.num_labels, max_length=released.max_length, seed=seed,
                                  data_name=task.name, precision=precision)
    logger.info("user's clean fine-tuning of the released model on %d rows", len(task.train))
    train_classifier(clf, task.train, train, dev=task.dev,
                     work_dir=work_dir / "user-finetune" if work_dir is not None else None,
                     fingerprint={"step": "user-finetune", "new_head": new_head})
    return clf
