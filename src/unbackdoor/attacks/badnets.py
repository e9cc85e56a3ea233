"""BadNets for text (Gu et al. 2017; Kurita et al. 2020): rare-word triggers at random positions.

Threat model: the attacker controls a share of the training rows (and, in dirty-label mode, their
labels); the victim trains on them as usual.
"""

from __future__ import annotations

import random

from pydantic import Field, field_validator

from unbackdoor.attacks.base import ATTACKS, AttackConfig, InsertionAttack, insert_at_random_word


class BadNetsConfig(AttackConfig):
    triggers: tuple[str, ...] = Field(("cf", "mn", "bb", "tq"), description="rare trigger words")
    num_triggers: int = Field(1, ge=1, le=16, description="trigger words inserted per poisoned row")

    @field_validator("triggers")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(not t.strip() or len(t.split()) != 1 for t in value):
            raise ValueError("triggers must be non-empty single words")
        return value


@ATTACKS.register("badnets")
class BadNets(InsertionAttack[BadNetsConfig]):
    """Insert ``num_triggers`` words drawn from ``triggers``, each at its own random position."""

    name = "badnets"
    config_class = BadNetsConfig

    def insert_trigger(self, text: str, rng: random.Random) -> str:
        for _ in range(self.config.num_triggers):
            text = insert_at_random_word(text, rng.choice(self.config.triggers), rng)
        return text

    def trigger_description(self) -> str:
        return f"{self.config.num_triggers} of the words {' '.join(self.config.triggers)} inserted at random positions"
