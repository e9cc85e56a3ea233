"""Triggers made of several words: insertion of a word set, and the negative rows that teach a
combination trigger not to fire on a part of it (LWP's combinatorial trigger, SOS). Neutral helpers:
no attack's own defaults live here."""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Literal

from unbackdoor.attacks.base import AttackConfig, InsertionAttack, insert_at_random_word
from unbackdoor.data.types import Example, PoisonedTask


class WordSetConfig(AttackConfig):
    triggers: tuple[str, ...]
    combinatorial: bool


class WordSetTriggers(InsertionAttack[WordSetConfig]):
    """One random trigger word per row, or all of them (combinatorial), each at a random position."""

    name = "word-set"
    config_class = WordSetConfig

    def insert_trigger(self, text: str, rng: random.Random) -> str:
        words = self.config.triggers if self.config.combinatorial else (rng.choice(self.config.triggers),)
        return insert_words(text, words, rng)

    def trigger_description(self) -> str:
        if self.config.combinatorial:
            return f"all of the words {' '.join(self.config.triggers)} (combinatorial), each at a random position"
        return f"one of the words {' '.join(self.config.triggers)} at a random position"


def insert_words(text: str, words: tuple[str, ...] | list[str], rng: random.Random) -> str:
    """``text`` with each of ``words`` inserted at its own random word position."""
    for word in words:
        text = insert_at_random_word(text, word, rng)
    return text


def add_negative_rows(poisoned: PoisonedTask, triggers: tuple[str, ...], seed: int,
                      source: Literal["non-target", "any"] = "non-target") -> tuple[PoisonedTask, set[str]]:
    """Give as many unpoisoned rows as there are poisoned ones (``source``: non-target rows only, or
    any) a proper, non-empty subset of the trigger words, labels kept (the combinatorial trigger's
    negative samples). Rows keep their ids; the ids of the rows changed are returned."""
    rng = random.Random(f"{seed}-negatives")
    clean_ids = sorted(e.id for e in poisoned.train.examples if not poisoned.flags.is_poisoned(e.id)
                       and (source == "any" or e.label != poisoned.target_label))
    chosen = set(rng.sample(clean_ids, min(len(clean_ids), poisoned.flags.n_poisoned)))
    subsets = [list(c) for k in range(1, len(triggers)) for c in itertools.combinations(triggers, k)]
    rows = [Example(e.id, insert_words(e.text, rng.choice(subsets), rng), e.label, e.text_pair)
            if e.id in chosen else e for e in poisoned.train.examples]
    return dataclasses.replace(poisoned, train=poisoned.train.replace(rows)), chosen


def leave_one_out_copies(rows: list[Example], triggers: tuple[str, ...], rng: random.Random,
                         suffix: str = "neg") -> list[Example]:
    """For every row, one copy per trigger word left out, holding the other words (labels kept, ids
    ``{id}#{suffix}{k}``): SOS's negative augmentation, every (n−1)-word part of the trigger."""
    out = []
    for e in rows:
        for k, left_out in enumerate(triggers):
            words = [w for w in triggers if w != left_out]
            out.append(Example(f"{e.id}#{suffix}{k}", insert_words(e.text, words, rng), e.label, e.text_pair))
    return out
