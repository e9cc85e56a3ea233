"""The ``cube`` detector: CUBE (Cui et al., NeurIPS 2022 Datasets and Benchmarks; as OpenBackdoor's
``cube_defender.py`` implements it).

A model trained on poisoned rows maps them to their own region of its representation space (they
share the trigger, not the content of their label), so within a label they form a cluster apart
from the label's clean rows. Steps:

1. [PAPER] train a model on the rows as given: here a copy of ``DetectInputs.encoder`` fine-tuned by
   the one training loop (:func:`~unbackdoor.detect.finetuned.fine_tuned_copy`);
2. the representation of every row: [OURS] the first token's last hidden state (OpenBackdoor takes
   BERT's pooler output, dense + tanh over it, or RoBERTa's head's dense layer: model-specific);
3. reduce the dimension: [PAPER] UMAP (after PCA to 20 dims in the code; 2 dims, 100 neighbours,
   min_dist 0) with ``reduction=umap`` if ``umap-learn`` is installed; [OURS] by default PCA alone
   (scikit-learn, ``pca_components`` dims; umap-learn is not a dependency of this project);
4. [PAPER] density clustering: HDBSCAN (scikit-learn's), noise points (label −1) forming one group
   of their own as in the code;
5. [PAPER code] within each label, every group but the label's largest whose size is below
   ``max_share`` (0.5) of the label's rows is a minority group: its rows are what CUBE removes.

Scores [OURS]: a row of a minority group scores 1 − (its group's share of the label's rows), in
(1 − max_share, 1]: smaller groups first, and ``--threshold`` at 1 − max_share (0.5 by default)
flags exactly CUBE's rows; every other row scores 0, ordered among themselves by 1 − HDBSCAN's
membership strength (weak members and noise first). ``detect.json`` records every label's groups
and their sizes and ``n_minority`` (the rows CUBE itself would remove).

Other choices [OURS]: ``min_samples`` defaults to min(100 [PAPER code], 5 % of the rows) so that
small data sets are not one cluster; training uses the project's victim settings (OpenBackdoor: 10
epochs at lr 2e-5).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from unbackdoor.config import StrictConfig
from unbackdoor.detect.base import DETECTORS, DetectInputs, Detector, Scores
from unbackdoor.detect.features import Pooling, representations
from unbackdoor.detect.finetuned import TRAIN_DESCRIPTION, fine_tuned_copy
from unbackdoor.training.config import TrainConfig, victim_train_config
from unbackdoor.training.config import merge_train

logger = logging.getLogger(__name__)

NOISE = -1


class CubeConfig(StrictConfig):
    """Options of CUBE ([PAPER] / [OURS] as the module docstring says)."""

    reduction: Literal["pca", "umap"] = Field("pca", description="dimension reduction: PCA [OURS default] or "
                                              "PCA then UMAP [PAPER; needs umap-learn]")
    pca_components: int = Field(20, ge=1, description="PCA dimensions [PAPER code: 20, before UMAP]")
    umap_components: int = Field(2, ge=1, description="UMAP dimensions (reduction=umap) [PAPER code: 2]")
    umap_neighbors: int = Field(100, ge=2, description="UMAP n_neighbors (reduction=umap) [PAPER code: 100]")
    umap_min_dist: float = Field(0.0, ge=0, description="UMAP min_dist (reduction=umap) [PAPER code: 0]")
    min_cluster_size: int = Field(5, ge=2, description="HDBSCAN min_cluster_size [PAPER code: library default 5]")
    min_samples: int | None = Field(None, ge=1, description="HDBSCAN min_samples; null: min(100 [PAPER code], "
                                    "5 % of the rows) [OURS]")
    max_share: float = Field(0.5, gt=0, le=1, description="a non-largest group of a label is removed if it holds "
                             "less than this share of the label's rows [PAPER code: 0.5]")
    pooling: Pooling = Field("cls", description="representation: the first token's last hidden state, or the "
                             "mean over tokens (decoder models) [OURS]")
    batch_size: int = Field(64, ge=1, description="rows per forward pass")
    seed: int = Field(42, description="random_state of PCA and UMAP [PAPER code: 42]")
    train: TrainConfig | None = Field(None, description=TRAIN_DESCRIPTION)

    def train_config(self) -> TrainConfig:
        return merge_train(victim_train_config(), self.train)

    @model_validator(mode="after")
    def _umap_installed(self) -> CubeConfig:
        if self.reduction == "umap" and importlib.util.find_spec("umap") is None:
            raise ValueError("reduction=umap needs the package umap-learn, which is not installed; use reduction=pca")
        return self


def reduce_dimension(x: np.ndarray, cfg: CubeConfig) -> tuple[np.ndarray, str]:
    """PCA (then UMAP with ``reduction=umap``) of the representations, and a description."""
    from sklearn.decomposition import PCA

    k = min(cfg.pca_components, x.shape[0], x.shape[1])
    reduced = PCA(n_components=k, random_state=cfg.seed).fit_transform(x)
    what = f"PCA to {k} dims"
    if cfg.reduction == "umap":
        import umap  # checked by the config

        neighbours = min(cfg.umap_neighbors, x.shape[0] - 1)
        reduced = umap.UMAP(n_neighbors=neighbours, min_dist=cfg.umap_min_dist, n_components=cfg.umap_components,
                            random_state=cfg.seed, transform_seed=cfg.seed).fit(reduced).embedding_
        what += f", then UMAP to {cfg.umap_components} dims ({neighbours} neighbours, min_dist {cfg.umap_min_dist})"
    return np.asarray(reduced, dtype=np.float64), what


def cluster(x: np.ndarray, cfg: CubeConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """HDBSCAN group of every row (−1: noise), its membership strength, and min_samples used."""
    from sklearn.cluster import HDBSCAN

    n = x.shape[0]
    min_samples = cfg.min_samples if cfg.min_samples is not None else max(1, min(100, round(0.05 * n)))
    min_samples = min(min_samples, n)
    if n < 2:  # nothing to cluster: one group
        return np.zeros(n, dtype=int), np.ones(n), min_samples
    model = HDBSCAN(min_cluster_size=min(cfg.min_cluster_size, n), min_samples=min_samples,
                    cluster_selection_epsilon=0.0, copy=True)
    groups = model.fit_predict(x)
    return groups, np.asarray(model.probabilities_, dtype=np.float64), min_samples


def minority_scores(labels: list[int], groups: np.ndarray,
                    max_share: float) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Step 5 and the score (module docstring): 1 − group share for minority rows, else 0; and per
    label its groups with their sizes (largest first) and which are minorities."""
    y = np.asarray(labels)
    scores = torch.zeros(len(labels), dtype=torch.float64)
    summary: list[dict[str, Any]] = []
    for label in sorted(set(labels)):
        in_label = y == label
        total = int(in_label.sum())
        ids, counts = np.unique(groups[in_label], return_counts=True)
        order = sorted(range(len(ids)), key=lambda j: (-counts[j], int(ids[j])))
        entries = []
        for rank, j in enumerate(order):
            share = counts[j] / total
            minority = rank > 0 and share < max_share
            if minority:
                scores[torch.from_numpy(in_label & (groups == ids[j]))] = 1.0 - float(share)
            entries.append({"group": "noise" if ids[j] == NOISE else int(ids[j]), "size": int(counts[j]),
                            "minority": bool(minority)})
        summary.append({"label": int(label), "rows": total, "groups": entries})
    return scores, summary


@DETECTORS.register("cube")
class CubeDetector(Detector[CubeConfig]):
    """Rows in a minority cluster of their label (in a model trained on the rows) are suspected."""

    name = "cube"
    config_class = CubeConfig

    def _scores(self, inputs: DetectInputs) -> Scores:
        cfg = self.config
        train = cfg.train_config()
        clf, training = fine_tuned_copy(inputs.encoder, inputs.rows, train)
        reps = representations(clf, inputs.rows.examples, cfg.pooling, cfg.batch_size).double().numpy()
        reduced, how = reduce_dimension(reps, cfg)
        groups, strength, min_samples = cluster(reduced, cfg)
        scores, summary = minority_scores(inputs.rows.labels, groups, cfg.max_share)
        n_minority = int((scores > 0).sum())
        logger.info("cube: %d clusters (+ %d noise rows); %d rows in minority clusters", len(set(groups) - {NOISE}),
                    int((groups == NOISE).sum()), n_minority)
        report = {
            "trained": f"copy of {inputs.encoder.source or 'the encoder'}, every parameter, on the rows",
            "train": train.model_dump(), "history": training.history, "n_clean": len(inputs.clean),
            "representation": f"{cfg.pooling} pooling of the last hidden state ({reps.shape[1]} dims)",
            "reduction": how, "hdbscan": {"min_cluster_size": cfg.min_cluster_size, "min_samples": min_samples},
            "n_clusters": len(set(groups.tolist()) - {NOISE}), "n_noise": int((groups == NOISE).sum()),
            "labels": summary, "n_minority": n_minority,
        }
        return Scores(scores.float(), report, tiebreak=torch.from_numpy(1.0 - strength).float())
