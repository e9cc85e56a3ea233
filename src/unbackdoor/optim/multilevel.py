"""Multilevel optimisation by unrolled gradient steps (``docs/methods/multilevel.md``; Sato, Tanaka & Takeda,
NeurIPS 2021).

An n-level problem, outermost first (§1)::

    min_{x1 ∈ X1} f1(x1, x2*, …, xn*)   where   x_i* = argmin / argmax_{x_i} f_i(x1, …, x_i, x_{i+1}*, …, xn*)

Every lower level i ≥ 2 is replaced by ``T_i`` steps of projected gradient descent (ascent for a
maximising level) from a preset start (§1, §3): ``x_i ← Π_i(x_i ∓ η_i ∇_{x_i} f_i)``, where the
gradient is the *total* derivative of ``f_i`` through the (unrolled) levels below it. The result is a
single-level function of x1 whose gradient, the **hypergradient**, is exact: reverse-mode autograd
through every unrolled loop (``create_graph=True``). :func:`solve` then runs the projected gradient
method on x1.

* :class:`Level`: one level's objective, start, steps T, step size, sense and projection.
* :func:`unroll`: the lower levels' unrolled solutions as differentiable functions of the upper ones.
* :func:`hypergradient`: f1 and ∂f1/∂x1 through every unrolled loop.
* :func:`solve`: projected (hyper)gradient method on the top level (§1 [ABS]).
* Projections: :func:`box_projection` (e.g. weights in [0, 1]), :func:`l2_ball_projection`
  (per-row ‖P_i‖ ≤ ε, the attacker of §2).

Cost: level i is unrolled once per step of every level above it, so a trilevel problem evaluates
f3's gradient T2·T3 + T3 times per hypergradient; keep the T's small (§3).

Section numbers (§) cite ``docs/methods/multilevel.md``, the method notes in this repository.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Objective = Callable[[Sequence[torch.Tensor]], torch.Tensor]
"""``f_i(x1, …, xn)``: takes every level's variable, outermost first; returns a scalar tensor."""
Projection = Callable[[torch.Tensor], torch.Tensor]
Start = torch.Tensor | Callable[[Sequence[torch.Tensor]], torch.Tensor]
"""A fixed start, or a function of the upper levels' variables (a warm start)."""


@dataclass(frozen=True)
class Level:
    """One decision maker. For the top level, ``init`` is where :func:`solve` starts and ``steps`` /
    ``lr`` are its outer iterations; for a lower level they define the unrolled loop (T, η)."""

    objective: Objective
    init: Start
    steps: int = 10
    lr: float = 0.1
    sense: Literal["min", "max"] = "min"
    project: Projection | None = None

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.sense not in ("min", "max"):
            raise ValueError(f"sense must be 'min' or 'max', got {self.sense!r}")

    def start(self, upper: Sequence[torch.Tensor]) -> torch.Tensor:
        """The starting point, differentiable wrt itself (and wrt ``upper`` for a warm start)."""
        x = self.init(upper) if callable(self.init) else self.init
        return x if x.requires_grad else x.detach().clone().requires_grad_(True)

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One projected gradient step: descent for ``min``, ascent for ``max``."""
        x = x - self.lr * grad if self.sense == "min" else x + self.lr * grad
        return self.project(x) if self.project is not None else x


# ----------------------------------------------------------------------------- projections
def box_projection(low: float = 0.0, high: float = 1.0) -> Projection:
    """Π onto [low, high]^d (elementwise clamp)."""
    if low > high:
        raise ValueError(f"empty box [{low}, {high}]")

    def project(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(low, high)

    return project


def l2_ball_projection(radius: float, dim: int = -1) -> Projection:
    """Π onto {‖x_i‖₂ ≤ radius} for every slice along ``dim`` (one ball per row by default).

    Differentiable everywhere: the norm is computed as √(‖x‖² + 1e-12), so a zero row (e.g. one a
    zero weight made irrelevant) has a finite gradient.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")

    def project(x: torch.Tensor) -> torch.Tensor:
        norm = torch.sqrt((x * x).sum(dim=dim, keepdim=True) + 1e-12)
        return x * torch.clamp(radius / norm, max=1.0)

    return project


# ----------------------------------------------------------------------------- unrolling
def _grad(value: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """∂value/∂x (zero where ``value`` does not depend on ``x``)."""
    if value.dim() != 0:
        raise ValueError(f"an objective must return a scalar, got shape {tuple(value.shape)}")
    (grad,) = torch.autograd.grad(value, x, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def unroll(levels: Sequence[Level], upper: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The unrolled solutions of ``levels[len(upper):]`` given the upper variables ``upper``.

    Level i takes ``T_i`` projected steps on the total derivative of f_i, where the levels below are
    re-unrolled at every step. Everything stays on the autograd graph (``create_graph=True``), so the
    result is differentiable wrt ``upper`` (§3).
    """
    i = len(upper)
    if i >= len(levels):
        return []
    level = levels[i]
    x = level.start(upper)
    for _ in range(level.steps):
        lower = unroll(levels, [*upper, x])
        value = level.objective([*upper, x, *lower])
        x = level.step(x, _grad(value, x, create_graph=True))
    return [x, *unroll(levels, [*upper, x])]


def hypergradient(levels: Sequence[Level], x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f1, ∂f1/∂x1)`` at ``x1`` with every lower level unrolled: the exact gradient of the
    unrolled single-level problem (§1, §3). Both are detached."""
    if not levels:
        raise ValueError("need at least one level")
    with torch.enable_grad():
        x = x1.detach().clone().requires_grad_(True)
        lower = unroll(levels, [x])
        value = levels[0].objective([x, *lower])
        grad = _grad(value, x, create_graph=False)
    return value.detach(), grad.detach()


@dataclass
class SolveResult:
    """The top level's final variable, the lower levels' unrolled response to it, f1 per step."""

    x: torch.Tensor
    lower: list[torch.Tensor]
    history: list[float] = field(default_factory=list)


def solve(levels: Sequence[Level]) -> SolveResult:
    """The projected gradient method on level 1 (§1 [ABS]): ``levels[0].steps`` iterations of
    ``x1 ← Π1(x1 ∓ η1 ∂f1/∂x1)`` from ``levels[0].init``, each with the exact hypergradient."""
    top = levels[0]
    x = top.init([]) if callable(top.init) else top.init
    x = x.detach().clone()
    history: list[float] = []
    for t in range(top.steps):
        value, grad = hypergradient(levels, x)
        history.append(float(value))
        with torch.no_grad():
            x = top.step(x, grad)
        logger.debug("multilevel step %d: f1=%.6g", t, history[-1])
    with torch.enable_grad():
        lower = [v.detach() for v in unroll(levels, [x.detach().requires_grad_(True)])]
    return SolveResult(x.detach(), lower, history)
