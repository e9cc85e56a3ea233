"""Optimisation helpers shared by several methods: diagonal Fisher estimation (Fine-purifying's
curvature, LYA's EWC penalty) and multilevel optimisation by unrolled lower levels (reweighting)."""

from unbackdoor.optim.fisher import FisherEstimator, FisherMode, diagonal_fisher
from unbackdoor.optim.multilevel import Level, box_projection, hypergradient, l2_ball_projection, solve, unroll

__all__ = ["FisherEstimator", "FisherMode", "Level", "box_projection", "diagonal_fisher", "hypergradient",
           "l2_ball_projection", "solve", "unroll"]
