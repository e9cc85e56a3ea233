"""The multi-scale low-rank (MSLR) layer and the small classification head of GPT-2/Llama (``docs/methods/musclelora.md`` §3, §4).

MSLR wraps a frozen dense layer (W0, b0) and adds n radially scaled rank-r_in components:

    y = W0·x + b0 + s · R · diag(κ) · L · x,      s = α_m / r_in,                       (§4)

with trainable L ∈ R^{(n·r_in)×d_in}, R ∈ R^{d_out×(n·r_in)} and the fixed buffer κ that repeats each
scale k_j r_in times. κ multiplies L·x inside the forward pass (never folded into L: under Adam that
would change the per-component step). Both factors start Kaiming-uniform (a = √5), so ΔW ≠ 0 at step
0 [CODE]. No bias on the low-rank path; the official layer's unused dropout argument is left out.

Section numbers (§) cite ``docs/methods/musclelora.md``, the method notes in this repository.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from unbackdoor.train_defenses.musclelora.config import MslrConfig


class MultiScaleLowRankLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the multi-scale low-rank update (trainable ``mslr_L``, ``mslr_R``)."""

    def __init__(self, base_layer: nn.Linear, config: MslrConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MSLR wraps an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.config = config
        rank = len(config.scales) * config.inner_rank
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.mslr_L = nn.Parameter(torch.empty(rank, base_layer.in_features, **factory))
        self.mslr_R = nn.Parameter(torch.empty(base_layer.out_features, rank, **factory))
        kappa = torch.tensor(config.scales, **factory).repeat_interleave(config.inner_rank)
        self.register_buffer("kappa", kappa)
        self.scaling = config.alpha / config.inner_rank  # s = α_m / r_in: the inner rank, not n·r_in
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform (a = √5) for both factors: U(±1/√d_in) for L, U(±1/√(n·r_in)) for R."""
        nn.init.kaiming_uniform_(self.mslr_L, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.mslr_R, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · R · diag(κ) · L."""
        return self.scaling * (self.mslr_R * self.kappa) @ self.mslr_L

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = F.linear(F.linear(x, self.mslr_L) * self.kappa, self.mslr_R)
        return self.base_layer(x) + self.scaling * low_rank

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with W0 + ΔW and b0: the same map, for saving."""
        base = self.base_layer
        out = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(base.weight + self.delta_weight())
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out

    def extra_repr(self) -> str:
        return f"scales={self.config.scales}, inner_rank={self.config.inner_rank}, scaling={self.scaling:g}"


class LowRankHead(nn.Module):
    """The head MuScleLoRA gives GPT-2/Llama classifiers [CODE ``llms.py``]: dense(hidden→width, no bias)
    → dropout → out_proj(width→C, no bias), no activation. It replaces ``score``, so pooling at the last
    non-pad token is unchanged."""

    def __init__(self, hidden_size: int, num_labels: int, width: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, width, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(width, num_labels, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(self.dense(hidden)))

    def merged(self) -> nn.Linear:
        """One ``nn.Linear`` (hidden→C, no bias) equal to the head in eval mode: out_proj · dense."""
        dense = self.dense.merged() if isinstance(self.dense, MultiScaleLowRankLinear) else self.dense
        w = self.out_proj.weight @ dense.weight
        out = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
        return out
