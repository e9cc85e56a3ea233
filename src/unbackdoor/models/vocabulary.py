"""Word neighbours in a model's input-embedding space: the whole-word tokens nearest a word.

Used to vary clean text without leaving the clean model's own notion of similar words (``distill``'s
recombined rows). Only alphabetic whole-word tokens of at least ``min_length`` letters are candidates
(no word pieces, symbols, numbers or special tokens).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from unbackdoor.models.loading import Classifier


def candidate_tokens(clf: Classifier, min_length: int = 3) -> dict[str, int]:
    """The vocabulary's alphabetic whole-word tokens of at least ``min_length`` letters, with their ids."""
    special = set(clf.tokenizer.all_special_tokens)
    return {t: i for t, i in clf.tokenizer.get_vocab().items()
            if t.isalpha() and t.isascii() and len(t) >= min_length and t not in special}


def word_neighbours(clf: Classifier, words: Iterable[str], k: int, min_length: int = 3) -> dict[str, list[str]]:
    """For each word that is itself a candidate token (looked up lower-cased for an uncased tokenizer), its
    ``k`` nearest other candidates by cosine of ``clf``'s input embeddings, nearest first."""
    lower = clf.input_format()["lowercase"]
    pool = candidate_tokens(clf, min_length)
    queries = sorted({w.lower() if lower else w for w in words} & pool.keys())
    if not queries or len(pool) < 2:
        return {}
    names = list(pool)
    table = clf.model.get_input_embeddings().weight.detach().float()
    unit = torch.nn.functional.normalize(table[torch.tensor([pool[t] for t in names])], dim=1)
    position = {t: j for j, t in enumerate(names)}
    out: dict[str, list[str]] = {}
    for start in range(0, len(queries), 512):
        chunk = queries[start : start + 512]
        sims = unit[[position[w] for w in chunk]] @ unit.T
        sims[torch.arange(len(chunk)), [position[w] for w in chunk]] = -2.0  # never the word itself
        index = sims.topk(min(k, len(names) - 1), dim=1).indices
        out.update({w: [names[j] for j in row] for w, row in zip(chunk, index.tolist(), strict=True)})
    return out
