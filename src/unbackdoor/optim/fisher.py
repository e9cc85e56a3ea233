"""Diagonal Fisher information of a classifier on clean labelled data.

    F_i = (1/N) Σ_n ( ∂ℓ(x_n, y_n; θ) / ∂θ_i )²,      ℓ = cross-entropy = −log p_θ(y|x)

* **Per-example** gradients, squared, then averaged: never the square of a batch-mean gradient
  (that is biased toward zero by about the batch size; ``fine-purifying.md`` §6, ``lya.md`` §4).
  Two estimators compute the same quantity: a batch-of-one loop (``loop``, any architecture) and
  vectorised per-sample gradients (``vmap``, ``torch.func``; encoder models such as BERT/RoBERTa/
  Llama, rows grouped by equal length so no padding mask is needed).
* Which label ``y`` (``mode``):
  ``empirical`` the row's own label (default; both specs' default);
  ``sampled`` one label per row drawn from p_θ(·|x) with a seeded generator (Monte-Carlo Fisher);
  ``true`` the exact expectation Σ_y p_θ(y|x)·(∂ℓ(x, y)/∂θ_i)², one backward pass per class.
* The model is in eval mode (dropout off) while accumulating, so two runs give the same result on
  CPU; its previous mode is restored.

Only a :class:`~unbackdoor.data.Dataset` (text and labels) is accepted: triggered sets, poison flags
and poisoned tasks are refused by type.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F

from unbackdoor.data.sampling import sample_subset
from unbackdoor.data.types import Dataset, require_clean_dataset
from unbackdoor.errors import ModelError
from unbackdoor.inference import collate, encode
from unbackdoor.models.loading import Classifier
from unbackdoor.training.loop import check_trainable

logger = logging.getLogger(__name__)

FisherMode = Literal["empirical", "sampled", "true"]
FisherEstimator = Literal["loop", "vmap"]

Features = list[dict[str, list[int]]]


def diagonal_fisher(
    clf: Classifier,
    data: Dataset,
    *,
    mode: FisherMode = "empirical",
    batch_size: int = 32,
    max_rows: int | None = None,
    estimator: FisherEstimator = "loop",
    params: Collection[str] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``clf`` on clean ``data``: parameter name -> fp32 tensor of its shape.

    ``params`` restricts the result to these parameter names (default: every parameter).
    ``max_rows`` caps N with a seeded stratified subset; ``seed`` also drives ``mode="sampled"``.
    ``batch_size`` is the number of rows per vectorised call (``estimator="vmap"``; the loop
    always uses one row). Tensors live on the parameters' device; the model is left unchanged.
    """
    require_clean_dataset(data, "Fisher data")
    check_trainable(clf, data)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rows = _cap_rows(data, max_rows, seed)
    named = _selected_parameters(clf.model, params)
    features = encode(clf, rows.examples)
    generator = torch.Generator().manual_seed(seed)
    with _eval_mode_with_grads(clf.model, named):
        if estimator == "loop":
            sums = _fisher_loop(clf, named, features, rows.labels, mode, generator)
        elif estimator == "vmap":
            sums = _fisher_vmap(clf, named, features, rows.labels, mode, generator, batch_size)
        else:
            raise ValueError(f"unknown Fisher estimator {estimator!r}; choose loop or vmap")
    n = len(features)
    logger.info("diagonal Fisher (%s, %s) over %d rows, %d tensors", mode, estimator, n, len(sums))
    return {name: total / n for name, total in sums.items()}


def _cap_rows(data: Dataset, max_rows: int | None, seed: int) -> Dataset:
    """All rows, or a seeded stratified subset of ``max_rows`` of them."""
    if max_rows is None or max_rows >= len(data):
        return data
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    return sample_subset(data, size=max_rows, seed=seed, name=f"{data.name}[fisher]")


def _selected_parameters(model: torch.nn.Module, names: Collection[str] | None) -> dict[str, torch.nn.Parameter]:
    """The parameters to estimate, by name, in the model's order."""
    all_params = dict(model.named_parameters())
    if names is None:
        return all_params
    unknown = set(names) - set(all_params)
    if unknown:
        raise ValueError(f"the model has no parameter {sorted(unknown)[0]!r}")
    return {n: p for n, p in all_params.items() if n in set(names)}


@contextmanager
def _eval_mode_with_grads(model: torch.nn.Module, named: dict[str, torch.nn.Parameter]) -> Iterator[None]:
    """Eval mode (dropout off) and gradients enabled on the selected parameters; restored after."""
    was_training = model.training
    flags = {n: p.requires_grad for n, p in named.items()}
    model.eval()
    for p in named.values():
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for n, p in named.items():
            p.requires_grad_(flags[n])
        model.train(was_training)


def _model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


def _sample_label(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One label drawn from ``probs`` (a 1-D distribution) with the seeded CPU generator."""
    return int(torch.multinomial(probs.detach().double().cpu(), 1, generator=generator))


def _fisher_loop(
    clf: Classifier,
    named: dict[str, torch.nn.Parameter],
    features: Features,
    labels: Sequence[int],
    mode: FisherMode,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Σ_n of squared per-example gradients, one row per forward/backward pass, in row order."""
    names, tensors = list(named), list(named.values())
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named.items()}
    device = tensors[0].device if tensors else torch.device("cpu")
    for feature, label in zip(features, labels, strict=True):
        logits = clf.model(**_model_inputs(collate(clf, [feature]), device)).logits.float()
        log_probs = F.log_softmax(logits, dim=-1)[0]
        for weight, y in _label_weights(log_probs, label, mode, generator):
            grads = torch.autograd.grad(-log_probs[y], tensors, retain_graph=True, allow_unused=True)
            for n, g in zip(names, grads, strict=True):
                if g is not None:
                    sums[n] += weight * g.float().square()
    return sums


def _label_weights(log_probs: torch.Tensor, label: int, mode: FisherMode, generator: torch.Generator) -> list[tuple[float, int]]:
    """(weight, label) pairs whose weighted squared gradients make one row's Fisher term."""
    if mode == "empirical":
        return [(1.0, label)]
    probs = log_probs.detach().exp()
    if mode == "sampled":
        return [(1.0, _sample_label(probs, generator))]
    if mode == "true":
        return [(float(probs[c]), c) for c in range(probs.numel())]
    raise ValueError(f"unknown Fisher mode {mode!r}; choose empirical, sampled or true")


def _equal_length_chunks(features: Features, batch_size: int) -> list[list[int]]:
    """Row indices grouped by token length (so no padding mask is needed), in chunks."""
    by_length: dict[int, list[int]] = {}
    for i, f in enumerate(features):
        by_length.setdefault(len(f["input_ids"]), []).append(i)
    return [rows[j : j + batch_size] for _, rows in sorted(by_length.items()) for j in range(0, len(rows), batch_size)]


def _fisher_vmap(
    clf: Classifier,
    named: dict[str, torch.nn.Parameter],
    features: Features,
    labels: Sequence[int],
    mode: FisherMode,
    generator: torch.Generator,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Σ_n of squared per-example gradients with ``torch.func.vmap`` over equal-length rows."""
    from torch.func import functional_call, grad, vmap

    model = clf.model
    fixed = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in named}
    trainable = {n: p.detach() for n, p in named.items()}
    device = next(iter(trainable.values())).device if trainable else torch.device("cpu")

    def row_loss(params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        kwargs = {k: v.unsqueeze(0) for k, v in inputs.items()}
        logits = functional_call(model, {**fixed, **params}, args=(), kwargs=kwargs).logits.float()
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_row_grads = vmap(grad(row_loss), in_dims=(None, 0, 0))
    chunks = _equal_length_chunks(features, batch_size)
    inputs = {tuple(c): _unpadded_inputs(clf, [features[i] for i in c], device) for c in chunks}
    row_labels = _vmap_labels(clf, chunks, inputs, labels, mode, generator)
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named.items()}
    for chunk in chunks:
        for weights, ys in row_labels[tuple(chunk)]:
            try:
                with warnings.catch_warnings():  # functorch's note that some ops run unbatched
                    warnings.filterwarnings("ignore", message="There is a performance drop")
                    grads = per_row_grads(trainable, inputs[tuple(chunk)], ys.to(device))
            except RuntimeError as exc:
                raise ModelError(
                    f"this model cannot be vectorised with torch.func ({str(exc).splitlines()[0][:120]}); "
                    "use the Fisher estimator 'loop'"
                ) from exc
            w = weights.to(device)
            for n, g in grads.items():
                sums[n] += torch.einsum("b,b...->...", w, g.float().square())
    return sums


def _unpadded_inputs(clf: Classifier, rows: Features, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs for rows of one length; the all-ones attention mask is left out."""
    batch = collate(clf, rows)
    return {k: v.to(device) for k, v in batch.items() if k not in ("labels", "attention_mask")}


@torch.no_grad()
def _vmap_labels(
    clf: Classifier,
    chunks: list[list[int]],
    inputs: dict[tuple[int, ...], dict[str, torch.Tensor]],
    labels: Sequence[int],
    mode: FisherMode,
    generator: torch.Generator,
) -> dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per chunk, (weights, labels) passes; labels are drawn in row order, as the loop draws them."""
    if mode == "empirical":
        return {tuple(c): [(torch.ones(len(c)), torch.tensor([labels[i] for i in c]))] for c in chunks}
    if mode not in ("sampled", "true"):
        raise ValueError(f"unknown Fisher mode {mode!r}; choose empirical, sampled or true")
    probs: dict[int, torch.Tensor] = {}
    for c in chunks:
        p = F.softmax(clf.model(**inputs[tuple(c)]).logits.float(), dim=-1).cpu()
        probs.update(zip(c, p, strict=True))
    if mode == "sampled":
        drawn = {i: _sample_label(probs[i], generator) for i in sorted(probs)}
        return {tuple(c): [(torch.ones(len(c)), torch.tensor([drawn[i] for i in c]))] for c in chunks}
    n_classes = clf.num_labels
    return {
        tuple(c): [(torch.stack([probs[i][k] for i in c]), torch.full((len(c),), k)) for k in range(n_classes)]
        for c in chunks
    }
