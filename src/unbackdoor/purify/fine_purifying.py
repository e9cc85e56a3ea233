"""Fine-purifying-style (δ²/F) purification (``docs/methods/fine-purifying.md``; Zhang et al., Findings of ACL 2023).

Find the *poisonous dimensions* (single scalar parameters) from the drift δ = θ_B − θ_pre of the
suspect θ_B away from its clean pre-trained base θ_pre, weighed against a diagonal curvature
estimate F (empirical Fisher on the clean set); reset the top-ranked dimensions to θ_pre; then
fine-tune on the clean set, selecting the epoch on a held-out clean split.

Steps (``docs/methods/fine-purifying.md`` §4), one function each:

1. **Align** θ_B and θ_pre by name and shape (:func:`scored_tensors`);
3. **Fisher** F on the clean fit split at θ_B, or along θ_pre → θ_B (:func:`clean_fisher`);
4. **Indicator** r_i per dimension (:func:`indicator_values`), δ from :func:`parameter_drift`;
5. **Select** the d − ⌈ρ·d⌉ highest r_i per tensor (default, measured on MiniLM) or globally
   (the method notes' [RECON] default) (:func:`reset_masks`);
6. **Purify**: θ_i = θ_pre,i on the selected dimensions, θ_B,i elsewhere (:func:`apply_reset`);
7. **Fine-tune** on clean data with held-out epoch selection (``finetune_with_selection``);
8. **Report**: indicator, ε, ρ, dims reset, their spread over tensors and layers
   (:func:`summarise_reset`, :func:`top_dimensions_by_layer`).

Step 2 (E-PUR first) is the ``--epur`` composition (:func:`unbackdoor.purify.base.epur_first`), which
resets E-PUR's suspicious embedding rows before this method runs.

**The indicator is not confirmed against the paper** (``docs/methods/fine-purifying.md`` §5, §15). All the method notes' candidates are
named options; the default ``ratio`` r_i = δ_i²/(F_i + ε) is the method notes' best-supported reading (a
diffusion-theory check and a clean-loss Taylor argument both rank this way, §5.1), *not* a
measured choice: measurements on MiniLM victims come later and may change it. Call it
"Fine-purifying-style (δ²/F)" in user-facing text.

What is scored (``docs/methods/fine-purifying.md`` §4, docs/methods/fine-mixing.md §4.3): tensors present in both checkpoints, in the groups
``embeddings``, ``layernorm``, ``encoder``, ``pooler`` (all by default). The task head has no
pre-trained counterpart: ``head=keep`` (default) leaves θ_B's head out of scoring and untouched;
``head=reinit`` scores it as drift from a seeded fresh initialisation (reset entries take the fresh
values). The same rule covers any tensor of θ_B that the base lacks. The reset ratio follows
Fine-mixing: ``rho`` is the **kept** share of suspect weights (reset fraction 1 − ρ); ρ = 1 keeps
θ_B, ρ = 0 gives θ_pre on every scored tensor.

Selection is exact: d − ⌈ρ·d⌉ dimensions (Fine-mixing's count), found with one ``kthvalue``; ties
at the threshold keep the earlier flat positions and reset the later ones, as Fine-mixing's stable
sort does, so ``indicator=random, scope=per_tensor`` and the same seed give Fine-mixing's mask bit
for bit (the method notes' §7 sentence "the first needed ties in flat order" would reset the earlier ones;
we follow Fine-mixing so the two methods differ only in the score).

Only clean data enters: the Fisher, the indicator and the ρ search take a
:class:`~unbackdoor.data.Dataset` and nothing with poison flags, triggers or triggered rows.

Section numbers (§) cite ``docs/methods/fine-purifying.md``, the method notes in this repository.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field, model_validator

from unbackdoor.config import StrictConfig
from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset, require_clean_dataset
from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyResult, PurifyDefense, PurifyInputs
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.models.loading import Classifier, check_same_architecture
from unbackdoor.models.surgery import (
    HEAD,
    aligned_parameters,
    config_fingerprint,
    fresh_values,
    kept_count,
    parameter_groups,
    random_priorities,
    restore_state,
    snapshot_state,
)
from unbackdoor.training.config import five_epoch_train_config
from unbackdoor.selection import finetune_with_selection
from unbackdoor.selection import TOLERANCE_HELP, search_within_tolerance
from unbackdoor.optim.fisher import FisherEstimator, FisherMode, diagonal_fisher
from unbackdoor.training.config import TrainConfig
from unbackdoor.training.loop import evaluate_accuracy
from unbackdoor.utils.resources import Stopwatch

logger = logging.getLogger(__name__)

Indicator = Literal["ratio", "drift", "curvature", "product", "random"]
Scope = Literal["global", "per_tensor"]
ParamGroup = Literal["embeddings", "layernorm", "encoder", "pooler"]
ALL_GROUPS: tuple[ParamGroup, ...] = ("embeddings", "layernorm", "encoder", "pooler")
POWER_BETA = {"ratio": -1.0, "drift": 0.0, "product": 1.0}  # r = δ²·(F+ε)^β (``docs/methods/fine-purifying.md`` §5.2)
RHO_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class FinePurifyingConfig(StrictConfig):
    """Options of Fine-purifying; provenance of each default in ``docs/methods/fine-purifying.md`` §10."""

    indicator: Indicator = Field(
        "ratio",
        description="per-dimension score: ratio = δ²/(F+ε) (default, method notes' best-supported reading, unconfirmed); "
        "drift = δ² (same ranking as |δ|); curvature = 1/(F+ε); product = δ²·F (expected to fail, ablation); "
        "random = seeded U(0,1) priorities (Fine-mixing's mask)",
    )
    beta: float | None = Field(
        None, description="sweep exponent β of r = δ²·(F+ε)^β, replacing the fixed β of ratio (−1), drift (0) "
        "or product (+1); null = the indicator's own β",
    )
    epsilon_scale: float = Field(1e-8, gt=0, description="ε = epsilon_scale × mean(F) over scored dimensions")
    fisher_mode: FisherMode = Field(
        "empirical", description="labels in the Fisher: empirical (true labels), sampled (y ~ p_θ), true (exact expectation)"
    )
    fisher_estimator: FisherEstimator = Field(
        "loop", description="per-example gradients by a batch-of-one loop (any model) or torch.func vmap"
    )
    fisher_max_rows: int | None = Field(None, ge=1, description="cap on clean rows for the Fisher (null = all fit rows)")
    h_point: Literal["ft", "path"] = Field(
        "ft", description="where F is estimated: ft = at θ_B; path = mean over points on θ_pre → θ_B (θ_B's head)"
    )
    path_points: int = Field(3, ge=2, description="points α ∈ linspace(0, 1) on the path for h_point=path")
    scope: Scope = Field("per_tensor", description="reset the same share of every tensor (default: measured on "
                         "MiniLM, where global ranking spends the budget on F=0 embedding rows: ASR 99.5% vs 72.7% "
                         "per tensor on the BadNets clean-label victim, 1% clean set), or rank all dimensions together "
                         "(global, the method notes' [RECON] default)")
    rho: float = Field(0.5, ge=0, le=1, description="kept share of suspect weights as in Fine-mixing; reset fraction = 1 − rho")
    rho_mode: Literal["fixed", "search"] = Field(
        "fixed", description="use rho, or pick the smallest rho from rho_grid that keeps held-out clean accuracy"
    )
    rho_grid: tuple[float, ...] = Field(RHO_GRID, min_length=1, description="candidate rho values for rho_mode=search")
    tolerance: float = Field(0.02, ge=0, le=1, validation_alias=AliasChoices("tolerance", "rho_tolerance"),
                             description=f"rho_mode=search: {TOLERANCE_HELP}")
    rho_criterion: Literal["after_ft", "before_ft"] = Field(
        "after_ft", description="search: measure held-out accuracy after clean fine-tuning, or right after the reset"
    )
    groups: tuple[ParamGroup, ...] = Field(ALL_GROUPS, min_length=1, description="parameter groups eligible for scoring and reset")
    head: Literal["keep", "reinit"] = Field(
        "keep", description="task head (no pre-trained counterpart): keep θ_B's, or score it as drift from a fresh init"
    )
    train: TrainConfig = Field(default_factory=five_epoch_train_config, description="clean fine-tuning settings")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of the clean set held out for epoch and rho selection")
    seed: int = Field(0, description="seed of the fit/held-out split, the random indicator, sampled labels and a fresh head")

    @model_validator(mode="after")
    def _check(self) -> FinePurifyingConfig:
        if self.beta is not None and self.indicator not in POWER_BETA:
            raise ValueError(f"beta applies to the indicators {', '.join(POWER_BETA)}, not {self.indicator!r}")
        if any(not 0 <= r <= 1 for r in self.rho_grid):
            raise ValueError("every rho_grid value must lie in [0, 1]")
        if len(set(self.groups)) != len(self.groups):
            raise ValueError("groups lists a group twice")
        return self

    @property
    def effective_beta(self) -> float | None:
        """β of the δ²·(F+ε)^β family, or None for curvature/random."""
        return self.beta if self.beta is not None else POWER_BETA.get(self.indicator)


# --------------------------------------------------------------------------- step 1: align
def tensor_layer(model: torch.nn.Module, name: str) -> str:
    """The layer a parameter sits in: ``encoder.layer.3``, ``embeddings``, ``pooler``, ``classifier``."""
    prefix = getattr(model, "base_model_prefix", "")
    parts = name.split(".")
    if prefix and parts[0] == prefix:
        parts = parts[1:]
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else name


def scored_tensors(
    suspect: Classifier, base: Classifier, groups: tuple[str, ...] = ALL_GROUPS, head: str = "keep", seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Step 1: the eligible tensors with the reference θ_pre a reset writes, and their groups (model order).

    Tensors of the chosen groups present in both models (architecture, vocabulary and shapes are
    checked first); with ``head=reinit`` also the head and any tensor the base lacks (group
    ``head``), referenced to a seeded fresh initialisation.
    """
    check_same_architecture(suspect, base)
    aligned = {name: ref for name, _, ref in aligned_parameters(suspect, base)}
    model = suspect.model
    group_of = {n: HEAD if n not in aligned else g for n, g in parameter_groups(model).items()}
    headless = [n for n, g in group_of.items() if g == HEAD]
    fresh: dict[str, torch.Tensor] = {}
    if head == "reinit" and headless:
        logger.info("head=reinit: scoring %s against a fresh initialisation", ", ".join(headless))
        fresh = fresh_values(suspect.model, headless, seed)
    elif headless:
        logger.info("head=keep: %s kept from the suspect, not scored", ", ".join(headless))
    chosen = {n: g for n, g in group_of.items() if g in groups or n in fresh}
    if not chosen:
        raise ConfigError(f"no parameters to score with groups={list(groups)} and head={head}")
    return {n: fresh[n] if n in fresh else aligned[n] for n in chosen}, chosen


# --------------------------------------------------------------------------- step 4 input: drift
def parameter_drift(suspect: Classifier, reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """δ = θ_B − θ_pre (fp32) for every scored tensor."""
    params = dict(suspect.model.named_parameters())
    return {n: params[n].detach().float() - ref.float() for n, ref in reference.items()}


# --------------------------------------------------------------------------- step 3: Fisher
def clean_fisher(
    suspect: Classifier,
    clean: Dataset,
    reference: Mapping[str, torch.Tensor],
    config: FinePurifyingConfig,
    *,
    head_names: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """Step 3: diagonal Fisher of the scored tensors on clean data, at θ_B or averaged along the path.

    On the path θ_pre → θ_B, ``head_names`` (tensors without a pre-trained counterpart) stay at θ_B.
    """
    require_clean_dataset(clean, "the Fisher's clean data")
    kwargs: dict[str, Any] = {"mode": config.fisher_mode, "estimator": config.fisher_estimator,
                              "max_rows": config.fisher_max_rows, "params": list(reference), "seed": config.seed}
    if config.h_point == "ft":
        return diagonal_fisher(suspect, clean, **kwargs)
    alphas = torch.linspace(0, 1, config.path_points).tolist()
    path_names = [n for n in reference if n not in set(head_names)]
    total: dict[str, torch.Tensor] | None = None
    for alpha in alphas:
        with _on_path(suspect, reference, path_names, alpha):
            fisher = diagonal_fisher(suspect, clean, **kwargs)
        total = fisher if total is None else {n: total[n] + fisher[n] for n in total}
    assert total is not None
    return {n: t / len(alphas) for n, t in total.items()}


@contextmanager
def _on_path(suspect: Classifier, reference: Mapping[str, torch.Tensor], names: list[str], alpha: float) -> Iterator[None]:
    """Temporarily set ``names`` to θ_pre + α·(θ_B − θ_pre) (exact at α = 0 and 1); restore θ_B."""
    params = dict(suspect.model.named_parameters())
    saved = {n: params[n].detach().clone() for n in names}
    with torch.no_grad():
        for n in names:
            ref = reference[n].to(params[n].dtype)
            point = ref if alpha == 0 else saved[n] if alpha == 1 else ref + alpha * (saved[n] - ref)
            params[n].copy_(point)
    try:
        yield
    finally:
        with torch.no_grad():
            for n in names:
                params[n].copy_(saved[n])


# --------------------------------------------------------------------------- step 4: indicator
def fisher_epsilon(fisher: Mapping[str, torch.Tensor], scale: float = 1e-8) -> float:
    """ε = scale × mean(F) over all scored dimensions; an all-zero Fisher is an error."""
    total = sum(float(f.double().sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    if count == 0 or total <= 0:
        raise DataError("the clean set produced no gradient on the scored parameters (mean Fisher is 0)")
    return scale * total / count


def indicator_values(
    drift: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor] | None,
    *,
    indicator: Indicator = "ratio",
    beta: float | None = None,
    epsilon: float | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Step 4: r_i per dimension (float64), higher = reset first (``docs/methods/fine-purifying.md`` §5.2).

    ``ratio`` δ²/(F+ε), ``drift`` δ², ``product`` δ²·(F+ε) are r = δ²·(F+ε)^β with β = −1, 0, +1
    (``beta`` overrides β); ``curvature`` 1/(F+ε); ``random`` seeded U(0, 1) priorities. ``epsilon``
    defaults to :func:`fisher_epsilon`.
    """
    if indicator == "random":
        return {n: random_priorities(n, d.shape, seed).to(d.device, torch.float64) for n, d in drift.items()}
    if indicator == "drift" and beta in (None, 0.0):
        return {n: d.double().square() for n, d in drift.items()}
    if fisher is None:
        raise ValueError(f"indicator {indicator!r} needs the Fisher")
    eps = fisher_epsilon(fisher) if epsilon is None else epsilon
    if indicator == "curvature":
        return {n: 1.0 / (fisher[n].double() + eps) for n in drift}
    if indicator not in POWER_BETA:
        raise ValueError(f"unknown indicator {indicator!r}")
    b = POWER_BETA[indicator] if beta is None else beta
    return {n: d.double().square() * (fisher[n].double() + eps).pow(b) for n, d in drift.items()}


@dataclass
class DimensionScores:
    """Steps 1–4 on one suspect: what each scored tensor is reset to, δ, F and the indicator."""

    scores: dict[str, torch.Tensor]
    drift: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor] | None
    reference: dict[str, torch.Tensor]
    groups: dict[str, str]
    layers: dict[str, str]
    indicator: str
    beta: float | None
    epsilon: float | None
    n_fisher_rows: int

    @property
    def n_dimensions(self) -> int:
        return sum(s.numel() for s in self.scores.values())


def score_dimensions(
    suspect: Classifier, base: Classifier, clean: Dataset, config: FinePurifyingConfig | None = None
) -> DimensionScores:
    """Steps 1, 3, 4: align, estimate F on ``clean`` (clean labelled rows only), score every dimension.

    ``clean`` is the whole Fisher set: the defence passes its fit split; ``unbackdoor scan`` may
    pass the user's whole clean set.
    """
    require_clean_dataset(clean, "the indicator's clean data")
    config = config or FinePurifyingConfig()
    reference, groups = scored_tensors(suspect, base, config.groups, config.head, config.seed)  # step 1
    drift = parameter_drift(suspect, reference)
    fisher, epsilon, n_rows = None, None, 0
    if config.effective_beta not in (None, 0.0) or config.indicator == "curvature":  # random, drift: no F
        heads = [n for n, g in groups.items() if g == HEAD]
        fisher = clean_fisher(suspect, clean, reference, config, head_names=heads)  # step 3
        epsilon = fisher_epsilon(fisher, config.epsilon_scale)
        n_rows = min(len(clean), config.fisher_max_rows or len(clean))
    scores = indicator_values(drift, fisher, indicator=config.indicator, beta=config.beta,  # step 4
                              epsilon=epsilon, seed=config.seed)
    layers = {n: tensor_layer(suspect.model, n) for n in reference}
    return DimensionScores(scores, drift, fisher, reference, groups, layers, config.indicator,
                           config.effective_beta, epsilon, n_rows)


# --------------------------------------------------------------------------- step 5: select
def n_reset(size: int, rho: float) -> int:
    """d − ⌈ρ·d⌉ dimensions to reset (ρ = kept share), exact for decimal ρ (0.3 · 10 keeps 3, not 4),
    the same count as Fine-mixing's ``kept_count``."""
    return size - kept_count(rho, size)


def _top_k_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly the ``k`` largest entries of a 1-D tensor (one selection, no full sort).

    Ties at the threshold: the *earlier* flat positions are kept and the later ones reset, i.e. the
    kept set is the first d − k of a stable ascending sort. This matches Fine-mixing's
    ``keep_mask_from_priorities`` so that ``indicator=random, scope=per_tensor`` reproduces its mask
    bit for bit (see the module docstring).
    """
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= flat.numel():
        return ~mask
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values  # the k-th largest value
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing:
        ties = torch.nonzero(flat == threshold).flatten()
        mask[ties[ties.numel() - missing :]] = True
    return mask


def reset_masks(scores: Mapping[str, torch.Tensor], rho: float, scope: Scope = "global") -> dict[str, torch.Tensor]:
    """Step 5: boolean masks (True = reset to θ_pre) over the highest-scoring dimensions.

    ``global``: d − ⌈ρ·d⌉ over all scored dimensions; ``per_tensor``: d_t − ⌈ρ·d_t⌉ in each tensor.
    Deterministic: score, then flat position (model order; later positions reset first) break ties.
    """
    if not 0 <= rho <= 1:
        raise ConfigError(f"rho must lie in [0, 1], got {rho}")
    if scope == "per_tensor":
        return {n: _top_k_mask(s.flatten(), n_reset(s.numel(), rho)).view(s.shape) for n, s in scores.items()}
    if scope != "global":
        raise ConfigError(f"unknown scope {scope!r}; choose global or per_tensor")
    flat = torch.cat([s.flatten() for s in scores.values()]) if scores else torch.zeros(0)
    chosen = _top_k_mask(flat, n_reset(flat.numel(), rho))
    masks, start = {}, 0
    for n, s in scores.items():
        masks[n] = chosen[start : start + s.numel()].view(s.shape)
        start += s.numel()
    return masks


# --------------------------------------------------------------------------- step 6: purify
def apply_reset(suspect: Classifier, reference: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> int:
    """Step 6: θ_i = θ_pre,i where the mask is set, θ_B,i elsewhere, by selection (bit-exact, dtype kept).

    Returns the number of dimensions reset.
    """
    params = dict(suspect.model.named_parameters())
    count = 0
    with torch.no_grad():
        for name, mask in masks.items():
            p = params[name]
            p.copy_(torch.where(mask.to(p.device), reference[name].to(p.device, p.dtype), p))
            count += int(mask.sum())
    return count


# --------------------------------------------------------------------------- step 8: report
def summarise_reset(masks: Mapping[str, torch.Tensor], scores: DimensionScores) -> dict[str, Any]:
    """Where the selected dimensions sit: per tensor, per layer, per group, and the F = 0 budget share."""
    sizes = {n: m.numel() for n, m in masks.items()}
    chosen = {n: int(m.sum()) for n, m in masks.items()}
    total = sum(chosen.values())

    def share(part: int, whole: int) -> float:
        return part / whole if whole else 0.0

    def rollup(key: Mapping[str, str]) -> list[dict[str, Any]]:
        rows: dict[str, list[int]] = {}
        for n in masks:
            acc = rows.setdefault(key[n], [0, 0])
            acc[0] += chosen[n]
            acc[1] += sizes[n]
        return [{"name": k, "n_selected": c, "size": s, "share_of_selected": share(c, total), "share_of_part": share(c, s)}
                for k, (c, s) in rows.items()]

    zero_fisher = None
    if scores.fisher is not None and total:
        zero_fisher = sum(int((masks[n] & (scores.fisher[n] == 0).to(masks[n].device)).sum()) for n in masks) / total
    return {
        "n_scored": sum(sizes.values()),
        "n_selected": total,
        "selected_share": share(total, sum(sizes.values())),
        "zero_fisher_share_of_selected": zero_fisher,
        "by_group": rollup(scores.groups),
        "by_layer": rollup(scores.layers),
        "by_tensor": [{"name": n, "group": scores.groups[n], "layer": scores.layers[n], "n_selected": chosen[n],
                       "size": sizes[n], "share_of_selected": share(chosen[n], total),
                       "share_of_part": share(chosen[n], sizes[n])} for n in masks],
    }


def top_dimensions_by_layer(scores: DimensionScores, *, fraction: float = 0.01, scope: Scope = "global") -> dict[str, Any]:
    """Per layer and per matrix, the share of the top ``fraction`` of dimensions by the indicator.

    For ``unbackdoor scan`` (``docs/methods/fine-purifying.md`` §7: a fixed 1 % by default). ``scores`` comes from
    :func:`score_dimensions`. Same selection rule as the reset (``reset_masks`` with ρ = 1 − fraction),
    so the top is ⌊fraction·d⌋ dimensions. Usage::

        scores = score_dimensions(suspect, base, clean)       # clean: a Dataset, nothing else
        summary = top_dimensions_by_layer(scores)              # JSON-ready: by_layer, by_tensor, by_group
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must lie in (0, 1], got {fraction}")
    masks = reset_masks(scores.scores, float(1 - Fraction(repr(float(fraction)))), scope)
    return {"indicator": scores.indicator, "beta": scores.beta, "fraction": fraction, "scope": scope,
            **summarise_reset(masks, scores)}


# --------------------------------------------------------------------------- ρ search (``docs/methods/fine-purifying.md`` §8)
def search_rho(
    suspect: Classifier,
    clean: Dataset,
    scores: DimensionScores,
    config: FinePurifyingConfig,
) -> tuple[float, dict[str, Any], dict[str, Any] | None]:
    """The smallest ρ in the grid whose held-out clean accuracy is ≥ the suspect's − tolerance
    (:func:`unbackdoor.selection.search_within_tolerance`, strongest reset first: masks are nested);
    if none does, the most accurate (ties → smaller ρ). Only the clean held-out split is read.
    Returns (ρ, search record, fine-tuning report of the chosen ρ when ``after_ft`` left the model in
    that state, else None with the suspect restored)."""
    require_clean_dataset(clean, "the rho search's clean data")
    _, held_out = holdout_split(clean, config.holdout_fraction, config.seed)
    original = snapshot_state(suspect.model)
    finetuned: dict[float, dict[str, Any]] = {}
    kept: dict[float, dict[str, torch.Tensor]] = {}

    def try_rho(rho: float) -> tuple[float, dict[str, Any]]:
        restore_state(suspect.model, original)
        apply_reset(suspect, scores.reference, reset_masks(scores.scores, rho, config.scope))
        if config.rho_criterion != "after_ft":
            return evaluate_accuracy(suspect, held_out), {}
        finetuned[rho] = finetune_with_selection(suspect, clean, config.train, holdout_fraction=config.holdout_fraction,
                                                 seed=config.seed)
        return float(finetuned[rho]["selection_accuracy"]), {}

    def keep(rho: float) -> None:
        if rho in finetuned:
            kept.clear()
            kept[rho] = snapshot_state(suspect.model)

    suspect_accuracy = evaluate_accuracy(suspect, held_out)
    search = search_within_tolerance(sorted(set(config.rho_grid)), try_rho, suspect_accuracy, config.tolerance,
                                     on_choice=keep, label="rho search")
    record = {**search.record("rho"), "criterion": config.rho_criterion, "n_held_out": len(held_out)}
    if search.chosen in kept:
        restore_state(suspect.model, kept[search.chosen])
        return search.chosen, record, finetuned[search.chosen]
    restore_state(suspect.model, original)
    return search.chosen, record, None


# --------------------------------------------------------------------------- the defence
@PURIFY_DEFENSES.register("fine-purifying")
class FinePurifying(PurifyDefense[FinePurifyingConfig]):
    """Reset the dimensions with the most abnormal drift for their clean curvature to θ_pre, then
    fine-tune on clean data (Fine-purifying-style, δ²/F by default; see the module docstring)."""

    name = "fine-purifying"
    config_class = FinePurifyingConfig
    needs_base = True

    def _purify(self, inputs: PurifyInputs, work_dir: Path | None) -> PurifyResult:
        cfg = self.config
        suspect, base = inputs.suspect, inputs.base
        assert base is not None  # needs_base is checked by purify()
        watch = Stopwatch()
        fit, _ = holdout_split(inputs.clean, cfg.holdout_fraction, cfg.seed)  # F on the fit split (``docs/methods/fine-purifying.md`` §6)
        scores = score_dimensions(suspect, base, fit, cfg)  # steps 1, 3, 4
        scoring_s = watch.elapsed()
        rho, search, ft_report = cfg.rho, None, None
        if cfg.rho_mode == "search":
            rho, search, ft_report = search_rho(suspect, inputs.clean, scores, cfg)
        masks = reset_masks(scores.scores, rho, cfg.scope)  # step 5
        reset = summarise_reset(masks, scores)
        if ft_report is None:
            n = apply_reset(suspect, scores.reference, masks)  # step 6
            logger.info("fine-purifying: reset %d of %d scored dimensions (rho=%.3f, %s, %s)",
                        n, scores.n_dimensions, rho, cfg.indicator, cfg.scope)
            ft_report = finetune_with_selection(  # step 7
                suspect, inputs.clean, cfg.train, holdout_fraction=cfg.holdout_fraction, seed=cfg.seed,
                work_dir=_finetune_dir(work_dir, cfg, rho))
        report = {  # step 8
            "method": self.name,
            "indicator": cfg.indicator,
            "beta": scores.beta,
            "epsilon": scores.epsilon,
            "fisher": None if scores.fisher is None else {
                "mode": cfg.fisher_mode, "estimator": cfg.fisher_estimator, "h_point": cfg.h_point,
                "n_rows": scores.n_fisher_rows},
            "scope": cfg.scope,
            "groups": list(cfg.groups),
            "head": cfg.head,
            "rho": rho,
            "reset_fraction": round(1 - rho, 12),
            "rho_mode": cfg.rho_mode,
            "rho_search": search,
            "n_reset": reset["n_selected"],
            "reset": reset,
            "scoring_time_s": scoring_s,
            "finetune": ft_report,
        }
        return PurifyResult(suspect, report)


def _finetune_dir(work_dir: Path | None, config: FinePurifyingConfig, rho: float) -> Path | None:
    """A checkpoint folder per reset (config and ρ), so a resumed run never restores another reset's run."""
    if work_dir is None:
        return None
    return work_dir / f"finetune-{config_fingerprint(config.model_dump(mode='json', exclude={'train'}), rho)}"
