"""Extension points of the training loop.

A method adds behaviour by subclassing :class:`Callback`, never by copying the loop:

* ``extra_loss``: add a term to the loss (EWC, gradient ascent by returning a negated loss, ...);
* ``on_gradients``: rewrite gradients after backward, before clipping and the optimizer step
  (gradient alignment, two-gradient rules);
* ``on_step_end``: act on parameters after each step (fixed pruning or mixing masks); set
  ``ctx.state.stopped = True`` to end training after this step (a stopping rule, e.g. unlearning's);
* ``on_train_begin`` / ``on_epoch_end``: set-up and per-epoch logging.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from unbackdoor.training.config import TrainConfig


@dataclass
class TrainState:
    """Where training is; saved with every checkpoint."""

    epoch: int = 0
    batches_done: int = 0  # batches of this process done in the current epoch
    global_step: int = 0
    epoch_loss_sum: float = 0.0  # running task loss of the current epoch (kept across a resume)
    epoch_rows: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    stopped: bool = False  # a callback ended training early (kept across a resume)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainContext:
    """What a callback may look at: the unwrapped model, the wrapped one, the optimizer, state."""

    model: torch.nn.Module
    wrapped_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator
    config: TrainConfig
    state: TrainState
    precision: str = "fp32"  # the classifier's compute precision (extra forwards use it too)


class Callback:
    """Base class: every hook is a no-op."""

    def on_train_begin(self, ctx: TrainContext) -> None:
        """Called once, after the model is prepared and any checkpoint restored."""

    def extra_loss(self, ctx: TrainContext, batch: dict[str, torch.Tensor], outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        """Return the loss to back-propagate (default: unchanged)."""
        return loss

    def on_gradients(self, ctx: TrainContext, batch: dict[str, torch.Tensor]) -> None:
        """Rewrite ``p.grad`` in place, before clipping and the optimizer step."""

    def on_step_end(self, ctx: TrainContext) -> None:
        """After each optimizer step; may set ``ctx.state.stopped`` to end training here."""

    def on_epoch_end(self, ctx: TrainContext, record: dict[str, Any]) -> None:
        """After each epoch, with its record (loss, dev accuracy)."""


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
