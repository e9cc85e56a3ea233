"""E-PUR-style embedding purification (Zhang, Lyu, Ma, Wang, Sun: *Fine-mixing*, Findings of EMNLP
2022, arXiv 2210.09545). Spec: ``docs/methods/e-pur.md`` in the shared docs. **Provisional**: the
paper's exact score was not available; user-facing text says "E-PUR-style".

Steps, one function each:

1. :func:`embedding_drift`: Δ_k = ‖e^B_k − e^pre_k‖₂ for every input word-embedding row.
2. :func:`resolve_frequencies`: token frequency f_k (a user table, the clean set's text, or the
   vocabulary order), counted with the model's own tokenizer.
3. :func:`ratio_scores` (s_k = Δ_k / g(f_k)) or :func:`residual_scores` (robust z of log Δ
   against a robust line in log-frequency).
4. :func:`choose_rows`: the top N rows (``ratio``) or those above ``z_thr`` (``residual``, at most N).
5. :func:`reset_rows`: e_k ← e^pre_k for the chosen rows; nothing else changes.
6. Alone (``finetune=True``): clean fine-tuning, epoch chosen on held-out clean data.

:func:`score_tokens` (steps 1-3, used by ``unbackdoor scan``) and :func:`apply_epur` (steps 1-5,
for other methods' ``--epur``) are the public entry points. Score on θ_B *before* mixing; the reset
may happen before or after element-wise mixing (bit-identical), and before fine-tuning.

Provenance of each choice (``docs/methods/e-pur.md`` §9/§10):

* faithful [ABS]: targets backdoors in the word embeddings; composes with other purifiers.
* [MEM, low]: the ratio form with g = log (``score="ratio"``, ``ratio_g="log"``); the reset value
  (the pre-trained row); ``n_reset=200``; E-PUR before the clean fine-tuning.
* [RECON] (ours): ``f_min`` (the method notes' 20, but ``"auto"`` lowers it for small sources, below),
  ``score="residual"`` and its fit, ``freq_source`` (``auto``/``table``/``clean``/``vocab_rank``),
  the small-source warning, table validation, ``finetune=True`` with Fine-mixing's fine-tuning
  (lr 1e-4 for MiniLM, 5 epochs, batch 32, held-out 20 %), the optional held-out search over ``n_reset``,
  and ``decay_tol``: rows whose change is only AdamW's global weight-decay shrink (e^B = c·e^pre,
  the same c for all such rows) received no gradient and are treated like the method notes' Δ = 0 rows
  (never flagged, left out of the residual fit). Set ``decay_tol=0`` for the method notes' literal rule.

``f_min="auto"`` [RECON, measured]: 20 · (source tokens / 10⁵), clipped to [2, 20]; i.e. the method notes'
20 for sources of 10⁵ tokens or more. With a 100-row clean set every token sits below 20, the ratio
degenerates to raw drift, and on the tiny planted BadNets victim task words then outrank the
triggers; with the floor at 2 (the smallest integer with log f > 0) the triggers rank first.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import AliasChoices, Field, model_validator

from unbackdoor.config import StrictConfig
from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset, require_clean_dataset
from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyResult, PurifyDefense, PurifyInputs
from unbackdoor.training.config import five_epoch_train_config
from unbackdoor.selection import finetune_with_selection
from unbackdoor.selection import TOLERANCE_HELP, search_within_tolerance
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.models.loading import Classifier, check_same_architecture
from unbackdoor.training.config import TrainConfig
from unbackdoor.training.loop import evaluate_accuracy

logger = logging.getLogger(__name__)

SPEC_F_MIN = 20.0
AUTO_F_MIN_FLOOR = 2.0
LARGE_SOURCE_TOKENS = 100_000
COMMON_WORDS = ("the", "of", "and")
WORD_PREFIXES = ("##", "Ġ", "▁")
BRACKETED = re.compile(r"^(\[.*\]|<.*>)$")
UNUSED_SLOT = re.compile(r"^(\[unused\d+\]|<unused\d+>|<extra_id_\d+>)$")
ScoreName = Literal["ratio", "residual"]


class EpurScoring(StrictConfig):
    """How E-PUR scores vocabulary rows (shared by the defence and ``unbackdoor scan``)."""

    score: ScoreName = Field("ratio", description="ranking score: ratio = drift / g(freq) [MEM, low]; "
                             "residual = robust z of log drift against a robust line in log freq [RECON]")
    freq_source: Literal["auto", "table", "clean", "vocab_rank"] = Field(
        "auto", description="token frequencies: table (freq_table), clean (the clean set's text + extra_text), "
        "vocab_rank (vocabulary order; last resort, residual only); auto = table if given, else clean, "
        "else vocab_rank [RECON]")
    freq_table: str | None = Field(None, description="token -> count table made with the model's tokenizer: "
                                   "JSON object or 'token<TAB>count' lines")
    extra_text: str | None = Field(None, description="unlabelled in-domain text (one text per line) counted "
                                   "together with the clean set under freq_source=clean")
    f_min: float | Literal["auto"] = Field("auto", description="frequency floor of the ratio's g and of the residual "
                                           "fit; auto = 20*(source tokens/1e5) clipped to [2, 20] [RECON; spec: 20]")
    ratio_g: Literal["log", "sqrt"] = Field("log", description="increasing g of the ratio: log(max(f, f_min)) "
                                            "[MEM, low] or sqrt(max(f, f_min)) [RECON]")
    z_thr: float = Field(3.5, gt=0, description="residual: flag rows with robust z above this [RECON]")
    residual_fit: Literal["huber", "theil_sen"] = Field("huber", description="robust line fit of the residual score")
    min_fit_tokens: int = Field(100, ge=3, description="residual: fit on rows with f >= f_min if at least this "
                                "many, else on all scored rows (``docs/methods/e-pur.md`` §6)")
    decay_tol: float = Field(1e-4, ge=0, description="rows changed only by the global weight-decay shrink (relative "
                             "tolerance) count as untouched: never flagged [RECON]; 0 = method notes' literal Δ=0 rule")
    small_source_tokens: int = Field(LARGE_SOURCE_TOKENS, ge=0, description="warn when the frequency source has "
                                     "fewer tokens than this [RECON]")
    table_max_unknown: float = Field(0.05, ge=0, le=1, description="error when a larger share of the table's "
                                     "tokens is not in the vocabulary [RECON]")
    vocab_rank_check_rank: int = Field(300, ge=1, description="vocab_rank self-check: 'the', 'of', 'and' must sit "
                                       "within this many ordinary ranks [RECON]")
    seed: int = Field(0, description="seed of the held-out clean split (defence) and of Theil-Sen's pair sample")

    @model_validator(mode="after")
    def _consistent(self) -> EpurScoring:
        if self.freq_source == "vocab_rank" and self.score == "ratio":
            raise ValueError("freq_source=vocab_rank gives no counts; use score=residual with it (``docs/methods/e-pur.md`` §5)")
        if self.freq_source == "table" and not self.freq_table:
            raise ValueError("freq_source=table needs freq_table")
        if self.freq_table and self.freq_source in ("clean", "vocab_rank"):
            raise ValueError(f"freq_table is not used with freq_source={self.freq_source}; use table or auto")
        if isinstance(self.f_min, float) and self.f_min <= 1:
            raise ValueError("f_min must be above 1 (log f_min must be positive)")
        return self


class EpurConfig(EpurScoring):
    """E-PUR as a purify defence: scoring options plus how many rows to reset and the fine-tuning."""

    n_reset: int = Field(200, ge=0, description="rows reset: exactly the top N (ratio) or at most N (residual) "
                         "[MEM, low: 'a few hundred']")
    n_reset_grid: tuple[int, ...] | None = Field(None, description="if given, choose n_reset from these on held-out "
                                                 "clean data: the largest whose drop is within tolerance [RECON]")
    tolerance: float = Field(0.01, ge=0, le=1, validation_alias=AliasChoices("tolerance", "max_heldout_drop"),
                             description=f"n_reset_grid: {TOLERANCE_HELP} [RECON]")
    finetune: bool = Field(True, description="clean fine-tuning after the reset (``docs/methods/e-pur.md`` §7 'alone'); False = bare reset")
    train: TrainConfig = Field(default_factory=five_epoch_train_config, description="fine-tuning settings")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of the clean set held out for selection "
                                    "and for the before/after-reset accuracy check")

    @model_validator(mode="after")
    def _grid(self) -> EpurConfig:
        if self.n_reset_grid is not None and (not self.n_reset_grid or min(self.n_reset_grid) < 0):
            raise ValueError("n_reset_grid must hold non-negative row counts")
        return self


# ----------------------------------------------------------------------------- step 1: drift
@dataclass
class RowChange:
    """Per-row change of the input word embeddings between suspect and base."""

    drift: np.ndarray  # Δ_k = ‖e^B_k − e^pre_k‖₂
    untouched: np.ndarray  # bool: unchanged, or only shrunk by the shared weight-decay factor
    decay_factor: float | None  # that shared factor c (None if no row is a pure shrink)


def input_embeddings(clf: Classifier) -> torch.nn.Parameter:
    """The input word-embedding matrix (vocabulary rows)."""
    emb = clf.model.get_input_embeddings()
    if emb is None or not hasattr(emb, "weight"):
        raise ConfigError(f"{clf.source}: the model has no input word-embedding matrix")
    return emb.weight


@torch.no_grad()
def embedding_drift(suspect: Classifier, base: Classifier, decay_tol: float = 1e-4, chunk: int = 4096) -> RowChange:
    """Δ_k per row, and which rows received no gradient (``docs/methods/e-pur.md`` §4; the shrink test is [RECON]).

    A row counts as untouched when e^B_k = c·e^pre_k up to ``decay_tol`` (relative), with the same
    c for all such rows: AdamW's decoupled weight decay shrinks every row by one common factor.
    """
    a, b = input_embeddings(suspect), input_embeddings(base)
    if a.shape != b.shape:
        raise ConfigError(f"input embeddings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    drift, factor, perp = [], [], []
    for start in range(0, a.shape[0], chunk):
        ea = a[start:start + chunk].detach().double().cpu()
        eb = b[start:start + chunk].detach().double().cpu()
        drift.append((ea - eb).norm(dim=1))
        nb2 = (eb * eb).sum(dim=1)
        c = torch.where(nb2 > 0, (ea * eb).sum(dim=1) / nb2.clamp_min(1e-300), torch.ones_like(nb2))
        rest = (ea - c[:, None] * eb).norm(dim=1)
        perp.append(torch.where(nb2 > 0, rest / nb2.sqrt().clamp_min(1e-300), rest))
        factor.append(c)
    d, c, p = (torch.cat(t).numpy() for t in (drift, factor, perp))
    eps = max(float(torch.finfo(a.dtype).eps), float(torch.finfo(b.dtype).eps))
    tol = max(decay_tol, 4 * eps) if decay_tol > 0 else 0.0  # half-precision weights: rounding is not drift
    untouched = d == 0
    shared = None
    if tol > 0:
        shrunk = p <= tol
        if shrunk.any():
            shared = float(np.median(c[shrunk]))
            untouched |= shrunk & (np.abs(c - shared) <= tol)
    return RowChange(d, untouched, shared)


# ----------------------------------------------------------------------------- step 2: frequency
@dataclass
class Frequencies:
    """Token frequencies per embedding row, in the coordinates the scores use."""

    source: str  # table | clean | vocab_rank
    counts: np.ndarray | None  # f_k (None under vocab_rank)
    x: np.ndarray  # frequency coordinate of the residual fit: log(1+f), or -log(rank); NaN = none
    n_tokens: int | None  # size of the source in tokens (None under vocab_rank)
    f_min: float
    warnings: list[str] = field(default_factory=list)


def _warn(warnings: list[str], message: str) -> None:
    logger.warning(message)
    warnings.append(message)


def dataset_texts(data: Dataset) -> list[str]:
    """Every sentence of a dataset (both sentences of a pair)."""
    require_clean_dataset(data, "E-PUR's frequency source")
    return [t for e in data.examples for t in (e.text, e.text_pair) if t]


def count_tokens(tokenizer: Any, texts: Iterable[str], n_rows: int, batch: int = 1000) -> np.ndarray:
    """Count each token id in ``texts`` with the model's tokenizer, without special tokens."""
    counts = np.zeros(n_rows, dtype=np.float64)
    texts = list(texts)
    for start in range(0, len(texts), batch):
        ids = tokenizer(texts[start:start + batch], add_special_tokens=False)["input_ids"]
        flat = np.fromiter((i for row in ids for i in row), dtype=np.int64)
        if flat.size:
            counts += np.bincount(flat[flat < n_rows], minlength=n_rows)[:n_rows]
    counts[[i for i in tokenizer.all_special_ids if i < n_rows]] = 0
    return counts


def read_text_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read text ({exc})") from exc


def _parse_table(path: Path) -> dict[str, float]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the frequency table ({exc})") from exc
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: malformed JSON ({exc.msg})") from exc
        if not isinstance(data, dict):
            raise DataError(f"{path}: a JSON frequency table must be an object token -> count")
        items = list(data.items())
    else:
        items = []
        for n, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            token, sep, count = line.rpartition("\t") if "\t" in line else line.rpartition(" ")
            if not sep:
                raise DataError(f"{path}: line {n + 1}: expected 'token<TAB>count'")
            items.append((token, count))
    table: dict[str, float] = {}
    for n, (token, count) in enumerate(items):
        try:
            value = float(count)
        except (TypeError, ValueError):
            if n == 0:
                continue  # a header line
            raise DataError(f"{path}: count {count!r} of token {token!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise DataError(f"{path}: count of token {token!r} must be a non-negative number")
        table[token] = table.get(token, 0.0) + value
    if not table:
        raise DataError(f"{path}: the frequency table is empty")
    return table


def _has_upper(token: str) -> bool:
    return any(ch.isupper() for ch in token)


def is_cased_vocabulary(tokens: Iterable[str]) -> bool:
    """At least 1 % of the word tokens (not bracketed markers like ``[EOS]``) have upper-case letters."""
    words = [t for t in tokens if any(ch.isalpha() for ch in t) and not BRACKETED.match(t)]
    return bool(words) and sum(_has_upper(t) for t in words) >= 0.01 * len(words)


def table_frequencies(path: str | Path, tokenizer: Any, n_rows: int, max_unknown: float,
                      warnings: list[str]) -> np.ndarray:
    """Counts per row from a token -> count table; refuses tables made with another tokenizer."""
    table = _parse_table(Path(path))
    vocab = tokenizer.get_vocab()
    specials = set(tokenizer.all_special_tokens)
    vocab_cased = is_cased_vocabulary(t for t in vocab if t not in specials)
    table_upper = sum(_has_upper(t) for t in table)
    if not vocab_cased and table_upper:
        _warn(warnings, f"{path}: {table_upper} table tokens have upper-case letters but the tokenizer's "
              "vocabulary is lower-case (casing mismatch?)")
    elif vocab_cased and len(table) >= 100 and not table_upper:
        _warn(warnings, f"{path}: the table is all lower-case but the tokenizer is cased (casing mismatch?)")
    unknown = [t for t in table if t not in vocab]
    if len(unknown) > max_unknown * len(table):
        raise DataError(f"{path}: {len(unknown)} of {len(table)} table tokens (e.g. {unknown[0]!r}) are not in the "
                        "model's vocabulary; count with the model's own tokenizer")
    counts = np.zeros(n_rows, dtype=np.float64)
    for token, value in table.items():
        i = vocab.get(token)
        if i is not None and i < n_rows and token not in specials:
            counts[i] += value
    return counts


def _strip_prefix(token: str) -> str:
    for prefix in WORD_PREFIXES:
        if token.startswith(prefix):
            return token[len(prefix):]
    return token


def vocab_rank_coordinate(tokenizer: Any, n_rows: int, check_rank: int) -> np.ndarray:
    """x_k = −log(rank_k) over ordinary tokens in vocabulary order (NaN for the others); ``docs/methods/e-pur.md`` §5.

    Ordinary: not special, not an unused slot, more than one character after the word prefix.
    Refuses when 'the', 'of' and 'and' do not all rank within ``check_rank``.
    """
    specials = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), n_rows))))
    x = np.full(n_rows, np.nan)
    rank_of: dict[str, int] = {}
    rank = 0
    for i, token in enumerate(tokens):
        if i in specials or token is None or UNUSED_SLOT.match(token) or len(_strip_prefix(token)) <= 1:
            continue
        rank += 1
        x[i] = -math.log(rank)
        rank_of.setdefault(_strip_prefix(token).lower(), rank)
    late = {w: rank_of.get(w) for w in COMMON_WORDS if rank_of.get(w) is None or rank_of[w] > check_rank}
    if late:
        raise ConfigError(f"freq_source=vocab_rank: this vocabulary is not frequency-ordered ({late} not within the "
                          f"first {check_rank} ordinary tokens); give a frequency table or clean data")
    return x


def auto_f_min(n_tokens: int) -> float:
    """[RECON] 20 for sources of 10⁵ tokens or more, proportionally less below, never under 2."""
    return float(min(SPEC_F_MIN, max(AUTO_F_MIN_FLOOR, SPEC_F_MIN * n_tokens / LARGE_SOURCE_TOKENS)))


def resolve_source(config: EpurScoring, have_clean: bool) -> str:
    """``auto`` -> table if given, else clean if there is clean data, else vocab_rank."""
    if config.freq_source != "auto":
        return config.freq_source
    if config.freq_table:
        return "table"
    return "clean" if have_clean or config.extra_text else "vocab_rank"


def resolve_frequencies(config: EpurScoring, tokenizer: Any, n_rows: int, clean: Dataset | None) -> Frequencies:
    """Token frequencies from the configured source (never poisoned data: a Dataset or a table)."""
    source = resolve_source(config, clean is not None)
    warnings: list[str] = []
    if source == "vocab_rank":
        x = vocab_rank_coordinate(tokenizer, n_rows, config.vocab_rank_check_rank)
        f_min = SPEC_F_MIN if config.f_min == "auto" else float(config.f_min)
        _warn(warnings, "frequencies from the vocabulary order (vocab_rank): a weak proxy; give clean data or a table")
        return Frequencies(source, None, x, None, f_min, warnings)
    if source == "table":
        counts = table_frequencies(config.freq_table or "", tokenizer, n_rows, config.table_max_unknown, warnings)
    else:
        texts = dataset_texts(clean) if clean is not None else []
        if config.extra_text:
            texts += read_text_lines(config.extra_text)
        if not texts:
            raise ConfigError("freq_source=clean needs clean data or extra_text")
        counts = count_tokens(tokenizer, texts, n_rows)
    n_tokens = int(counts.sum())
    if n_tokens < config.small_source_tokens:
        _warn(warnings, f"the frequency source ({source}) has only {n_tokens} tokens (< {config.small_source_tokens}): "
              "most tokens sit at the floor, and task words absent from it may be flagged (``docs/methods/e-pur.md`` §5)")
    f_min = auto_f_min(n_tokens) if config.f_min == "auto" else float(config.f_min)
    return Frequencies(source, counts, np.log1p(counts), n_tokens, f_min, warnings)


# ----------------------------------------------------------------------------- step 3: scores
def ratio_scores(drift: np.ndarray, counts: np.ndarray, f_min: float, g: str = "log") -> np.ndarray:
    """s_k = Δ_k / g(max(f_k, f_min)) with g = log [MEM, low] or sqrt [RECON]."""
    floored = np.maximum(counts, f_min)
    return drift / (np.log(floored) if g == "log" else np.sqrt(floored))


def huber_line(x: np.ndarray, y: np.ndarray, c: float = 1.345, iterations: int = 50) -> tuple[float, float]:
    """Robust line y = a + b·x by iteratively reweighted least squares with Huber weights."""
    design = np.column_stack([np.ones_like(x), x])
    beta = np.linalg.lstsq(design, y, rcond=None)[0]
    for _ in range(iterations):
        r = y - design @ beta
        scale = robust_scale(r)
        if scale == 0:
            break
        u = np.abs(r) / (c * scale)
        w = np.sqrt(np.where(u <= 1, 1.0, 1.0 / np.maximum(u, 1e-12)))
        new = np.linalg.lstsq(design * w[:, None], y * w, rcond=None)[0]
        if np.allclose(new, beta, rtol=1e-10, atol=1e-12):
            beta = new
            break
        beta = new
    return float(beta[0]), float(beta[1])


def theil_sen_line(x: np.ndarray, y: np.ndarray, seed: int = 0, max_pairs: int = 200_000) -> tuple[float, float]:
    """Theil–Sen line: median pairwise slope (a seeded sample of pairs when there are many)."""
    n = len(x)
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, 1)
    else:
        rng = np.random.default_rng(seed)
        i, j = rng.integers(0, n, max_pairs), rng.integers(0, n, max_pairs)
    keep = x[i] != x[j]
    slope = float(np.median((y[j] - y[i])[keep] / (x[j] - x[i])[keep])) if keep.any() else 0.0
    return float(np.median(y - slope * x)), slope


def robust_scale(r: np.ndarray) -> float:
    """1.4826·MAD, falling back to 1.2533·mean absolute deviation when the MAD is 0."""
    centre = np.median(r)
    mad = 1.4826 * float(np.median(np.abs(r - centre)))
    return mad if mad > 0 else 1.2533 * float(np.mean(np.abs(r - centre)))


@dataclass
class ResidualFit:
    """The line and the residual distribution of the ``residual`` score."""

    intercept: float
    slope: float
    centre: float  # median residual
    scale: float  # robust scale of the residuals
    n_fit: int
    fit_on: str  # "f>=f_min" or "all scored rows"
    method: str


def residual_scores(drift: np.ndarray, x: np.ndarray, counts: np.ndarray | None, scored: np.ndarray, f_min: float,
                    config: EpurScoring) -> tuple[np.ndarray, ResidualFit | None]:
    """Robust z of r_k = log Δ_k − (a + b·x_k) over the scored rows (NaN elsewhere); ``docs/methods/e-pur.md`` §6."""
    z = np.full(len(drift), np.nan)
    rows = scored & np.isfinite(x) & (drift > 0)
    if rows.sum() < 3:
        return z, None
    y = np.log(np.where(rows, drift, 1.0))
    frequent = rows & (counts >= f_min) if counts is not None else np.zeros_like(rows)
    fit_rows, fit_on = (frequent, "f>=f_min") if frequent.sum() >= config.min_fit_tokens else (rows, "all scored rows")
    if config.residual_fit == "huber":
        a, b = huber_line(x[fit_rows], y[fit_rows])
    else:
        a, b = theil_sen_line(x[fit_rows], y[fit_rows], config.seed)
    r = y - (a + b * x)
    centre, scale = float(np.median(r[rows])), robust_scale(r[rows])
    z[rows] = (r[rows] - centre) / scale if scale > 0 else 0.0
    return z, ResidualFit(a, b, centre, scale, int(fit_rows.sum()), fit_on, config.residual_fit)


@dataclass
class TokenScores:
    """E-PUR scores of every input-embedding row of a suspect against its base."""

    tokens: list[str]
    drift: np.ndarray
    freq: Frequencies
    ratio: np.ndarray | None  # NaN on rows that are not scored
    z: np.ndarray  # residual robust z; NaN on rows that are not scored
    scored: np.ndarray  # bool: may be flagged
    special: np.ndarray
    untouched: np.ndarray
    fit: ResidualFit | None
    clean_counts: np.ndarray | None = None  # clean-set frequency (reported for every flagged token)
    decay_factor: float | None = None
    ratio_g: str = "log"

    @property
    def warnings(self) -> list[str]:
        return self.freq.warnings

    def values(self, score: ScoreName) -> np.ndarray:
        if score == "ratio":
            if self.ratio is None:
                raise ConfigError("the ratio score needs token counts (not available under vocab_rank)")
            return self.ratio
        return self.z

    def ranking(self, score: ScoreName) -> np.ndarray:
        """Row ids of the scored rows, highest score first (ties: lower id first)."""
        values = self.values(score)
        ids = np.flatnonzero(self.scored & np.isfinite(values))
        return ids[np.lexsort((ids, -values[ids]))]

    def record(self, k: int, rank: int | None = None) -> dict[str, Any]:
        """One row as JSON-able values: token, id, Δ, f, clean f, both scores, rank."""
        def num(a: np.ndarray | None) -> float | None:
            return None if a is None or not np.isfinite(a[k]) else float(a[k])

        return {"rank": rank, "token": self.tokens[k], "id": int(k), "drift": float(self.drift[k]),
                "freq": num(self.freq.counts), "clean_freq": num(self.clean_counts),
                "ratio": num(self.ratio), "residual_z": num(self.z)}


def row_tokens(tokenizer: Any, n_rows: int) -> list[str]:
    """Token string of each embedding row (rows beyond the tokenizer get a placeholder)."""
    n_tok = min(len(tokenizer), n_rows)
    tokens = [t if t is not None else f"<id {i}>" for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(n_tok))))]
    return tokens + [f"<row {i}>" for i in range(n_tok, n_rows)]


def score_tokens(suspect: Classifier, base: Classifier, clean: Dataset | None = None,
                 config: EpurScoring | None = None) -> TokenScores:
    """Steps 1-3: drift, frequency and both scores for every vocabulary row of ``suspect`` (θ_B).

    Special tokens, rows beyond the tokenizer, and untouched rows (Δ = 0 or a pure weight-decay
    shrink) are never scored. ``clean`` is clean text for the frequencies (never poisoned data).
    """
    config = config or EpurScoring()
    check_same_architecture(suspect, base)
    change = embedding_drift(suspect, base, config.decay_tol)
    n_rows = len(change.drift)
    tokenizer = suspect.tokenizer
    freq = resolve_frequencies(config, tokenizer, n_rows, clean)
    special = np.zeros(n_rows, dtype=bool)
    special[[i for i in tokenizer.all_special_ids if i < n_rows]] = True
    in_tokenizer = np.arange(n_rows) < len(tokenizer)
    scored = in_tokenizer & ~special & ~change.untouched & (change.drift > 0)
    ratio = None
    if freq.counts is not None:
        ratio = np.where(scored, ratio_scores(change.drift, freq.counts, freq.f_min, config.ratio_g), np.nan)
    z, fit = residual_scores(change.drift, freq.x, freq.counts, scored, freq.f_min, config)
    clean_counts = None
    if freq.source == "clean" and not config.extra_text:
        clean_counts = freq.counts
    elif clean is not None:
        clean_counts = count_tokens(tokenizer, dataset_texts(clean), n_rows)
    if model_ties_embeddings(suspect):
        logger.info("input and output embeddings are tied: a reset also changes the output layer "
                    "(sequence-classification heads do not use it)")
    logger.info("E-PUR scores: %d of %d rows scored (%d untouched, %d special); frequencies: %s, %s tokens, f_min %.3g",
                scored.sum(), n_rows, change.untouched.sum(), special.sum(), freq.source, freq.n_tokens, freq.f_min)
    return TokenScores(row_tokens(tokenizer, n_rows), change.drift, freq, ratio, z, scored, special,
                       change.untouched, fit, clean_counts, change.decay_factor, config.ratio_g)


def model_ties_embeddings(clf: Classifier) -> bool:
    out = clf.model.get_output_embeddings()
    return out is not None and getattr(out, "weight", None) is input_embeddings(clf)


# ----------------------------------------------------------------------------- steps 4-5: choose and reset
def choose_rows(scores: TokenScores, score: ScoreName, n_reset: int, z_thr: float) -> list[int]:
    """The rows to reset: the top ``n_reset`` (ratio), or those with z > ``z_thr``, at most ``n_reset`` (residual)."""
    ranked = scores.ranking(score)
    if score == "residual":
        ranked = ranked[scores.z[ranked] > z_thr]
    return [int(k) for k in ranked[:n_reset]]


@torch.no_grad()
def reset_rows(suspect: Classifier, base: Classifier, rows: Sequence[int]) -> None:
    """e_k ← e^pre_k for ``rows``, in place. Every other row and tensor is left untouched."""
    if not rows:
        return
    weight, ref = input_embeddings(suspect), input_embeddings(base)
    index = torch.as_tensor(list(rows), dtype=torch.long, device=weight.device)
    weight[index] = ref.detach()[index.to(ref.device)].to(weight.device, weight.dtype)


# ----------------------------------------------------------------------------- the whole step
def choose_n_on_heldout(suspect: Classifier, base: Classifier, scores: TokenScores, config: EpurConfig,
                        held_out: Dataset, accuracy_before: float) -> tuple[int, dict[str, Any]]:
    """[RECON] The largest N in ``n_reset_grid`` whose reset keeps held-out clean accuracy within
    ``tolerance`` (0, no reset, if none does). Clean data only; the model is restored after each try."""
    weight = input_embeddings(suspect)
    saved = weight.detach().clone()

    def try_n(n: int) -> tuple[float, dict[str, Any]]:
        rows = choose_rows(scores, config.score, n, config.z_thr)
        reset_rows(suspect, base, rows)
        accuracy = evaluate_accuracy(suspect, held_out)
        with torch.no_grad():
            weight.copy_(saved)
        return accuracy, {"n_flagged": len(rows)}

    grid = sorted(set(config.n_reset_grid or ()) | {0}, reverse=True)  # strongest first; 0 always passes
    search = search_within_tolerance(grid, try_n, accuracy_before, config.tolerance, label="E-PUR n_reset search")
    return search.chosen, search.record("n_reset")


def _check_n_reset(rows: Sequence[int], scores: TokenScores) -> None:
    n_scored = int(scores.scored.sum())
    if len(rows) > 0.1 * n_scored:
        _warn(scores.warnings, f"resetting {len(rows)} of {n_scored} scored rows (more than 10%): task words are "
              "likely reset too; lower n_reset for a small vocabulary")


def apply_epur(suspect: Classifier, base: Classifier, clean: Dataset, config: EpurConfig | None = None) -> dict[str, Any]:
    """Score ``suspect`` against ``base``, choose the rows and reset them in place (steps 1-5).

    For other methods' ``--epur``: call this on θ_B before mixing or fine-tuning. Returns the report:
    every reset token with Δ, f, clean-set f and scores, and held-out clean accuracy before/after.
    """
    config = config or EpurConfig()
    scores = score_tokens(suspect, base, clean, config)
    _, held_out = holdout_split(clean, config.holdout_fraction, config.seed)
    before = evaluate_accuracy(suspect, held_out)
    search = None
    n = config.n_reset
    if config.n_reset_grid is not None:
        n, search = choose_n_on_heldout(suspect, base, scores, config, held_out, before)
        logger.info("E-PUR: n_reset=%d chosen on %d held-out clean rows", n, len(held_out))
    rows = choose_rows(scores, config.score, n, config.z_thr)
    _check_n_reset(rows, scores)
    reset_rows(suspect, base, rows)
    after = evaluate_accuracy(suspect, held_out)
    logger.info("E-PUR: reset %d rows (%s); held-out clean accuracy %.3f -> %.3f", len(rows),
                " ".join(scores.tokens[k] for k in rows[:10]), before, after)
    return {
        "label": "E-PUR-style (provisional)",
        "score": config.score,
        "n_reset": n,
        "n_reset_search": search,
        "reset_tokens": [scores.record(k, r + 1) for r, k in enumerate(rows)],
        "frequency_source": frequency_summary(scores),
        "residual_fit": vars(scores.fit) if scores.fit else None,
        "n_scored_rows": int(scores.scored.sum()),
        "n_untouched_rows": int((scores.untouched & ~scores.special).sum()),
        "heldout": {"n_rows": len(held_out), "accuracy_before_reset": before, "accuracy_after_reset": after},
        "warnings": list(scores.warnings),
    }


def frequency_summary(scores: TokenScores) -> dict[str, Any]:
    return {"source": scores.freq.source, "n_tokens": scores.freq.n_tokens, "f_min": scores.freq.f_min}


@PURIFY_DEFENSES.register("e-pur")
class Epur(PurifyDefense[EpurConfig]):
    """E-PUR-style: reset the word-embedding rows that drifted most for their frequency, then
    (``finetune=True``) fine-tune on clean data with held-out epoch selection."""

    name = "e-pur"
    config_class = EpurConfig
    needs_base = True

    def _purify(self, inputs: PurifyInputs, work_dir: Path | None) -> PurifyResult:
        assert inputs.base is not None  # needs_base is checked by purify()
        report: dict[str, Any] = {"method": self.name, **apply_epur(inputs.suspect, inputs.base, inputs.clean, self.config)}
        if self.config.finetune:
            report["finetune"] = finetune_with_selection(
                inputs.suspect, inputs.clean, self.config.train, holdout_fraction=self.config.holdout_fraction,
                seed=self.config.seed, work_dir=work_dir)
        return PurifyResult(inputs.suspect, report)
