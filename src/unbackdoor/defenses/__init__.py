"""Defences, each behind the contract in :mod:`unbackdoor.defenses.base`, found by name.

Purify defences (registry :data:`PURIFY_DEFENSES`): ``finetune``, ``reinit``, ``fine-pruning``,
``e-pur``, ``fine-mixing``, ``fine-purifying``, ``tsbd``.
"""

from unbackdoor.defenses.base import PURIFY_DEFENSES, DefenseResult, PurifyDefense, PurifyInputs
from unbackdoor.defenses.epur import Epur, EpurConfig
from unbackdoor.defenses.fine_mixing import FineMixing, FineMixingConfig, mix_weights
from unbackdoor.defenses.fine_pruning import FinePruning, FinePruningConfig
from unbackdoor.defenses.fine_purifying import FinePurifying, FinePurifyingConfig
from unbackdoor.defenses.finetune import CleanFinetune, FinetuneConfig
from unbackdoor.defenses.reinit import Reinit, ReinitConfig
from unbackdoor.defenses.tsbd import Tsbd, TsbdConfig

__all__ = [
    "PURIFY_DEFENSES",
    "CleanFinetune",
    "DefenseResult",
    "Epur",
    "EpurConfig",
    "FineMixing",
    "FineMixingConfig",
    "FinePruning",
    "FinePruningConfig",
    "FinePurifying",
    "FinePurifyingConfig",
    "FinetuneConfig",
    "PurifyDefense",
    "PurifyInputs",
    "Reinit",
    "ReinitConfig",
    "Tsbd",
    "TsbdConfig",
    "mix_weights",
]
