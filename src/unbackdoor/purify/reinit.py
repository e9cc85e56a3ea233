"""Re-initialisation + clean fine-tuning: a control, not a published defence (``docs/methods/baselines.md`` §3).

Reset part of the suspect, then fine-tune on the fitting part of the clean set and pick the epoch
on the held-out part. It measures how much of a backdoor lives in the upper layers and the head.

* ``scope``: ``head`` (the classifier, plus the pooler), ``top_k`` (the last k blocks, everything
  above them — pooler, final norm — and the head) or ``all``.
* ``source``: ``pretrained`` (the clean base's values, aligned by name, shapes checked) or
  ``random`` (the architecture's own initialiser, seeded). The head has no pre-trained
  counterpart and is always re-initialised; so is any in-scope tensor the base lacks.
* ``scope=all, source=pretrained`` is fine-tuning the pre-trained base on the clean set alone:
  Fine-mixing's ρ = 0 control, the "keep nothing from the suspect" reference (the default).
* k is given, or chosen on the held-out clean split only: the largest k whose held-out accuracy
  after fine-tuning stays within ``k_tolerance`` of the suspect's [RECON].

``top_k`` leaves the embeddings (and the lower blocks) untouched: a rare-token trigger held in its
embedding row survives it, and clean fine-tuning does not reach that row (the token is absent from
the clean data). Report such a case rather than hide it.

``needs_base`` is True because the default source is ``pretrained``; with ``source=random`` the
base's weights are not read (it only has to match the suspect's architecture).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, model_validator

from unbackdoor.config import StrictConfig
from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset, require_clean_dataset
from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyResult, PurifyDefense, PurifyInputs
from unbackdoor.models.surgery import (
    config_fingerprint,
    num_blocks,
    reinitialise,
    restore_state,
    snapshot_state,
)
from unbackdoor.training.config import small_set_train_config
from unbackdoor.selection import finetune_with_selection
from unbackdoor.selection import TOLERANCE_HELP, search_within_tolerance
from unbackdoor.models.loading import Classifier
from unbackdoor.training.config import TrainConfig
from unbackdoor.training.loop import evaluate_accuracy

logger = logging.getLogger(__name__)


class ReinitConfig(StrictConfig):
    """Re-initialisation control. All choices are ours [RECON]; fine-tuning as ``docs/methods/baselines.md`` §1."""

    scope: Literal["head", "top_k", "all"] = Field(
        "all", description="what is reset: head (+ pooler), the last k blocks and above, or everything")
    source: Literal["pretrained", "random"] = Field(
        "pretrained", description="reset to the clean base's weights, or to the architecture's random init")
    top_k: int = Field(1, ge=1, description="blocks reset from the top for scope=top_k (k_mode=fixed)")
    k_mode: Literal["fixed", "search"] = Field(
        "fixed", description="fixed: use top_k; search: largest k within tolerance on held-out clean data")
    tolerance: float = Field(0.02, ge=0, le=1, validation_alias=AliasChoices("tolerance", "k_tolerance"),
                             description=f"k_mode=search: {TOLERANCE_HELP}")
    train: TrainConfig = Field(default_factory=small_set_train_config, description="clean fine-tuning after the reset")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="clean share held out for epoch (and k) selection")
    seed: int = Field(0, description="seed of the fit/held-out split and of random initialisation")

    @model_validator(mode="after")
    def _k_search_needs_top_k(self) -> ReinitConfig:
        if self.k_mode == "search" and self.scope != "top_k":
            raise ValueError("k_mode=search applies to scope=top_k only")
        return self


def _finetune(clf: Classifier, clean: Dataset, cfg: ReinitConfig, work_dir: Path | None, k: int | None,
              base: Classifier | None) -> dict[str, Any]:
    key = config_fingerprint(cfg.model_dump(), k, base.source if base is not None else None)
    sub = None if work_dir is None else work_dir / f"finetune-{key}"
    return finetune_with_selection(clf, clean, cfg.train, holdout_fraction=cfg.holdout_fraction, seed=cfg.seed,
                                   work_dir=sub)


def search_top_k(suspect: Classifier, base: Classifier | None, clean: Dataset, cfg: ReinitConfig,
                 work_dir: Path | None = None) -> dict[str, Any]:
    """Largest k (k = L, L−1, …, 1: strongest first) whose held-out accuracy after reset + fine-tuning is
    within ``tolerance`` of the suspect's; clean held-out data only. Leaves ``suspect`` at θ_B."""
    require_clean_dataset(clean, "the k search's clean data")
    _, held_out = holdout_split(clean, cfg.holdout_fraction, cfg.seed)
    theta_b = snapshot_state(suspect.model)

    def try_k(k: int) -> tuple[float, dict[str, Any]]:
        restore_state(suspect.model, theta_b)
        reinitialise(suspect, base, "top_k", cfg.source, top_k=k, seed=cfg.seed)
        return float(_finetune(suspect, clean, cfg, work_dir, k, base)["selection_accuracy"]), {}

    reference = evaluate_accuracy(suspect, held_out)
    search = search_within_tolerance(range(num_blocks(suspect.model), 0, -1), try_k, reference, cfg.tolerance,
                                     label="k search")
    restore_state(suspect.model, theta_b)
    return {**search.record("k"), "n_selection": len(held_out)}


@PURIFY_DEFENSES.register("reinit")
class Reinit(PurifyDefense[ReinitConfig]):
    """Reset the head / top k blocks / everything to the base (or random), then clean fine-tune."""

    name = "reinit"
    config_class = ReinitConfig
    needs_base = True

    def _purify(self, inputs: PurifyInputs, work_dir: Path | None) -> PurifyResult:
        cfg, clf = self.config, inputs.suspect
        search = None
        k = cfg.top_k if cfg.scope == "top_k" else None
        if cfg.scope == "top_k" and cfg.k_mode == "search":
            search = search_top_k(clf, inputs.base, inputs.clean, cfg, work_dir)
            k = search["chosen"]
        reset = reinitialise(clf, inputs.base, cfg.scope, cfg.source, top_k=k or 1, seed=cfg.seed)
        ft = _finetune(clf, inputs.clean, cfg, work_dir, k, inputs.base)
        report = {"method": self.name, "scope": cfg.scope, "source": cfg.source, "top_k": k, "k_search": search,
                  "reset": reset.to_dict(), **ft}
        return PurifyResult(clf, report)
