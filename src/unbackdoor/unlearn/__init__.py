"""Unlearning a backdoor given identified trojaned rows (the *unlearn* situation).

Registry :data:`UNLEARN_METHODS`: ``lya`` (gradient ascent + EWC, reconstructed),
``gradient-ascent``, ``retrain`` (from the clean base, without the forget rows), ``finetune``
(on the retain set) and ``repair`` (EXPERIMENTAL: keeps the forget set's beneficial part by
relabelling or gradient projection; our reconstruction, not the paper's algorithm). :mod:`unbackdoor.unlearn.oracle` builds forget sets from ground-truth flags
for benchmarks only.
"""

from unbackdoor.training.ascent import AscentConfig
from unbackdoor.unlearn.base import (
    UNLEARN_METHODS,
    UnlearnInputs,
    UnlearnMethod,
    UnlearnResult,
    build_unlearn_method,
    unlearn,
)
from unbackdoor.unlearn.ewc import EwcPenalty, ewc_penalty
from unbackdoor.unlearn.finetune import RetainFinetune
from unbackdoor.unlearn.gradient_ascent import GradientAscent
from unbackdoor.unlearn.lya import Lya, LyaConfig
from unbackdoor.unlearn.repair import Repair, RepairConfig
from unbackdoor.unlearn.retrain import Retrain, RetrainConfig, remove_forget_rows

__all__ = [
    "UNLEARN_METHODS",
    "AscentConfig",
    "EwcPenalty",
    "GradientAscent",
    "Lya",
    "LyaConfig",
    "Repair",
    "RepairConfig",
    "RetainFinetune",
    "Retrain",
    "RetrainConfig",
    "UnlearnInputs",
    "UnlearnMethod",
    "UnlearnResult",
    "build_unlearn_method",
    "ewc_penalty",
    "remove_forget_rows",
    "unlearn",
]
