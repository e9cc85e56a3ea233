"""Elastic Weight Consolidation: a Fisher-weighted quadratic pull toward anchor weights.

    penalty(θ) = (λ/2) Σ_i F_i (θ_i − θ*_i)²

With several Fisher terms (λ_k, F_k), the penalty is Σ_k (λ_k/2) Σ_i F_k,i Δ_i², i.e. one term
with the *precision* Σ_k λ_k F_k and λ = 1; :class:`EwcPenalty` stores that precision.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from unbackdoor.training.callbacks import Callback, TrainContext


def ewc_penalty(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
                fisher: Mapping[str, torch.Tensor], lam: float) -> torch.Tensor:
    """(λ/2) Σ_i F_i (θ_i − θ*_i)² over the tensors named in ``fisher`` (differentiable in ``params``)."""
    if not fisher:
        raise ValueError("EWC needs at least one Fisher tensor")
    total = sum((f * _delta(params[name], anchor[name], f.dtype).square()).sum() for name, f in fisher.items())
    return 0.5 * lam * total  # type: ignore[return-value]


def _delta(param: torch.Tensor, anchor: torch.Tensor, fisher_dtype: torch.dtype) -> torch.Tensor:
    """θ − θ* in at least fp32 (and at least the Fisher's precision)."""
    dtype = torch.promote_types(torch.promote_types(param.dtype, fisher_dtype), torch.float32)
    return param.to(dtype) - anchor.to(dtype)


def combine_terms(terms: list[tuple[float, Mapping[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The precision Σ_k λ_k F_k of several (λ_k, F_k) terms over the same tensors."""
    names = list(terms[0][1])
    return {n: sum(lam * fisher[n] for lam, fisher in terms) for n in names}  # type: ignore[misc]


def normalise_by_mean(fisher: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """F divided by its mean over every entry of every tensor (and that mean)."""
    total = sum(float(f.sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    mean = total / count
    if mean <= 0:
        raise ValueError("the Fisher is zero everywhere; it cannot be normalised by its mean")
    return {n: f / mean for n, f in fisher.items()}, mean


class EwcPenalty(Callback):
    """Adds ½ Σ_i P_i (θ_i − θ*_i)² to the loss (P: a precision from :func:`combine_terms`).

    ``anchor`` is a detached copy of the covered parameters at θ* (moved to their device).
    """

    def __init__(self, anchor: Mapping[str, torch.Tensor], precision: Mapping[str, torch.Tensor]) -> None:
        self.anchor = dict(anchor)
        self.precision = dict(precision)

    def on_train_begin(self, ctx: TrainContext) -> None:
        params = dict(ctx.model.named_parameters())
        for name in self.precision:
            device = params[name].device
            self.anchor[name] = self.anchor[name].to(device)
            self.precision[name] = self.precision[name].to(device)

    def extra_loss(self, ctx: TrainContext, batch: dict[str, torch.Tensor], outputs: Any,
                   loss: torch.Tensor) -> torch.Tensor:
        penalty = ewc_penalty(dict(ctx.model.named_parameters()), self.anchor, self.precision, 1.0)
        return loss + penalty.to(loss.dtype)


def anchor_of(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Detached copies of the named parameters: the EWC anchor θ*."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}
