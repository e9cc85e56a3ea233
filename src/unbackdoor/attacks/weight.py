"""The weight-attack contract: a clean :class:`Task` (and a starting model) in, a poisoned victim
model and the :class:`PoisonedTask` that measures it out.

Threat model shared by every weight attack: the attacker controls the victim's *weights* (it
releases a fine-tuned or pre-trained model), not only a share of its training rows. Data-side
defences see at most the attacker's poisoned rows, which the returned task carries for evaluation
(flags, target, triggered test set built exactly as for data attacks: non-target rows with the
trigger).

Seeds: the attack config's ``seed`` chooses rows and trigger positions (as for data attacks); the
``seed`` argument of :meth:`WeightAttack.poison_model` seeds the model side (new heads, batch order,
dropout) and replaces ``train.seed``.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field

from unbackdoor.attacks.base import AttackConfig
from unbackdoor.config import StrictConfig, build_config
from unbackdoor.data.types import AttackInfo, PoisonedTask, Task
from unbackdoor.models.loading import Classifier, load_classifier
from unbackdoor.registry import Method, Registry
from unbackdoor.training.config import TrainConfig, victim_train_config
from unbackdoor.training.loop import check_trainable

logger = logging.getLogger(__name__)

C = TypeVar("C", bound=StrictConfig)


class WeightAttackConfig(AttackConfig):
    """Parameters every weight attack shares: the data-side ones plus the attacker's training run."""

    train: TrainConfig = Field(default_factory=victim_train_config,
                               description="the attacker's poisoning run (keys given override the defaults)")


class WeightAttack(Method[C], ABC):
    """A weight-level attack: produces a victim model, not only data. Construction only stores the
    config; :meth:`poison_model` does the work."""


    @abstractmethod
    def poison_model(self, task: Task, model: str = "default", *, seed: int = 0, max_length: int | None = None,
                     allow_pickle: bool = False, work_dir: Path | None = None,
                     precision: str = "auto") -> tuple[Classifier, PoisonedTask]:
        """The victim classifier (from the starting ``model``) and the poisoned task measuring it."""


WEIGHT_ATTACKS: Registry[WeightAttack] = Registry("weight attack")


def build_weight_attack(name: str, params: dict[str, Any]) -> WeightAttack:
    """The named weight attack with validated parameters (fails before any work)."""
    cls = WEIGHT_ATTACKS.get(name)
    return cls(build_config(cls.config_class, params, f"attack {name}"))


def run_weight_attack(name: str, params: dict[str, Any], task: Task, model: str = "default", *, seed: int = 0,
                      max_length: int | None = None, allow_pickle: bool = False,
                      work_dir: Path | None = None, precision: str = "auto") -> tuple[Classifier, PoisonedTask]:
    """Run the named weight attack on ``task`` starting from ``model``: (victim, poisoned task)."""
    attack = build_weight_attack(name, params)
    return attack.poison_model(task, model, seed=seed, max_length=max_length, allow_pickle=allow_pickle,
                               work_dir=work_dir, precision=precision)


def seeded(train: TrainConfig, seed: int) -> TrainConfig:
    """``train`` with its seed replaced by the model-side ``seed``; no progress bar."""
    return train.model_copy(update={"seed": seed, "progress": False})


def load_start_model(model: str, task: Task, seed: int, *, max_length: int | None,
                     allow_pickle: bool, precision: str = "auto") -> Classifier:
    """The starting classifier (a base gets a new head seeded by ``seed``), checked against ``task``."""
    clf = load_classifier(model, num_labels=task.num_labels, allow_pickle=allow_pickle, max_length=max_length,
                          data_name=task.name, seed=seed, precision=precision)
    check_trainable(clf, task.train)
    return clf


def renamed(poisoned: PoisonedTask, name: str, config: StrictConfig, trigger: str) -> PoisonedTask:
    """``poisoned`` (built by a data attack's row poisoning) recorded as produced by weight attack ``name``."""
    info = AttackInfo(name, config.model_dump(mode="json"), trigger, poisoned.attack.source, poisoned.attack.n_failed)
    train = poisoned.train.replace(poisoned.train.examples, f"{poisoned.clean.name}:{name}")
    return dataclasses.replace(poisoned, train=train, attack=info)
