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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, model_validator

from unbackdoor.config import StrictConfig
from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset, require_clean_dataset
from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyResult, PurifyDefense, PurifyInputs
from unbackdoor.models.surgery import (
    HEAD,
    aligned_parameters,
    config_fingerprint,
    layer_index,
    parameter_groups,
    reinitialise_parameters,
    restore_state,
    snapshot_state,
)
from unbackdoor.training.config import small_set_train_config
from unbackdoor.selection import finetune_with_selection
from unbackdoor.selection import TOLERANCE_HELP, search_within_tolerance
from unbackdoor.errors import ConfigError, ModelError
from unbackdoor.models.loading import Classifier, check_same_architecture
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


def num_blocks(model: Any) -> int:
    """The number of transformer blocks (from parameter names)."""
    indices = [i for i in (layer_index(n) for n, _ in model.named_parameters()) if i is not None]
    if not indices:
        raise ModelError(f"{type(model).__name__}: no numbered transformer blocks found")
    return max(indices) + 1


def scope_parameters(model: Any, scope: str, top_k: int = 1) -> list[str]:
    """Names of the parameters a scope resets, in model order.

    ``head``: head + pooler. ``top_k``: blocks ≥ L − k, every parameter after the last block
    (pooler, final norm) and the head. ``all``: every parameter.
    """
    names = [n for n, _ in model.named_parameters()]
    if scope == "all":
        return names
    groups = parameter_groups(model)
    if scope == "head":
        return [n for n in names if groups[n] in (HEAD, "pooler")]
    if scope != "top_k":
        raise ConfigError(f"unknown reinit scope {scope!r}")
    n_blocks = num_blocks(model)
    if top_k > n_blocks:
        raise ConfigError(f"top_k={top_k} but the model has {n_blocks} blocks")
    last_block_pos = max(i for i, n in enumerate(names) if layer_index(n) is not None)
    chosen = []
    for pos, name in enumerate(names):
        idx = layer_index(name)
        if (idx is not None and idx >= n_blocks - top_k) or pos > last_block_pos or groups[name] == HEAD:
            chosen.append(name)
    return chosen


@dataclass
class ResetReport:
    """What :func:`reinitialise` did."""

    scope: str
    source: str
    top_k: int | None
    n_from_base: int
    n_random: int
    random_names: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reinitialise(suspect: Classifier, base: Classifier | None, scope: str, source: str, *, top_k: int = 1,
                 seed: int = 0) -> ResetReport:
    """Reset ``suspect``'s parameters in ``scope`` in place: to ``base`` (``pretrained``) or random.

    The head, and any tensor the base lacks, is always re-initialised (seeded, model's initialiser).
    """
    names = scope_parameters(suspect.model, scope, top_k)
    from_base: dict[str, Any] = {}
    if source == "pretrained":
        if base is None:
            raise TypeError("source=pretrained needs the clean base model")
        check_same_architecture(suspect, base)
        groups = parameter_groups(suspect.model)
        aligned = {name: (param, ref) for name, param, ref in aligned_parameters(suspect, base)}
        from_base = {n: aligned[n] for n in names if n in aligned and groups[n] != HEAD}
    elif source != "random":
        raise ConfigError(f"unknown reinit source {source!r}")
    for param, ref in from_base.values():
        param.data.copy_(ref.to(param.dtype))
    random_names = [n for n in names if n not in from_base]
    reinitialise_parameters(suspect.model, random_names, seed)
    report = ResetReport(scope, source, top_k if scope == "top_k" else None, len(from_base), len(random_names),
                         random_names)
    logger.info("reinit %s from %s: %d tensors from the base, %d re-initialised", scope, source,
                report.n_from_base, report.n_random)
    return report


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
