"""Label-share calibration of a classifier's output bias on clean dev rows [OURS].

A model trained on rows whose label shares differ from deployment leans toward the over-represented
label: dropping a dirty-label attack's rows (non-target text labelled as the target) is one way this
happens, and on a triggered test set the lean reads as attack success. :func:`calibrate_to_dev` adds
per-class offsets b to the classification head's bias so that the model's mean predicted probability
of each class on the clean dev rows equals that class's share there,

    mean_i softmax(z_i + b)_c = p_dev(c)   for every class c,

solved by the fixed-point iteration b_c ← b_c + log p_dev(c) − log q_c(b) (Saerens et al., 2002,
"Adjusting the outputs of a classifier to new a priori probabilities", with the dev shares known
rather than estimated). Only clean dev rows and their labels are used; the offsets live in the head's
bias, so the saved model carries them. Heads without a bias (GPT-2, Llama ``score``) are left as they
are, and the report says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from unbackdoor.data.types import Dataset
from unbackdoor.inference import predict_logits
from unbackdoor.models.loading import Classifier

logger = logging.getLogger(__name__)


def output_layer(clf: Classifier) -> torch.nn.Linear | None:
    """The classification head's last linear layer (the one producing the logits), or ``None``."""
    layers = [m for m in clf.model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == clf.num_labels]
    return layers[-1] if layers else None


def label_shares(labels: Sequence[int], num_labels: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels) / len(labels)


def prior_offsets(logits: np.ndarray, shares: np.ndarray, iterations: int = 200, tol: float = 1e-6) -> np.ndarray:
    """Offsets b with mean softmax(logits + b) = ``shares`` (mean zero over the classes present). A
    class with share 0 (absent from dev) keeps offset 0, and the others are matched among themselves."""
    live = shares > 0
    z, p = logits.astype(np.float64)[:, live], shares[live] / shares[live].sum()
    b_live = np.zeros(int(live.sum()))
    for _ in range(iterations):
        step = np.log(p) - np.log(np.maximum(_mean_softmax(z + b_live), 1e-12))
        b_live += step
        if np.abs(step).max() < tol:
            break
    b = np.zeros(logits.shape[1])
    b[live] = b_live - b_live.mean()
    return b


def _mean_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).mean(axis=0)


def calibrate_to_dev(clf: Classifier, dev: Dataset) -> dict[str, Any]:
    """Shift ``clf``'s head bias so its mean predicted class probabilities on ``dev`` match the dev
    label shares (module docstring). Returns what was done, for the output's record."""
    layer = output_layer(clf)
    if layer is None or layer.bias is None:
        logger.info("calibration skipped: the classification head has no bias to shift")
        return {"applied": False, "reason": "the classification head has no bias"}
    labels = np.asarray(dev.labels)
    shares = label_shares(labels, clf.num_labels)
    logits = predict_logits(clf, dev.examples)
    offsets = prior_offsets(logits, shares)
    with torch.no_grad():
        layer.bias.add_(torch.as_tensor(offsets, dtype=layer.bias.dtype, device=layer.bias.device))
    after = logits + offsets
    report = {"applied": True, "offsets": offsets.round(6).tolist(), "dev_shares": shares.round(6).tolist(),
              "mean_probability_before": _mean_softmax(logits.astype(np.float64)).round(6).tolist(),
              "predicted_shares_before": _predicted_shares(logits, clf.num_labels),
              "predicted_shares_after": _predicted_shares(after, clf.num_labels),
              "dev_accuracy_before": float((logits.argmax(1) == labels).mean()),
              "dev_accuracy_after": float((after.argmax(1) == labels).mean())}
    logger.info("calibration: head bias shifted by %s (dev predicted shares %s -> %s; dev accuracy %.4f -> %.4f)",
                np.round(offsets, 3).tolist(), report["predicted_shares_before"], report["predicted_shares_after"],
                report["dev_accuracy_before"], report["dev_accuracy_after"])
    return report


def _predicted_shares(logits: np.ndarray, num_labels: int) -> list[float]:
    return label_shares(logits.argmax(1), num_labels).round(4).tolist()
