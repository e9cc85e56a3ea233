"""Gradient ascent on a set of rows, with stopping rules and a checkpoint choice.

Shared by the unlearn methods ``gradient-ascent`` (vanilla GA) and ``lya`` (GA + EWC), which ascend on
a forget set (the stopping rules of ``docs/methods/lya.md`` §6; our reconstruction [RECON], the paper's criteria
were not available to us), and by TSBD's Stage 1, which ascends on clean rows until their accuracy
falls to chance (SGD, constant lr, checked at epoch ends: ``keep=last``).

The ascent runs in the one training loop (:func:`~unbackdoor.training.train_classifier`) with
callbacks: :class:`AscendTaskLoss` negates the task loss, :class:`DropoutOff` keeps the model in
eval mode, :class:`AscentMonitor` applies the stopping rules every ``eval_every`` optimizer steps:

* (a) **forget accuracy**: the share of the monitored forget rows still predicted as their
  (poisoned) labels. The monitored rows are a held-out slice of the forget set that is never
  ascended on (``forget_holdout``), or, with ``forget_holdout=0``, the ascended rows themselves.
  Training stops at the first check where it is ≤ ``stop_forget_accuracy``.
* (b) **clean guard**: training stops when accuracy on a held-out part of the retain set falls
  more than the tolerance below its value at the suspect's weights at ``guard_patience`` checks in
  a row; such states are never kept. The tolerance is ``clean_guard``, widened under
  ``guard_slack=binomial`` to two standard errors of that accuracy (on a 70-row slice, one error is
  1.4 points: a 5-point guard there stopped every ascent after 1-2 steps, before EWC's penalty,
  zero at the suspect's weights, could act; so LYA ran as plain gradient ascent).
* (c) **budget**: ``train.epochs`` / ``train.max_steps``.

Checkpoint choice: among checked states that pass (b) (the suspect itself, at step 0, included),
the first that meets (a); if none does, the one with the lowest forget accuracy (earliest on ties).
``keep=last`` keeps the final weights instead and ``stop_forget_accuracy=null`` drops rule (a):
both exist to study over-unlearning (``docs/methods/lya.md`` pitfall 2), not to defend. Stopping and choice read
only the forget set and the retain set.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset
from unbackdoor.models.surgery import layer_index, restore_state, snapshot_state
from unbackdoor.errors import ModelError
from unbackdoor.models.loading import Classifier
from unbackdoor.training.callbacks import Callback, TrainContext
from unbackdoor.training.config import TrainConfig
from unbackdoor.training.loop import evaluate_accuracy, evaluate_balanced_accuracy, train_classifier

logger = logging.getLogger(__name__)

STOP_THRESHOLD = "forget_accuracy_threshold"
STOP_GUARD = "clean_guard"
STOP_BUDGET = "budget"


def ascent_train_config() -> TrainConfig:
    """[RECON, not measured on real models] AdamW, batch 16, peak lr 5e-5 (the top of the method notes'
    {1e-5, 2e-5, 5e-5} grid: MiniLM barely moves at BERT's 2e-5), no weight decay and no warm-up
    (EWC already regularises). Budget: 100 epochs, at most 1000 steps, so that a small forget set
    (one batch an epoch) still gets enough steps; the lr decays linearly over the budget, so it is
    nearly constant over the part the stopping rule usually lets run."""
    return TrainConfig(epochs=100, max_steps=1000, batch_size=16, learning_rate=5e-5, weight_decay=0.0,
                       warmup_ratio=0.0, select_best=False)


class AscentConfig(StrictConfig):
    """Gradient ascent with stopping rules; every choice is ours [RECON] (``docs/methods/lya.md`` §5–6)."""

    train: TrainConfig = Field(default_factory=ascent_train_config, description="training-loop settings "
                               "(the loss is negated; epochs/max_steps are the budget)")
    stop_forget_accuracy: float | None = Field(0.1, ge=0, le=1, description="stop when the monitored forget rows "
                                               "are predicted as their (poisoned) labels this often or less (τ); "
                                               "null = run the whole budget")
    forget_holdout: float = Field(0.2, ge=0, lt=1, description="share of the forget set held out (never ascended) "
                                  "to monitor; 0 = monitor the ascended rows themselves")
    eval_every: int | None = Field(1, ge=1, description="check the stopping rules every N optimizer steps "
                                   "(null: at epoch ends only)")
    check_epoch_end: bool = Field(False, description="also check at the end of every epoch")
    metric: Literal["accuracy", "balanced"] = Field("accuracy", description="forget accuracy as plain accuracy, or "
                                                    "balanced (the mean recall of the labels present)")
    clean_guard: float | None = Field(0.05, ge=0, le=1, description="stop when held-out retain accuracy falls more "
                                      "than this below the suspect's (δ); null = off")
    retain_holdout: float = Field(0.2, gt=0, lt=1, description="share of the retain set held out for the clean guard")
    guard_slack: Literal["fixed", "binomial"] = Field(
        "binomial", description="the clean guard's tolerance: clean_guard alone, or at least two standard errors "
        "of the held-out accuracy (a guard on 70 rows cannot tell 5 points from noise) [OURS]")
    guard_patience: int = Field(2, ge=1, description="stop only after this many checks in a row break the guard "
                                "(one noisy check does not end the ascent) [OURS]")
    ascent_mode: Literal["eval", "train"] = Field("eval", description="model mode while ascending: eval (dropout "
                                                  "off, deterministic) or train")
    scope: Literal["all", "encoder"] = Field("all", description="parameters updated (and penalised): all, or the "
                                             "transformer blocks only")
    keep: Literal["chosen", "last"] = Field("chosen", description="end at the checkpoint choice's state, or at the "
                                            "last weights (to study over-unlearning; not a defence setting)")
    seed: int = Field(0, description="seed of the forget and retain splits")


# ----------------------------------------------------------------------------- callbacks
class AscendTaskLoss(Callback):
    """Gradient ascent: back-propagate the negated task loss (put it first among loss callbacks)."""

    def extra_loss(self, ctx: TrainContext, batch: dict[str, torch.Tensor], outputs: Any,
                   loss: torch.Tensor) -> torch.Tensor:
        return -loss


class DropoutOff(Callback):
    """Train with the model in eval mode (dropout off)."""

    def on_train_begin(self, ctx: TrainContext) -> None:
        ctx.wrapped_model.eval()


@dataclass
class Check:
    """One evaluation of the stopping rules."""

    step: int
    forget_accuracy: float
    clean_accuracy: float | None


class AscentMonitor(Callback):
    """Applies the stopping rules (a)-(c) and keeps the state the checkpoint choice picks."""

    def __init__(self, clf: Classifier, monitor: Dataset, clean_val: Dataset | None, threshold: float | None,
                 guard: float | None, every: int | None, *, epoch_end: bool = False, balanced: bool = False,
                 slack: str = "fixed", patience: int = 1) -> None:
        self.clf = clf
        self.monitor = monitor
        self.clean_val = clean_val
        self.threshold = threshold
        self.guard = guard
        self.every = every
        self.epoch_end = epoch_end or every is None
        self.measure = evaluate_balanced_accuracy if balanced else evaluate_accuracy
        self.slack = slack
        self.patience = patience
        self._broken = 0  # checks in a row that broke the guard
        self.checks: list[Check] = []
        self.reference_clean: float | None = None
        self.chosen: Check | None = None
        self._chosen_state: dict[str, torch.Tensor] | None = None
        self.reason: str | None = None

    def check(self, step: int, accelerator: Any = None) -> None:
        """Evaluate the current weights; record, keep or stop."""
        forget_acc = self.measure(self.clf, self.monitor, accelerator=accelerator)
        clean_acc = None if self.clean_val is None else evaluate_accuracy(self.clf, self.clean_val,
                                                                          accelerator=accelerator)
        current = Check(step, forget_acc, clean_acc)
        self.checks.append(current)
        logger.info("ascent step %d: forget accuracy %.4f, clean accuracy %s", step, forget_acc,
                    "-" if clean_acc is None else f"{clean_acc:.4f}")
        if step == 0:
            self.reference_clean = clean_acc
        elif self._guard_broken(clean_acc):
            self._broken += 1
            if self._broken >= self.patience:
                self.reason = STOP_GUARD
            return  # a state that breaks the guard is never kept
        else:
            self._broken = 0
        if self.threshold is not None and forget_acc <= self.threshold:
            if step == 0:
                logger.warning("the suspect already predicts the monitored forget rows' labels only %.1f%% of the "
                               "time; nothing to unlearn (is the forget set labelled as it was trained?)",
                               100 * forget_acc)
            self.reason = STOP_THRESHOLD
            self._keep(current)
        elif self.chosen is None or forget_acc < self.chosen.forget_accuracy:
            self._keep(current)

    def tolerance(self) -> float | None:
        """The clean guard's allowed drop: ``guard``, widened to two standard errors of the held-out
        accuracy (binomial) under ``slack=binomial``."""
        if self.guard is None or self.reference_clean is None or self.clean_val is None:
            return self.guard
        if self.slack == "fixed":
            return self.guard
        p, n = self.reference_clean, len(self.clean_val)
        return max(self.guard, 2 * (p * (1 - p) / max(1, n)) ** 0.5)

    def _guard_broken(self, clean_acc: float | None) -> bool:
        tolerance = self.tolerance()
        if tolerance is None or clean_acc is None or self.reference_clean is None:
            return False
        return clean_acc < self.reference_clean - tolerance - 1e-12

    def _keep(self, check: Check) -> None:
        self.chosen = check
        self._chosen_state = snapshot_state(self.clf.model)

    def on_train_begin(self, ctx: TrainContext) -> None:
        if not self.checks:
            self.check(0, ctx.accelerator)
        if self.reason is not None:
            ctx.state.stopped = True

    def on_step_end(self, ctx: TrainContext) -> None:
        if self.every is not None and ctx.state.global_step % self.every == 0:
            self.check(ctx.state.global_step, ctx.accelerator)
        if self.reason is not None:
            ctx.state.stopped = True

    def on_epoch_end(self, ctx: TrainContext, record: dict[str, Any]) -> None:
        if self.epoch_end and self.reason is None and self.checks[-1].step != ctx.state.global_step:
            self.check(ctx.state.global_step, ctx.accelerator)
            if self.reason is not None:
                ctx.state.stopped = True

    def finish(self, final_step: int, keep_last: bool = False) -> None:
        """Check the final weights if the budget ended between checks; load the chosen state
        (``keep_last``: keep the final weights and report them as chosen)."""
        if self.reason is None and self.checks[-1].step != final_step:
            self.check(final_step)
        if self.reason is None:
            self.reason = STOP_BUDGET
        if keep_last:
            self.chosen = self.checks[-1]
        else:
            assert self._chosen_state is not None  # step 0 always passes the guard
            restore_state(self.clf.model, self._chosen_state)
        self._chosen_state = None

    def report(self) -> dict[str, Any]:
        assert self.chosen is not None
        first = self.checks[0]
        return {
            "stop_reason": self.reason, "stopped_at_step": self.checks[-1].step,
            "chosen_step": self.chosen.step, "chosen_forget_accuracy": self.chosen.forget_accuracy,
            "chosen_clean_accuracy": self.chosen.clean_accuracy,
            "initial_forget_accuracy": first.forget_accuracy, "reference_clean_accuracy": self.reference_clean,
            "checks": [asdict(c) for c in self.checks],
        }


# ----------------------------------------------------------------------------- the ascent
@dataclass(frozen=True)
class AscentPlan:
    """The forget rows to ascend on, the forget rows to monitor, the clean guard's rows."""

    forget: Dataset
    ascend: Dataset
    monitor: Dataset
    clean_val: Dataset | None
    monitor_kind: str


def plan_ascent(forget: Dataset, retain: Dataset, cfg: AscentConfig) -> AscentPlan:
    """Split the forget set (ascend / monitor) and hold out part of the retain set (clean guard)."""
    if cfg.forget_holdout > 0:
        ascend, monitor = holdout_split(forget, cfg.forget_holdout, cfg.seed)
        kind = "held-out forget slice"
    else:
        ascend, monitor, kind = forget, forget, "ascended forget rows"
    clean_val = holdout_split(retain, cfg.retain_holdout, cfg.seed)[1] if cfg.clean_guard is not None else None
    return AscentPlan(forget, ascend, monitor, clean_val, kind)


def scope_names(model: torch.nn.Module, scope: str) -> list[str]:
    """The parameters a scope updates: all, or those inside numbered transformer blocks."""
    names = [n for n, _ in model.named_parameters()]
    if scope == "all":
        return names
    chosen = [n for n in names if layer_index(n) is not None]
    if not chosen:
        raise ModelError(f"{type(model).__name__}: no numbered transformer blocks for scope=encoder")
    return chosen


@contextmanager
def only_trainable(model: torch.nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Freeze every parameter not in ``names`` (the loop's optimizer skips frozen ones); restored after."""
    keep = set(names)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep and flags[n])
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def run_ascent(clf: Classifier, plan: AscentPlan, cfg: AscentConfig, penalty: Callback | None = None) -> dict[str, Any]:
    """Ascend on ``plan.ascend`` (plus ``penalty``, e.g. EWC) in the training loop; stop and choose
    the checkpoint by the rules above. ``clf`` ends at the chosen state. Returns a report."""
    monitor = AscentMonitor(clf, plan.monitor, plan.clean_val, cfg.stop_forget_accuracy, cfg.clean_guard,
                            cfg.eval_every, epoch_end=cfg.check_epoch_end, balanced=cfg.metric == "balanced",
                            slack=cfg.guard_slack, patience=cfg.guard_patience)
    callbacks: list[Callback] = [DropoutOff()] if cfg.ascent_mode == "eval" else []
    callbacks += [AscendTaskLoss(), *([penalty] if penalty is not None else []), monitor]
    with only_trainable(clf.model, scope_names(clf.model, cfg.scope)):
        result = train_classifier(clf, plan.ascend, cfg.train, callbacks=callbacks)
    monitor.finish(result.steps, keep_last=cfg.keep == "last")
    clf.model.eval()
    report = monitor.report()
    logger.info("ascent stopped (%s) at step %d; kept step %d: forget accuracy %.4f",
                report["stop_reason"], report["stopped_at_step"], report["chosen_step"],
                report["chosen_forget_accuracy"])
    return {"n_forget": len(plan.forget), "n_ascended": len(plan.ascend), "n_monitored": len(plan.monitor),
            "monitor": plan.monitor_kind,
            "n_clean_validation": len(plan.clean_val) if plan.clean_val is not None else 0,
            "stop_forget_accuracy": cfg.stop_forget_accuracy, "clean_guard": cfg.clean_guard,
            "clean_guard_tolerance": monitor.tolerance(), "guard_patience": cfg.guard_patience,
            "eval_every": cfg.eval_every, "ascent_mode": cfg.ascent_mode, "scope": cfg.scope, "keep": cfg.keep,
            **report, "training": result.to_dict()}
