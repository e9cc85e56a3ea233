"""Pieces several purify defences share: base/suspect parameter alignment, clean fine-tuning with
held-out selection, and a callback that keeps chosen weights fixed while fine-tuning."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset
from unbackdoor.errors import ModelError
from unbackdoor.models.loading import Classifier
from unbackdoor.training.callbacks import Callback, TrainContext
from unbackdoor.training.config import TrainConfig
from unbackdoor.training.loop import train_classifier


CLEAN_FT_LEARNING_RATE = 1e-4
"""[RECON, measured] Peak lr of every purify defence's clean fine-tuning. The specs' 2e-5 is
BERT-base's; all-MiniLM-L6-v2 (the default base, whose victims are trained at 1e-4) barely moves
at 2e-5 on a 1% clean set: on the MiniLM BadNets clean-label victim, Fine-mixing (ρ 0.5) left
ASR at 99.6% with lr 2e-5 and 75.9% with 1e-4, CACC 87.5 vs 88.6 (docs/results/purify.md,
pilot rows). For BERT-base models pass ``train.learning_rate=2e-5``."""


def aligned_parameters(suspect: Classifier, base: Classifier) -> Iterator[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """(name, suspect parameter, base tensor) for every parameter the base also has, by name.

    Parameters only the suspect has (typically the new classification head of a fine-tuned
    model built from a headless encoder) are skipped; shapes must agree.
    """
    base_params = dict(base.model.named_parameters())
    for name, param in suspect.model.named_parameters():
        ref = base_params.get(name)
        if ref is None:
            continue
        if ref.shape != param.shape:
            raise ModelError(f"parameter {name}: suspect {tuple(param.shape)} vs base {tuple(ref.shape)}")
        yield name, param, ref.detach().to(param.device)


def finetune_with_selection(
    clf: Classifier,
    clean: Dataset,
    config: TrainConfig,
    *,
    holdout_fraction: float,
    seed: int,
    callbacks: Sequence[Callback] = (),
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune ``clf`` on a fitting part of ``clean``; pick the epoch on the held-out part.

    Returns a report (split sizes, chosen epoch, its held-out accuracy, the training record).
    """
    fit, held_out = holdout_split(clean, holdout_fraction, seed)
    result = train_classifier(clf, fit, config, dev=held_out, callbacks=callbacks, work_dir=work_dir)
    return {
        "n_fit": len(fit),
        "n_selection": len(held_out),
        "selected_epoch": result.best_epoch,
        "selection_accuracy": result.best_dev_accuracy,
        "training": result.to_dict(),
    }


class FixedWeights(Callback):
    """Keep chosen entries of parameters at fixed values during training (pruning or reset masks).

    ``masks[name]`` is a boolean tensor of the parameter's shape (True = keep fixed) and
    ``values[name]`` the values to hold there. Re-applied after every optimizer step.
    """

    def __init__(self, masks: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
        self.masks = masks
        self.values = values

    def _apply(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, mask in self.masks.items():
                p = params[name]
                p.data = torch.where(mask.to(p.device), self.values[name].to(p.device, p.dtype), p.data)

    def on_train_begin(self, ctx: TrainContext) -> None:
        self._apply(ctx.model)

    def on_step_end(self, ctx: TrainContext) -> None:
        self._apply(ctx.model)
