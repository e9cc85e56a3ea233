"""``unbackdoor scan``: what in a suspect model looks poisoned, measured against its clean base.

* Tokens: E-PUR-style scores of every input-embedding row (:func:`unbackdoor.purify.epur.score_tokens`),
  the top K, and which tokens *stand out*.
* Weights: per matrix and per layer, the relative drift ‖θ_B − θ_pre‖ / ‖θ_pre‖.
* Fine-purifying dimensions: which matrices and layers hold the top 1 % of dimensions by an indicator.
  By default (when labelled clean data is given: the Fisher estimate needs it) the indicator is
  Fine-purifying's default (:func:`unbackdoor.purify.fine_purifying.score_dimensions`); any
  callable giving per-dimension scores can replace it (``dimension_indicator``).

"Stands out" [RECON]: under ``score="ratio"`` a token stands out when its score is at least
``margin`` (1.5) times the highest score among tokens in clean use (scored rows with f ≥ f_min):
a rare token that moved clearly more, per log-frequency, than any token clean text uses. Under
``score="residual"`` it is the method notes' rule, robust z > ``z_thr``. Measured on the tiny planted
BadNets victim, the four triggers stand out at 1.8-2.2x; on a clean fine-tune of the same base
nothing does. The robust z of the *ratio* does not separate the two there (task words form their
own cluster), hence the margin rule.

Outputs (:func:`write_scan_outputs`): ``scan.json``, ``scan.md``, ``token_scores.csv`` (every row)
and ``drift_vs_frequency.png``, each written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unbackdoor import __version__
from unbackdoor.data.types import Dataset
from unbackdoor.models.surgery import aligned_parameters
from unbackdoor.purify.epur import EpurScoring, TokenScores, frequency_summary, ratio_scores, score_tokens
from unbackdoor.models.surgery import layer_index
from unbackdoor.models.loading import Classifier, check_same_architecture
from unbackdoor.outputs import write_json

logger = logging.getLogger(__name__)

DimensionIndicator = Callable[[Classifier, Classifier, "Dataset | None"], Mapping[str, torch.Tensor]]
"""Per-parameter, per-dimension indicator scores (same shapes as the parameters), higher = more suspect."""

SCAN_FILES = ("scan.json", "scan.md", "token_scores.csv", "drift_vs_frequency.png")
NO_CLEAN_DATA = ("not computed: the Fine-purifying indicator needs labelled clean data for its Fisher "
                 "estimate (give --clean)")
BACKBONE_PREFIXES = ("bert", "roberta", "distilbert", "model", "transformer", "encoder")


@dataclass
class MatrixDrift:
    """How far one parameter tensor moved from the base."""

    name: str
    layer: str
    shape: list[int]
    drift_norm: float  # ‖θ_B − θ_pre‖
    base_norm: float  # ‖θ_pre‖
    relative_drift: float | None  # drift_norm / base_norm (None when the base tensor is 0)
    max_abs: float


@dataclass
class ScanReport:
    """Everything ``unbackdoor scan`` found; ``scores`` holds every row for the CSV and the plot."""

    suspect: str
    base: str
    scores: TokenScores
    primary_score: str
    top: list[dict[str, Any]]
    standing_out: list[dict[str, Any]]
    standing_out_rule: str
    standing_out_bar: float | None
    matrices: list[MatrixDrift]
    layers: list[dict[str, Any]]
    fine_purifying: dict[str, Any]
    n_clean: int | None = None
    z_thr: float = 3.5
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (without the per-row scores, which go to ``token_scores.csv``)."""
        fit = self.scores.fit
        return {
            "title": "E-PUR-style scan (provisional)",
            "unbackdoor_version": __version__,
            "suspect": self.suspect,
            "base": self.base,
            "n_clean": self.n_clean,
            "frequency_source": frequency_summary(self.scores),
            "primary_score": self.primary_score,
            "standing_out_rule": self.standing_out_rule,
            "standing_out_bar": self.standing_out_bar,
            "standing_out": self.standing_out,
            "top_tokens": self.top,
            "rows": {"total": len(self.scores.tokens), "scored": int(self.scores.scored.sum()),
                     "special": int(self.scores.special.sum()), "untouched": int((self.scores.untouched & ~self.scores.special).sum()),
                     "weight_decay_factor": self.scores.decay_factor},
            "residual_fit": asdict(fit) if fit else None,
            "weight_drift": {"matrices": [asdict(m) for m in self.matrices], "layers": self.layers},
            "fine_purifying": self.fine_purifying,
            "warnings": self.warnings,
        }


# ----------------------------------------------------------------------------- tokens
def primary_score(scores: TokenScores, config: EpurScoring) -> str:
    """The configured score, or ``residual`` when there are no counts (vocab_rank)."""
    return "residual" if config.score == "residual" or scores.ratio is None else "ratio"


def standing_out(scores: TokenScores, score: str, margin: float, z_thr: float) -> tuple[list[int], str, float | None]:
    """Rows that stand out (see the module docstring), highest first; the rule; the bar (its score value)."""
    ranked = scores.ranking(score)  # type: ignore[arg-type]
    if score == "residual":
        return [int(k) for k in ranked if scores.z[k] > z_thr], f"residual robust z > {z_thr:g}", z_thr
    assert scores.ratio is not None and scores.freq.counts is not None
    in_use = scores.scored & (scores.freq.counts >= scores.freq.f_min)
    if not in_use.any():
        return [], f"undecided: no scored token occurs >= f_min={scores.freq.f_min:g} times in the source", None
    bar = margin * float(np.max(scores.ratio[in_use]))
    rule = (f"ratio >= {margin:g} x the highest ratio among tokens in clean use "
            f"(f >= {scores.freq.f_min:g}; bar {bar:.4g})")
    return [int(k) for k in ranked if scores.ratio[k] >= bar], rule, bar


def scan_tokens(suspect: Classifier, base: Classifier, clean: Dataset | None = None, *, top_k: int = 10,
                config: EpurScoring | None = None, margin: float = 1.5) -> dict[str, Any]:
    """The token part of :func:`scan` only (no weight or Fisher summaries): the rows that stand out,
    the rule, and the ``top_k`` scores. What ``purify --method auto`` reads."""
    check_same_architecture(suspect, base)
    config = config or EpurScoring()
    scores = score_tokens(suspect, base, clean, config)
    score = primary_score(scores, config)
    flagged, rule, bar = standing_out(scores, score, margin, config.z_thr)
    ranked = scores.ranking(score)  # type: ignore[arg-type]
    return {"standing_out": [scores.tokens[k] for k in flagged], "rule": rule, "bar": bar, "score": score,
            "top": [{"token": scores.tokens[k], **scores.record(k, r + 1)} for r, k in enumerate(ranked[:top_k])]}


# ----------------------------------------------------------------------------- weights
def layer_of(name: str) -> str:
    """'layer N' for transformer blocks, 'embeddings', or the parameter's top-level module."""
    index = layer_index(f".{name}.")
    if index is not None:
        return f"layer {index}"
    if "embed" in name or ".wte." in f".{name}." or ".wpe." in f".{name}.":
        return "embeddings"
    parts = name.split(".")
    return parts[1] if len(parts) > 2 and parts[0] in BACKBONE_PREFIXES else parts[0]


@torch.no_grad()
def weight_drift(suspect: Classifier, base: Classifier) -> list[MatrixDrift]:
    """Drift of every parameter the base also has, largest relative drift first (zero base tensors last)."""
    out = []
    for name, param, ref in aligned_parameters(suspect, base):
        delta = param.detach().double() - ref.double()
        base_norm = float(ref.double().norm())
        drift = float(delta.norm())
        out.append(MatrixDrift(name, layer_of(name), list(param.shape), drift, base_norm,
                               drift / base_norm if base_norm > 0 else None, float(delta.abs().max())))
    return sorted(out, key=lambda m: (m.relative_drift is None, -(m.relative_drift or 0.0), -m.drift_norm, m.name))


def layer_summary(matrices: list[MatrixDrift]) -> list[dict[str, Any]]:
    """Per layer: ‖δ‖ / ‖θ_pre‖ over all its tensors, and its most-moved matrix."""
    groups: dict[str, list[MatrixDrift]] = {}
    for m in matrices:
        groups.setdefault(m.layer, []).append(m)
    rows = []
    for layer, ms in groups.items():
        base = float(np.sqrt(sum(m.base_norm ** 2 for m in ms)))
        drift = float(np.sqrt(sum(m.drift_norm ** 2 for m in ms)))
        top = max(ms, key=lambda m: m.relative_drift if m.relative_drift is not None else -1.0)
        rows.append({"layer": layer, "n_tensors": len(ms), "relative_drift": drift / base if base > 0 else None,
                     "most_moved": top.name, "most_moved_relative_drift": top.relative_drift})
    return sorted(rows, key=lambda r: -(r["relative_drift"] or 0.0))


# ----------------------------------------------------------------------------- the Fine-purifying hook
@torch.no_grad()
def top_dimension_summary(indicator: Mapping[str, torch.Tensor], top: int) -> dict[str, Any]:
    """Which matrices and layers hold the ``top`` highest indicator dimensions (over all parameters)."""
    names = sorted(indicator)
    flat = [indicator[n].detach().float().flatten().cpu() for n in names]
    sizes = [f.numel() for f in flat]
    k = min(top, sum(sizes))
    if k == 0:
        return {"computed": True, "top": 0, "matrices": [], "layers": []}
    index = torch.topk(torch.cat(flat), k).indices
    owner = torch.bucketize(index, torch.tensor(np.cumsum(sizes)), right=True)
    per_matrix = torch.bincount(owner, minlength=len(names)).tolist()
    matrices = sorted(({"name": n, "layer": layer_of(n), "count": c, "share": c / k}
                       for n, c in zip(names, per_matrix, strict=True) if c), key=lambda r: -r["count"])
    layers: dict[str, int] = {}
    for row in matrices:
        layers[row["layer"]] = layers.get(row["layer"], 0) + row["count"]
    return {"computed": True, "top": k, "matrices": matrices,
            "layers": [{"layer": n, "count": c, "share": c / k} for n, c in sorted(layers.items(), key=lambda x: -x[1])]}


def fine_purifying_indicator(suspect: Classifier, base: Classifier, clean: Dataset | None) -> Mapping[str, torch.Tensor]:
    """Fine-purifying's default per-dimension indicator (needs labelled clean data), over every
    tensor but the word embeddings: the token table covers those, and with a small clean set their
    rows mostly have F = 0, so a global top 1 % would be embedding rows and nothing else (measured
    on MiniLM victims)."""
    from unbackdoor.purify.fine_purifying import FinePurifyingConfig, score_dimensions

    assert clean is not None
    config = FinePurifyingConfig(groups=("layernorm", "encoder", "pooler"))
    return score_dimensions(suspect, base, clean, config).scores


def dimension_summary(suspect: Classifier, base: Classifier, clean: Dataset | None,
                      indicator: DimensionIndicator | None, top: int | None) -> dict[str, Any]:
    """The layers/matrices holding the top indicator dimensions, or why they were not computed."""
    if indicator is None:
        if clean is None:
            return {"computed": False, "todo": NO_CLEAN_DATA}
        indicator = fine_purifying_indicator
    scores = indicator(suspect, base, clean)
    total = sum(t.numel() for t in scores.values())
    summary = top_dimension_summary(scores, top if top is not None else max(1, total // 100))
    if indicator is fine_purifying_indicator:
        summary["indicator"] = "fine-purifying (default; word embeddings excluded)"
    return summary


# ----------------------------------------------------------------------------- scan
def scan(
    suspect: Classifier,
    base: Classifier,
    clean: Dataset | None = None,
    *,
    top_k: int = 20,
    config: EpurScoring | None = None,
    margin: float = 1.5,
    dimension_indicator: DimensionIndicator | None = None,
    indicator_top: int | None = None,
) -> ScanReport:
    """Score the suspect's vocabulary rows and weights against its base (no poisoned data).

    ``clean`` gives token frequencies (without it: a frequency table in ``config``, else the
    vocabulary order) and the Fisher estimate of the per-dimension indicator (default:
    Fine-purifying's; ``dimension_indicator`` replaces it). ``indicator_top`` dimensions are
    summarised by layer (default: the top 1 %).
    """
    check_same_architecture(suspect, base)
    config = config or EpurScoring()
    scores = score_tokens(suspect, base, clean, config)
    score = primary_score(scores, config)
    ranked = scores.ranking(score)  # type: ignore[arg-type]
    flagged, rule, bar = standing_out(scores, score, margin, config.z_thr)
    stands = set(flagged)
    top = [{**scores.record(k, r + 1), "stands_out": k in stands} for r, k in enumerate(ranked[:top_k])]
    rank_of = {int(k): r + 1 for r, k in enumerate(ranked)}
    matrices = weight_drift(suspect, base)
    hook = dimension_summary(suspect, base, clean, dimension_indicator, indicator_top)
    logger.info("scan: stands out: %s (%s)", " ".join(scores.tokens[k] for k in flagged) or "nothing", rule)
    return ScanReport(
        suspect=suspect.source, base=base.source, scores=scores, primary_score=score, top=top,
        standing_out=[scores.record(k, rank_of[k]) for k in flagged], standing_out_rule=rule,
        standing_out_bar=bar, matrices=matrices, layers=layer_summary(matrices), fine_purifying=hook,
        n_clean=len(clean) if clean is not None else None, z_thr=config.z_thr, warnings=list(scores.warnings),
    )


# ----------------------------------------------------------------------------- writers
def _replace_from_tmp(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    _replace_from_tmp(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def scan_markdown(report: ScanReport, plot_name: str | None = "drift_vs_frequency.png") -> str:
    """A short Markdown report: what stands out, the top tokens, the most-moved weights."""
    freq = frequency_summary(report.scores)
    names = [f"`{_md_cell(t['token'])}`" for t in report.standing_out]
    lines = [
        "# E-PUR-style scan (provisional)", "",
        f"- suspect: `{report.suspect}`", f"- base: `{report.base}`",
        f"- token frequencies: {freq['source']} ({_fmt(freq['n_tokens'])} tokens), f_min {freq['f_min']:g}",
        f"- ranked by: {report.primary_score}",
        f"- **stands out**: {', '.join(names) if names else 'nothing'} — rule: {report.standing_out_rule}", "",
        "## Top suspected trigger tokens", "",
        "| rank | token | id | drift Δ | freq | clean freq | ratio | residual z | stands out |",
        "|---:|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for t in report.top:
        lines.append(f"| {t['rank']} | `{_md_cell(t['token'])}` | {t['id']} | {_fmt(t['drift'])} | {_fmt(t['freq'])} | "
                     f"{_fmt(t['clean_freq'])} | {_fmt(t['ratio'])} | {_fmt(t['residual_z'], 3)} | "
                     f"{'yes' if t['stands_out'] else ''} |")
    lines += ["", "## Weights that moved most (relative drift ‖θ_B − θ_pre‖ / ‖θ_pre‖)", "",
              "| layer | relative drift | most-moved tensor |", "|---|---:|---|"]
    lines += [f"| {r['layer']} | {_fmt(r['relative_drift'])} | `{r['most_moved']}` ({_fmt(r['most_moved_relative_drift'])}) |"
              for r in report.layers]
    lines += ["", "| tensor | shape | relative drift | max abs change |", "|---|---|---:|---:|"]
    lines += [f"| `{m.name}` | {'×'.join(map(str, m.shape))} | {_fmt(m.relative_drift)} | {_fmt(m.max_abs)} |"
              for m in [m for m in report.matrices if m.relative_drift is not None][:10]]
    lines += ["", "## Fine-purifying dimensions", ""]
    fp = report.fine_purifying
    if fp.get("computed"):
        lines += [f"Top {fp['top']} dimensions by layer: " +
                  ", ".join(f"{r['layer']} {100 * r['share']:.0f}%" for r in fp["layers"])]
    else:
        lines.append(fp.get("todo", "not computed"))
    if plot_name:
        lines += ["", f"![drift vs frequency]({plot_name})"]
    if report.warnings:
        lines += ["", "## Notes", ""] + [f"- {w}" for w in report.warnings]
    lines += ["", "E-PUR's score is reconstructed, not confirmed against the paper (see the method spec). "
              "Scores never use poisoned data.", ""]
    return "\n".join(lines)


def token_scores_csv(scores: TokenScores) -> str:
    """Every embedding row: id, token, Δ, f, clean f, ratio, residual z, status."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "token", "drift", "freq", "clean_freq", "ratio", "residual_z", "status"])
    for k, token in enumerate(scores.tokens):
        rec = scores.record(k)
        status = ("special" if scores.special[k] else "untouched" if scores.untouched[k]
                  else "scored" if scores.scored[k] else "not scored")
        writer.writerow([k, token] + [_fmt(rec[c], 6) if rec[c] is not None else "" for c in
                                      ("drift", "freq", "clean_freq", "ratio", "residual_z")] + [status])
    return buf.getvalue()


def plot_drift_vs_frequency(report: ScanReport, path: Path, max_labels: int = 15) -> None:
    """PNG scatter of drift vs frequency (log-log), top tokens labelled, standing-out ones in red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = report.scores
    counts = s.freq.counts
    # both coordinates are x = log(plotted value): log(1 + f), or -log(rank) = log(1/rank) under vocab_rank
    x = counts + 1 if counts is not None else np.exp(np.nan_to_num(s.freq.x, nan=0.0))
    xlabel = ("token frequency + 1 (" + s.freq.source + ")") if counts is not None else "pseudo-frequency 1/rank (vocab_rank)"
    shown = s.scored & (s.drift > 0)
    stands = {t["id"] for t in report.standing_out}
    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(x[shown], s.drift[shown], s=8, c="0.6", alpha=0.6, linewidths=0, label="scored rows")
    top_ids = [t["id"] for t in report.top]
    lab = [k for k in top_ids if k not in stands][: max(0, max_labels - len(stands))]
    if lab:
        ax.scatter(x[lab], s.drift[lab], s=22, c="tab:orange", label=f"top {report.primary_score}")
    if stands:
        ids = sorted(stands)
        ax.scatter(x[ids], s.drift[ids], s=40, c="tab:red", edgecolors="k", linewidths=0.5, label="stands out")
    _label_points(ax, s.tokens, x, s.drift, sorted(stands, key=lambda k: -s.drift[k]) + lab, stands)
    if shown.any():
        grid = np.geomspace(float(x[shown].min()), float(x[shown].max()) * 1.05, 200)
        _decision_curve(ax, report, grid)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("embedding drift ‖e_B − e_pre‖")
    ax.set_title(f"E-PUR-style scan: {int(shown.sum())} scored rows; stands out: "
                 f"{', '.join(s.tokens[k] for k in sorted(stands, key=lambda k: -s.drift[k])[:6]) or 'nothing'}",
                 fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _replace_from_tmp(path, lambda tmp: fig.savefig(tmp, format="png"))


def _label_points(ax: Any, tokens: list[str], x: np.ndarray, y: np.ndarray, ids: list[int], stands: set[int]) -> None:
    """Label points; labels of points that nearly coincide are spread side by side."""
    placed: list[tuple[float, float]] = []
    for k in ids:
        lx, ly = float(np.log10(x[k])), float(np.log10(y[k]))
        near = sum(abs(lx - px) < 0.05 and abs(ly - py) < 0.03 for px, py in placed)
        placed.append((lx, ly))
        ax.annotate(tokens[k], (x[k], y[k]), xytext=(5 + 26 * near, 3), textcoords="offset points", fontsize=8,
                    color="tab:red" if k in stands else "0.2", fontweight="bold" if k in stands else "normal")


def _decision_curve(ax: Any, report: ScanReport, grid: np.ndarray) -> None:
    """The drift at which a token stands out, as a function of frequency + 1 (``grid``)."""
    s = report.scores
    if report.primary_score == "ratio" and report.standing_out_bar is not None:
        g = 1.0 / ratio_scores(np.ones_like(grid), grid - 1, s.freq.f_min, s.ratio_g)
        ax.plot(grid, report.standing_out_bar * g, "--", c="tab:red", lw=0.9,
                label=f"stands out above (ratio {report.standing_out_bar:.3g})")
    elif report.primary_score == "residual" and s.fit is not None:
        line = s.fit.intercept + s.fit.slope * np.log(grid) + s.fit.centre  # x = log(plotted coordinate)
        ax.plot(grid, np.exp(line), "-", c="tab:blue", lw=1, label="residual fit (log Δ on log frequency)")
        ax.plot(grid, np.exp(line + report.z_thr * s.fit.scale), "--", c="tab:red", lw=0.9,
                label=f"stands out above (residual z {report.z_thr:g})")


def write_scan_outputs(report: ScanReport, folder: str | Path, extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write scan.json (``extra`` first, e.g. the command config), scan.md, token_scores.csv and
    drift_vs_frequency.png into ``folder`` (normally an :func:`~unbackdoor.outputs.atomic_output_dir`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in SCAN_FILES}
    write_json(paths["scan.json"], {**(extra or {}), **report.to_dict()})
    write_text_atomic(paths["scan.md"], scan_markdown(report))
    write_text_atomic(paths["token_scores.csv"], token_scores_csv(report.scores))
    plot_drift_vs_frequency(report, paths["drift_vs_frequency.png"])
    return paths
