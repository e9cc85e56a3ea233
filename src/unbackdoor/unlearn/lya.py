"""LYA (reconstructed): gradient ascent on the forget set + Elastic Weight Consolidation.

Kazemi et al., "Unlearning Trojans in Large Language Models: A Comparison Between Natural
Language and Source Code", arXiv 2408.12416 (2024). Only the abstract and third-party summaries
were available (``docs/methods/lya.md`` §1): "GA on trojaned samples + EWC" is confirmed; everything else here
is our **reconstruction** [RECON], each unconfirmed choice a named option. Starting from the
suspect's weights θ*, minimise (``docs/methods/lya.md`` §3)

    L(θ) = − mean_{(x, y) ∈ B_forget} CE(p_θ(·|x), y)  +  (λ/2) Σ_i F_i (θ_i − θ*_i)²

1. Split the forget set (ascend / monitor) and the retain set (clean guard): :mod:`.ascent`.
2. Estimate the diagonal Fisher once, at θ*, in eval mode, from per-row gradients
   (:func:`~unbackdoor.optim.fisher.diagonal_fisher`). ``fisher_data``: ``retain`` (variant A,
   default: cannot shield trigger weights, which get ≈ 0 clean Fisher) or ``retain+forget``
   (variant B, "EWC terms on clean and poisoned samples"; ``fisher_combine``: ``sum`` of two
   terms with λ and ``lam_forget``, or one ``pooled`` Fisher weighted by row counts). The
   forget-side Fisher uses the ascended rows only, never the monitored slice.
3. Ascend in the training loop with the EWC term (:class:`~unbackdoor.unlearn.ewc.EwcPenalty`),
   stop and choose the checkpoint by ``docs/methods/lya.md`` §6 (:mod:`.ascent`).

``lam=0`` is vanilla gradient ascent (the ``gradient-ascent`` method).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from unbackdoor.data.types import Dataset
from unbackdoor.models.loading import Classifier
from unbackdoor.optim.fisher import diagonal_fisher
from unbackdoor.training.loop import make_accelerator
from unbackdoor.training.ascent import AscentConfig, plan_ascent, run_ascent, scope_names
from unbackdoor.unlearn.base import UNLEARN_METHODS, UnlearnInputs, UnlearnMethod, UnlearnResult
from unbackdoor.unlearn.ewc import EwcPenalty, anchor_of, combine_terms, normalise_by_mean

logger = logging.getLogger(__name__)


class LyaConfig(AscentConfig):
    """LYA (reconstructed). Confirmed: GA on the forget set + EWC at the suspect's weights, one λ.
    Everything else is ours [RECON], checked only on the tests' tiny planted backdoor:

    * ``fisher_norm=mean``: the raw empirical Fisher of a well-fitted model is tiny (mean entry
      2e-5 there, since per-row gradients vanish where p(y|x) ≈ 1), so the method notes' scale hint
      λ = N_D/|M| ≈ 10 on the raw Fisher left GA unchanged even at λ = 1000.
    * ``lam=10`` on the mean-normalised Fisher: there λ 1–100 removed the backdoor with the
      stopping rules; at λ ≥ 1e3 the ascent sometimes stalled before the threshold; at 1e5 it
      did not move. Sweep λ (and the lr) on held-out data for a real model.
    """

    lam: float = Field(10.0, ge=0, description="λ of the EWC term (λ/2) Σ F (θ − θ*)²; 0 = vanilla gradient ascent")
    fisher_data: Literal["retain", "retain+forget"] = Field(
        "retain", description="rows the Fisher is estimated on: retain (variant A) or retain+forget (variant B)")
    fisher_combine: Literal["sum", "pooled"] = Field(
        "sum", description="retain+forget: two EWC terms (λ, lam_forget) or one Fisher pooled by row count")
    lam_forget: float | None = Field(None, ge=0, description="λ of the forget-set term for fisher_combine=sum; "
                                     "null = lam")
    fisher_type: Literal["empirical", "true", "sampled"] = Field(
        "empirical", description="label in the Fisher: the row's own, the exact expectation, or one sample")
    fisher_norm: Literal["none", "mean"] = Field(
        "mean", description="divide each Fisher by its mean entry (λ transfers across models) or not")
    fisher_max_rows: int | None = Field(2000, ge=1, description="cap on the rows of each Fisher (seeded subset)")
    fisher_estimator: Literal["loop", "vmap"] = Field("loop", description="per-row gradients: batch-of-one loop "
                                                      "(any model) or torch.func vmap (encoders)")


def fisher_terms(clf: Classifier, retain: Dataset, ascend: Dataset, cfg: LyaConfig,
                 names: list[str]) -> tuple[list[tuple[float, dict[str, torch.Tensor]]], dict[str, Any]]:
    """The (λ_k, F_k) terms of the EWC penalty, estimated at the current weights, and a report."""
    report: dict[str, Any] = {"fisher_data": cfg.fisher_data, "fisher_type": cfg.fisher_type,
                              "fisher_norm": cfg.fisher_norm, "fisher_max_rows": cfg.fisher_max_rows}
    retain_f, n_retain = _fisher(clf, retain, cfg, names, report, "retain")
    if cfg.fisher_data == "retain":
        return [(cfg.lam, retain_f)], report
    forget_f, n_forget = _fisher(clf, ascend, cfg, names, report, "forget")
    report["fisher_combine"] = cfg.fisher_combine
    if cfg.fisher_combine == "sum":
        lam_forget = cfg.lam if cfg.lam_forget is None else cfg.lam_forget
        report["lam_forget"] = lam_forget
        return [(cfg.lam, retain_f), (lam_forget, forget_f)], report
    pooled = {n: (n_retain * retain_f[n] + n_forget * forget_f[n]) / (n_retain + n_forget) for n in names}
    return [(cfg.lam, pooled)], report


def _fisher(clf: Classifier, data: Dataset, cfg: LyaConfig, names: list[str], report: dict[str, Any],
            role: str) -> tuple[dict[str, torch.Tensor], int]:
    fisher = diagonal_fisher(clf, data, mode=cfg.fisher_type, max_rows=cfg.fisher_max_rows,
                             estimator=cfg.fisher_estimator, params=names, seed=cfg.seed)
    n_rows = min(len(data), cfg.fisher_max_rows or len(data))
    report[f"fisher_rows_{role}"] = n_rows
    if cfg.fisher_norm == "mean":
        fisher, mean = normalise_by_mean(fisher)
        report[f"fisher_mean_{role}"] = mean
    return fisher, n_rows


@UNLEARN_METHODS.register("lya")
class Lya(UnlearnMethod[LyaConfig]):
    """LYA (reconstructed): gradient ascent on the forget set + EWC anchored at the suspect."""

    name = "lya"
    config_class = LyaConfig

    def _unlearn(self, inputs: UnlearnInputs, work_dir: Path | None) -> UnlearnResult:
        cfg, clf = self.config, inputs.suspect
        clf.model.to(make_accelerator(cfg.train).device)  # the Fisher on the device the loop will use
        plan = plan_ascent(inputs.forget, inputs.retain, cfg)
        names = scope_names(clf.model, cfg.scope)
        terms, fisher_report = fisher_terms(clf, inputs.retain, plan.ascend, cfg, names)
        penalty = EwcPenalty(anchor_of(clf.model, names), combine_terms(terms))
        report = run_ascent(clf, plan, cfg, penalty)
        return UnlearnResult(clf, {"method": self.name, "reconstructed": True, "lam": cfg.lam, **fisher_report,
                                   **report})
