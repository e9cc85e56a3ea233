"""The ``contrast`` detector [OURS]: which training rows a classifier can tell apart from clean data.

The defender's clean set is drawn from the task's own distribution, and so are a poisoned training set's
clean rows; its poisoned rows are not (they carry a trigger word, a fixed sentence, a syntactic template
or a text style). So a classifier taught to tell training rows from clean rows can only learn the
poison, and the rows it confidently calls "training" are the suspects. The trigger need not be one
feature: a style shifts many weak words at once, which a per-feature count (``zscore``) misses and a
linear model sums. No model of the task is trained; no flags, triggers or triggered rows are seen.
The idea (a domain classifier against trusted data) is ours as a detector here; steps:

1. features of each row: the shallow lexical ones of :mod:`unbackdoor.detect.lexical` (words, word
   pairs, the opening words, the opening shape), kept when they occur in at least ``min_count`` rows;
2. within each label (``per_label``; a dirty-label row is out of place in its label by its content as
   well as its trigger), a logistic regression with an L2 penalty (``l2``) separates the training rows
   (1) from the clean rows (0); every row, training or clean, is scored out of fold (``folds``, seeded),
   so no row is scored by a model that saw it;
3. the cut [OURS]: the clean rows' out-of-fold scores are the null (what a clean training row scores);
   per label, the longest top list whose estimated share of clean rows stays at most ``fdr``
   (:func:`unbackdoor.detect.null.fdr_cut`).

Row score: the out-of-fold logit minus its label's cut, so the selected rows are exactly those with
score > 0 (the report's ``threshold``; ``auto`` drops them, ``detect --threshold 0`` flags them). A label
without clean rows cannot be calibrated: its rows score below 0 throughout.

Settings chosen on development data outside the acceptance grids (OpenBackdoor's SynBkd/StyleBkd SST-2
releases, BadNets/AddSent on HSOL, OLID and QNLI; docs/results/auto.md): per-label models, l2 0.01,
fdr 0.2. Lexical only: a trigger that leaves the words and the opening unchanged is invisible to it.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
import torch
from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.detect.base import DETECTORS, DetectInputs, Detector, Scores
from unbackdoor.detect.lexical import Feature, FeatureKind, row_features
from unbackdoor.detect.null import fdr_cut

logger = logging.getLogger(__name__)


class ContrastConfig(StrictConfig):
    """Options of the train-versus-clean contrast (module docstring; all [OURS])."""

    features: list[FeatureKind] = Field(default_factory=lambda: ["unigram", "bigram", "start", "shape"],
                                        min_length=1, description="lexical feature kinds")
    min_count: int = Field(2, ge=1, description="a feature is used when it occurs in at least this many rows")
    per_label: bool = Field(True, description="one classifier and one cut per label (else one for all rows)")
    l2: float = Field(0.01, gt=0, description="L2 penalty on the weights (added to the mean cross-entropy)")
    folds: int = Field(5, ge=2, description="cross-fitting folds: every row is scored by a model that did not see it")
    fdr: float = Field(0.2, gt=0, lt=1, description="largest estimated share of clean rows among those selected")
    max_iter: int = Field(100, ge=1, description="L-BFGS iterations per fit")
    seed: int = Field(0, description="seed of the fold assignment")


def feature_index(rows: list[set[Feature]], min_count: int) -> dict[Feature, int]:
    """Column of every feature held by at least ``min_count`` rows (sorted, so the order is reproducible)."""
    counts = Counter(f for feats in rows for f in feats)
    return {f: i for i, f in enumerate(sorted(f for f, c in counts.items() if c >= min_count))}


def bags(rows: list[set[Feature]], index: dict[Feature, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows as (flat column ids, offsets) for :func:`torch.nn.functional.embedding_bag`."""
    cols = [sorted(index[f] for f in feats if f in index) for feats in rows]
    offsets = torch.tensor([0, *np.cumsum([len(c) for c in cols])[:-1].tolist()], dtype=torch.long)
    return torch.tensor([c for row in cols for c in row], dtype=torch.long), offsets


def _logits(w: torch.Tensor, b: torch.Tensor, flat: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.embedding_bag(flat, w[:, None], offsets, mode="sum")[:, 0] + b


def fit_logistic(flat: torch.Tensor, offsets: torch.Tensor, y: torch.Tensor, n_features: int, l2: float,
                 max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of an L2-penalised logistic regression on binary bag-of-feature rows (float64, L-BFGS)."""
    w = torch.zeros(n_features, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = _logits(w, b, flat, offsets)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def out_of_fold_logits(rows: list[set[Feature]], y: torch.Tensor, cfg: ContrastConfig) -> torch.Tensor:
    """Step 2: every row's logit of "training row" from a model fitted on the other folds."""
    n = len(rows)
    out = torch.zeros(n, dtype=torch.float64)
    folds = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)) % cfg.folds
    for k in range(cfg.folds):
        held, fit = (folds == k).nonzero()[:, 0], (folds != k).nonzero()[:, 0]
        fit_rows = [rows[i] for i in fit.tolist()]
        index = feature_index(fit_rows, cfg.min_count)  # features seen when fitting only
        w, b = fit_logistic(*bags(fit_rows, index), y[fit], max(len(index), 1), cfg.l2, cfg.max_iter)
        out[held] = _logits(w, b, *bags([rows[i] for i in held.tolist()], index))
    return out


@DETECTORS.register("contrast")
class ContrastDetector(Detector[ContrastConfig]):
    """Rows that a classifier tells apart from the clean set (out of fold) are suspected (no task model)."""

    name = "contrast"
    config_class = ContrastConfig

    def _scores(self, inputs: DetectInputs) -> Scores:
        cfg = self.config
        rows = [row_features(e, cfg.features) for e in inputs.rows]
        clean = [row_features(e, cfg.features) for e in inputs.clean]
        groups = sorted(set(inputs.rows.labels)) if cfg.per_label else [None]
        scores = torch.full((len(rows),), -1.0, dtype=torch.float64)
        report: dict[str, Any] = {"threshold": 0.0, "groups": []}
        for label in groups:
            t_idx = [i for i, y in enumerate(inputs.rows.labels) if label is None or y == label]
            c_idx = [i for i, y in enumerate(inputs.clean.labels) if label is None or y == label]
            if c_idx:  # without clean rows there is no null: nothing of this label is selected
                logits = out_of_fold_logits([rows[i] for i in t_idx] + [clean[i] for i in c_idx],
                                            torch.cat([torch.ones(len(t_idx)), torch.zeros(len(c_idx))]).double(), cfg)
                train, null = logits[: len(t_idx)], logits[len(t_idx):]
                cut, k, share = fdr_cut(train, null, cfg.fdr)
                scores[t_idx] = train - cut
            else:
                cut, k, share = None, 0, 0.0
            report["groups"].append({"label": label, "rows": len(t_idx), "clean_rows": len(c_idx), "cut": cut,
                                     "selected": k, "estimated_fdr": share})
            logger.info("contrast: label %s: %d of %d rows above the cut (estimated false share %.2f; %d clean rows)",
                        "all" if label is None else label, k, len(t_idx), share, len(c_idx))
        report["n_rows_over_threshold"] = int((scores > 0).sum())
        return Scores(scores.float(), report)
