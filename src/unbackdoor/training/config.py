"""Training-loop configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from unbackdoor.config import StrictConfig


class TrainConfig(StrictConfig):
    """Hyperparameters of the one training loop (AdamW + linear warm-up/decay)."""

    epochs: int = Field(3, ge=1, description="passes over the training data")
    batch_size: int = Field(32, ge=1, description="rows per batch and process")
    eval_batch_size: int = Field(128, ge=1, description="rows per batch when predicting")
    learning_rate: float = Field(2e-5, gt=0, description="peak AdamW learning rate")
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
