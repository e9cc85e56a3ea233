"""Defences, each behind the contract in :mod:`unbackdoor.purify.base`, found by name.

Purify defences (registry :data:`PURIFY_DEFENSES`): ``finetune``, ``reinit``, ``fine-pruning``,
``e-pur``, ``fine-mixing``, ``fine-purifying``, ``tsbd``, ``distill``, and ``auto``
(chooses and composes them from the suspect, the base, the clean set and ``scan``'s signals).
"""

from unbackdoor.purify.auto import AutoPurify, AutoPurifyConfig
from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyDefense, PurifyInputs, PurifyResult
from unbackdoor.purify.distill import Distill, DistillConfig
from unbackdoor.purify.epur import Epur, EpurConfig
from unbackdoor.purify.fine_mixing import FineMixing, FineMixingConfig, mix_weights
from unbackdoor.purify.fine_pruning import FinePruning, FinePruningConfig
from unbackdoor.purify.fine_purifying import FinePurifying, FinePurifyingConfig
from unbackdoor.purify.finetune import CleanFinetune, FinetuneConfig
from unbackdoor.purify.reinit import Reinit, ReinitConfig
from unbackdoor.purify.tsbd import Tsbd, TsbdConfig

__all__ = [
    "PURIFY_DEFENSES",
    "AutoPurify",
    "AutoPurifyConfig",
    "CleanFinetune",
    "Distill",
    "DistillConfig",
    "PurifyResult",
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
