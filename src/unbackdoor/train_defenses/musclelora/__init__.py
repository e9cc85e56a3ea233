"""MuScleLoRA (ACL 2024): train a clean classifier from a possibly poisoned dataset.

LoRA on the attention projections, a multi-scale low-rank layer on one dense layer, and every step's
gradient aligned to the gradient of a small clean reference set drawn from the clean dev set.
Importing this package registers the ``lora`` and ``musclelora`` training defences.
"""

from unbackdoor.train_defenses.musclelora.align import AlignmentRule, GradientAlignment, align_gradients, aligned_gradient, split_reference
from unbackdoor.train_defenses.musclelora.config import LoraOnlyConfig, MslrConfig, MuscleLoraConfig, resolve_config
from unbackdoor.train_defenses.musclelora.defense import LoraOnly, MuscleLora
from unbackdoor.train_defenses.musclelora.layer import LowRankHead, MultiScaleLowRankLinear
from unbackdoor.train_defenses.musclelora.model import adapt_model, merge_adapters, trainable_parameter_names

__all__ = [
    "AlignmentRule",
    "GradientAlignment",
    "LoraOnly",
    "LoraOnlyConfig",
    "LowRankHead",
    "MslrConfig",
    "MultiScaleLowRankLinear",
    "MuscleLora",
    "MuscleLoraConfig",
    "adapt_model",
    "align_gradients",
    "aligned_gradient",
    "merge_adapters",
    "resolve_config",
    "split_reference",
    "trainable_parameter_names",
]
