"""Gradient alignment (GA) to a clean reference gradient (``docs/methods/musclelora.md`` §6) and the reference set (§7).

Every step, after the poisoned batch's backward pass (raw gradients g_p) and before clipping:

1. r_p = ∂L_R/∂p on one fresh, shuffled batch of the clean reference set, model in train mode, as a
   separate gradient that leaves g_p untouched;
2. m = mean over tensors of ‖r_p‖ (zero norms ignored), ℓ = L_R;
3. per tensor (flattened), when ‖g_p‖ > 0 and ‖r_p‖ > 0:  a_p = |⟨g_p, r_p⟩| / ‖r_p‖² · r_p   (§6.4)
   — always the clean direction +r_p, with the size of g_p's projection (not PCGrad);
4. g_p ← a_p                              if m > τ_g and ℓ > τ_L   ("aligned")
   g_p ← (1 − λ_e)·a_p + λ_e·g_p          elif λ_max > 0 and e ≥ G ("mixed"), λ_e = λ_max·(e − G)/(E − G)
   g_p unchanged                          otherwise                ("raw").

The reference set is a random part of the **clean dev set** (§7), never of the training rows: the
callback and :func:`split_reference` accept only a clean :class:`~unbackdoor.data.Dataset`.

Section numbers (§) cite ``docs/methods/musclelora.md``, the method notes in this repository.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from unbackdoor.data.sampling import sample_subset
from unbackdoor.data.types import Dataset, require_clean_dataset
from unbackdoor.errors import DataError
from unbackdoor.inference import collate, encode
from unbackdoor.models.loading import Classifier
from unbackdoor.training.callbacks import Callback, TrainContext
from unbackdoor.training.loop import compute_region

Mode = Literal["aligned", "mixed", "raw"]


# --------------------------------------------------------------------------------------------------
# §7: the reference set, carved out of the clean dev set
# --------------------------------------------------------------------------------------------------


def split_reference(dev: Dataset, size: int, how: Literal["random", "stratified"] = "random",
                    seed: int = 0) -> tuple[Dataset, Dataset]:
    """(reference, selection): ``size`` rows of the clean dev set and the rest, which picks the epoch.

    ``random`` is the official unstratified split [CODE]; ``stratified`` keeps label shares [RECON].
    """
    require_clean_dataset(dev, "the clean dev set")
    if size >= len(dev):
        raise DataError(f"{dev.name}: the clean dev set has {len(dev)} rows; a reference set of {size} "
                        "must leave some for epoch selection (lower reference_size)")
    name = f"{dev.name}[reference]"
    if how == "stratified":
        reference = sample_subset(dev, size=size, seed=seed, name=name)
    else:
        reference = dev.select(random.Random(f"reference-{seed}").sample(sorted(dev.ids), size), name)
    return reference, dev.without(reference.ids, f"{dev.name}[selection]")


# --------------------------------------------------------------------------------------------------
# §6: the alignment rule
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignmentRule:
    """The gate and ramp of §6: E, G, λ_max, τ_L, τ_g."""

    epochs: int  # E
    ga_epoch: int = 1  # G
    max_raw_grad_ratio: float = 0.1  # λ_max
    min_ref_loss: float = 0.4  # τ_L
    min_ref_grad_norm: float = 5e-7  # τ_g

    def raw_share(self, epoch: int) -> float:
        """λ_e = λ_max · (e − G) / (E − G)."""
        if self.epochs <= self.ga_epoch:
            return 0.0
        return self.max_raw_grad_ratio * (epoch - self.ga_epoch) / (self.epochs - self.ga_epoch)

    def mode(self, epoch: int, ref_loss: float, ref_grad_norm: float) -> Mode:
        if ref_grad_norm > self.min_ref_grad_norm and ref_loss > self.min_ref_loss:
            return "aligned"
        if self.max_raw_grad_ratio > 0 and epoch >= self.ga_epoch:
            return "mixed"
        return "raw"


def aligned_gradient(raw: torch.Tensor, ref: torch.Tensor) -> torch.Tensor | None:
    """a = |⟨g, r⟩| / ‖r‖² · r (§6.4); ``None`` when g or r is zero (the raw gradient is kept)."""
    g, r = raw.flatten().float(), ref.flatten().float()
    r_sq = torch.dot(r, r)
    if r_sq == 0 or not torch.any(g):
        return None
    return (torch.dot(g, r).abs() / r_sq * r).view_as(raw).to(raw.dtype)


def mean_reference_norm(refs: Sequence[torch.Tensor]) -> float:
    """m: the mean of ‖r_p‖ over tensors with a non-zero reference gradient."""
    norms = [float(r.float().norm()) for r in refs]
    norms = [n for n in norms if n > 0]
    return sum(norms) / len(norms) if norms else 0.0


def align_gradients(raws: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], mode: Mode,
                    raw_share: float) -> list[torch.Tensor]:
    """The new gradient of every tensor (paired by position of the *same* parameter list)."""
    if mode == "raw":
        return list(raws)
    out = []
    for g, r in zip(raws, refs, strict=True):
        a = aligned_gradient(g, r)
        if a is None:
            out.append(g)
        elif mode == "aligned":
            out.append(a)
        else:
            out.append((1 - raw_share) * a + raw_share * g)
    return out


# --------------------------------------------------------------------------------------------------
# the training-loop extension
# --------------------------------------------------------------------------------------------------


class GradientAlignment(Callback):
    """Rewrites every step's gradients by the GA rule (an ``on_gradients`` hook of the one loop).

    ``reference`` must be clean data (a slice of the clean dev set, see :func:`split_reference`).
    Reference batches are drawn from (``seed``, step), so a resumed run draws the same ones.
    Each epoch's record gets the number of aligned / mixed / raw steps and the mean reference loss.
    """

    def __init__(self, reference: Dataset, clf: Classifier, rule: AlignmentRule, *, batch_size: int,
                 batches: int | None = 1, seed: int = 0) -> None:
        self.reference = require_clean_dataset(reference, "the reference set")
        self.clf = clf  # for its tokenizer and input format
        self.rule = rule
        self.batch_size = batch_size
        self.batches = batches  # None: a whole pass over the reference set per step
        self.seed = seed
        self._features: list[dict[str, list[int]]] = []
        self._params: list[tuple[str, torch.nn.Parameter]] = []
        self._epoch_stats: Counter[str] = Counter()
        self._ref_loss_sum = 0.0

    def on_train_begin(self, ctx: TrainContext) -> None:
        self._features = encode(self.clf, self.reference.examples)
        self._params = [(n, p) for n, p in ctx.model.named_parameters() if p.requires_grad]

    def reference_batches(self, step: int) -> list[list[int]]:
        """Row indices of the reference batches of optimizer step ``step``: a fresh shuffled pass."""
        order = list(range(len(self._features or self.reference.examples)))
        random.Random(f"reference-batches-{self.seed}-{step}").shuffle(order)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return batches if self.batches is None else batches[: self.batches]

    def reference_gradient(self, ctx: TrainContext) -> tuple[list[torch.Tensor], float]:
        """r_p for every trainable tensor and ℓ, on this step's reference batches (train mode)."""
        params = [p for _, p in self._params]
        total = [torch.zeros_like(p) for p in params]
        loss_sum = 0.0
        labels = self.reference.labels
        batches = self.reference_batches(ctx.state.global_step)
        for rows in batches:
            batch = collate(self.clf, [self._features[i] for i in rows], [labels[i] for i in rows])
            with compute_region(ctx.precision, ctx.config, ctx.accelerator):  # the step's own precision
                loss = ctx.model(**{k: v.to(ctx.accelerator.device) for k, v in batch.items()}).loss
            for t, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
                if g is not None:
                    t.add_(g)
            loss_sum += float(loss.detach())
        grads = [t / len(batches) for t in total]
        ref_loss = torch.tensor(loss_sum / len(batches), device=ctx.accelerator.device)
        if ctx.accelerator.num_processes > 1:  # every replica must take the same step
            grads = [ctx.accelerator.reduce(g, "mean") for g in grads]
            ref_loss = ctx.accelerator.reduce(ref_loss, "mean")
        return grads, float(ref_loss)

    def on_gradients(self, ctx: TrainContext, batch: dict[str, torch.Tensor]) -> None:
        missing = [n for n, p in self._params if p.grad is None]
        if missing:  # pair by identity, and fail loudly rather than shift the pairing (§14.9)
            raise RuntimeError(f"trainable parameters without a gradient: {missing[:3]}")
        refs, ref_loss = self.reference_gradient(ctx)  # step 2
        epoch = ctx.state.epoch
        mode = self.rule.mode(epoch, ref_loss, mean_reference_norm(refs))  # step 3
        raws = [p.grad for _, p in self._params]
        for (_, p), new in zip(self._params, align_gradients(raws, refs, mode, self.rule.raw_share(epoch)),
                               strict=True):  # step 4
            p.grad = new
        self._epoch_stats[mode] += 1
        self._ref_loss_sum += ref_loss

    def on_epoch_end(self, ctx: TrainContext, record: dict[str, Any]) -> None:
        steps = sum(self._epoch_stats.values())
        record.update({f"ga_{m}_steps": self._epoch_stats[m] for m in ("aligned", "mixed", "raw")})
        record["reference_loss"] = self._ref_loss_sum / steps if steps else None
        self._epoch_stats.clear()
        self._ref_loss_sum = 0.0
