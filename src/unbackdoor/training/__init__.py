"""The one Accelerate-based training loop and its extension points."""

from unbackdoor.training.callbacks import Callback, TrainContext, TrainState
from unbackdoor.training.config import TrainConfig
from unbackdoor.training.loop import TrainResult, evaluate_accuracy, make_accelerator, require_clean_dataset, train_classifier

__all__ = [
    "Callback",
    "TrainConfig",
    "TrainContext",
    "TrainResult",
    "TrainState",
    "evaluate_accuracy",
    "make_accelerator",
    "require_clean_dataset",
    "train_classifier",
]
