"""The attack contract: a clean :class:`Task` in, a :class:`PoisonedTask` out.

Poisoning modes (``mode``), named as in OpenBackdoor:

* ``dirty``: poisoned rows are drawn from non-target rows and relabelled to the target;
* ``mix``: drawn from all rows, relabelled to the target (OpenBackdoor's "mix", as in the shared
  SynBkd/StyleBkd/AddSent sets);
* ``clean``: clean-label, drawn from target-label rows only, labels kept.

``poison_rate`` is the share of *all* training rows that get the trigger. Poisoned rows keep the id
of the clean row they came from. The triggered test (and dev) set holds only non-target rows with
the trigger, labelled with the target, and keeps each row's true label.

An attack that cannot place its trigger in every text (e.g. dead code needs a statement boundary)
says so in :meth:`InsertionAttack.can_insert`: such rows are never drawn for poisoning and are left
out of the triggered sets; the poisoned task's ``attack.n_failed`` counts them.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import Any, Literal, TypeVar

from pydantic import Field

from unbackdoor.config import StrictConfig, build_config
from unbackdoor.data.types import AttackInfo, Dataset, Example, PoisonedTask, PoisonFlags, Task, TriggeredSet
from unbackdoor.errors import ConfigError
from unbackdoor.registry import Method, Registry


class AttackConfig(StrictConfig):
    """Parameters every data-poisoning attack shares."""

    poison_rate: float = Field(0.1, gt=0, le=1, description="share of training rows poisoned, in (0, 1]")
    target_label: int = Field(1, ge=0, description="label the trigger should force")
    mode: Literal["dirty", "mix", "clean"] = Field("dirty", description="dirty-label, mix or clean-label")
    seed: int = Field(0, description="seed for row choice and trigger placement")


C = TypeVar("C", bound=AttackConfig)


class Attack(Method[C], ABC):
    """A data-poisoning attack. Construction only stores the config; ``poison`` does the work."""


    @abstractmethod
    def poison(self, task: Task) -> PoisonedTask:
        """Poison ``task``'s training set and build the triggered evaluation sets."""


ATTACKS: Registry[Attack] = Registry("attack")


class InsertionAttack(Attack[C]):
    """An attack that inserts a text trigger; subclasses define :meth:`insert_trigger`."""

    @abstractmethod
    def insert_trigger(self, text: str, rng: random.Random) -> str:
        """``text`` with the trigger inserted."""

    @abstractmethod
    def trigger_description(self) -> str:
        """Human-readable trigger, recorded with the poisoned task."""

    def can_insert(self, text: str) -> bool:
        """Whether the trigger can be placed in ``text`` (every text, unless a subclass says not)."""
        return True

    def poison(self, task: Task) -> PoisonedTask:
        cfg = self.config
        target = cfg.target_label
        self.check_target_label(task)
        chosen = self._choose_rows(task.train)
        rng = random.Random(f"{cfg.seed}-train")
        poisoned_rows = []
        for e in task.train.examples:
            if e.id in chosen:
                label = e.label if cfg.mode == "clean" else target
                poisoned_rows.append(Example(e.id, self.insert_trigger(e.text, rng), label, e.text_pair))
            else:
                poisoned_rows.append(e)
        train = task.train.replace(poisoned_rows, f"{task.name}:{self.name}-{cfg.mode}-p{cfg.poison_rate:g}")
        triggered_test, triggered_dev = self.triggered_sets(task)
        return PoisonedTask(
            train=train,
            flags=PoisonFlags(frozenset(chosen), len(train)),
            target_label=target,
            triggered_test=triggered_test,
            triggered_dev=triggered_dev,
            clean=task,
            attack=AttackInfo(self.name, cfg.model_dump(), self.trigger_description(), task.name,
                              n_failed=self.count_skipped(task)),
        )

    def count_skipped(self, task: Task) -> int:
        """Rows the attack would use but cannot place its trigger in: candidate training rows of
        the mode plus non-target dev and test rows."""
        rows = [*self._mode_pool(task.train), *(e for d in (task.dev, task.test) for e in d.examples
                                                 if e.label != self.config.target_label)]
        return sum(not self.can_insert(e.text) for e in rows)

    def _mode_pool(self, train: Dataset) -> list[Example]:
        """The training rows the mode draws from, before :meth:`can_insert` filters them."""
        cfg = self.config
        if cfg.mode == "dirty":
            return [e for e in train.examples if e.label != cfg.target_label]
        if cfg.mode == "clean":
            return [e for e in train.examples if e.label == cfg.target_label]
        return list(train.examples)

    def _choose_rows(self, train: Dataset) -> set[str]:
        cfg = self.config
        n = round(cfg.poison_rate * len(train))
        if n < 1:
            raise ConfigError(f"poison_rate {cfg.poison_rate} poisons no row of {len(train)}")
        pool = [e.id for e in self._mode_pool(train) if self.can_insert(e.text)]
        if n > len(pool):
            raise ConfigError(
                f"poison_rate {cfg.poison_rate} needs {n} rows but mode {cfg.mode!r} has only {len(pool)} candidates"
            )
        return set(random.Random(f"{cfg.seed}-rows").sample(sorted(pool), n))

    def check_target_label(self, task: Task) -> None:
        """A target label outside ``task``'s label set is an error."""
        target = self.config.target_label
        if target >= task.num_labels:
            raise ConfigError(f"target_label {target} is outside the label set 0..{task.num_labels - 1}")

    def triggered_sets(self, task: Task) -> tuple[TriggeredSet, TriggeredSet]:
        """``task``'s triggered test and dev sets, placed by the config's seed."""
        seed = self.config.seed
        return self.triggered_set(task.test, f"{seed}-test"), self.triggered_set(task.dev, f"{seed}-dev")

    def triggered_set(self, data: Dataset, seed: str) -> TriggeredSet:
        """Triggered copies of ``data``'s non-target rows, labelled with the target."""
        target = self.config.target_label
        rng = random.Random(seed)
        source = [e for e in data.examples if e.label != target and self.can_insert(e.text)]
        rows = [Example(e.id, self.insert_trigger(e.text, rng), target, e.text_pair) for e in source]
        return TriggeredSet(
            tuple(rows), target, data.num_labels, tuple(e.label for e in source), f"{data.name}:triggered"
        )


def insert_at_random_word(text: str, insert: str, rng: random.Random) -> str:
    """Insert ``insert`` between two words of ``text`` (or at either end), uniformly."""
    words = text.split()
    pos = rng.randint(0, len(words))
    return " ".join([*words[:pos], insert, *words[pos:]])


def build_attack(name: str, params: dict[str, Any]) -> Attack:
    """The named data attack with validated parameters (fails before any work)."""
    cls = ATTACKS.get(name)
    return cls(build_config(cls.config_class, params, f"attack {name}"))


def attack_task(task: Task, attack: str, params: dict[str, Any]) -> PoisonedTask:
    """Poison ``task`` with the named attack and its (validated) parameters."""
    return build_attack(attack, params).poison(task)
