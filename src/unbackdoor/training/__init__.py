"""The one Accelerate-based training loop, its extension points, and the train-time defence contract."""

from unbackdoor.training.callbacks import Callback, TrainContext, TrainState
from unbackdoor.training.config import TrainConfig
from unbackdoor.training.defense import TRAIN_DEFENSES, PlainFinetune, TrainDefense, TrainDefenseResult, TrainInputs
from unbackdoor.training.loop import TrainResult, evaluate_accuracy, make_accelerator, require_clean_dataset, train_classifier

__all__ = [
    "TRAIN_DEFENSES",
    "Callback",
    "PlainFinetune",
    "TrainConfig",
    "TrainContext",
    "TrainDefense",
    "TrainDefenseResult",
    "TrainInputs",
    "TrainResult",
    "TrainState",
    "evaluate_accuracy",
    "make_accelerator",
    "require_clean_dataset",
    "train_classifier",
]
