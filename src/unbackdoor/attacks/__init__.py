"""Attacks: each turns a clean Task into a PoisonedTask. Published sets load via unbackdoor.data."""

from unbackdoor.attacks.addsent import AddSent, AddSentConfig
from unbackdoor.attacks.badnets import BadNets, BadNetsConfig
from unbackdoor.attacks.base import ATTACKS, Attack, AttackConfig, InsertionAttack
from unbackdoor.attacks.deadcode import TROJANEDCM_TRIGGERS, DeadCode, DeadCodeConfig
from unbackdoor.attacks.survival import TriggerSurvival, trigger_survival

__all__ = ["ATTACKS", "AddSent", "AddSentConfig", "Attack", "AttackConfig", "BadNets", "BadNetsConfig", "DeadCode",
           "DeadCodeConfig", "InsertionAttack", "TROJANEDCM_TRIGGERS", "TriggerSurvival", "trigger_survival"]
