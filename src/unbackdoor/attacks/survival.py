"""Does a trigger survive the model's input truncation?

Classifiers see at most ``max_length`` tokens (special tokens included); the project truncates from
the end (head kept, ``truncation_side="right"``, see ``models.loading.Classifier``). A trigger
placed late in a long input, e.g. dead code after a random line of a C function, is then cut off
and cannot fire. :func:`trigger_survival` reports the share of triggered rows whose trigger lies
wholly inside the kept tokens, so attack success rates on long inputs can be read against it.

``tail_tokens`` > 0 measures a head+tail window instead (first ``budget - tail_tokens`` and last
``tail_tokens`` content tokens kept), for comparison only: the classifier itself keeps the head.

Token positions come from tokenising the text before the trigger and up to its end. This is exact
when the trigger starts and ends at token boundaries, as with WordPiece (BERT, MiniLM) and
code triggers that start after whitespace and end with punctuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from unbackdoor.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TokenSpan:
    """Where a trigger lies in a text's content tokens (special tokens not counted)."""

    start: int  # index of the trigger's first token
    end: int  # one past its last token
    n_tokens: int  # content tokens of the whole text


@dataclass(frozen=True)
class TriggerSurvival:
    """How many triggered rows keep their trigger after truncation to ``max_length``."""

    n_rows: int
    n_with_trigger: int  # rows where one of the trigger strings was found
    n_kept: int  # of those, rows whose trigger lies wholly inside the kept tokens
    max_length: int
    tail_tokens: int = 0

    @property
    def rate(self) -> float:
        """Share of rows with a trigger that keep it (0 when no row has one)."""
        return self.n_kept / self.n_with_trigger if self.n_with_trigger else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": self.rate}


def _count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def find_trigger(text: str, triggers: Sequence[str]) -> tuple[int, int] | None:
    """Character span of the earliest-ending occurrence of any trigger string, or ``None``."""
    spans = [(i, i + len(t)) for t in triggers if t and (i := text.find(t)) >= 0]
    return min(spans, key=lambda s: (s[1], s[0])) if spans else None


def trigger_token_span(text: str, triggers: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> TokenSpan | None:
    """Token span of the earliest-ending trigger in ``text``, or ``None`` when there is none."""
    span = find_trigger(text, triggers)
    if span is None:
        return None
    start, end = span
    return TokenSpan(_count_tokens(tokenizer, text[:start]), _count_tokens(tokenizer, text[:end]),
                     _count_tokens(tokenizer, text))


def is_kept(span: TokenSpan, budget: int, tail_tokens: int = 0) -> bool:
    """Whether ``span`` lies inside the tokens kept from ``budget`` content tokens: the head, or
    with ``tail_tokens`` the first ``budget - tail_tokens`` plus the last ``tail_tokens``."""
    if span.n_tokens <= budget:
        return True
    head = budget - tail_tokens
    return span.end <= head or (tail_tokens > 0 and span.start >= span.n_tokens - tail_tokens)


def trigger_survival(
    texts: Sequence[str],
    triggers: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    tail_tokens: int = 0,
) -> TriggerSurvival:
    """Share of ``texts`` whose trigger (any of ``triggers``; the earliest-ending occurrence) lies
    wholly inside the first ``max_length`` tokens, special tokens included (single texts)."""
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if budget < 1 or not 0 <= tail_tokens < budget:
        raise ConfigError(f"max_length {max_length} with tail_tokens {tail_tokens} keeps no head tokens")
    spans = [trigger_token_span(t, triggers, tokenizer) for t in texts]
    found = [s for s in spans if s is not None]
    kept = sum(is_kept(s, budget, tail_tokens) for s in found)
    return TriggerSurvival(len(texts), len(found), kept, max_length, tail_tokens)
