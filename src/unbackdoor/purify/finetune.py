"""Clean fine-tuning (FT): the baseline every purification method must beat (``docs/methods/baselines.md`` §1).

From the suspect, train all parameters with cross-entropy on the fitting part of the clean set;
pick the epoch by accuracy on the held-out part (never by poisoned data). With little clean data
FT often leaves much of a backdoor in place; that is what it is here to show.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyResult, PurifyDefense, PurifyInputs
from unbackdoor.selection import finetune_with_selection
from unbackdoor.training.config import TrainConfig, small_set_train_config


class FinetuneConfig(StrictConfig):
    train: TrainConfig = Field(default_factory=small_set_train_config, description="training-loop settings")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of the clean set held out to select the epoch")
    seed: int = Field(0, description="seed of the fit/held-out split")


@PURIFY_DEFENSES.register("finetune")
class CleanFinetune(PurifyDefense[FinetuneConfig]):
    """Fine-tune the suspect on clean data; select the epoch on held-out clean data."""

    name = "finetune"
    config_class = FinetuneConfig

    def _purify(self, inputs: PurifyInputs, work_dir: Path | None) -> PurifyResult:
        report = finetune_with_selection(inputs.suspect, inputs.clean, self.config.train,
                                         holdout_fraction=self.config.holdout_fraction, seed=self.config.seed,
                                         work_dir=work_dir)
        return PurifyResult(inputs.suspect, {"method": self.name, **report})
