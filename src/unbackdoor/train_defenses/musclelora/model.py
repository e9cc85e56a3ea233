"""Turning a sequence classifier into a MuScleLoRA (or LoRA-only) model and back (``docs/methods/musclelora.md`` §3, §5 steps 1-3).

| family  | LoRA (peft) on        | MSLR on                              | frozen at random init |
| ------- | --------------------- | ------------------------------------ | --------------------- |
| BERT    | ``query``, ``value``  | ``bert.pooler.dense`` (pre-trained)  | ``classifier``        |
| RoBERTa | ``query``, ``value``  | ``classifier.dense``                 | ``classifier.out_proj`` |
| GPT-2   | ``c_attn``            | ``score.dense`` of a new head        | ``score.out_proj``    |
| Llama   | ``q_proj``, ``v_proj``| ``score.dense`` of a new head        | ``score.out_proj``    |

LoRA is injected into the backbone body only (``model.base_model``; peft's sequence-classification
wrapper would make the head trainable), then every non-adapter weight is frozen, then MSLR replaces its
dense layer, so the trainable set is exactly {LoRA A, B} ∪ {MSLR L, R}. The class-logit projection
stays at its random initialisation [CODE]. :func:`merge_adapters` folds everything back into a plain
Hugging Face model that ``from_pretrained`` opens.

Section numbers (§) cite ``docs/methods/musclelora.md``, the method notes in this repository.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

from unbackdoor.errors import ModelError
from unbackdoor.train_defenses.musclelora.config import Family, MuscleLoraConfig, model_family, mslr_config
from unbackdoor.train_defenses.musclelora.layer import LowRankHead, MultiScaleLowRankLinear

#: the dense layer MSLR replaces, per family (§3)
MSLR_TARGET: dict[Family, str] = {"bert": "bert.pooler.dense", "roberta": "classifier.dense",
                                  "gpt2": "score.dense", "llama": "score.dense"}
NEW_HEAD_FAMILIES: tuple[Family, ...] = ("gpt2", "llama")


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _get_linear(model: nn.Module, path: str) -> nn.Linear:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ModelError(f"{type(model).__name__} has no layer {path!r} for MSLR") from None
    if not isinstance(module, nn.Linear):
        raise ModelError(f"{path} is a {type(module).__name__}, MSLR needs an nn.Linear")
    return module


def check_supported(model: PreTrainedModel, config: MuscleLoraConfig) -> Family:
    """The model's family; raise before any change unless LoRA/MSLR can be placed on it."""
    family = model_family(model.config.model_type)
    if config.mslr and family not in NEW_HEAD_FAMILIES:
        _get_linear(model, MSLR_TARGET[family])
    if config.lora:
        names = {n.rpartition(".")[2] for n, _ in model.base_model.named_modules()}
        missing = set(config.lora_targets or ()) - names
        if missing:
            raise ModelError(f"LoRA targets {sorted(missing)} are not modules of this {family} model")
    return family


def adapt_model(model: PreTrainedModel, config: MuscleLoraConfig) -> None:
    """Steps 1-3 of §5, in place, for a resolved ``config``. With neither LoRA nor MSLR this is plain
    full fine-tuning (every parameter trainable, no new head): the ``GA only`` ablation."""
    family = check_supported(model, config)
    if not (config.lora or config.mslr):
        model.requires_grad_(True)
        return
    # step 1: GPT-2/Llama get the new two-layer head in place of `score` (seeded by the caller's RNG)
    if family in NEW_HEAD_FAMILIES:
        old = model.score
        model.score = LowRankHead(old.in_features, model.config.num_labels, config.head_width,
                                  config.head_dropout).to(old.weight.device, old.weight.dtype)
    # step 2: LoRA in the backbone body's attention projections; freeze everything else, head included
    if config.lora:
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.lora_targets or ()), bias="none",
                          fan_in_fan_out=family == "gpt2")  # GPT-2's c_attn is a transposed Conv1D
        inject_adapter_in_model(lora, model.base_model)
    for name, param in model.named_parameters():
        param.requires_grad_(any(m in f".{name}" for m in (".lora_A.", ".lora_B.")))
    # step 3: MSLR replaces the designated dense layer after the freeze, so L and R stay trainable
    if config.mslr:
        path = MSLR_TARGET[family]
        _set_submodule(model, path, MultiScaleLowRankLinear(_get_linear(model, path), mslr_config(config)))


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def merge_adapters(model: PreTrainedModel) -> None:
    """Fold LoRA, MSLR and the GPT-2/Llama head into plain layers (same outputs in eval mode), in place;
    unfreeze every parameter, as a loaded Hugging Face model would be."""
    for path, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            _set_submodule(model, path, module.get_base_layer())
    for path, module in list(model.named_modules()):
        if isinstance(module, MultiScaleLowRankLinear):
            _set_submodule(model, path, module.merged())
    if isinstance(getattr(model, "score", None), LowRankHead):
        model.score = model.score.merged()
    model.requires_grad_(True)
