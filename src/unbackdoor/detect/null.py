"""Cuts against an empirical null: the defender's clean rows, scored the way the training rows are, show
what a clean training row scores, so the number of clean rows above any cut can be estimated.

:func:`fdr_cut` [OURS]: with n training rows and the clean rows' survival function S(t), a cut at t
expects n·S(t) clean training rows above it; the selection is the longest top list whose estimated
false-discovery share n·S(t)/k stays at most ``fdr`` (an empirical-null false-discovery rule in the
manner of Benjamini-Hochberg's step-up and Efron's empirical null, the clean set being the null sample).
Used by the ``contrast`` detector, per label.
"""

from __future__ import annotations

import torch


def fdr_cut(train: torch.Tensor, clean: torch.Tensor, fdr: float) -> tuple[float, int, float]:
    """The cut for one group of training scores against its clean null (module docstring): the cut (midway
    between the last selected training score and the next), the number selected, and their estimated
    false-discovery share. Nothing is selected without clean rows; higher scores are more suspicious."""
    order = torch.sort(train, descending=True).values
    if len(clean) == 0 or len(order) == 0:
        return float(order[0]) + 1.0 if len(order) else 0.0, 0, 0.0
    null = torch.sort(clean).values
    above = len(null) - torch.searchsorted(null, order, right=False)  # clean rows scoring >= each training score
    expected = len(order) * above.double() / len(null)
    share = expected / torch.arange(1, len(order) + 1, dtype=torch.float64)
    ok = (share <= fdr).nonzero()
    k = int(ok[-1]) + 1 if len(ok) else 0
    if k == 0:
        return float(order[0]) + 1.0, 0, 0.0
    below = float(order[k]) if k < len(order) else float(order[k - 1]) - 1.0
    return (float(order[k - 1]) + below) / 2, k, float(share[k - 1])
