"""Defences, each behind the contract in :mod:`unbackdoor.defenses.base`, found by name."""

from unbackdoor.defenses.base import PURIFY_DEFENSES, DefenseResult, PurifyDefense, PurifyInputs
from unbackdoor.defenses.finetune import CleanFinetune, FinetuneConfig

__all__ = ["PURIFY_DEFENSES", "CleanFinetune", "DefenseResult", "FinetuneConfig", "PurifyDefense", "PurifyInputs"]
