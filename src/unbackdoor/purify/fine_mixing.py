"""Fine-mixing-style purification (Zhang et al., Findings of EMNLP 2022; ``docs/methods/fine-mixing.md``).

Two steps [ABS]: mix the suspect's weights θ_B with its clean pre-trained base θ_pre,

    θ_mix = θ_pre + M ⊙ (θ_B − θ_pre),      M_i ∈ {0, 1},

where the seeded random mask M keeps a share ρ of the backdoored weights, then fine-tune θ_mix on
the small clean set, selecting the epoch on a clean held-out split. The method notes' status is
provisional: user-facing text should say "Fine-mixing-style".

**What is mixed** (defaults): every tensor that both checkpoints hold under the same name and shape
in the groups ``embeddings`` (word, position, token-type), ``layernorm`` (every LayerNorm/RMSNorm,
the embedding LayerNorm included), ``encoder`` (attention and feed-forward weights and biases) and
``pooler``. The classification **head** has no pre-trained counterpart and is never mixed: it is
kept from θ_B (``head=keep``) or re-initialised, seeded, with the model's own initialiser
(``head=reinit``); the same holds for any tensor the base lacks. Tied tensors are mixed once.

Faithful vs. ours:

* mixing with the pre-trained weights, then clean fine-tuning: [ABS];
* random mask, ρ = share of θ_B **kept**, ρ = 0.5: [3P-MBD] (a later re-implementation);
* ``granularity=element``: [MEM + RECON], medium; ``tensor`` is our ablation;
* exactly ⌈ρ·d_t⌉ kept per tensor, priorities seeded by (seed, tensor name), masks nested in ρ: [RECON];
* groups (all four) and ``head=keep``: [RECON], low;
* ``selection=drift`` (reset the largest |δ|): [MEM, low] ablation;
* ``rho_mode=search`` (smallest ρ within τ of θ_B's held-out accuracy), its grid and τ: [RECON];
* fine-tuning batch 32, 5 epochs, 8:2 split: [CODE]/[3P-MBD] values, their use here [RECON]; lr 1e-4 for
  MiniLM (measured; the method notes' 2e-5 is BERT-base's), see ``CLEAN_FT_LEARNING_RATE``.

Mixing alone does not clean the embedding rows of rare trigger tokens (they get no gradient from
clean data): pair with E-PUR against rare-word and embedding attacks (``docs/methods/fine-mixing.md`` §10.4).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field, field_validator

from unbackdoor.config import StrictConfig
from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset, require_clean_dataset
from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyResult, PurifyDefense, PurifyInputs
from unbackdoor.errors import ConfigError
from unbackdoor.models.loading import Classifier, check_same_architecture
from unbackdoor.models.surgery import (
    HEAD,
    aligned_parameters,
    config_fingerprint,
    keep_mask_from_priorities,
    parameter_groups,
    random_priorities,
    reinitialise_parameters,
    restore_state,
    snapshot_state,
)
from unbackdoor.training.config import five_epoch_train_config
from unbackdoor.selection import finetune_with_selection
from unbackdoor.selection import TOLERANCE_HELP, Search, search_within_tolerance
from unbackdoor.training.config import TrainConfig
from unbackdoor.training.loop import evaluate_accuracy

logger = logging.getLogger(__name__)

Group = Literal["embeddings", "layernorm", "encoder", "pooler"]
MIXABLE_GROUPS: tuple[Group, ...] = ("embeddings", "layernorm", "encoder", "pooler")
DEFAULT_RHO_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# --------------------------------------------------------------------------------------------------
# Masks (Fine-mixing's step 2)
# --------------------------------------------------------------------------------------------------


def _element_masks(tensors: Sequence[tuple[str, torch.Tensor, torch.Tensor]], rho: float, seed: int,
                   selection: str) -> dict[str, torch.Tensor]:
    masks = {}
    for name, theta_b, theta_pre in tensors:
        if selection == "random":
            prio = random_priorities(name, theta_b.shape, seed)
        else:  # drift: reset the largest |δ| first
            prio = (theta_b.detach().float() - theta_pre.float()).abs().cpu()
        masks[name] = keep_mask_from_priorities(prio, rho)
    return masks


def _tensor_masks(tensors: Sequence[tuple[str, torch.Tensor, torch.Tensor]], rho: float, seed: int,
                  selection: str) -> dict[str, torch.Tensor]:
    """Whole tensors kept or reset: visit tensors in a seeded random order (``drift``: least
    drifted first) and keep each one that still fits in ρ·d kept elements [RECON]."""
    def order_key(item: tuple[str, torch.Tensor, torch.Tensor]) -> float:
        name, theta_b, theta_pre = item
        if selection == "random":
            return float(random_priorities(name, (1,), seed)[0])
        return float((theta_b.detach().float() - theta_pre.float()).abs().mean())

    budget = Fraction(repr(float(rho))) * sum(t.numel() for _, t, _ in tensors)
    kept, masks = 0, {}
    for name, theta_b, _ in sorted(tensors, key=order_key):
        fits = kept + theta_b.numel() <= budget
        kept += theta_b.numel() if fits else 0
        masks[name] = torch.full(theta_b.shape, fits, dtype=torch.bool)
    return masks


@dataclass
class MixReport:
    """What :func:`mix_weights` did: realised kept shares, what was not mixed and why."""

    rho: float
    seed: int
    granularity: str
    selection: str
    head: str
    groups: list[str]
    kept_share: float
    kept_share_by_group: dict[str, float]
    n_mixed_tensors: int
    n_mixed_elements: int
    not_mixed: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_mix_options(rho: float, groups: Sequence[str], granularity: str, selection: str, head: str) -> None:
    if not 0 <= rho <= 1:
        raise ConfigError(f"rho (kept share of the suspect's weights) must be in [0, 1], got {rho}")
    unknown = set(groups) - set(MIXABLE_GROUPS)
    if unknown or not groups:
        raise ConfigError(f"groups must be a non-empty subset of {list(MIXABLE_GROUPS)}, got {list(groups)}")
    allowed = {"granularity": ("element", "tensor"), "selection": ("random", "drift"), "head": ("keep", "reinit")}
    given = {"granularity": granularity, "selection": selection, "head": head}
    for option, value in given.items():
        if value not in allowed[option]:
            raise ConfigError(f"mixing option {option}={value!r}; choose one of {list(allowed[option])}")


def _split_tensors(suspect: Classifier, base: Classifier, groups: Sequence[str]
                   ) -> tuple[list[tuple[str, torch.nn.Parameter, torch.Tensor, str]], dict[str, list[str]]]:
    """Step 1 (Align): mixable (name, θ_B param, θ_pre tensor, group) and the rest, by reason."""
    check_same_architecture(suspect, base)
    group_of = parameter_groups(suspect.model)
    aligned = {name: (param, ref) for name, param, ref in aligned_parameters(suspect, base)}
    mixable, not_mixed = [], {"head": [], "no_base_counterpart": [], "excluded_group": []}
    for name, param in suspect.model.named_parameters():
        group = group_of[name]
        if group == HEAD:
            not_mixed["head"].append(name)
        elif name not in aligned:
            not_mixed["no_base_counterpart"].append(name)
        elif group not in groups:
            not_mixed["excluded_group"].append(name)
        else:
            mixable.append((name, param, aligned[name][1], group))
    return mixable, not_mixed


def _log_tied(model: torch.nn.Module) -> None:
    n_all = sum(1 for _ in model.named_parameters(remove_duplicate=False))
    n_unique = sum(1 for _ in model.named_parameters())
    if n_all != n_unique:
        logger.info("%d tied parameter name(s) share a tensor; each shared tensor is mixed once", n_all - n_unique)


def mixing_masks(
    suspect: Classifier,
    base: Classifier,
    rho: float,
    *,
    seed: int = 0,
    groups: Sequence[str] = MIXABLE_GROUPS,
    granularity: Literal["element", "tensor"] = "element",
    selection: Literal["random", "drift"] = "random",
) -> dict[str, torch.Tensor]:
    """The mask M (True = keep θ_B) for every mixed tensor, without changing any weight."""
    _check_mix_options(rho, groups, granularity, selection, "keep")
    mixable, _ = _split_tensors(suspect, base, groups)
    tensors = [(name, param, ref) for name, param, ref, _ in mixable]
    build = _element_masks if granularity == "element" else _tensor_masks
    return build(tensors, rho, seed, selection)


def mix_weights(
    suspect: Classifier,
    base: Classifier,
    rho: float,
    *,
    seed: int = 0,
    groups: Sequence[str] = MIXABLE_GROUPS,
    granularity: Literal["element", "tensor"] = "element",
    selection: Literal["random", "drift"] = "random",
    head: Literal["keep", "reinit"] = "keep",
) -> MixReport:
    """Step 3 (Mix), in place on ``suspect``: θ_mix = θ_pre + M ⊙ (θ_B − θ_pre).

    Computed by selection (θ_B where M = 1, θ_pre elsewhere), so every element equals exactly one
    of the two; ρ = 1 leaves θ_B bit for bit, ρ = 0 gives θ_pre on every mixed tensor. Reads no
    data. Raises :class:`~unbackdoor.errors.ModelError` on any architecture, vocabulary or shape
    mismatch, before changing anything.
    """
    _check_mix_options(rho, groups, granularity, selection, head)
    mixable, not_mixed = _split_tensors(suspect, base, groups)
    tensors = [(name, param, ref) for name, param, ref, _ in mixable]
    masks = (_element_masks if granularity == "element" else _tensor_masks)(tensors, rho, seed, selection)
    kept_by_group: dict[str, list[int]] = {}
    with torch.no_grad():
        for name, param, ref, group in mixable:
            mask = masks[name].to(param.device)
            param.copy_(torch.where(mask, param, ref.to(param.dtype)))
            counts = kept_by_group.setdefault(group, [0, 0])
            counts[0] += int(mask.sum())
            counts[1] += mask.numel()
    if head == "reinit":
        reinitialise_parameters(suspect.model, not_mixed["head"] + not_mixed["no_base_counterpart"], seed)
    _log_tied(suspect.model)
    kept, total = sum(c[0] for c in kept_by_group.values()), sum(c[1] for c in kept_by_group.values())
    report = MixReport(
        rho=rho, seed=seed, granularity=granularity, selection=selection, head=head, groups=list(groups),
        kept_share=kept / total if total else 0.0,
        kept_share_by_group={g: c[0] / c[1] for g, c in kept_by_group.items()},
        n_mixed_tensors=len(mixable), n_mixed_elements=total, not_mixed=not_mixed,
    )
    logger.info("mixed %d tensors at rho=%.3f: kept share %.4f (%s); head %s", len(mixable), rho,
                report.kept_share, ", ".join(f"{g} {s:.4f}" for g, s in report.kept_share_by_group.items()), head)
    if not_mixed["no_base_counterpart"]:
        logger.warning("not mixed (no counterpart in the base): %s", ", ".join(not_mixed["no_base_counterpart"]))
    return report


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


class FineMixingConfig(StrictConfig):
    """Fine-mixing settings. Faithful: mixing + clean FT [ABS]; random mask, ρ = kept share, 0.5
    [3P-MBD]. Everything else is [RECON] or [MEM] (see the module docstring and ``docs/methods/fine-mixing.md`` §7)."""

    rho: float = Field(0.5, ge=0, le=1,
                       description="share of the suspect's weights KEPT (rho_mode=fixed); 0.5 [3P-MBD]")
    rho_mode: Literal["fixed", "search"] = Field(
        "fixed", description="fixed: use rho; search: smallest grid rho within tolerance of the suspect's "
        "held-out clean accuracy [RECON]")
    rho_grid: tuple[float, ...] = Field(DEFAULT_RHO_GRID,
                                        description="candidate rho values for rho_mode=search [RECON]")
    tolerance: float = Field(0.02, ge=0, le=1, validation_alias=AliasChoices("tolerance", "rho_tolerance"),
                             description=f"rho_mode=search: {TOLERANCE_HELP} [RECON]")
    rho_criterion: Literal["after_ft", "before_ft"] = Field(
        "after_ft",
        description="measure a candidate after clean fine-tuning, or the mixed model alone (cheaper) [RECON]")
    search_full_grid: bool = Field(
        False, description="evaluate every grid value; false stops at the first rho that qualifies (same choice, "
        "fewer fine-tuning runs)")
    granularity: Literal["element", "tensor"] = Field(
        "element", description="one keep/reset decision per scalar [MEM+RECON], or per whole tensor (ablation)")
    selection: Literal["random", "drift"] = Field(
        "random", description="random mask (the method, [3P-MBD]) or reset the largest |θ_B − θ_pre| first "
        "(ablation, [MEM] low)")
    groups: tuple[Group, ...] = Field(MIXABLE_GROUPS, description="parameter groups mixed; the rest keep θ_B [RECON]")
    head: Literal["keep", "reinit"] = Field(
        "keep", description="classification head (no pre-trained counterpart): keep θ_B's or re-initialise [RECON]")
    train: TrainConfig = Field(default_factory=five_epoch_train_config, description="clean fine-tuning after mixing")
    holdout_fraction: float = Field(0.2, gt=0, lt=1,
                                    description="clean share held out for rho and epoch selection (8:2)")
    seed: int = Field(0, description="seed of the mask, the fit/held-out split and a re-initialised head")

    @field_validator("rho_grid")
    @classmethod
    def _grid(cls, grid: tuple[float, ...]) -> tuple[float, ...]:
        if not grid or any(not 0 <= r <= 1 for r in grid):
            raise ValueError("rho_grid must be a non-empty list of values in [0, 1]")
        return tuple(sorted(set(grid)))

    @field_validator("groups")
    @classmethod
    def _groups(cls, groups: tuple[str, ...]) -> tuple[str, ...]:
        if not groups or len(set(groups)) != len(groups):
            raise ValueError("groups must be non-empty and without repeats")
        return groups

    def mix_options(self) -> dict[str, Any]:
        return {"seed": self.seed, "groups": self.groups, "granularity": self.granularity,
                "selection": self.selection, "head": self.head}


# --------------------------------------------------------------------------------------------------
# Setting ρ (``docs/methods/fine-mixing.md`` §5)
# --------------------------------------------------------------------------------------------------


@dataclass
class RhoSearch:
    """The ρ search (:func:`unbackdoor.selection.search_within_tolerance`, smallest ρ first) and the
    chosen candidate's state, kept so that it need not be trained again."""

    search: Search[float]
    criterion: str
    n_selection: int
    chosen_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    chosen_finetune: dict[str, Any] | None = field(default=None, repr=False)
    chosen_mix: MixReport | None = field(default=None, repr=False)

    @property
    def chosen(self) -> float:
        return self.search.chosen

    def to_dict(self) -> dict[str, Any]:
        return {**self.search.record("rho"), "criterion": self.criterion, "n_selection": self.n_selection}


def _run_dir(work_dir: Path | None, label: str, *parts: Any) -> Path | None:
    return None if work_dir is None else work_dir / f"{label}-{config_fingerprint(*parts)}"


def _finetune(clf: Classifier, clean: Dataset, config: FineMixingConfig, work_dir: Path | None) -> dict[str, Any]:
    """Step 5 (Fine-tune): all parameters, clean CE on the fit split, epoch chosen on the held-out split."""
    return finetune_with_selection(clf, clean, config.train, holdout_fraction=config.holdout_fraction,
                                   seed=config.seed, work_dir=work_dir)


def search_rho(
    suspect: Classifier,
    base: Classifier,
    clean: Dataset,
    config: FineMixingConfig,
    work_dir: Path | None = None,
) -> RhoSearch:
    """Choose ρ on a held-out part of the clean set only ([RECON]).

    1. Split ``clean`` 8:2 (seeded, stratified); a_B = θ_B's held-out accuracy.
    2. For each ρ in the grid, ascending (strongest reset first): mix (same seed, nested masks),
       fine-tune on the fit part (``after_ft``) or not (``before_ft``), measure held-out accuracy.
    3. The smallest ρ with accuracy ≥ a_B − τ; else the most accurate (ties → smaller ρ).

    ``suspect`` is restored to θ_B before returning; with ``after_ft`` the chosen candidate's
    fine-tuned state is kept in the result so it need not be trained again.
    """
    require_clean_dataset(clean, "the rho search's clean data")
    _, held_out = holdout_split(clean, config.holdout_fraction, config.seed)
    theta_b = snapshot_state(suspect.model)
    tried: dict[float, tuple[dict[str, Any] | None, MixReport]] = {}
    kept: dict[float, dict[str, torch.Tensor]] = {}  # the current best guess's fine-tuned state (after_ft)

    def try_rho(rho: float) -> tuple[float, dict[str, Any]]:
        restore_state(suspect.model, theta_b)
        mix = mix_weights(suspect, base, rho, **config.mix_options())
        ft = None
        if config.rho_criterion == "after_ft":
            ft = _finetune(suspect, clean, config, _run_dir(work_dir, "search", config.model_dump(), rho, base.source))
            acc = float(ft["selection_accuracy"])
        else:
            acc = evaluate_accuracy(suspect, held_out)
        tried[rho] = (ft, mix)
        return acc, {"kept_share": mix.kept_share, "selected_epoch": ft["selected_epoch"] if ft else None}

    def keep(rho: float) -> None:
        if tried[rho][0] is not None:
            kept.clear()
            kept[rho] = snapshot_state(suspect.model)

    reference = evaluate_accuracy(suspect, held_out)
    search = search_within_tolerance(config.rho_grid, try_rho, reference, config.tolerance,
                                     exhaustive=config.search_full_grid, on_choice=keep, label="rho search")
    restore_state(suspect.model, theta_b)
    if search.chosen not in kept:
        return RhoSearch(search, config.rho_criterion, len(held_out))
    ft, mix = tried[search.chosen]
    return RhoSearch(search, config.rho_criterion, len(held_out), kept[search.chosen], ft, mix)


# --------------------------------------------------------------------------------------------------
# The defence
# --------------------------------------------------------------------------------------------------


@PURIFY_DEFENSES.register("fine-mixing")
class FineMixing(PurifyDefense[FineMixingConfig]):
    """Fine-mixing-style: mix θ_B with θ_pre under a seeded random mask keeping ρ, then clean FT."""

    name = "fine-mixing"
    config_class = FineMixingConfig
    needs_base = True

    def _purify(self, inputs: PurifyInputs, work_dir: Path | None) -> PurifyResult:
        cfg, clf, base = self.config, inputs.suspect, inputs.base
        assert base is not None  # guaranteed by needs_base; PurifyInputs checked the architecture (step 1)
        search = search_rho(clf, base, inputs.clean, cfg, work_dir) if cfg.rho_mode == "search" else None
        rho = search.chosen if search is not None else cfg.rho
        if search is not None and search.chosen_state is not None:
            restore_state(clf.model, search.chosen_state)  # the chosen candidate, already fine-tuned
            mix, ft = search.chosen_mix, search.chosen_finetune
        else:
            mix = mix_weights(clf, base, rho, **cfg.mix_options())
            ft = _finetune(clf, inputs.clean, cfg, _run_dir(work_dir, "finetune", cfg.model_dump(), rho, base.source))
        assert mix is not None and ft is not None
        report = {
            "method": self.name,
            "rho": rho,
            "rho_mode": cfg.rho_mode,
            "rho_search": search.to_dict() if search is not None else None,
            "groups": list(cfg.groups),
            "head": cfg.head,
            "granularity": cfg.granularity,
            "selection": cfg.selection,
            "mask_seed": cfg.seed,
            "finetune_seed": cfg.train.seed,
            "mixing": mix.to_dict(),
            **ft,
        }
        return PurifyResult(clf, report)
