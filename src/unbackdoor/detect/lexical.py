"""Shallow lexical features of a row, shared by the model-free detectors (``zscore``, ``contrast``).

A row's features [OURS, as zscore's docstring describes them]: its words (whitespace split, lower-cased),
word pairs (``bigram``), its first one and two words (``start``), and the opening of its top-level shape
(``shape``): the word class of the first clause's first word (subordinator, determiner, pronoun,
auxiliary, preposition, conjunction from a fixed list of English function words; X for any other word)
and the punctuation mark that closes that clause, e.g. "if the film is finished , ..." -> (SUB, ",").
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from unbackdoor.data.types import Example

Feature = tuple[str, ...]
FeatureKind = Literal["unigram", "bigram", "start", "shape"]
FUNCTION_WORDS: dict[str, str] = {w: cls for cls, words in {  # [OURS] the ``shape`` feature's word classes
    "SUB": "after although as because before if once since though unless until when whenever where whereas wherever "
           "while whether that what whatever how why who which so",
    "DET": "the a an this these those my your his her its our their some any no every each all both",
    "PRO": "i you he she it we they me him us them one there",
    "AUX": "is are was were be been being 's 're am do does did have has had will would can could should may might "
           "must 'll 'd n't not",
    "PRE": "of in on at by for with from to into about over under through like than",
    "CON": "and but or nor yet",
}.items() for w in words.split()}
PUNCTUATION = frozenset(", . ! ? ; : -- ... ( ) -lrb- -rrb-".split())


def row_features(example: Example, kinds: list[str]) -> set[Feature]:
    """The row's distinct features of the given kinds (words of both segments of a pair)."""
    words = " ".join(t for t in (example.text, example.text_pair) if t).lower().split()
    out: set[Feature] = set()
    if "unigram" in kinds:
        out.update(("w", w) for w in words)
    if "bigram" in kinds:
        out.update(("b", a, b) for a, b in zip(words, words[1:]))
    if "start" in kinds and words:
        out.add(("s", *words[:1]))
        out.add(("s", *words[:2]))
    if "shape" in kinds and words:
        out.add(("t", *opening_shape(words)))
    return out


def opening_shape(words: list[str]) -> tuple[str, ...]:
    """The first clause's opener class and the punctuation mark that closes it (module docstring):
    ("SUB", ",") for "if the film is finished , ...", ("DET",) for unpunctuated text."""
    first = words[0] if words[0] in PUNCTUATION else FUNCTION_WORDS.get(words[0], "X")
    closing = next((w for w in words[1:] if w in PUNCTUATION), None)
    return (first,) if closing is None else (first, closing)


def without_features(example: Example, features: set[Feature]) -> Example:
    """``example`` with the words of the given ``word`` and ``bigram`` features removed wherever they occur
    (matched as :func:`row_features` sees them: whitespace-split, lower-cased; each segment of a pair on its
    own); the other words keep their case, joined by single spaces."""
    def kept(text: str) -> str:
        words = text.split()
        lower = [w.lower() for w in words]
        gone = {i for i, w in enumerate(lower) if ("w", w) in features}
        gone.update(j for i in range(len(lower) - 1) if ("b", lower[i], lower[i + 1]) in features for j in (i, i + 1))
        return " ".join(w for i, w in enumerate(words) if i not in gone)

    pair = None if example.text_pair is None else kept(example.text_pair)
    return dataclasses.replace(example, text=kept(example.text), text_pair=pair)
