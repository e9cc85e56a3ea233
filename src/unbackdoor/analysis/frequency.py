"""Frequency analysis (``unbackdoor analyze frequency``; ``docs/methods/musclelora.md`` §11): how fast the clean mapping and the
backdoor mapping are fitted in the low- and high-frequency parts of a model's output over the
input-embedding space, while the same poisoned data is learned by plain fine-tuning, LoRA and MuScleLoRA.

Method (fixed before training, the same for every training method):

* **Probe sets.** Clean mapping: clean dev rows with their labels. Backdoor mapping: the triggered dev
  rows (non-target rows + trigger) with the target label *together with their clean source rows* with
  their true labels; errors are averaged over the triggered rows only. (On the triggered rows alone
  the target is constant, so its high-frequency part would be zero: the backdoor is the jump between
  a row and its triggered copy.) At most ``max_rows`` rows (or pairs) each, seeded [RECON].
* **Input space (the projection).** Each probe row's word-embedding vectors under the *base* model
  (``get_input_embeddings()``, before any training), zero-padded to the set's longest row and
  flattened: x_i ∈ R^{L·d}. Nothing is projected further: distances are taken in that space.
* **Low-pass filter.** G_δ(i, j) = exp(−‖x_i − x_j‖ / (2δ)), each row normalised to sum 1, with the
  official code's *unsquared* Euclidean distance [CODE] (``squared_distance`` gives the Gaussian
  exp(−‖x_i − x_j‖² / (2δ)) of the frequency-principle literature). Larger δ = lower cut-off.
  δ takes 25 values in [2, 8] [CODE]; ``delta_unit="median"`` reads them in units of the median
  pairwise distance instead, for models whose embedding scale is far from BERT-base's [RECON].
* **Bands.** For the model outputs f (softmax probabilities by default [RECON]; ``outputs="logits"``
  is the official code's choice) and the one-hot targets y: low band G_δ·(·), high band (·) − G_δ·(·).
* **Fitting error per band**: Δ_low = mean_i ‖(G_δ f − G_δ y)_i‖ / mean_i ‖(G_δ y)_i‖, Δ_high the same
  with the high bands. Recorded before the first step and every ``every`` optimizer steps (5 [CODE]),
  for every δ; the plot shows the mean over the δ grid (``frequency.json`` keeps each δ).

A band whose Δ falls sooner is fitted first. The paper's reading [ABS]: under plain fine-tuning the
backdoor mapping is fitted first and leans to low frequencies; MuScleLoRA slows its fit.

This is an analysis, not a defence: the recorder observes training from outside and is the only
part that reads the triggered dev set; the training-time defences never see it.
"""

from __future__ import annotations

import csv
import io
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.data.types import Example, PoisonedTask
from unbackdoor.errors import DataError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.inference import encode, predict_logits
from unbackdoor.models.loading import Classifier, load_classifier
from unbackdoor.outputs import write_json
from unbackdoor.training.callbacks import Callback, TrainContext
from unbackdoor.training.config import TrainConfig
from unbackdoor.train_defenses.base import build_train_defense
from unbackdoor.train_defenses.base import TrainDefense, TrainInputs

logger = logging.getLogger(__name__)

OFFICIAL_DELTAS = tuple(round(float(d), 4) for d in np.linspace(2.0, 8.0, 25))
BANDS = ("clean_low", "clean_high", "backdoor_low", "backdoor_high")


class FrequencyConfig(StrictConfig):
    """Settings of the frequency analysis (see the module docstring for the method)."""

    methods: tuple[str, ...] = Field(("none", "lora", "musclelora"), min_length=1,
                                     description="training defences compared (registry names)")
    method_params: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                     description="options per method, e.g. {musclelora: {reference_size: 64}}")
    train: TrainConfig | None = Field(None, description="training-loop keys applied to every method (others keep "
                                      "each method's defaults)")
    every: int = Field(5, ge=1, description="record every N optimizer steps [CODE: 5]")
    deltas: tuple[float, ...] = Field(OFFICIAL_DELTAS, min_length=1, description="filter widths δ [CODE: 25 in [2, 8]]")
    delta_unit: Literal["absolute", "median"] = Field("absolute", description="δ as is [CODE], or in units of the "
                                                      "median pairwise embedding distance [RECON]")
    squared_distance: bool = Field(False, description="Gaussian kernel on squared distances (code: unsquared)")
    outputs: Literal["probabilities", "logits"] = Field("probabilities", description="model output analysed "
                                                        "(the official code: logits)")
    max_rows: int = Field(256, ge=4, description="rows per probe set (seeded subsample)")
    seed: int = Field(0, description="seed of the probe subsamples")


# --------------------------------------------------------------------------------------------------
# the input space, the filter and the band errors
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def embed_rows(clf: Classifier, examples: Sequence[Example]) -> torch.Tensor:
    """x_i: each row's word embeddings, zero-padded to the longest row, flattened (n × L·d)."""
    features = encode(clf, examples)
    length = max(len(f["input_ids"]) for f in features)
    table = clf.model.get_input_embeddings()
    out = torch.zeros(len(features), length, table.embedding_dim)
    for i, f in enumerate(features):
        ids = torch.tensor(f["input_ids"], device=table.weight.device)
        out[i, : len(ids)] = table(ids).float().cpu()
    return out.flatten(1)


def low_pass_kernels(x: torch.Tensor, deltas: Sequence[float], unit: str = "absolute",
                     squared: bool = False) -> torch.Tensor:
    """Row-normalised G_δ for every δ: a (len(deltas) × n × n) tensor."""
    dist = torch.cdist(x.double(), x.double())
    if unit == "median":
        off = dist[~torch.eye(len(x), dtype=torch.bool)]
        scale = float(off.median()) if off.numel() else 1.0
        deltas = [d * scale for d in deltas]
    d = dist.square() if squared else dist
    kernels = torch.stack([torch.exp(-d / (2 * delta)) for delta in deltas])
    return kernels / kernels.sum(dim=2, keepdim=True)


def band_errors(f: torch.Tensor, y: torch.Tensor, kernels: torch.Tensor,
                measured: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ_low, Δ_high) per δ for outputs ``f`` and one-hot targets ``y`` (both n × C), averaged over
    the rows in ``measured`` (a boolean mask; default all rows)."""
    f, y = f.double(), y.double()
    f_low, y_low = kernels @ f, kernels @ y  # (k, n, C)
    f_high, y_high = f - f_low, y - y_low
    rows = measured if measured is not None else torch.ones(len(f), dtype=torch.bool)

    def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a[:, rows], b[:, rows]
        return (a - b).norm(dim=2).mean(dim=1) / b.norm(dim=2).mean(dim=1).clamp_min(1e-12)

    return rel(f_low, y_low), rel(f_high, y_high)


@dataclass
class Probe:
    """A fixed probe set: rows, one-hot targets, the filters over its input space, the measured rows."""

    name: str
    examples: tuple[Example, ...]
    targets: torch.Tensor
    kernels: torch.Tensor
    measured: torch.Tensor


def make_probe(clf: Classifier, name: str, examples: Sequence[Example], labels: Sequence[int],
               measured: Sequence[bool], config: FrequencyConfig) -> Probe:
    """A probe with kernels from ``clf``'s (base) embeddings; errors are averaged over ``measured`` rows."""
    rows = tuple(examples)
    targets = torch.nn.functional.one_hot(torch.tensor(list(labels)), clf.num_labels)
    kernels = low_pass_kernels(embed_rows(clf, rows), config.deltas, config.delta_unit, config.squared_distance)
    return Probe(name, rows, targets, kernels, torch.tensor(list(measured), dtype=torch.bool))


class FrequencyRecorder(Callback):
    """Records Δ_low and Δ_high of every probe before training and every ``every`` steps."""

    def __init__(self, clf: Classifier, probes: Sequence[Probe], every: int, outputs: str = "probabilities") -> None:
        self.clf = clf
        self.probes = list(probes)
        self.every = every
        self.outputs = outputs
        self.records: list[dict[str, Any]] = []

    def record(self, step: int, epoch: int) -> None:
        row: dict[str, Any] = {"step": step, "epoch": epoch}
        for probe in self.probes:
            f = torch.from_numpy(predict_logits(self.clf, probe.examples))
            if self.outputs == "probabilities":
                f = f.softmax(dim=1)
            low, high = band_errors(f, probe.targets, probe.kernels, probe.measured)
            row[f"{probe.name}_low"], row[f"{probe.name}_high"] = float(low.mean()), float(high.mean())
            row[f"{probe.name}_low_by_delta"], row[f"{probe.name}_high_by_delta"] = low.tolist(), high.tolist()
        self.records.append(row)

    def on_train_begin(self, ctx: TrainContext) -> None:
        self.record(ctx.state.global_step, ctx.state.epoch)

    def on_step_end(self, ctx: TrainContext) -> None:
        if ctx.state.global_step % self.every == 0:
            self.record(ctx.state.global_step, ctx.state.epoch)


# --------------------------------------------------------------------------------------------------
# the analysis: every method on the same data, seed, base and probes
# --------------------------------------------------------------------------------------------------


def build_probes(base: Classifier, poisoned: PoisonedTask, config: FrequencyConfig) -> list[Probe]:
    """The clean and backdoor probe sets (dev rows only), with kernels from the base's embeddings."""
    if poisoned.triggered_dev is None:
        raise DataError(f"{poisoned.name}: frequency analysis needs the triggered dev set (poison with "
                        "`unbackdoor attack`, which writes one)")
    dev, trig = poisoned.clean.dev, poisoned.triggered_dev

    def draw(n: int, name: str) -> list[int]:
        rng = random.Random(f"frequency-{config.seed}-{name}")
        return sorted(rng.sample(range(n), config.max_rows)) if n > config.max_rows else list(range(n))

    clean = [dev.examples[i] for i in draw(len(dev), "clean")]
    triggered = [trig.examples[i] for i in draw(len(trig), "backdoor")]
    by_id = {e.id: e for e in dev.examples}
    sources = [by_id[e.id] for e in triggered]  # a triggered row keeps its clean row's id
    return [make_probe(base, "clean", clean, [e.label for e in clean], [True] * len(clean), config),
            make_probe(base, "backdoor", triggered + sources, [e.label for e in triggered + sources],
                       [True] * len(triggered) + [False] * len(sources), config)]


def build_methods(config: FrequencyConfig) -> dict[str, TrainDefense]:
    """Every method with its options, validated before any work."""
    return {name: build_train_defense(name, config.method_params.get(name, {}), config.train)
            for name in config.methods}


def analyze_frequency(base: str | Path | None, poisoned: PoisonedTask, config: FrequencyConfig, *,
                      max_length: int | None = None, allow_pickle: bool = False,
                      precision: str = "auto") -> dict[str, Any]:
    """Train each method on ``poisoned.train`` (flags unused) from ``base`` and record the band errors.

    Returns ``{"curves": {method: [records]}, "metrics": {method: {cacc, asr}}}``.
    """
    defences = build_methods(config)
    probe_model = load_classifier(base, num_labels=poisoned.train.num_labels, allow_pickle=allow_pickle,
                                  max_length=max_length, precision=precision)
    probes = build_probes(probe_model, poisoned, config)
    curves: dict[str, list[dict[str, Any]]] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for name, defence in defences.items():
        seed = defence.train_config(probe_model).seed
        clf = load_classifier(base, num_labels=poisoned.train.num_labels, allow_pickle=allow_pickle,
                              max_length=max_length, seed=seed, precision=precision)
        recorder = FrequencyRecorder(clf, probes, config.every, config.outputs)
        result = defence.fit(TrainInputs(clf, poisoned.train, poisoned.clean.dev), observers=[recorder])
        final = evaluate_classifier(result.model, poisoned.clean.test, poisoned.triggered_test, name=name)
        curves[name] = recorder.records
        metrics[name] = {"cacc": final.cacc, "asr": final.asr, "selected_epoch": result.training.best_epoch,
                         "steps": result.training.steps}
        logger.info("%s: CACC %.3f, ASR %s", name, final.cacc, final.asr)
    return {"curves": curves, "metrics": metrics}


def curves_csv(curves: dict[str, list[dict[str, Any]]]) -> str:
    """One row per (method, recorded step), band errors averaged over δ."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "step", "epoch", *BANDS])
    for method, records in curves.items():
        for r in records:
            writer.writerow([method, r["step"], r["epoch"], *(f"{r[b]:.6g}" for b in BANDS)])
    return buf.getvalue()


def plot_frequency(curves: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> None:
    """PNG: rows clean / backdoor mapping, columns low / high band; one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True)
    for row, mapping in enumerate(("clean", "backdoor")):
        for col, band in enumerate(("low", "high")):
            ax = axes[row][col]
            for method, records in curves.items():
                ax.plot([r["step"] for r in records], [r[f"{mapping}_{band}"] for r in records], marker=".",
                        label=method)
            ax.set_title(f"{mapping} mapping, {band}-frequency part", fontsize=10)
            ax.set_ylabel("relative error Δ")
            ax.grid(True, alpha=0.3)
            if row == 1:
                ax.set_xlabel("optimizer step")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_frequency_outputs(analysis: dict[str, Any], folder: Path, extra: dict[str, Any]) -> None:
    """frequency.json (``extra`` first), frequency.csv and frequency.png into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "frequency.json", {**extra, **analysis})
    (folder / "frequency.csv").write_text(curves_csv(analysis["curves"]), encoding="utf-8")
    summary = ", ".join(f"{m} ASR {v['asr']:.2f}" for m, v in analysis["metrics"].items() if v["asr"] is not None)
    plot_frequency(analysis["curves"], folder / "frequency.png", f"fitting speed by frequency band ({summary})")
