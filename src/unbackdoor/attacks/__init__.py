"""Attacks: each turns a clean Task into a PoisonedTask. Published sets load via unbackdoor.data."""

from unbackdoor.attacks.addsent import AddSent, AddSentConfig
from unbackdoor.attacks.badnets import BadNets, BadNetsConfig
from unbackdoor.attacks.base import ATTACKS, Attack, AttackConfig, InsertionAttack

__all__ = ["ATTACKS", "AddSent", "AddSentConfig", "Attack", "AttackConfig", "BadNets", "BadNetsConfig", "InsertionAttack"]
