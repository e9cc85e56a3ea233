"""Training-loop configuration and the training recipes methods start from (victims, clean
fine-tuning on a small clean set)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from unbackdoor.config import StrictConfig


class TrainConfig(StrictConfig):
    """Hyperparameters of the one training loop (AdamW + linear warm-up/decay)."""

    epochs: int = Field(3, ge=1, description="passes over the training data")
    batch_size: int = Field(32, ge=1, description="rows per batch and process")
    eval_batch_size: int = Field(128, ge=1, description="rows per batch when predicting")
    learning_rate: float = Field(2e-5, gt=0, description="peak learning rate")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with momentum")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (optimizer=sgd)")
    schedule: Literal["linear", "constant"] = Field("linear", description="linear warm-up then linear decay, "
                                                    "or a constant learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases/LayerNorm)")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="share of steps with linear warm-up")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm; null = off")
    gradient_accumulation_steps: int = Field(1, ge=1, description="batches per optimizer step")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    group_by_length: bool = Field(True, description="batch rows of similar length (less padding)")
    select_best: bool = Field(True, description="keep the epoch with the best clean dev accuracy")
    selection_ties: Literal["first", "last"] = Field(
        "first", description="among epochs with equal dev accuracy keep the first or the last"
    )
    checkpoint_every: int = Field(0, ge=0, description="also checkpoint every N steps (0: epoch ends only)")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="autocast on accelerators")
    seed: int = Field(0, description="seed for batch order, dropout and new heads")
    progress: bool = Field(True, description="show a progress bar on a terminal")


def victim_train_config() -> TrainConfig:
    """[RECON] Full fine-tuning defaults for MiniLM-sized encoders on a few thousand rows
    (lr 1e-4: all-MiniLM-L6-v2 barely moves at BERT's usual 2e-5 in 3 epochs)."""
    return TrainConfig(epochs=3, batch_size=32, learning_rate=1e-4)


CLEAN_FT_LEARNING_RATE = 1e-4
"""[RECON, measured] Peak lr of every purify defence's clean fine-tuning. The specs' 2e-5 is
BERT-base's; all-MiniLM-L6-v2 (the default base, whose victims are trained at 1e-4) barely moves
at 2e-5 on a 1% clean set: on the MiniLM BadNets clean-label victim, Fine-mixing (ρ 0.5) left
ASR at 99.6% with lr 2e-5 and 75.9% with 1e-4, CACC 87.5 vs 88.6 (docs/results/purify.md,
pilot rows). For BERT-base models pass ``train.learning_rate=2e-5``."""


def small_set_train_config() -> TrainConfig:
    """[RECON] Clean fine-tuning on a few hundred clean rows (``finetune``, ``reinit``): batch 16,
    10 epochs, lr :data:`CLEAN_FT_LEARNING_RATE` (1e-4 for MiniLM; 2e-5 for BERT-base).

    Ties in held-out accuracy keep the *last* epoch (our choice): with a tiny held-out set many
    epochs tie, and at equal clean accuracy more clean fine-tuning is the stronger defence.
    """
    return TrainConfig(epochs=10, batch_size=16, learning_rate=CLEAN_FT_LEARNING_RATE, warmup_ratio=0.1,
                       selection_ties="last")


def five_epoch_train_config() -> TrainConfig:
    """The clean fine-tuning after Fine-mixing's mixing, E-PUR's reset and Fine-purifying's reset:
    AdamW, batch 32 (= min(32, n_fit) in effect), 5 epochs [3P-MBD, Fine-mixing's re-implementation];
    trainer defaults otherwise [RECON]. lr: the papers' 2e-5 is BERT-base's; here
    :data:`CLEAN_FT_LEARNING_RATE` (1e-4, measured on MiniLM). Ties keep the last epoch."""
    return TrainConfig(epochs=5, batch_size=32, learning_rate=CLEAN_FT_LEARNING_RATE, selection_ties="last")


def given_keys(config: TrainConfig | None) -> dict[str, Any]:
    """The keys that were set on ``config`` (pydantic's ``model_fields_set``), not its defaults."""
    return config.model_dump(include=set(config.model_fields_set)) if config is not None else {}


def merge_train(defaults: TrainConfig, given: TrainConfig | None) -> TrainConfig:
    """``defaults`` overridden by the keys set in ``given``."""
    return defaults.model_copy(update=given_keys(given))
