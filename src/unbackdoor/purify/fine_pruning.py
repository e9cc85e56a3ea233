"""Fine-pruning (FP) for transformer classifiers (``docs/methods/baselines.md`` §2).

Liu et al. (RAID 2018) prune the units that stay *dormant* on clean data, then fine-tune on clean
data. BackdoorBench ``defense/fp.py`` [CODE] hooks the input of the final linear layer, sorts its
units by mean clean activation (ascending), prunes in steps of 1% by masking that layer's input
columns, keeps the largest pruning whose accuracy drop stays under a tolerance (stopping at the
first step beyond it), then fine-tunes. The transformer version [RECON]:

1. split the clean set into a fitting part and a held-out part (:func:`holdout_split`);
2. record each unit's activation on the fitting part (:func:`collect_activations`): by default the
   FFN-intermediate neurons of the last encoder layer (the input of ``output.dense``), averaged per
   row over its non-pad tokens and then over rows;
3. rank units dormant-first (:func:`dormant_ranking`), per layer or globally;
4. prune in steps of 1% of the units (:func:`pruning_steps`) by zeroing the next layer's input
   columns (:func:`zero_columns`), which removes a neuron's contribution exactly whatever its bias;
   keep the largest step whose held-out accuracy stays within δ of the unpruned suspect's
   (:func:`select_pruning_level`);
5. fine-tune on the fitting part with the pruned columns held at zero (:class:`FixedWeights`),
   selecting the epoch on the held-out part.

No step sees poisoned data, the test set or the attack success rate. Differences from
BackdoorBench: it chooses the level with *test* accuracy (and a relative drop); we use held-out
clean accuracy and an absolute drop δ. Its mask prunes ``num_pruned - 1`` units at step
``num_pruned`` (an off-by-one); we prune exactly the stated count. It fine-tunes with SGD for 100
epochs; we reuse the clean fine-tuning settings of ``finetune.py`` (AdamW).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt, model_validator

from unbackdoor.config import StrictConfig
from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset
from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyResult, PurifyDefense, PurifyInputs
from unbackdoor.training.config import small_set_train_config
from unbackdoor.selection import finetune_with_selection
from unbackdoor.selection import TOLERANCE_HELP, search_within_tolerance
from unbackdoor.errors import ModelError
from unbackdoor.inference import collate, encode, length_sorted_batches
from unbackdoor.models.loading import Classifier
from unbackdoor.training import evaluate_accuracy
from unbackdoor.training.callbacks import FixedWeights
from unbackdoor.training.config import TrainConfig

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("bert", "roberta")
"""``model_type`` values whose module layout (``encoder.layer[i].output.dense``) we know."""

Unit = Literal["ffn", "pooled"]
Statistic = Literal["mean", "first_token", "mean_abs"]
Order = Literal["per_layer", "global"]
Search = Literal["stop_at_first_drop", "full_sweep"]


class FinePruningConfig(StrictConfig):
    """Settings of fine-pruning. [RECON]: our transformer adaptation; [CODE]: as BackdoorBench."""

    unit: Unit = Field(
        "ffn",
        description="[RECON] what a unit is: 'ffn' = FFN-intermediate neurons (input of output.dense); "
        "'pooled' = the dimensions feeding the final classifier layer (BackdoorBench's choice)",
    )
    layers: PositiveInt | Literal["last", "all"] = Field(
        "last",
        description="[RECON] encoder layers to prune (unit 'ffn'): 'last', a number k (the last k), or 'all'",
    )
    statistic: Statistic = Field(
        "mean",
        description="[RECON] a unit's activation: 'mean' over a row's non-pad tokens; 'first_token' "
        "([CLS]/<s>) only; 'mean_abs' = mean absolute value over non-pad tokens (GELU can be negative)",
    )
    order: Order = Field(
        "per_layer",
        description="[RECON] rank dormant-first within each layer ('per_layer') or across the chosen layers ('global')",
    )
    step: float = Field(0.01, gt=0, le=0.5, description="[CODE] share of the units pruned per step (rounded up)")
    max_ratio: float = Field(1.0, gt=0, le=1, description="[ours] never prune more than this share of the units")
    tolerance: float = Field(
        0.1,
        ge=0,
        le=1,
        description=f"[RECON] δ: {TOLERANCE_HELP}; absolute (BackdoorBench uses a 10% relative drop on test "
        "accuracy)",
    )
    search: Search = Field(
        "stop_at_first_drop",
        description="[CODE] 'stop_at_first_drop': stop at the first step beyond δ and keep the one before; "
        "[ours] 'full_sweep': try every step up to max_ratio and keep the largest within δ",
    )
    finetune: bool = Field(True, description="fine-tune after pruning (off: pruning only, for ablations)")
    train: TrainConfig = Field(
        default_factory=small_set_train_config,
        description="[RECON] fine-tuning settings, as clean fine-tuning (docs/methods/baselines.md §1)",
    )
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of the clean set held out to choose the pruning level and the epoch"
    )
    seed: int = Field(0, description="seed of the fit/held-out split")

    @model_validator(mode="after")
    def _layers_apply_to_ffn(self) -> FinePruningConfig:
        if self.unit == "pooled" and self.layers != "last":
            raise ValueError("'layers' applies to unit 'ffn' only; unit 'pooled' has a single layer")
        return self


@dataclass(frozen=True)
class PruneSite:
    """A linear layer whose input units may be pruned: ``module`` is the layer, ``name`` its path."""

    name: str
    module: torch.nn.Linear

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def n_units(self) -> int:
        return int(self.module.in_features)


# --- step 2: where the units are and what they do on clean data -----------------------------------


def _check_family(clf: Classifier) -> str:
    family = clf.model.config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise ModelError(
            f"fine-pruning supports {' and '.join(SUPPORTED_FAMILIES)} encoders (model_type), "
            f"not {family!r}: it needs to know where the FFN and the classifier layers are"
        )
    return family


def _encoder_layers(clf: Classifier, layers: int | str) -> list[int]:
    n = len(clf.model.base_model.encoder.layer)
    if layers == "all":
        return list(range(n))
    k = 1 if layers == "last" else int(layers)
    if k > n:
        raise ModelError(f"asked to prune the last {k} layers but the model has {n}")
    return list(range(n - k, n))


def find_prune_sites(clf: Classifier, unit: Unit, layers: int | str = "last") -> list[PruneSite]:
    """The linear layers whose input columns are pruned, for a BERT or RoBERTa classifier.

    ``ffn``: ``encoder.layer[i].output.dense`` of the chosen layers (its input is the FFN-intermediate
    activation). ``pooled``: the final classifier layer (BERT ``classifier``, RoBERTa
    ``classifier.out_proj``), whose input is the pooled representation.
    """
    family = _check_family(clf)
    prefix = clf.model.base_model_prefix
    if unit == "ffn":
        names = [f"{prefix}.encoder.layer.{i}.output.dense" for i in _encoder_layers(clf, layers)]
    else:
        names = ["classifier" if family == "bert" else "classifier.out_proj"]
    modules = dict(clf.model.named_modules())
    sites = []
    for name in names:
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            raise ModelError(f"expected a linear layer at {name!r} of this {family} model")
        sites.append(PruneSite(name, module))
    return sites


def row_statistic(acts: torch.Tensor, mask: torch.Tensor | None, statistic: Statistic) -> torch.Tensor:
    """Per-row activation of every unit, ``[rows, units]``, from ``acts`` (``[rows, tokens, units]``
    or ``[rows, units]``) and the attention ``mask`` (``[rows, tokens]``, 1 = real token).

    Pad positions never count: 'mean'/'mean_abs' average over a row's real tokens, 'first_token'
    takes the row's first real token.
    """
    values = acts.abs() if statistic == "mean_abs" else acts
    if values.dim() == 2:  # one vector per row (pooled): nothing to average over
        return values
    keep = torch.ones(values.shape[:2], dtype=torch.bool, device=values.device) if mask is None else mask.bool()
    if statistic == "first_token":
        first = keep.int().argmax(dim=1)
        return values[torch.arange(values.shape[0], device=values.device), first]
    summed = torch.where(keep.unsqueeze(-1), values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(1)
    return summed / keep.sum(1, keepdim=True).clamp_min(1).to(values.dtype)


class _Recorder:
    """Forward pre-hooks summing each site's per-row input statistic over the rows seen."""

    def __init__(self, sites: Sequence[PruneSite], statistic: Statistic) -> None:
        self.sites = sites
        self.statistic = statistic
        self.mask: torch.Tensor | None = None
        self.sums: dict[str, torch.Tensor] = {}
        self.rows = 0
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            per_row = row_statistic(args[0].detach().float(), self.mask, self.statistic).sum(0).cpu()
            self.sums[name] = self.sums[name] + per_row if name in self.sums else per_row

        return record

    def __enter__(self) -> _Recorder:
        self._handles = [s.module.register_forward_pre_hook(self._hook(s.name)) for s in self.sites]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def collect_activations(
    clf: Classifier, data: Dataset, sites: Sequence[PruneSite], statistic: Statistic = "mean", batch_size: int = 128
) -> dict[str, torch.Tensor]:
    """Mean over the rows of ``data`` of each unit's per-row statistic (:func:`row_statistic`),
    one ``[units]`` tensor per site, recorded with forward hooks in eval mode."""
    model = clf.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    features = encode(clf, data.examples)
    try:
        with _Recorder(sites, statistic) as recorder:
            for rows in length_sorted_batches([len(f["input_ids"]) for f in features], batch_size):
                batch = {k: v.to(device) for k, v in collate(clf, [features[i] for i in rows]).items()}
                recorder.mask = batch.get("attention_mask")
                model(**batch)
                recorder.rows += len(rows)
    finally:
        model.train(was_training)
    return {name: total / recorder.rows for name, total in recorder.sums.items()}


# --- step 3: dormant-first ranking and the pruning schedule ---------------------------------------


def dormant_ranking(stats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each site's unit indices, lowest activation first (stable, so ties keep index order)."""
    return {name: torch.sort(values, stable=True).indices for name, values in stats.items()}


def pruning_steps(
    stats: Mapping[str, torch.Tensor], order: Order = "per_layer", step: float = 0.01, max_ratio: float = 1.0
) -> list[dict[str, int]]:
    """How many units of each site are pruned at each step; step 0 prunes none.

    Each step prunes ``ceil(step * units)`` more units, dormant-first, up to ``max_ratio`` of them:
    per site with ``order='per_layer'``, over all sites pooled with ``order='global'``. Steps are
    nested: the units pruned at a step are a prefix of each site's :func:`dormant_ranking`.
    """
    names = list(stats)
    if order == "per_layer":
        sizes = {n: stats[n].numel() for n in names}
        per_step = {n: math.ceil(step * sizes[n]) for n in names}
        caps = {n: math.floor(max_ratio * sizes[n]) for n in names}
        n_steps = max(math.ceil(caps[n] / per_step[n]) for n in names)
        return [{n: min(i * per_step[n], caps[n]) for n in names} for i in range(n_steps + 1)]
    values = torch.cat([stats[n].flatten() for n in names])
    owner = torch.cat([torch.full((stats[n].numel(),), j) for j, n in enumerate(names)])
    ranked_owner = owner[torch.sort(values, stable=True).indices]
    per_step, cap = math.ceil(step * values.numel()), math.floor(max_ratio * values.numel())
    steps = []
    for i in range(math.ceil(cap / per_step) + 1):
        counts = torch.bincount(ranked_owner[: min(i * per_step, cap)], minlength=len(names))
        steps.append({n: int(counts[j]) for j, n in enumerate(names)})
    return steps


def pruned_units(ranking: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> dict[str, list[int]]:
    """The unit indices pruned at a step (sorted), per site."""
    return {name: sorted(ranking[name][: counts[name]].tolist()) for name in counts}


# --- step 4: pruning and choosing the level on held-out clean accuracy ----------------------------


@torch.no_grad()
def zero_columns(sites: Sequence[PruneSite], units: Mapping[str, Sequence[int]]) -> None:
    """Zero the input columns ``units[site]`` of each site's weight (removes those units exactly)."""
    for site in sites:
        idx = list(units.get(site.name, ()))
        if idx:
            site.module.weight[:, idx] = 0


def column_masks(sites: Sequence[PruneSite], units: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """Boolean masks (True = pruned) of each site's weight, by parameter name, for :class:`FixedWeights`."""
    masks = {}
    for site in sites:
        idx = list(units.get(site.name, ()))
        if idx:
            mask = torch.zeros_like(site.module.weight, dtype=torch.bool)
            mask[:, idx] = True
            masks[site.weight_name] = mask
    return masks


def select_pruning_level(
    accuracy_at: Callable[[int], float], n_steps: int, tolerance: float, search: Search = "stop_at_first_drop"
) -> tuple[int, list[float]]:
    """The chosen step and the held-out accuracy curve (one value per step evaluated).

    ``accuracy_at(i)`` is the held-out accuracy after pruning step ``i``; step 0 (no pruning) is the
    reference. The shared held-out search, weakest first: 'stop_at_first_drop' keeps the step before
    the first one more than ``tolerance`` below the reference and evaluates no further;
    'full_sweep' evaluates every step and keeps the largest one within tolerance.
    """
    reference = accuracy_at(0)
    curve = [reference]

    def measured(i: int) -> tuple[float, dict[str, Any]]:
        if i:
            curve.append(accuracy_at(i))
        return curve[i], {}

    result = search_within_tolerance(range(n_steps), measured, reference, tolerance, walk="weakest_first",
                                     exhaustive=search == "full_sweep", label="pruning level")
    return result.chosen, curve


# --- step 5: the defence -------------------------------------------------------------------------


def _weights(sites: Sequence[PruneSite]) -> dict[str, torch.Tensor]:
    return {s.name: s.module.weight.detach().clone() for s in sites}


@torch.no_grad()
def _restore(sites: Sequence[PruneSite], saved: Mapping[str, torch.Tensor]) -> None:
    for site in sites:
        site.module.weight.copy_(saved[site.name])


def prune_on_held_out(
    clf: Classifier,
    sites: Sequence[PruneSite],
    steps: Sequence[Mapping[str, int]],
    ranking: Mapping[str, torch.Tensor],
    held_out: Dataset,
    config: FinePruningConfig,
) -> tuple[int, list[float]]:
    """Prune step by step, measure held-out accuracy, leave ``clf`` pruned at the chosen step."""
    original = _weights(sites)

    def accuracy_at(i: int) -> float:
        zero_columns(sites, pruned_units(ranking, steps[i]))  # steps are nested: zeroing accumulates
        return evaluate_accuracy(clf, held_out, config.train.eval_batch_size)

    chosen, curve = select_pruning_level(accuracy_at, len(steps), config.tolerance, config.search)
    _restore(sites, original)
    zero_columns(sites, pruned_units(ranking, steps[chosen]))
    return chosen, curve


def _curve_record(steps: Sequence[Mapping[str, int]], curve: Sequence[float], total: int) -> list[dict[str, Any]]:
    return [{"n_pruned": sum(steps[i].values()), "ratio": sum(steps[i].values()) / total, "accuracy": acc}
            for i, acc in enumerate(curve)]


def finetune_with_mask(
    clf: Classifier,
    clean: Dataset,
    sites: Sequence[PruneSite],
    units: Mapping[str, Sequence[int]],
    config: FinePruningConfig,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune on the fitting part of ``clean`` with the pruned columns held at zero after every
    step; the epoch is selected on the held-out part (the same split as the pruning search)."""
    masks = column_masks(sites, units)
    zeros = {name: torch.zeros(mask.shape) for name, mask in masks.items()}
    return finetune_with_selection(clf, clean, config.train, holdout_fraction=config.holdout_fraction,
                                   seed=config.seed, callbacks=[FixedWeights(masks, zeros)], work_dir=work_dir)


@PURIFY_DEFENSES.register("fine-pruning")
class FinePruning(PurifyDefense[FinePruningConfig]):
    """Prune units dormant on clean data, then fine-tune with the pruning mask held fixed."""

    name = "fine-pruning"
    config_class = FinePruningConfig
    needs_base = False

    def _purify(self, inputs: PurifyInputs, work_dir: Path | None) -> PurifyResult:
        cfg = self.config
        clf = inputs.suspect
        fit, held_out = holdout_split(inputs.clean, cfg.holdout_fraction, cfg.seed)
        sites = find_prune_sites(clf, cfg.unit, cfg.layers)
        stats = collect_activations(clf, fit, sites, cfg.statistic, cfg.train.eval_batch_size)
        ranking = dormant_ranking(stats)
        steps = pruning_steps(stats, cfg.order, cfg.step, cfg.max_ratio)
        chosen, curve = prune_on_held_out(clf, sites, steps, ranking, held_out, cfg)
        pruned = pruned_units(ranking, steps[chosen])
        report = self._report(sites, steps, chosen, curve, pruned)
        if cfg.finetune:
            report["finetune"] = finetune_with_mask(clf, inputs.clean, sites, pruned, cfg, work_dir)
        return PurifyResult(clf, report)

    def _report(
        self,
        sites: Sequence[PruneSite],
        steps: Sequence[Mapping[str, int]],
        chosen: int,
        curve: Sequence[float],
        pruned: dict[str, list[int]],
    ) -> dict[str, Any]:
        total = sum(s.n_units for s in sites)
        n_pruned = sum(len(v) for v in pruned.values())
        logger.info("fine-pruning: pruned %d of %d units (%.1f%%); held-out accuracy %.4f -> %.4f",
                    n_pruned, total, 100 * n_pruned / total, curve[0], curve[chosen])
        return {
            "method": self.name,
            "unit": self.config.unit,
            "sites": [s.name for s in sites],
            "n_units": total,
            "n_pruned": n_pruned,
            "pruning_ratio": n_pruned / total,
            "chosen_step": chosen,
            "reference_accuracy": curve[0],
            "pruned_accuracy": curve[chosen],
            "accuracy_curve": _curve_record(steps, curve, total),
            "pruned_units": pruned,
        }
