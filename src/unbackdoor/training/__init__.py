"""The one Accelerate-based training loop and its extension points (callbacks, configs, recipes)."""

from unbackdoor.training.callbacks import Callback, FixedWeights, TrainContext, TrainState
from unbackdoor.training.config import TrainConfig, victim_train_config
from unbackdoor.training.loop import SoftTargets, TrainResult, evaluate_accuracy, make_accelerator, train_classifier

__all__ = [
    "Callback",
    "FixedWeights",
    "SoftTargets",
    "TrainConfig",
    "TrainContext",
    "TrainResult",
    "TrainState",
    "evaluate_accuracy",
    "make_accelerator",
    "train_classifier",
    "victim_train_config",
]
