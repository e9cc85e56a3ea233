"""Vanilla gradient ascent (``docs/methods/lya.md`` §8): LYA with λ = 0. Same splits, optimiser, stopping rules
and checkpoint choice (:mod:`unbackdoor.training.ascent`), no EWC term. Pure ascent on
cross-entropy is unbounded: the stopping rules are what keeps the model from collapsing."""

from __future__ import annotations

from pathlib import Path

from unbackdoor.training.ascent import AscentConfig, plan_ascent, run_ascent
from unbackdoor.unlearn.base import UNLEARN_METHODS, UnlearnInputs, UnlearnMethod, UnlearnResult


@UNLEARN_METHODS.register("gradient-ascent")
class GradientAscent(UnlearnMethod[AscentConfig]):
    """Ascend on the forget set's cross-entropy until the stopping rules end it."""

    name = "gradient-ascent"
    config_class = AscentConfig

    def _unlearn(self, inputs: UnlearnInputs, work_dir: Path | None) -> UnlearnResult:
        plan = plan_ascent(inputs.forget, inputs.retain, self.config)
        report = run_ascent(inputs.suspect, plan, self.config)
        return UnlearnResult(inputs.suspect, {"method": self.name, **report})
