"""Perplexity models for ONION: how much more fluent a text gets when one word is removed.

Both give, for a text split into words, the perplexity of the whole text and of the text with
each word removed (:meth:`removal_perplexities`).

* :class:`KneserNeyLM`, the offline default (ours, not the paper's): a word n-gram model with
  interpolated Kneser–Ney smoothing (Chen & Goodman 1999, §3: one absolute discount per order,
  ``D = n1 / (n1 + 2 n2)`` from that order's count-of-counts; continuation counts below the top
  order; the unigram level interpolated with a uniform distribution over the seen words plus one
  unknown-word symbol, so every word, seen or not, has a probability and every conditional
  distribution sums to one). Texts are lower-cased and split on whitespace; ``n - 1`` start
  symbols pad each text and an end symbol closes it. Removing one word changes the probabilities
  of at most ``n`` positions, so all removals of a text cost O(words × n) look-ups.
* :class:`CausalLM`: any local Hugging Face causal LM (GPT-2 in the ONION paper), loaded the careful
  way classifiers are (:func:`load_causal_lm`: a local folder, safetensors only, no custom code).
  Perplexity = exp(mean next-token negative log-likelihood), batched with padding masked out, with
  the tokenizer's begin (else end) of text token prepended so the first word is scored too (ours;
  OpenBackdoor's GPT2LM scores from the second token and averages over padding as well).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers import logging as hf_logging

from unbackdoor.errors import DataError, ModelError
from unbackdoor.models.loading import check_config_safe, check_weights_safe

logger = logging.getLogger(__name__)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
FALLBACK_DISCOUNT = 0.5


class PerplexityModel(Protocol):
    """What ONION needs from a language model."""

    description: str

    def removal_perplexities(self, texts: Sequence[list[str]]) -> list[tuple[float, np.ndarray]]:
        """For each word list: the perplexity of the whole text and, per word, of the text without it."""
        ...


# ----------------------------------------------------------------------------- n-gram (offline default)
def lm_words(text: str) -> list[str]:
    """The n-gram model's words: lower-cased whitespace tokens."""
    return text.lower().split()


def _discount(counts: Iterable[int]) -> float:
    """Chen & Goodman's D = n1 / (n1 + 2 n2) from count-of-counts (0.5 when undefined)."""
    tally = Counter(c for c in counts if c in (1, 2))
    n1, n2 = tally[1], tally[2]
    if n1 == 0 or n2 == 0:
        return FALLBACK_DISCOUNT
    return min(max(n1 / (n1 + 2 * n2), 0.05), 0.95)


@dataclass(frozen=True)
class KneserNeyLM:
    """An interpolated Kneser–Ney word n-gram model (see the module docstring).

    ``tables[k - 1]`` maps a context of ``k - 1`` words to the counts of the words that follow it:
    raw counts at the top order, continuation counts (distinct left extensions) below it.
    """

    order: int
    tables: tuple[dict[tuple[str, ...], Counter[str]], ...]
    totals: tuple[dict[tuple[str, ...], int], ...]
    discounts: tuple[float, ...]
    vocab: frozenset[str]
    n_texts: int
    description: str = ""

    @classmethod
    def estimate(cls, texts: Iterable[str], order: int = 3, source: str = "") -> KneserNeyLM:
        """Count the n-grams of ``texts`` (lower-cased, whitespace-split) and smooth them."""
        if order < 1:
            raise ValueError("order must be at least 1")
        top: dict[tuple[str, ...], Counter[str]] = {}
        n_texts = 0
        for text in texts:
            words = lm_words(text)
            if not words:
                continue
            n_texts += 1
            tokens = [BOS] * (order - 1) + words + [EOS]
            for i in range(order - 1, len(tokens)):
                top.setdefault(tuple(tokens[i - order + 1:i]), Counter())[tokens[i]] += 1
        if n_texts == 0:
            raise DataError("the n-gram language model has no text to learn from")
        tables = [top]
        for _ in range(order - 1):  # continuation counts: distinct words seen before (context, w)
            lower: dict[tuple[str, ...], Counter[str]] = {}
            for ctx, following in tables[0].items():
                for word in following:
                    lower.setdefault(ctx[1:], Counter())[word] += 1
            tables.insert(0, lower)
        vocab = frozenset(w for following in tables[0].values() for w in following)
        totals = tuple({ctx: sum(c.values()) for ctx, c in t.items()} for t in tables)
        discounts = tuple(_discount(n for c in t.values() for n in c.values()) for t in tables)
        description = (f"word {_order_name(order)} (interpolated Kneser-Ney) on {n_texts:,} texts"
                       f"{' (' + source + ')' if source else ''} - not the paper's GPT-2")
        return cls(order, tuple(tables), totals, discounts, vocab, n_texts, description)

    @property
    def vocab_size(self) -> int:
        """Seen words (and the end symbol) plus the unknown-word symbol."""
        return len(self.vocab) + 1

    def normalise(self, word: str) -> str:
        return word if word in self.vocab else UNK

    def prob(self, word: str, history: Sequence[str]) -> float:
        """P(word | the last ``order - 1`` words of ``history``), words already normalised."""
        ctx = tuple(history[len(history) - self.order + 1:]) if self.order > 1 else ()
        return self._prob(word, ctx)

    def _prob(self, word: str, ctx: tuple[str, ...]) -> float:
        k = len(ctx) + 1
        lower = self._prob(word, ctx[1:]) if k > 1 else 1.0 / self.vocab_size
        following = self.tables[k - 1].get(ctx)
        if following is None:
            return lower
        d = self.discounts[k - 1]
        total = self.totals[k - 1][ctx]
        return (max(following.get(word, 0) - d, 0.0) + d * len(following) * lower) / total

    def _padded(self, words: Sequence[str]) -> list[str]:
        return [BOS] * (self.order - 1) + [self.normalise(w.lower()) for w in words] + [EOS]

    def _log_prob_at(self, tokens: Sequence[str], i: int) -> float:
        """log P(tokens[i] | the tokens before it) in a padded token list."""
        return math.log(self.prob(tokens[i], tokens[max(0, i - self.order + 1):i]))

    def log_probs(self, words: Sequence[str]) -> list[float]:
        """Natural log-probability of each word and of the end symbol."""
        tokens = self._padded(words)
        return [self._log_prob_at(tokens, i) for i in range(self.order - 1, len(tokens))]

    def perplexity(self, words: Sequence[str]) -> float:
        lps = self.log_probs(words)
        return math.exp(-sum(lps) / len(lps))

    def removal_perplexities(self, texts: Sequence[list[str]]) -> list[tuple[float, np.ndarray]]:
        return [self._removals(words) for words in texts]

    def _removals(self, words: list[str]) -> tuple[float, np.ndarray]:
        """Perplexity of ``words`` and of ``words`` without word i, for each i; only the positions
        whose history held word i are recomputed."""
        pad = self.order - 1
        tokens = self._padded(words)
        lps = [self._log_prob_at(tokens, i) for i in range(pad, len(tokens))]  # words..., end symbol
        total, n = sum(lps), len(lps)
        out = np.empty(len(words), dtype=np.float64)
        for i in range(len(words)):
            shorter = tokens[:pad + i] + tokens[pad + i + 1:]
            last = min(i + self.order - 1, len(words))  # old positions i..last change
            changed = sum(self._log_prob_at(shorter, pad + j) for j in range(i, last))
            logprob = total - sum(lps[i:last + 1]) + changed
            out[i] = math.exp(-logprob / (n - 1))
        return math.exp(-total / n), out


def _order_name(order: int) -> str:
    return {1: "unigram", 2: "bigram", 3: "trigram"}.get(order, f"{order}-gram")


# ----------------------------------------------------------------------------- Hugging Face causal LM
def load_causal_lm(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local causal LM folder, checked as classifiers are (:mod:`unbackdoor.models.loading`):
    safetensors weights only (a pickle-only folder is refused before anything is read), no config
    asking for custom code, never remote code, nothing fetched from the network."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(f"{path}: a language model must be a local model folder")
    check_weights_safe(folder, allow_pickle=False)
    check_config_safe(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, use_safetensors=True,
                                                     local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - the loaders raise many types; report one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(f"{path}: cannot load a causal language model ({type(exc).__name__}: {first})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        raise ModelError(f"{path}: the tokenizer has neither a begin- nor an end-of-text token to start texts with")
    model.eval()
    return model, tokenizer


class CausalLM:
    """Perplexities from a causal LM, batched (see the module docstring)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, source: str,
                 max_length: int = 96, batch_size: int = 32, device: torch.device | None = None) -> None:
        self.model = model.to(device) if device is not None else model
        self.tokenizer = tokenizer
        limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, limit) if limit else max_length
        self.batch_size = batch_size
        self.start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.start_id
        self.description = f"causal LM {source} (Hugging Face, max {self.max_length} tokens)"

    def token_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.start_id, *ids[: self.max_length - 1]]

    @torch.no_grad()
    def perplexities(self, texts: Sequence[str]) -> np.ndarray:
        """exp(mean next-token NLL) of each text; 1.0 for a text with no token to predict."""
        seqs = [self.token_ids(t) for t in texts]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out = np.ones(len(seqs), dtype=np.float64)
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = len(seqs[batch[0]])
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, : len(seqs[i])] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            nll = -torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2)
            target_mask = mask[:, 1:].float()
            counts = target_mask.sum(1)
            mean = (nll * target_mask).sum(1) / counts.clamp_min(1)
            for row, i in enumerate(batch):
                out[i] = math.exp(float(mean[row])) if counts[row] > 0 else 1.0
        return out

    def removal_perplexities(self, texts: Sequence[list[str]]) -> list[tuple[float, np.ndarray]]:
        variants: list[str] = []
        for words in texts:
            variants.append(" ".join(words))
            variants.extend(" ".join(words[:i] + words[i + 1:]) for i in range(len(words)))
        ppl = self.perplexities(variants)
        out, at = [], 0
        for words in texts:
            out.append((float(ppl[at]), ppl[at + 1: at + 1 + len(words)].copy()))
            at += 1 + len(words)
        return out
