"""STRIP (Gao et al., ACSAC 2019), the text version of OpenBackdoor's ``STRIPDefender`` and the RAP
authors' re-implementation: a triggered input keeps its label however much of it is replaced.

Steps, as the paper names them:

1. *perturbation*: ``repeat`` copies of the input, each with a share (``swap_ratio``) of its words
   replaced by the words of one random clean row, taken in that row's TF-IDF order (highest first);
2. *entropy*: the model's prediction entropy (bits) on each copy, averaged over the copies;
3. *detection*: an input whose mean entropy stays **low** is rejected. The threshold is the
   FRR-budget quantile of held-out clean rows' mean entropies.

Following OpenBackdoor: 5 copies, half of the words replaced, one random clean row's TF-IDF-ranked
words per copy, entropy in bits averaged over copies, a low clean quantile at the FRR budget as
threshold. Following the RAP authors' ``strip_vita.py``: at least one word replaced, positions drawn
without repetition, TF-IDF as ``count / length × (ln(n / df) + 1)`` over whitespace words without
punctuation symbols and without a stop-word list (OpenBackdoor uses scikit-learn's English list,
which this project does not depend on).

Ours: the replacement rows are the clean fitting rows and the threshold comes from the held-out ones
(OpenBackdoor uses one clean dev set for both); a row with fewer ranked words than replacements is
cycled; each input's draws are seeded by (``seed``, its text), so a text gets the same copies
wherever it appears; each text of a sentence pair is perturbed on its own. The suspicion score is
the negated mean entropy.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from unbackdoor.data.types import Dataset, Example
from unbackdoor.errors import DataError
from unbackdoor.guard.base import GUARDS, Guard, GuardConfig, RejectingGuard, ScoredRows, budget_threshold, map_segments
from unbackdoor.inference import predict_logits
from unbackdoor.models.loading import Classifier

logger = logging.getLogger(__name__)

SYMBOLS = frozenset([".", ",", "!", ":", "?", '"', ";", "...", "(", ")", "/", "~", "'"])  # the RAP authors' list


class StripConfig(GuardConfig):
    """STRIP's options; see the module docstring for what follows the sources and what is ours."""

    repeat: int = Field(5, ge=1, description="[PAPER] perturbed copies per input (OpenBackdoor: 5)")
    swap_ratio: float = Field(0.5, gt=0, le=1, description="[PAPER] share of an input's words replaced per copy "
                              "(OpenBackdoor: 0.5)")


# ----------------------------------------------------------------------------- step 1: perturbation
@dataclass(frozen=True)
class ReplacementPool:
    """Per clean row, its words ranked by TF-IDF over the clean rows (highest first)."""

    ranked: tuple[tuple[str, ...], ...]

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> ReplacementPool:
        docs = [[w for w in t.split() if w not in SYMBOLS] for t in texts]
        docs = [d for d in docs if d]
        if not docs:
            raise DataError("STRIP: the clean rows have no words to perturb inputs with")
        df = Counter(w for d in docs for w in set(d))
        idf = {w: math.log(len(docs) / c) + 1 for w, c in df.items()}
        ranked = []
        for d in docs:
            tf = Counter(d)
            weights = {w: tf[w] / len(d) * idf[w] for w in tf}
            ranked.append(tuple(sorted(weights, key=lambda w: (-weights[w], w))))
        return cls(tuple(ranked))


def perturb_text(text: str, pool: ReplacementPool, swap_ratio: float, rng: random.Random) -> str:
    """``text`` with ``max(1, ⌊len × swap_ratio⌋)`` distinct word positions replaced by one random
    clean row's words in TF-IDF order."""
    words = text.split()
    if not words:
        return text
    ranked = pool.ranked[rng.randrange(len(pool.ranked))]
    positions = rng.sample(range(len(words)), max(1, int(len(words) * swap_ratio)))
    for i, pos in enumerate(positions):
        words[pos] = ranked[i % len(ranked)]
    return " ".join(words)


def perturbed_copies(example: Example, pool: ReplacementPool, cfg: StripConfig) -> list[Example]:
    """Step 1: ``cfg.repeat`` perturbed copies, seeded by (seed, the row's texts)."""
    rng = random.Random(f"{cfg.seed}\x00{example.text}\x00{example.text_pair}")
    return [map_segments(example, lambda t: perturb_text(t, pool, cfg.swap_ratio, rng)) for _ in range(cfg.repeat)]


# ----------------------------------------------------------------------------- step 2: entropy
def entropy_bits(logits: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of the softmax of each row of ``logits`` (last axis)."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(axis=-1) / math.log(2)


def strip_scores(model: Classifier, examples: Sequence[Example], pool: ReplacementPool,
                 cfg: StripConfig) -> ScoredRows:
    """Steps 1-2 for every row in one batched pass: predictions on the inputs, suspicion = −mean
    entropy over the perturbed copies."""
    copies = [c for e in examples for c in perturbed_copies(e, pool, cfg)]
    logits = predict_logits(model, [*examples, *copies], cfg.batch_size)
    n = len(examples)
    entropy = entropy_bits(logits[n:]).reshape(n, cfg.repeat).mean(axis=1)
    return ScoredRows(scores=-entropy, predictions=logits[:n].argmax(axis=1), extra={"mean_entropy": entropy})


# ----------------------------------------------------------------------------- step 3: detection
class FittedStrip(RejectingGuard):
    """STRIP with its replacement pool and held-out clean scores."""

    name: ClassVar[str] = "strip"

    def __init__(self, model: Classifier, config: StripConfig, pool: ReplacementPool,
                 heldout_scores: np.ndarray) -> None:
        super().__init__(model, config)
        self.pool = pool
        self.heldout_scores = heldout_scores

    def thresholds(self, budget: float | None = None) -> dict[str, Any]:
        t = budget_threshold(self.heldout_scores, budget or self.budget)
        return {"on": "suspicion = -(mean prediction entropy in bits over the perturbed copies); rows with "
                      "suspicion > t are rejected", "t": t, "rejects_mean_entropy_below": -t}

    def _analyse(self, examples: tuple[Example, ...]) -> ScoredRows:
        return strip_scores(self.model, examples, self.pool, self.config)  # type: ignore[arg-type]

    def _row_thresholds(self, analysis: ScoredRows, budget: float) -> np.ndarray:
        return np.full(len(analysis.scores), budget_threshold(self.heldout_scores, budget))


@GUARDS.register("strip")
class Strip(Guard[StripConfig]):
    """Reject inputs whose predictions stay certain under heavy perturbation."""

    name = "strip"
    config_class = StripConfig

    def _fit(self, model: Classifier, fit_rows: Dataset, heldout: Dataset) -> FittedStrip:
        pool = ReplacementPool.from_texts([t for e in fit_rows for t in (e.text, e.text_pair) if t])
        heldout_scores = strip_scores(model, heldout.examples, pool, self.config).scores
        fitted = FittedStrip(model, self.config, pool, heldout_scores)
        entropy = -heldout_scores
        fitted.report = {"replacement_rows": len(pool.ranked),
                         "heldout_mean_entropy": {"min": float(entropy.min()), "median": float(np.median(entropy)),
                                                  "max": float(entropy.max())}}
        return fitted
