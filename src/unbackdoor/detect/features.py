"""Frozen sentence features, computed once per dataset, for the cheap detectors (spec
``docs/methods/multilevel.md`` §3: the unrolled parameters sit on top of frozen features).

[RECON] A feature is the encoder's last hidden state pooled over the row's tokens: ``mean`` (masked
mean over real tokens; all-MiniLM-L6-v2 was trained as a sentence encoder with mean pooling, the
default) or ``cls`` (the first token). The encoder is the classifier's body (``model.base_model``);
its classification head is not used. Which model to take is the caller's choice: the clean
pre-trained base (default in ``detect`` and the ``reweight`` defence), on which a dirty-label
poisoned row looks like a mislabelled row of its true class, or a given fine-tuned model.

:func:`standardise` puts training and clean features on one scale: per-dimension z-scores with the
training rows' mean and standard deviation, divided by √d so a typical row has norm ≈ 1 (the ε of
the attacker level is in these units).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from unbackdoor.data.types import Dataset, Example, require_clean_dataset
from unbackdoor.detect.base import DetectInputs
from unbackdoor.inference import collate, encode, length_sorted_batches
from unbackdoor.models.loading import Classifier
from unbackdoor.precision import autocast

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "cls"]


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


@torch.no_grad()
def representations(clf: Classifier, examples: Sequence[Example], pooling: Pooling = "cls",
                    batch_size: int = 64) -> torch.Tensor:
    """One pooled last-hidden-state vector per example (float32, CPU, input order), from ``clf``'s
    encoder in eval mode, under the classifier's precision (bf16 autocast where it runs in bf16)."""
    model = clf.model
    was_training = model.training
    model.eval()
    body = model.base_model
    device = next(model.parameters()).device
    feats = encode(clf, examples)
    out: torch.Tensor | None = None
    for batch in length_sorted_batches([len(f["input_ids"]) for f in feats], batch_size):
        inputs = {k: v.to(device) for k, v in collate(clf, [feats[i] for i in batch]).items()}
        with autocast(clf.precision, device):
            hidden = body(**inputs).last_hidden_state
        pooled = _pool(hidden.float(), inputs["attention_mask"], pooling).cpu()
        if out is None:
            out = torch.zeros(len(feats), pooled.shape[1])
        out[batch] = pooled
    model.train(was_training)
    assert out is not None
    return out


def sentence_features(clf: Classifier, data: Dataset, pooling: Pooling = "mean", batch_size: int = 64) -> torch.Tensor:
    """One pooled feature vector per row of ``data`` (float32, CPU, row order), from ``clf``'s
    encoder in eval mode."""
    require_clean_dataset(data, "rows to featurise")
    out = representations(clf, data.examples, pooling, batch_size)
    logger.info("features: %d rows x %d dims (%s pooling)", out.shape[0], out.shape[1], pooling)
    return out


def standardise(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``train`` and ``others`` z-scored with ``train``'s per-dimension statistics, then / √d."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True).clamp(min=1e-6) if len(train) > 1 else torch.ones_like(mean)
    scale = std * train.shape[1] ** 0.5
    return tuple((x - mean) / scale for x in (train, *others))


CLEAN_L2 = (1e-4, 1e-3, 1e-2)  # clean_classifier's penalties (standardised features of norm about 1)


def fit_softmax(x: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float,
                max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """A multinomial logistic regression (W, b) fitted to convergence (L-BFGS, float64) with an L2
    penalty ``l2`` on W added to the mean cross-entropy."""
    x64 = x.double()
    weight = torch.zeros(num_labels, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x64 @ weight.T + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach().float(), bias.detach().float()


def clean_classifier(x: torch.Tensor, y: torch.Tensor, num_labels: int, l2_grid: Sequence[float] = CLEAN_L2,
                     folds: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """:func:`fit_softmax` on clean features with the penalty of ``l2_grid`` that predicts best out of fold
    (``folds`` seeded folds, ties to the larger penalty); (W, b, the penalty, its out-of-fold accuracy)."""
    fold = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) % folds
    best: tuple[float, float] | None = None
    for l2 in sorted(l2_grid, reverse=True):
        hits = 0
        for k in range(folds):
            w, b = fit_softmax(x[fold != k], y[fold != k], num_labels, l2)
            hits += int(((x[fold == k] @ w.T + b).argmax(1) == y[fold == k]).sum())
        if best is None or hits / len(x) > best[1]:
            best = (l2, hits / len(x))
    assert best is not None
    weight, bias = fit_softmax(x, y, num_labels, best[0])
    return weight, bias, best[0], best[1]


@dataclass(frozen=True)
class FeatureData:
    """Standardised frozen features and labels of the training rows and the clean set."""

    x: torch.Tensor
    y: torch.Tensor
    clean_x: torch.Tensor
    clean_y: torch.Tensor
    num_labels: int


def feature_data(inputs: DetectInputs, pooling: Pooling, batch_size: int) -> FeatureData:
    """Frozen, standardised features of ``inputs``' training rows and clean set (encoder: ``inputs.encoder``)."""
    x = sentence_features(inputs.encoder, inputs.rows, pooling, batch_size)
    clean_x = sentence_features(inputs.encoder, inputs.clean, pooling, batch_size)
    x, clean_x = standardise(x, clean_x)
    return FeatureData(x, torch.tensor(inputs.rows.labels), clean_x, torch.tensor(inputs.clean.labels),
                       inputs.rows.num_labels)
