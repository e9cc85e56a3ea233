"""Optimisation helpers shared by several methods: diagonal Fisher estimation (Fine-purifying's
curvature, LYA's EWC penalty)."""

from unbackdoor.optim.fisher import FisherEstimator, FisherMode, diagonal_fisher

__all__ = ["FisherEstimator", "FisherMode", "diagonal_fisher"]
