"""ONION (Qi et al., EMNLP 2021): remove the words whose removal makes an input much more fluent.

Steps, as the paper names them:

1. *suspicion scores*: for each word ``w_i`` of an input, ``f_i = p_0 - p_i``, where ``p_0`` is the
   perplexity of the whole input and ``p_i`` the perplexity without ``w_i``;
2. *outlier word removal*: remove every word with ``f_i > t`` (the threshold ``t_s``), then let the
   model predict on what is left.

Following the paper and OpenBackdoor's ``ONIONDefender``: scores are perplexity differences, words
are whitespace tokens, single-word inputs are left as they are, and ``t = 0`` is the paper's
default (``threshold_rule=fixed``). The paper's perplexity model is GPT-2: give ``lm`` = a local
Hugging Face causal LM folder for that setting (:class:`~unbackdoor.guard.lm.CausalLM`).

Ours, not the paper's:

* the **default language model** is offline: a word trigram model with interpolated Kneser–Ney
  smoothing (:class:`~unbackdoor.guard.lm.KneserNeyLM`) estimated on the guard's clean fitting rows
  (never the held-out rows the threshold is set on) plus, optionally, ``lm_corpus`` (a data-root
  task's training texts, labels ignored, or a ``.txt`` file, one text per line), less any text of a
  held-out row (a model that has seen the calibration rows finds them too fluent, and the
  threshold set on them would remove far more from unseen inputs). It is not GPT-2,
  and the guard's report says so (``report["lm"]``). A trigger word the n-gram model never saw gets
  only the unknown-word probability, so removing it lowers perplexity a lot: the same outlier signal,
  from far less text;
* ``threshold_rule=budget`` (the default): ``t`` is chosen on held-out clean rows. Candidates are the
  ``percentiles`` of the held-out rows' per-word scores (the sweep of the RAP authors' ONION
  re-implementation) and the largest of them (which removes nothing there); the chosen ``t`` is the
  smallest candidate whose rewritten held-out rows keep their clean accuracy within ``frr_budget``
  of the accuracy without rewriting, as do those of every larger candidate;
* a text is never emptied: when every word would be removed, its least suspicious word stays;
* sentence pairs: each text is scored and rewritten on its own; a row's suspicion score is its
  largest ``f_i`` (NaN for a row with no text of two or more words).

ONION rewrites and rejects nothing: in the evaluation its FRR is the clean accuracy it costs and
its FAR the share of triggered rows still predicted as the target after rewriting (its ASR).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from unbackdoor.data.io import load_task
from unbackdoor.data.types import Dataset, Example
from unbackdoor.errors import DataError
from unbackdoor.guard.base import GUARDS, FittedGuard, Guard, GuardConfig, GuardOutput
from unbackdoor.guard.lm import CausalLM, KneserNeyLM, PerplexityModel, load_causal_lm
from unbackdoor.inference import predict
from unbackdoor.models.loading import Classifier

logger = logging.getLogger(__name__)

RAP_AUTHORS_PERCENTILES = (10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95, 97, 99)


class OnionConfig(GuardConfig):
    """ONION's options; see the module docstring for what follows the paper and what is ours."""

    lm: str | None = Field(None, description="[PAPER: GPT-2] a local Hugging Face causal LM folder (safetensors); "
                           "unset: [OURS] the offline word n-gram model")
    lm_corpus: str | None = Field(None, description="[OURS] n-gram model only: more unlabelled text, a data-root "
                                  "task (its train texts, labels ignored) or a .txt file (one text per line)")
    ngram_order: int = Field(3, ge=1, le=5, description="[OURS] n-gram model only: its order (3 = trigram)")
    lm_max_length: int = Field(96, ge=2, description="[PAPER] causal LM only: tokens per text (OpenBackdoor: 96)")
    lm_batch_size: int = Field(32, ge=1, description="[PAPER] causal LM only: texts per forward pass "
                               "(OpenBackdoor: 32)")
    threshold_rule: Literal["budget", "fixed"] = Field(
        "budget", description="[OURS] budget: t chosen on held-out clean rows within frr_budget of clean accuracy; "
        "fixed: t = threshold")
    threshold: float = Field(0.0, description="[PAPER] t for threshold_rule=fixed (the paper's 0)")
    percentiles: tuple[float, ...] = Field(RAP_AUTHORS_PERCENTILES, description="[PAPER] threshold_rule=budget: "
                                           "candidate t at these percentiles of held-out per-word scores (the RAP "
                                           "authors' ONION sweep)")

    @field_validator("lm")
    @classmethod
    def _lm_is_a_folder(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"{value}: no such language-model folder (a local Hugging Face causal LM)")
        return value

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not 0 < p <= 100 for p in value):
            raise ValueError("percentiles must be a non-empty list of values in (0, 100]")
        return tuple(sorted(set(value)))

    @model_validator(mode="after")
    def _options_of_the_lm(self) -> OnionConfig:
        if self.lm is not None:
            given = {"lm_corpus", "ngram_order"} & self.model_fields_set
            if given:
                raise ValueError(f"{', '.join(sorted(given))}: only for the n-gram model (no lm)")
        elif {"lm_max_length", "lm_batch_size"} & self.model_fields_set:
            raise ValueError("lm_max_length, lm_batch_size: only with lm (a causal LM folder)")
        if self.lm_corpus is not None and self.lm_corpus.endswith(".txt") and not Path(self.lm_corpus).is_file():
            raise ValueError(f"lm_corpus {self.lm_corpus}: no such file")
        if self.threshold_rule == "budget" and "threshold" in self.model_fields_set:
            raise ValueError("threshold is for threshold_rule=fixed")
        return self


# ----------------------------------------------------------------------------- step 0: the perplexity model
def corpus_texts(spec: str) -> list[str]:
    """Unlabelled texts: a ``.txt`` file (one per line) or a data-root task's training texts."""
    if spec.endswith(".txt"):
        try:
            lines = Path(spec).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"lm_corpus {spec}: unreadable ({exc})") from exc
        return [ln for ln in lines if ln.strip()]
    return [t for e in load_task(spec).train for t in (e.text, e.text_pair) if t]


def build_lm(cfg: OnionConfig, fit_rows: Dataset, heldout: Dataset, model: Classifier) -> PerplexityModel:
    """The causal LM of ``cfg.lm``, else the n-gram model on the fitting rows (+ ``lm_corpus``, less
    any text of a held-out row: a model that has seen the calibration rows finds them too fluent)."""
    if cfg.lm is not None:
        lm_model, tokenizer = load_causal_lm(cfg.lm)
        device = next(model.model.parameters()).device
        return CausalLM(lm_model, tokenizer, source=cfg.lm, max_length=cfg.lm_max_length,
                        batch_size=cfg.lm_batch_size, device=device)
    texts = [t for e in fit_rows for t in (e.text, e.text_pair) if t]
    source = f"the guard's {len(fit_rows):,} clean fitting rows"
    if cfg.lm_corpus is not None:
        held = {_text_key(t) for e in heldout for t in (e.text, e.text_pair) if t}
        extra = [t for t in corpus_texts(cfg.lm_corpus) if _text_key(t) not in held]
        texts += extra
        source += f" + {len(extra):,} texts of {cfg.lm_corpus}"
    return KneserNeyLM.estimate(texts, cfg.ngram_order, source)


def _text_key(text: str) -> str:
    return " ".join(text.lower().split())


# ----------------------------------------------------------------------------- step 1: suspicion scores
def segments(example: Example) -> list[str]:
    return [example.text] if example.text_pair is None else [example.text, example.text_pair]


@dataclass
class OnionAnalysis:
    """Per row, per text: its words and each word's suspicion ``f_i`` (empty under two words)."""

    words: list[list[list[str]]]
    suspicion: list[list[np.ndarray]]

    def row_scores(self) -> np.ndarray:
        """Each row's largest ``f_i`` (NaN for a row with nothing scored)."""
        out = np.full(len(self.words), np.nan)
        for r, per_text in enumerate(self.suspicion):
            scored = [s for s in per_text if s.size]
            if scored:
                out[r] = max(float(s.max()) for s in scored)
        return out

    def all_scores(self) -> np.ndarray:
        parts = [s for per_text in self.suspicion for s in per_text if s.size]
        return np.concatenate(parts) if parts else np.empty(0)


def suspicion_scores(lm: PerplexityModel, examples: Sequence[Example]) -> OnionAnalysis:
    """Step 1: ``f_i = p_0 - p_i`` for every word of every text with two or more words (one batch)."""
    words = [[text.split() for text in segments(e)] for e in examples]
    todo = [(r, s) for r, per_text in enumerate(words) for s, w in enumerate(per_text) if len(w) > 1]
    results = lm.removal_perplexities([words[r][s] for r, s in todo])
    suspicion = [[np.empty(0) for _ in per_text] for per_text in words]
    for (r, s), (p0, removed) in zip(todo, results, strict=True):
        suspicion[r][s] = p0 - removed
    return OnionAnalysis(words, suspicion)


# ----------------------------------------------------------------------------- step 2: outlier word removal
def kept_words(words: list[str], suspicion: np.ndarray, threshold: float) -> list[str]:
    """The words whose suspicion does not exceed ``threshold``; never none: when every word would go,
    the least suspicious one stays (ours: an empty input is no input)."""
    if not suspicion.size:
        return words
    keep = [w for w, f in zip(words, suspicion, strict=True) if not f > threshold]
    return keep or [words[int(np.argmin(suspicion))]]


def remove_outliers(examples: Sequence[Example], analysis: OnionAnalysis, threshold: float) -> tuple[Example, ...]:
    """Step 2: each input without the words whose suspicion exceeds ``threshold``."""
    out = []
    for e, per_text, scores in zip(examples, analysis.words, analysis.suspicion, strict=True):
        texts = [" ".join(kept_words(ws, s, threshold)) for ws, s in zip(per_text, scores, strict=True)]
        out.append(Example(e.id, texts[0], e.label, texts[1] if len(texts) > 1 else None))
    return tuple(out)


# ----------------------------------------------------------------------------- choosing t on held-out clean rows
@dataclass(frozen=True)
class Candidate:
    """A candidate threshold and the held-out clean accuracy after rewriting with it."""

    threshold: float
    percentile: float | None
    heldout_accuracy: float


def candidate_thresholds(analysis: OnionAnalysis, percentiles: Sequence[float]) -> list[tuple[float, float | None]]:
    """(t, percentile) at ``percentiles`` of the held-out per-word scores, plus their maximum (100)."""
    scores = analysis.all_scores()
    if scores.size == 0:
        return [(0.0, None)]  # nothing to score: any t leaves every held-out row as it is
    points = sorted({*percentiles, 100.0})
    return [(float(np.percentile(scores, p)), float(p)) for p in points]


def heldout_candidates(model: Classifier, heldout: Dataset, analysis: OnionAnalysis,
                       points: Sequence[tuple[float, float | None]], batch_size: int) -> list[Candidate]:
    """The held-out clean accuracy after rewriting at each candidate ``t`` (one batched prediction)."""
    rewritten = [ex for t, _ in points for ex in remove_outliers(heldout.examples, analysis, t)]
    preds = predict(model, rewritten, batch_size).reshape(len(points), len(heldout))
    labels = np.asarray(heldout.labels)
    return [Candidate(t, p, float((row == labels).mean())) for (t, p), row in zip(points, preds, strict=True)]


def smallest_within_budget(candidates: Sequence[Candidate], unguarded_accuracy: float, budget: float) -> Candidate:
    """The smallest t (most removal) such that it and every larger candidate keep the held-out
    accuracy loss within ``budget`` (a monotone rule: one lucky t among failing neighbours is not
    taken); the largest t when even that fails (it removes nothing on the held-out rows)."""
    ordered = sorted(candidates, key=lambda c: -c.threshold)
    chosen = ordered[0]
    for c in ordered:
        if unguarded_accuracy - c.heldout_accuracy > budget + 1e-12:
            break
        chosen = c
    return chosen


class FittedOnion(FittedGuard):
    """ONION with its perplexity model and its held-out calibration (see the module docstring)."""

    name: ClassVar[str] = "onion"
    kind: ClassVar[Literal["reject", "rewrite"]] = "rewrite"

    def __init__(self, model: Classifier, config: OnionConfig, lm: PerplexityModel,
                 candidates: list[Candidate], unguarded_accuracy: float) -> None:
        super().__init__(model, config)
        self.lm = lm
        self.candidates = candidates
        self.unguarded_accuracy = unguarded_accuracy

    def threshold_for(self, budget: float | None = None) -> tuple[float, Candidate | None]:
        cfg: OnionConfig = self.config  # type: ignore[assignment]
        if cfg.threshold_rule == "fixed":
            return cfg.threshold, None
        chosen = smallest_within_budget(self.candidates, self.unguarded_accuracy, budget or self.budget)
        return chosen.threshold, chosen

    def thresholds(self, budget: float | None = None) -> dict[str, Any]:
        t, chosen = self.threshold_for(budget)
        cfg: OnionConfig = self.config  # type: ignore[assignment]
        out: dict[str, Any] = {"on": "word suspicion f_i = p0 - p_i; words with f_i > t are removed",
                               "rule": cfg.threshold_rule, "t": t}
        if chosen is not None:
            out.update(percentile=chosen.percentile, heldout_accuracy=chosen.heldout_accuracy,
                       heldout_accuracy_unguarded=self.unguarded_accuracy)
        return out

    def _analyse(self, examples: tuple[Example, ...]) -> OnionAnalysis:
        return suspicion_scores(self.lm, examples)

    def _decide(self, examples: tuple[Example, ...], analysis: OnionAnalysis, budget: float) -> GuardOutput:
        t, _ = self.threshold_for(budget)
        rewritten = remove_outliers(examples, analysis, t)
        preds = predict(self.model, rewritten, self.config.batch_size)
        return GuardOutput(rewritten, np.zeros(len(examples), dtype=bool), analysis.row_scores(), preds, budget)


@GUARDS.register("onion")
class Onion(Guard[OnionConfig]):
    """Remove outlier words by a perplexity model's judgement, then predict."""

    name = "onion"
    config_class = OnionConfig

    def _fit(self, model: Classifier, fit_rows: Dataset, heldout: Dataset) -> FittedOnion:
        cfg = self.config
        lm = build_lm(cfg, fit_rows, heldout, model)
        logger.info("ONION: %s", lm.description)
        analysis = suspicion_scores(lm, heldout.examples)
        unguarded = float((predict(model, heldout.examples, cfg.batch_size) == np.asarray(heldout.labels)).mean())
        points = candidate_thresholds(analysis, cfg.percentiles) if cfg.threshold_rule == "budget" else \
            [(cfg.threshold, None)]
        candidates = heldout_candidates(model, heldout, analysis, points, cfg.batch_size)
        fitted = FittedOnion(model, cfg, lm, candidates, unguarded)
        fitted.report = {"lm": lm.description,
                         "candidates": [{"t": c.threshold, "percentile": c.percentile,
                                         "heldout_accuracy": c.heldout_accuracy} for c in candidates],
                         "heldout_accuracy_unguarded": unguarded}
        return fitted
