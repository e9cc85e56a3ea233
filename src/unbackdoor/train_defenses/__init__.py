"""Train-time defences: train a model from a possibly poisoned training set (``unbackdoor train
--defense NAME``), behind the contract of :mod:`.base`.

Importing this package registers every member in :data:`TRAIN_DEFENSES`: ``none`` (:mod:`.finetune`),
``lora`` and ``musclelora`` (:mod:`.musclelora`), ``reweight`` (:mod:`.reweight`), ``abl`` (:mod:`.abl`), ``auto`` (:mod:`.auto`),
``clean-only`` (:mod:`.clean_only`).
"""

from unbackdoor.train_defenses.abl import AblConfig, AblDefense
from unbackdoor.train_defenses.auto import AutoTrain, AutoTrainConfig
from unbackdoor.train_defenses.base import (
    TRAIN_DEFENSES,
    TrainDefense,
    TrainDefenseResult,
    TrainInputs,
    build_train_defense,
)
from unbackdoor.train_defenses.clean_only import CleanOnly, CleanOnlyConfig
from unbackdoor.train_defenses.finetune import NoDefenseConfig, PlainFinetune
from unbackdoor.train_defenses.musclelora import LoraOnly, LoraOnlyConfig, MuscleLora, MuscleLoraConfig
from unbackdoor.train_defenses.reweight import ReweightDefense, ReweightDefenseConfig

__all__ = [
    "TRAIN_DEFENSES",
    "AblConfig",
    "AblDefense",
    "AutoTrain",
    "AutoTrainConfig",
    "CleanOnly",
    "CleanOnlyConfig",
    "LoraOnly",
    "LoraOnlyConfig",
    "MuscleLora",
    "MuscleLoraConfig",
    "NoDefenseConfig",
    "PlainFinetune",
    "ReweightDefense",
    "ReweightDefenseConfig",
    "TrainDefense",
    "TrainDefenseResult",
    "TrainInputs",
    "build_train_defense",
]
