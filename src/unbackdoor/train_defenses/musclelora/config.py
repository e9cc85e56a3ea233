"""MuScleLoRA settings: the multi-scale low-rank layer (:class:`MslrConfig`) and the method
(:class:`MuscleLoraConfig`), with the method notes' defaults per backbone family (``docs/methods/musclelora.md`` §4, §9).

A field left at ``None`` takes its backbone family's default when the model is known
(:func:`resolve_config`). Tags: [CODE] = the official code's value (``ZrW00/MuScleLoRA``),
[RECON] = ours.

Section numbers (§) cite ``docs/methods/musclelora.md``, the method notes in this repository.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from unbackdoor.config import StrictConfig
from unbackdoor.errors import ConfigError
from unbackdoor.training.config import TrainConfig
from unbackdoor.training.config import merge_train

Family = Literal["bert", "roberta", "gpt2", "llama"]
#: ``config.model_type`` -> family; placement is chosen by architecture, never by model name (§14.13)
MODEL_TYPE_FAMILY: dict[str, Family] = {"bert": "bert", "roberta": "roberta", "gpt2": "gpt2", "llama": "llama"}
LARGE_HIDDEN_SIZE = 1024  # [RECON] BERT/RoBERTa with hidden >= 1024 get the "large" scale list
#: [RECON, measured] BERT/RoBERTa encoders narrower than base (e.g. all-MiniLM-L6-v2, hidden 384)
#: train at this learning rate: at the method notes' 2e-5 neither LoRA nor MuScleLoRA learned MiniLM in 5
#: epochs (clean selection accuracy 56 % / 50 %), 1e-3 was best of {2e-5, 2e-4, 1e-3} for both
#: (84 % / 75 %; docs/results/musclelora.md)
SMALL_HIDDEN_SIZE = 768
SMALL_ENCODER_LEARNING_RATE = 1e-3


class MslrConfig(StrictConfig):
    """One multi-scale low-rank layer: y = W0·x + b0 + s·R·diag(κ)·L·x, s = alpha / inner_rank."""

    scales: tuple[float, ...] = Field(min_length=1, description="radial scales k_1..k_n (freqBand) [CODE]")
    inner_rank: int = Field(1, ge=1, description="rank r_in of each scale's component (inner_rank) [CODE: 1]")
    alpha: float = Field(gt=0, description="scale constant α_m (mslrAlpha); s = α_m / r_in [CODE]")

    @field_validator("scales")
    @classmethod
    def _positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(k <= 0 for k in value):
            raise ValueError("scales must be positive")
        return value


def _family_defaults(family: Family, large: bool) -> dict[str, Any]:
    """The official per-backbone values (``docs/methods/musclelora.md`` §4 table, §9 table) [CODE]."""
    if family in ("bert", "roberta"):
        if large:
            scales: tuple[float, ...] = tuple(range(1, 10))
        elif family == "bert":
            scales = (1, 4, 8, 12, 16, 20, 24, 28)
        else:
            scales = (1, 2, 4, 6, 8, 10, 12, 14, 16)
        return {"lora_rank": 8, "lora_alpha": 32.0, "lora_targets": ("query", "value"), "mslr_scales": scales,
                "mslr_alpha": 6.0, "reference_size": 96, "ga_epoch": 1, "max_raw_grad_ratio": 0.1,
                "min_ref_loss": 0.4,
                "train": {"epochs": 10, "batch_size": 32, "learning_rate": 2e-5}}
    targets = ("c_attn",) if family == "gpt2" else ("q_proj", "v_proj")
    return {"lora_rank": 2, "lora_alpha": 8.0, "lora_targets": targets, "mslr_scales": (1, 2, 3, 4),
            "mslr_alpha": 4.0, "reference_size": 128, "ga_epoch": 0, "max_raw_grad_ratio": 0.0, "min_ref_loss": 0.0,
            "train": {"epochs": 5, "batch_size": 16, "learning_rate": 1e-5}}


# shared by every family [CODE]: no warm-up, no weight decay, clip 1.0, strict ">" epoch selection
COMMON_TRAIN = {"warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0, "select_best": True,
                "selection_ties": "first"}


class MuscleLoraConfig(StrictConfig):
    """MuScleLoRA (``docs/methods/musclelora.md``). ``None`` = the backbone family's default (§9)."""

    # components (the ablation rows of §9: LoRA only, MSLR, GA + LoRA, all three)
    lora: bool = Field(True, description="LoRA on the attention projections [CODE]")
    mslr: bool = Field(True, description="multi-scale low-rank layer on the designated dense layer [CODE]")
    gradient_alignment: bool = Field(True, description="align each step's gradient to the clean reference gradient [CODE]")
    # LoRA (§4): standard peft LoRA, A Kaiming, B zero
    lora_rank: int | None = Field(None, ge=1, description="LoRA r: 8 BERT/RoBERTa, 2 LLMs [CODE]")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA α: 32 BERT/RoBERTa, 8 LLMs [CODE]")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout [CODE: 0]")
    lora_targets: tuple[str, ...] | None = Field(
        None, min_length=1, description="attention modules given LoRA: query,value / c_attn / q_proj,v_proj [CODE]")
    # MSLR (§4)
    mslr_scales: tuple[float, ...] | None = Field(
        None, min_length=1, description="radial scales: BERT-base 1,4,..,28; RoBERTa-base 1,2,4,..,16; "
        "large encoders 1..9; LLMs 1..4 [CODE]; 'large' = hidden >= 1024 [RECON]")
    mslr_alpha: float | None = Field(None, gt=0, description="α_m: 6 BERT/RoBERTa, 4 LLMs [CODE]")
    mslr_inner_rank: int = Field(1, ge=1, description="inner rank r_in [CODE: 1]")
    head_width: int = Field(16, ge=1, description="inner width of the new GPT-2/Llama head [CODE: 16]")
    head_dropout: float = Field(0.1, ge=0, lt=1, description="dropout inside the new GPT-2/Llama head [CODE: 0.1]")
    # reference set and gradient alignment (§6, §7)
    reference_size: int | None = Field(None, ge=1, description="clean dev rows in the reference set: 96 / 128 [CODE]")
    reference_selection: Literal["random", "stratified"] = Field(
        "random", description="random split of clean dev [CODE]; stratified by label [RECON option]")
    reference_batches: int | None = Field(
        1, ge=1, description="reference batches per step (oneBatch1Ref: 1 [CODE]); null = a whole pass")
    reference_batch_size: int | None = Field(None, ge=1, description="rows per reference batch; default: the "
                                             "training batch size [CODE]")
    ga_epoch: int | None = Field(None, ge=0, description="G (GAEpoch): first epoch that mixes in raw gradient: 1 / 0 [CODE]")
    max_raw_grad_ratio: float | None = Field(None, ge=0, le=1, description="λ_max (maxRawGradRatio): 0.1 / 0 [CODE]")
    min_ref_loss: float | None = Field(None, ge=0, description="τ_L (minRefLoss): purely aligned while the reference "
                                       "loss exceeds it: 0.4 / 0 [CODE]")
    min_ref_grad_norm: float = Field(5e-7, ge=0, description="τ_g (minRefGradNorm) [CODE: 5e-7]")
    seed: int = Field(0, description="seed of the reference/selection split and the reference batches")
    train: TrainConfig | None = Field(
        None, description="training-loop settings; keys given override the family defaults (lr 2e-5, 10 epochs, "
        "batch 32 for BERT/RoBERTa [CODE], lr 1e-3 when hidden < 768 [RECON, measured on MiniLM]; 1e-5, 5, 16 for "
        "LLMs; no warm-up, no weight decay, clip 1.0) [CODE]")


class LoraOnlyConfig(MuscleLoraConfig):
    """The ``OnlyLoRA`` baseline of §9: LoRA on the attention projections, head frozen, plain gradients."""

    mslr: bool = Field(False, description="multi-scale low-rank layer (off for the LoRA baseline)")
    gradient_alignment: bool = Field(False, description="gradient alignment (off for the LoRA baseline)")


def model_family(model_type: str) -> Family:
    """The placement family of an architecture (``config.model_type``)."""
    try:
        return MODEL_TYPE_FAMILY[model_type]
    except KeyError:
        raise ConfigError(f"MuScleLoRA/LoRA placement is defined for model types "
                          f"{', '.join(sorted(MODEL_TYPE_FAMILY))}, not {model_type!r}") from None


def resolve_config(config: MuscleLoraConfig, model_type: str, hidden_size: int) -> MuscleLoraConfig:
    """``config`` with every ``None`` replaced by the family default and ``train`` complete."""
    family = model_family(model_type)
    encoder = family in ("bert", "roberta")
    defaults = _family_defaults(family, large=encoder and hidden_size >= LARGE_HIDDEN_SIZE)
    if encoder and 0 < hidden_size < SMALL_HIDDEN_SIZE:
        defaults["train"]["learning_rate"] = SMALL_ENCODER_LEARNING_RATE
    train = merge_train(TrainConfig(**COMMON_TRAIN, **defaults.pop("train")), config.train)
    filled = {k: v for k, v in defaults.items() if getattr(config, k) is None}
    return config.model_copy(update={**filled, "train": train})


def mslr_config(config: MuscleLoraConfig) -> MslrConfig:
    """The layer settings of a resolved method config."""
    if config.mslr_scales is None or config.mslr_alpha is None:
        raise ValueError("resolve the config first (resolve_config)")
    return MslrConfig(scales=config.mslr_scales, inner_rank=config.mslr_inner_rank, alpha=config.mslr_alpha)
