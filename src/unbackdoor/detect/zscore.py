"""The ``zscore`` detector: Z-defence's lexical filter (He et al., "Mitigating Backdoor Poisoning
Attacks through the Lens of Spurious Correlation", EMNLP 2023; [PAPER code] = the official
``xlhex/emnlp2023_z-defence`` @ 4e28e2ac2d7b4d09bd5878860911015a42ca95f3, ``z_filtering.py``, read,
not copied).

A poisoning attack ties a simple text feature to one label far more tightly than any natural feature
is tied to a label, so the feature's label statistics stand out. No model is trained. Steps:

1. [PAPER] features of each row: its words (whitespace split, lower-cased [OURS]; the code splits the
   corpus' own tokenisation); ``bigram`` adds word pairs (computed, unused, in the code); ``start`` adds
   the first one and two words [OURS]; ``shape`` adds the opening of the sentence's top-level shape
   [OURS]: the word class of the first clause's first word (subordinator, determiner, pronoun,
   auxiliary, preposition, conjunction from a fixed list of English function words; X for any other
   word) and the punctuation mark that closes that clause (none when the text has no punctuation), e.g.
   "if the film is finished , ..." -> (SUB, ","). ``start`` and ``shape`` are cheap stand-ins for
   Z-SEQ's syntactic template, which needs a constituency parser this project does not ship: a
   syntactic trigger such as HiddenKiller's S(SBAR)(,)(NP)(VP)(.) opens with a subordinate clause and a
   comma whatever its words, and a style transfer's output can share a shape the clean text rarely has
   (chosen on OpenBackdoor's SynBkd and StyleBkd SST-2 releases, development attacks outside the
   acceptance grids: docs/results/auto.md).
2. [PAPER] for every feature f and label y the feature occurs with, the z-score of the label share:
   z(f, y) = (p̂(y|f) − p₀(y)) / √(p₀(y)(1 − p₀(y)) / n(f)), n(f) = rows holding f. p₀ is the label's
   share of the rows (``prior=empirical``, the paper's text and the code's bigram branch) or 1/K
   (``prior=uniform``, the code's unigram branch, which makes every common word an outlier on an
   unbalanced task such as OLID).
3. [PAPER code] outliers: z beyond mean + ``bound`` · std of all z(f, y) (code: ±20; only the upper
   side is used here [OURS]: a trigger raises its label's share, and a row is matched on its own
   label); the paper removes every row that holds an outlier feature *with the outlier's label*.
   With ``contrast=clean`` [OURS, the default], a feature's z is first capped by how much more
   often it occurs in the rows than in the defender's clean set (a two-proportion z-score): an
   inserted trigger is over-represented in the rows, while a word naturally tied to a label (a team
   name in sports news) is as frequent in clean data, and would otherwise outscore a trigger on a
   topic task. ``contrast=none`` is the paper's filter.
4. Row score [OURS, for the :class:`~unbackdoor.detect.FlagRule`]: the largest standardised
   z, (z(f, y) − mean) / std, over the row's features f with the row's label y; the rows the paper
   removes are exactly those with score ≥ ``bound`` (``--threshold BOUND``; ``n_rows_over_bound`` in
   the report). The bound was set for full-size training sets: z grows with √n(f), so with 1,000
   rows a trigger in 10 % of them scores ~10 rather than ~30. So the report also gives a threshold
   calibrated on the clean set [OURS]: the ``clean_quantile`` (0.99) quantile of the clean rows'
   scores under the same statistics (what rows that carry no trigger score; a trigger is absent from
   clean data). ``auto`` drops the rows above it; ``--threshold`` with it does the same in ``detect``.
   The 99th percentile rather than the maximum: a clean row may hold the trigger's words by chance (an
   IMDB review that says "I watch this 3D movie"); chosen on OLID, HateSpeech and IMDB, where it kept
   every poisoned row of BadNets and AddSent above it (docs/results/auto.md). One exception [OURS,
   ``top_tie=drop``, the default]: when that quantile *is* the score of the most outlying feature of
   all, the feature also occurs in more than 1 % of the clean rows (a syntactic template does), and the
   threshold moves just below it, so the rows holding it with its label are dropped, natural ones
   included; ``top_tie=keep`` keeps the plain quantile (nothing holding that feature is dropped).

5. ``strip`` [OURS, used by train auto's ``suspects=strip``]: after scoring, a row's *outlying* features are
   those whose standardised z with some label is above the threshold. Where every outlying feature of a row
   is a word or word pair found in at most ``strip_clean_share`` of the clean rows (an inserted token or
   sentence; a style's or template's common words and a ``start``/``shape`` feature are not), those words
   are deleted from the row; the stripped row is given back only if none of its features is outlying any
   more, else the row cannot be cleaned (None). A removable feature also needs a strong label tie on its
   own: z(f, y) ≥ ``strip_min_z`` (3.0, before standardising). Chosen on development data (no model trained:
   zscore and strip only; 1,000 rows, seeds 0-1): the inserted words of BadNets score 3.1-6.7 and AddSent's
   7.7-11.5 on HSOL, OLID, QNLI and IMDB, while the words and pairs that pass the calibrated cut on
   OpenBackdoor's StyleBkd SST-2 rows ("unto", "would", "of all"; released and re-tokenised, seeds 0-2) and
   the natural words that pass it elsewhere score 1.9-2.8: without the bound, strip gave 6-17 style rows
   back per seed with the style intact.

Lexical and shallow only: a paraphrase trigger that changes neither the opening words nor the shape
leaves no feature to count.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.data.types import Example
from unbackdoor.detect.base import DETECTORS, DetectInputs, Detector, Scores
from unbackdoor.detect.lexical import Feature, FeatureKind, row_features, without_features

logger = logging.getLogger(__name__)


class ZScoreConfig(StrictConfig):
    """Options of Z-defence's lexical filter ([PAPER] / [OURS] as the module docstring says)."""

    features: list[FeatureKind] = Field(
        default_factory=lambda: ["unigram", "bigram", "start", "shape"], min_length=1,
        description="feature kinds counted [PAPER code: unigram]")
    top_tie: Literal["drop", "keep"] = Field("drop", description="drop: when the clean quantile is the most outlying "
                                             "feature's own score, the threshold moves just below it [OURS]; keep: "
                                             "the plain quantile")
    prior: Literal["empirical", "uniform"] = Field("empirical", description="p0(y): the label's share of the rows, "
                                                   "or 1/K [PAPER code's unigram branch]")
    contrast: Literal["none", "clean"] = Field("clean", description="clean: a feature also needs to be more frequent "
                                               "in the rows than in the clean set [OURS]; none: the paper's filter")
    clean_quantile: float = Field(0.99, gt=0, le=1, description="the reported threshold: this quantile of the clean "
                                  "rows' scores under the same statistics [OURS]")
    bound: float = Field(20.0, gt=0, description="outlier bound in standard deviations of all z-scores "
                         "[PAPER code: 20]; reported, and the threshold that reproduces the paper's filter")
    report_features: int = Field(10, ge=0, description="top (feature, label) pairs listed in the report")
    strip_clean_share: float = Field(0.01, ge=0, le=1, description="strip: an outlying word or word pair is "
                                     "removable only where at most this share of the clean rows hold it [OURS]")
    strip_min_z: float = Field(3.0, ge=0, description="strip: ... and only where its label z-score (step 2, before "
                               "standardising) is at least this: an inserted trigger alone ties its rows to a label "
                               "[OURS; chosen on development data, module docstring]")


@dataclass(frozen=True)
class Outliers:
    """What :meth:`ZScoreDetector.detect` found, kept for :meth:`ZScoreDetector.strip`: the features whose
    standardised z with some label is above the threshold, and which of them can be deleted from a row."""

    outlying: frozenset[Feature]
    removable: frozenset[Feature]


def label_zscores(rows: list[set[Feature]], labels: list[int], num_labels: int,
                  prior: str) -> dict[tuple[Feature, int], float]:
    """z(f, y) for every feature and every label it occurs with (step 2)."""
    n = len(rows)
    share = Counter(labels)
    p0 = {y: (share[y] / n if prior == "empirical" else 1 / num_labels) for y in range(num_labels)}
    n_f: Counter[Feature] = Counter()
    n_fy: Counter[tuple[Feature, int]] = Counter()
    for feats, y in zip(rows, labels):
        n_f.update(feats)
        n_fy.update((f, y) for f in feats)
    z: dict[tuple[Feature, int], float] = {}
    for (f, y), count in n_fy.items():
        p = p0[y]
        if 0 < p < 1:
            z[(f, y)] = (count / n_f[f] - p) / math.sqrt(p * (1 - p) / n_f[f])
    return z


def frequency_zscores(rows: list[set[Feature]], clean: list[set[Feature]]) -> dict[Feature, float]:
    """For every feature of the rows, the two-proportion z-score of its row share in the rows against its
    share in the clean set [OURS]: an inserted trigger is over-represented in the rows; a word that is
    naturally tied to a label (a team name in sports news) occurs as often in clean data."""
    n, m = len(rows), len(clean)
    in_rows: Counter[Feature] = Counter(f for feats in rows for f in feats)
    in_clean: Counter[Feature] = Counter(f for feats in clean for f in feats)
    out: dict[Feature, float] = {}
    for f, count in in_rows.items():
        r, c = count / n, in_clean[f] / m
        pooled = (count + in_clean[f]) / (n + m)
        out[f] = (r - c) / math.sqrt(pooled * (1 - pooled) * (1 / n + 1 / m)) if 0 < pooled < 1 else 0.0
    return out


def row_scores(standard: dict[tuple[Feature, int], float], rows: list[set[Feature]], labels: list[int]) -> torch.Tensor:
    """Each row's largest standardised z over its features with its own label (0 if none is known)."""
    return torch.tensor([max((standard.get((f, y), 0.0) for f in feats), default=0.0)
                         for feats, y in zip(rows, labels)], dtype=torch.float32)


def calibrated_threshold(clean: torch.Tensor, standard: dict[tuple[Feature, int], float], quantile: float,
                         top_tie: bool) -> tuple[float, bool]:
    """The score above which rows are dropped: the ``quantile`` of the clean rows' scores; with ``top_tie``,
    just below the most outlying feature's score when the quantile is that score (module docstring,
    step 4). Compared in the scores' own dtype, as a row holding that feature scores. Also whether the
    tie moved it."""
    threshold = float(torch.quantile(clean.double(), quantile))
    top = torch.tensor(max(standard.values(), default=math.inf), dtype=clean.dtype)
    if not top_tie or threshold != float(top):
        return threshold, False
    return float(torch.nextafter(top, torch.tensor(-math.inf, dtype=clean.dtype))), True


def _shown(feature: Feature) -> str:
    kind = {"w": "word", "b": "bigram", "s": "start", "t": "shape"}[feature[0]]
    return f"{kind}: {' '.join(feature[1:])}"


@DETECTORS.register("zscore")
class ZScoreDetector(Detector[ZScoreConfig]):
    """Rows holding a feature whose label share is an extreme outlier are suspected (no model)."""

    name = "zscore"
    config_class = ZScoreConfig

    def _scores(self, inputs: DetectInputs) -> Scores:
        cfg = self.config
        rows = [row_features(e, cfg.features) for e in inputs.rows]
        labels = inputs.rows.labels
        clean_rows = [row_features(e, cfg.features) for e in inputs.clean]
        z = label_zscores(rows, labels, inputs.rows.num_labels, cfg.prior)
        if cfg.contrast == "clean":  # a feature counts only as far as it is over-represented in the rows
            over = frequency_zscores(rows, clean_rows)
            z = {(f, y): min(v, over[f]) for (f, y), v in z.items()}
        values = torch.tensor(list(z.values()), dtype=torch.float64)
        mean, std = float(values.mean()), float(values.std()) or 1.0
        standard = {k: (v - mean) / std for k, v in z.items()}
        scores = row_scores(standard, rows, labels)
        clean = row_scores(standard, clean_rows, inputs.clean.labels)
        threshold, top_tie = calibrated_threshold(clean, standard, cfg.clean_quantile, cfg.top_tie == "drop")
        top = sorted(standard.items(), key=lambda kv: -kv[1])[:cfg.report_features]
        self.outliers_ = outlier_features(standard, threshold, clean_rows, cfg.strip_clean_share, z, cfg.strip_min_z)
        report = {"n_features": len({f for f, _ in z}), "z_mean": mean, "z_std": std, "bound": cfg.bound,
                  "threshold": threshold, "threshold_at_top_tie": top_tie,
                  "n_rows_over_threshold": int((scores > threshold).sum()),
                  "n_outlier_features": sum(v >= cfg.bound for v in standard.values()),
                  "n_rows_over_bound": int((scores >= cfg.bound).sum()),
                  "top_features": [{"feature": _shown(f), "label": y, "z": z[(f, y)], "standardised": s}
                                   for (f, y), s in top],
                  "removable_features": sorted(_shown(f) for f in self.outliers_.removable)}
        logger.info("zscore: %d features; top %s", report["n_features"],
                    ", ".join(f"{t['feature']} -> {t['label']} ({t['standardised']:.1f} sd)"
                              for t in report["top_features"][:3]))
        return Scores(scores, report)

    def strip(self, rows: list[Example]) -> list[Example | None]:
        """Step 5: each row with its outlying words deleted, or None where that leaves it outlying (or it
        holds no outlying feature, or one that is not a removable word or pair)."""
        outliers: Outliers | None = getattr(self, "outliers_", None)
        if outliers is None:
            raise RuntimeError("zscore: strip needs the outliers of a detect() run first")
        return [stripped_row(e, outliers, self.config.features) for e in rows]


def outlier_features(standard: dict[tuple[Feature, int], float], threshold: float, clean: list[set[Feature]],
                     max_clean_share: float, z: dict[tuple[Feature, int], float], min_z: float) -> Outliers:
    """The outlying features (standardised z above ``threshold`` with some label) and the removable ones among
    them: words and word pairs held by at most ``max_clean_share`` of the ``clean`` rows whose raw ``z`` is at
    least ``min_z`` with every label they are outlying with (step 5)."""
    over = {(f, y) for (f, y), s in standard.items() if float(np.float32(s)) > threshold}  # compared as rows score
    outlying = frozenset(f for f, _ in over)
    weak = {f for f, y in over if z[(f, y)] < min_z}
    held = Counter(f for feats in clean for f in feats if f in outlying)
    removable = frozenset(f for f in outlying if f[0] in ("w", "b") and f not in weak
                          and held[f] <= max_clean_share * len(clean))
    return Outliers(outlying, removable)


def stripped_row(example: Example, outliers: Outliers, kinds: list[str]) -> Example | None:
    """``example`` without its outlying words, if they are all removable and nothing outlying is left."""
    found = row_features(example, kinds) & outliers.outlying
    if not found or not found <= outliers.removable:
        return None
    out = without_features(example, set(found))
    if not out.text.strip() or (out.text_pair is not None and not out.text_pair.strip()):
        return None
    return None if row_features(out, kinds) & outliers.outlying else out
