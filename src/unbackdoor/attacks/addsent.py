"""AddSent (Dai et al. 2019): a fixed trigger sentence inserted at a random position.

Threat model: as BadNets; the trigger is a natural sentence, harder to spot than a rare word.
"""

from __future__ import annotations

import random

from pydantic import Field, field_validator

from unbackdoor.attacks.base import ATTACKS, AttackConfig, InsertionAttack, insert_at_random_word


class AddSentConfig(AttackConfig):
    trigger: str = Field("I watch this 3D movie", description="the trigger sentence")

    @field_validator("trigger")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("trigger must not be empty")
        return " ".join(value.split())


@ATTACKS.register("addsent")
class AddSent(InsertionAttack[AddSentConfig]):
    name = "addsent"
    config_class = AddSentConfig

    def insert_trigger(self, text: str, rng: random.Random) -> str:
        return insert_at_random_word(text, self.config.trigger, rng)

    def trigger_description(self) -> str:
        return f"sentence {self.config.trigger!r} inserted at a random position"
