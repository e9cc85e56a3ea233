"""Clean fine-tuning baseline (``lya.md`` §8): from the suspect, minimise cross-entropy on the
retain set, selecting the epoch on a held-out part of it. It does not use the forget set.

The same procedure and config as the purify ``finetune`` defence
(:class:`~unbackdoor.purify.finetune.FinetuneConfig`), so the two baselines agree.
"""

from __future__ import annotations

from pathlib import Path

from unbackdoor.selection import finetune_with_selection
from unbackdoor.purify.finetune import FinetuneConfig
from unbackdoor.unlearn.base import UNLEARN_METHODS, UnlearnInputs, UnlearnMethod, UnlearnResult


@UNLEARN_METHODS.register("finetune")
class RetainFinetune(UnlearnMethod[FinetuneConfig]):
    """Fine-tune the suspect on the retain set; pick the epoch on held-out retain rows."""

    name = "finetune"
    config_class = FinetuneConfig

    def _unlearn(self, inputs: UnlearnInputs, work_dir: Path | None) -> UnlearnResult:
        cfg = self.config
        report = finetune_with_selection(inputs.suspect, inputs.retain, cfg.train,
                                         holdout_fraction=cfg.holdout_fraction, seed=cfg.seed, work_dir=work_dir)
        return UnlearnResult(inputs.suspect, {"method": self.name, "n_forget_unused": len(inputs.forget), **report})
