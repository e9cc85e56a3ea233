"""The ``bki`` detector: Backdoor Keyword Identification (Chen & Dai, Neurocomputing 2021; as
OpenBackdoor's ``bki_defender.py`` implements it).

A model trained on poisoned rows has learned to let the trigger word override the rest of the
sentence, so deleting the trigger moves the model's internal representation far more than
deleting an ordinary word. Steps:

1. [PAPER] train a model on the rows as given: here a copy of ``DetectInputs.encoder`` fine-tuned
   by the one training loop (:func:`~unbackdoor.detect.finetuned.fine_tuned_copy`);
2. [PAPER] for every row and every word, the change of the model's representation when the word is
   deleted; [PAPER code] words split at whitespace, Δ = ‖r(text without the word) − r(text)‖∞ with r
   the first token's last hidden state (OpenBackdoor's ``get_repr_embeddings``; the paper's LSTM
   hidden states have no such token; ``pooling=mean`` for decoder models);
3. [PAPER code] keep each row's ``top_k`` = 5 words by Δ (its suspicious words);
4. [PAPER code] over the data set, each word's count c (rows that kept it) and mean Δ̄ of the kept
   Δs; keyword score s(w) = Δ̄ · log c (the code uses log10, which ranks the same; a word kept by a
   single row scores 0);
5. [PAPER code] the top ``n_keywords`` (= 1) words are the suspected triggers, and the rows holding
   one among their kept words are the ones BKI removes.

Row score [OURS, for the :class:`~unbackdoor.detect.FlagRule`]: the highest keyword score among the
row's kept words (0 if none), so rows holding the top keyword come first; ties (rows holding the same
keyword) are ordered by that word's Δ in the row. ``detect.json`` lists the suspected triggers, the
top ``report_keywords`` keywords with count, mean Δ and score, and how many rows hold a suspected
trigger (``n_rows_with_trigger``: what BKI itself would remove).

Other choices [OURS]: a word kept twice by one row (it occurs twice) counts once, with its larger
Δ; in sentence pairs, words of both segments are deleted one at a time; training uses the project's
victim settings (OpenBackdoor: 10 epochs at lr 2e-5 on BERT-base). Cost: one forward pass per word
of every row (rows are processed ``chunk_rows`` at a time).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.data.types import Example
from unbackdoor.detect.base import DETECTORS, DetectInputs, Detector, Scores
from unbackdoor.detect.features import Pooling, representations
from unbackdoor.detect.finetuned import TRAIN_DESCRIPTION, fine_tuned_copy
from unbackdoor.models.loading import Classifier
from unbackdoor.training.config import TrainConfig, victim_train_config
from unbackdoor.training.config import merge_train

logger = logging.getLogger(__name__)


class BkiConfig(StrictConfig):
    """Options of BKI ([PAPER] / [OURS] as the module docstring says)."""

    top_k: int = Field(5, ge=1, description="suspicious words kept per row [PAPER code: 5]")
    n_keywords: int = Field(1, ge=1, description="top keywords taken as the suspected triggers [PAPER code: 1]")
    norm: Literal["inf", "l2"] = Field("inf", description="norm of the representation change [PAPER code: inf]")
    pooling: Pooling = Field("cls", description="representation: the first token's last hidden state "
                             "[PAPER code] or the mean over tokens (decoder models)")
    report_keywords: int = Field(20, ge=1, description="keywords listed in the report [OURS]")
    batch_size: int = Field(64, ge=1, description="texts per forward pass")
    chunk_rows: int = Field(256, ge=1, description="rows whose word deletions are scored together")
    train: TrainConfig | None = Field(None, description=TRAIN_DESCRIPTION)

    def train_config(self) -> TrainConfig:
        return merge_train(victim_train_config(), self.train)


@dataclass(frozen=True)
class Word:
    """One word of a row: its text, segment (0: text, 1: text_pair) and position there."""

    text: str
    segment: int
    position: int


def row_words(example: Example) -> list[Word]:
    """The whitespace-separated words of a row, both segments of a pair."""
    out = [Word(w, 0, i) for i, w in enumerate(example.text.split())]
    if example.text_pair is not None:
        out += [Word(w, 1, i) for i, w in enumerate(example.text_pair.split())]
    return out


def without_word(example: Example, word: Word, index: int) -> Example:
    """``example`` with one word deleted (the rest joined by single spaces)."""
    segments = [example.text.split(), (example.text_pair or "").split()]
    kept = segments[word.segment][: word.position] + segments[word.segment][word.position + 1:]
    segments[word.segment] = kept
    pair = " ".join(segments[1]) if example.text_pair is not None else None
    return Example(f"{example.id}\x00{index}", " ".join(segments[0]), example.label, pair)


def deletion_deltas(clf: Classifier, examples: list[Example], cfg: BkiConfig) -> list[list[float]]:
    """Per row, per word: the representation change when that word is deleted (step 2)."""
    out: list[list[float]] = []
    order = float("inf") if cfg.norm == "inf" else 2.0
    for start in range(0, len(examples), cfg.chunk_rows):
        chunk = examples[start: start + cfg.chunk_rows]
        texts: list[Example] = list(chunk)
        owners: list[tuple[int, int]] = []  # (row in chunk, word index) of each variant
        for r, example in enumerate(chunk):
            for j, word in enumerate(row_words(example)):
                texts.append(without_word(example, word, j))
                owners.append((r, j))
        reps = representations(clf, texts, cfg.pooling, cfg.batch_size)
        originals, variants = reps[: len(chunk)], reps[len(chunk):]
        rows_in_chunk = torch.tensor([r for r, _ in owners], dtype=torch.long)
        deltas = torch.linalg.vector_norm(variants - originals[rows_in_chunk], ord=order, dim=1).tolist()
        per_row: list[list[float]] = [[] for _ in chunk]
        for (r, _), d in zip(owners, deltas, strict=True):
            per_row[r].append(d)
        out.extend(per_row)
    return out


def kept_words(words: list[Word], deltas: list[float], top_k: int) -> dict[str, float]:
    """A row's ``top_k`` words by Δ (earlier position first on ties), each word once with its largest Δ."""
    ranked = sorted(range(len(words)), key=lambda j: (-deltas[j], j))[:top_k]
    kept: dict[str, float] = {}
    for j in ranked:
        kept[words[j].text] = max(kept.get(words[j].text, 0.0), deltas[j])
    return kept


@dataclass
class KeywordStats:
    """One word's count (rows that kept it), mean kept Δ and score Δ̄ · ln(count)."""

    word: str
    count: int
    mean_delta: float

    @property
    def score(self) -> float:
        return self.mean_delta * math.log(self.count)

    def to_dict(self) -> dict[str, Any]:
        return {"word": self.word, "count": self.count, "mean_delta": self.mean_delta, "score": self.score}


def keyword_stats(kept: list[dict[str, float]]) -> list[KeywordStats]:
    """Every kept word's statistics, highest score first (then higher count, then the word)."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for row in kept:
        for word, delta in row.items():
            sums[word] += delta
            counts[word] += 1
    stats = [KeywordStats(w, counts[w], sums[w] / counts[w]) for w in counts]
    return sorted(stats, key=lambda s: (-s.score, -s.count, s.word))


@DETECTORS.register("bki")
class BkiDetector(Detector[BkiConfig]):
    """Rows whose most suspicious words include the top keyword (a suspected trigger) are suspected."""

    name = "bki"
    config_class = BkiConfig

    def _scores(self, inputs: DetectInputs) -> Scores:
        cfg = self.config
        train = cfg.train_config()
        clf, training = fine_tuned_copy(inputs.encoder, inputs.rows, train)
        examples = list(inputs.rows.examples)
        deltas = deletion_deltas(clf, examples, cfg)
        kept = [kept_words(row_words(e), d, cfg.top_k) for e, d in zip(examples, deltas, strict=True)]
        stats = keyword_stats(kept)
        score_of = {s.word: s.score for s in stats}
        triggers = [s.word for s in stats[: cfg.n_keywords]]
        scores, tiebreak = torch.zeros(len(examples)), torch.zeros(len(examples))
        for i, row in enumerate(kept):
            if row:
                best = max(row, key=lambda w: (score_of[w], row[w]))
                scores[i], tiebreak[i] = score_of[best], row[best]
        holding = sum(1 for row in kept if any(t in row for t in triggers))
        logger.info("bki: suspected trigger(s) %s, held by %d of %d rows", triggers, holding, len(examples))
        report = {
            "trained": f"copy of {inputs.encoder.source or 'the encoder'}, every parameter, on the rows",
            "train": train.model_dump(), "history": training.history, "n_clean": len(inputs.clean),
            "suspected_triggers": triggers, "n_rows_with_trigger": holding,
            "keywords": [s.to_dict() for s in stats[: cfg.report_keywords]],
            "n_words_scored": sum(len(d) for d in deltas),
        }
        return Scores(scores, report, tiebreak=tiebreak)
