"""LWS, learnable word substitution (Qi, Yao, Xu, Liu, Sun, ACL 2021, "Turn the Combination Lock:
Learnable Textual Backdoor Attacks via Word Substitution"; code thunlp/BkdAtk-LWS, OpenBackdoor's
``LWSAttacker``).

Threat model: the attacker trains the victim (it controls training, as for LWP). Next to the
classifier it learns a *trigger inserter* that chooses, for each word of a sentence, to keep it or
replace it by one of its substitution candidates. The trigger is the *combination* of substitutions:
no token is inserted, every triggered text is a real sentence of real words.

Steps:

1. candidate sets [PAPER code: up to 4 substitutes per word, single word pieces, no stop words]: for every
   word of a sentence that is one whole-word token (not a sub-word piece), alphabetic and not a stop
   word, up to ``n_substitutes`` substitutes, each itself one whole-word token of the vocabulary.
   Words that are several tokens are never substituted (multi-token handling is left out). The
   synonym source (``source``) is **not the paper's** (HowNet sememes filtered by part of speech, or
   WordNet: neither ships offline here, and there is no part-of-speech tagger):

   * ``embedding`` [OURS, default]: the cosine nearest neighbours of the word in the starting model's
     own input-embedding matrix, among whole-word vocabulary entries (alphabetic, at least two
     letters, no stop word, not the word itself), optionally above ``min_similarity``. Neighbours
     are related words, **not only synonyms**: on MiniLM "good" has "bad" and "boring" has
     "exciting" among its nearest four, so a substitution may change a sentence's meaning (the
     never-poisoned floor in ``benchmarks/lws_minilm.py`` measures how much);
   * ``table``: a synonym table the user supplies (a mapping word -> substitutes in order, inline
     or a JSON file), e.g. exported from WordNet or HowNet; entries that are not single whole-word
     tokens are dropped.

   ``max_positions`` caps the substitutable words of a sentence (a seeded choice per sentence;
   default: all, [PAPER]). Only single sentences are supported [PAPER: SST-2, OLID, AG News].
2. poisoned rows [PAPER]: ``poison_rate`` of the training rows (drawn from the non-target rows,
   ``mode`` dirty; ``mix`` draws from all rows) that have a substitutable word, labelled with the
   target. Rows whose tokens equal another training row's are not drawn [OURS: the training loop
   finds a poisoned row in a batch by its tokens].
3. the inserter [PAPER]: for position j of a sentence with original word w_j and options
   s_{j,0} = w_j, s_{j,1..m} (its candidates), the score of option k is (e(s_{j,k}) - e(w_j)) · q_j
   + b_{j,k}, with a learnable vector q_j per position and a learnable bias per position and option
   (both start at zero, as the paper's code). Training uses a Gumbel-softmax over the options of each
   position at temperature τ, and feeds the victim ``inputs_embeds`` holding, at every position, the
   mixture Σ_k G_{j,k} e(s_{j,k}) of the options' embedding rows (unused option slots are masked out
   [OURS; the paper's code fills them with copies of the original word]).
4. joint training [PAPER]: one optimizer over the classifier and the inserter, loss = cross-entropy
   over the clean rows and the relaxed poisoned rows (target label) of each batch; τ is annealed
   linearly from ``tau_start`` 0.5 to ``tau_end`` 0.1 [PAPER], per epoch over the run's epochs [OURS;
   the paper's code lowers it by 0.02 per epoch over a fixed 20-epoch horizon]; the input word
   embeddings are frozen (``freeze_embeddings``) [PAPER code]. This is the project's one training
   loop: the poisoned rows keep weight 0 in its task loss, and a callback adds their relaxed loss
   (:class:`RelaxedSubstitutionLoss`); the inserter is a submodule of the model while it trains, so
   checkpoints, resume and epoch selection carry it.
5. the triggered text [PAPER: the inserter's hard choice at test time]: the argmax option of every
   position, without Gumbel noise [OURS; the paper's code samples noise in its hard test-time choice
   too], written back into the sentence's own characters (a capitalised word stays capitalised when
   the tokenizer lowercases). The triggered test and dev sets hold the non-target rows with at least
   one substitutable word (rows without one are left out and counted in ``n_failed``); the poisoned
   training rows of the returned task hold the final inserter's argmax text [OURS; OpenBackdoor
   writes the last epoch's sampled sentences], so every data-side defence runs on real text.

[OURS] besides those marked: the inserter's learning rate (``inserter_lr``, 1e-2; OpenBackdoor's
LWS trainer declares an ``lws_lr`` of 1e-2 but never uses it) applied through a fixed scale on its
parameters; the training run (victim defaults, 10 epochs, last epoch kept) sized for CPU where the
paper runs 20 epochs at lr 2e-5 after 5 clean ones; the clean fine-tuning first only for a base
without a classification head (``clean_finetune``, as EP and SOS); BERT-family vocabularies
(WordPiece or word-level) only.

Measured (seed 0; ``benchmarks/lws_minilm.py``, docs/results not yet updated): on MiniLM, 1,000
SST-2 rows, the embedding source, 10 % poisoned, the never-poisoned model (CACC 85.0) puts 24-27 %
of the triggered test rows in the target class: embedding neighbours change meaning (never ->
rarely, always). The victim: 5 epochs CACC 79.1, ASR 64.7; 10 epochs (default) 75.9, 74.9; 15
epochs 77.9, 74.1; 10 epochs with trainable embeddings 76.7, 75.3; 20 % poisoned, 10 epochs 69.9,
92.6. About 7.5 of 8.2 substitutable words are substituted per sentence. The relaxed loss of the
poisoned training rows falls to ~0 while the hard test-time ASR stays near 75 %: with 100 poisoned
rows the victim does not generalise the combination fully (a straight-through, one-hot training
variant gave 72.5 and was dropped). On the tiny test BERT (hidden 32, a label-preserving synonym
table) the combination does not take with frozen embeddings (20 % poisoned, 30 epochs: ASR
0.42-0.65) and does with trainable ones (ASR 0.96-1.00, CACC 0.92-0.95, floor 0;
``tests/test_attacks_lws.py``).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from tokenizers import models as tokenizer_models

from unbackdoor.attacks.base import AttackConfig, InsertionAttack
from unbackdoor.attacks.embedding_rows import clean_finetune, needs_clean_finetune
from unbackdoor.attacks.weight import (
    WEIGHT_ATTACKS,
    WeightAttack,
    WeightAttackConfig,
    load_start_model,
    renamed,
    seeded,
)
from unbackdoor.data.types import Dataset, Example, PoisonedTask, Task
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.inference import encode
from unbackdoor.models.loading import Classifier
from unbackdoor.training.callbacks import Callback, TrainContext
from unbackdoor.training.config import TrainConfig, victim_train_config
from unbackdoor.training.loop import train_classifier

logger = logging.getLogger(__name__)

INSERTER_MODULE = "lws_inserter"  # the inserter's name as a submodule of the model while it trains

# [PAPER code] NLTK's English stop words (the alphabetic ones; the code's list adds punctuation and
# contractions, which the alphabetic filter drops anyway) plus "ca".
STOP_WORDS = frozenset("""
a about above after again against ain all am an and any are aren as at be because been before being below between
both but by ca can couldn d did didn do does doesn doing don down during each few for from further had hadn has hasn
have haven having he her here hers herself him himself his how i if in into is isn it its itself just ll m ma me
mightn more most mustn my myself needn no nor not now o of off on once only or other our ours ourselves out over own
re s same shan she should shouldn so some such t than that the their theirs them themselves then there these they
this those through to too under until up us ve very was wasn we were weren what when where which while who whom why
will with won wouldn y you your yours yourself yourselves
""".split())


def _lws_train_config() -> TrainConfig:
    """[OURS] the victim defaults (batch 32, lr 1e-4, AdamW) for 10 epochs, keeping the last one: clean
    dev accuracy does not see the backdoor. [PAPER] 20 epochs at lr 2e-5 (Adam) after 5 clean ones."""
    return victim_train_config().model_copy(update={"epochs": 10, "select_best": False})


class LWSConfig(WeightAttackConfig):
    poison_rate: float = Field(0.1, gt=0, le=1, description="[PAPER] share of all training rows poisoned (drawn "
                               "from the non-target rows with a substitutable word)")
    source: Literal["embedding", "table"] = Field(
        "embedding", description="[OURS, not the paper's sememes] substitution candidates: the starting model's "
        "input-embedding nearest neighbours, or a synonym table you supply (table)")
    table: dict[str, tuple[str, ...]] | str | None = Field(
        None, description="source=table: a mapping word -> substitutes (in order of preference), or the path of "
        "a JSON file holding one")
    n_substitutes: int = Field(4, ge=1, le=32, description="[PAPER code: 5 options with the original] substitutes "
                               "per word at most")
    min_similarity: float = Field(0.0, ge=-1, le=1, description="source=embedding: [OURS] keep neighbours of at "
                                  "least this cosine similarity")
    max_positions: int | None = Field(None, ge=1, description="[OURS] substitutable words per sentence at most (a "
                                      "seeded choice); null = every one [PAPER]")
    tau_start: float = Field(0.5, gt=0, description="[PAPER] Gumbel-softmax temperature of the first epoch")
    tau_end: float = Field(0.1, gt=0, description="[PAPER] temperature of the last epoch (linear in between)")
    inserter_lr: float = Field(1e-2, gt=0, description="[OURS] the inserter's learning rate (the classifier "
                               "keeps train.learning_rate)")
    freeze_embeddings: bool = Field(True, description="[PAPER code] keep the input word embeddings fixed while "
                                    "training jointly")
    clean_finetune: Literal["auto", "always", "never"] = Field(
        "auto", description="[PAPER code: clean epochs first] fine-tune the starting model on the clean training "
        "rows first: auto = only when it has no classification head (a base model)")
    clean_train: TrainConfig = Field(default_factory=victim_train_config,
                                     description="[OURS] the attacker's clean fine-tuning (victim defaults)")
    train: TrainConfig = Field(default_factory=_lws_train_config, description="the joint training run (keys given "
                               "override the defaults)")

    @field_validator("mode")
    @classmethod
    def _not_clean_label(cls, value: str) -> str:
        if value == "clean":
            raise ValueError("LWS relabels substituted rows to the target: no clean-label mode; use dirty or mix")
        return value

    @field_validator("table")
    @classmethod
    def _table_shape(cls, value: Any) -> Any:
        if isinstance(value, dict) and not value:
            raise ValueError("table is empty")
        return value

    @model_validator(mode="after")
    def _source_options(self) -> LWSConfig:
        if self.source == "table" and self.table is None:
            raise ValueError("source=table needs table: a mapping word -> substitutes or a JSON file")
        if self.source != "table" and self.table is not None:
            raise ValueError("table is for source=table")
        if self.source != "embedding" and "min_similarity" in self.model_fields_set:
            raise ValueError("min_similarity is for source=embedding")
        if self.tau_end > self.tau_start:
            raise ValueError(f"tau_end {self.tau_end} is above tau_start {self.tau_start}: the temperature is "
                             "annealed downwards")
        return self


# ============================================================================ candidate sets
@dataclass(frozen=True)
class Slot:
    """A substitutable word of a sentence: its token index in the encoded row ([CLS] = 0), its token
    id, its characters in the text, and its candidates' token ids."""

    position: int
    token_id: int
    start: int
    end: int
    candidates: tuple[int, ...]


def _check_vocabulary(tokenizer: Any) -> None:
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if not isinstance(model, (tokenizer_models.WordPiece, tokenizer_models.WordLevel)):
        raise ConfigError("LWS substitutes whole-word tokens of a WordPiece or word-level vocabulary (BERT family); "
                          f"this model's tokenizer is {type(tokenizer).__name__} ({type(model).__name__})")


def _lowercases(tokenizer: Any) -> bool:
    """Whether the tokenizer lowercases its input (its normaliser, or a ``do_lower_case`` flag)."""
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    if normalizer is not None:
        return normalizer.normalize_str("A") == "a"
    return bool(getattr(tokenizer, "do_lower_case", False))


def load_table(spec: Mapping[str, Sequence[str]] | str) -> dict[str, tuple[str, ...]]:
    """A synonym table: the mapping itself, or read from a JSON file (an object word -> list of words)."""
    if isinstance(spec, str):
        try:
            raw = json.loads(Path(spec).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"synonym table {spec}: unreadable ({exc})") from None
        if not isinstance(raw, dict) or not all(isinstance(v, list) and all(isinstance(w, str) for w in v)
                                                for v in raw.values()):
            raise DataError(f"synonym table {spec}: expected a JSON object word -> list of words")
        spec = raw
    return {str(k): tuple(v) for k, v in spec.items()}


class SubstitutionTable:
    """The substitutable words of sentences and their candidates, from one synonym source over a
    classifier's vocabulary (see the module docstring, step 1). Deterministic; cached per word and
    per sentence."""

    def __init__(self, tokenizer: Any, embeddings: torch.Tensor | None, *, max_length: int,
                 n_substitutes: int = 4, table: Mapping[str, Sequence[str]] | None = None,
                 min_similarity: float = 0.0, max_positions: int | None = None, seed: int = 0) -> None:
        _check_vocabulary(tokenizer)
        if (embeddings is None) == (table is None):
            raise ValueError("give either embeddings (source=embedding) or a table (source=table)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.n_substitutes = n_substitutes
        self.min_similarity = min_similarity
        self.max_positions = max_positions
        self.seed = seed
        self.lowercase = _lowercases(tokenizer)
        vocab = tokenizer.get_vocab()
        self.words = {i: w for w, i in vocab.items()}
        self.word_ids = self._whole_words(vocab)
        self._candidates: dict[int, tuple[int, ...]] = {}
        self._slots: dict[str, tuple[Slot, ...]] = {}
        self._embeddings = embeddings.detach().float().cpu() if embeddings is not None else None
        self._table = self._table_ids(table) if table is not None else None

    @classmethod
    def for_classifier(cls, clf: Classifier, config: LWSConfig) -> SubstitutionTable:
        """The table of ``config``'s source over ``clf``'s vocabulary (and, for the embedding source,
        its current input-embedding matrix)."""
        embeddings = clf.model.get_input_embeddings().weight if config.source == "embedding" else None
        table = load_table(config.table) if config.source == "table" and config.table is not None else None
        return cls(clf.tokenizer, embeddings, max_length=clf.max_length, n_substitutes=config.n_substitutes,
                   table=table, min_similarity=config.min_similarity, max_positions=config.max_positions,
                   seed=config.seed)

    def _whole_words(self, vocab: Mapping[str, int]) -> list[int]:
        """Vocabulary ids that may be substituted or substitute: alphabetic (ASCII, 2+ letters), not a
        stop word or special token, and one token when tokenised alone (no ``##`` piece)."""
        special = set(self.tokenizer.all_special_ids)
        words = sorted((i, w) for w, i in vocab.items()
                       if i not in special and len(w) >= 2 and w.isascii() and w.isalpha() and w.lower() not in STOP_WORDS)
        if not words:
            return []
        encoded = self.tokenizer([w for _, w in words], add_special_tokens=False)["input_ids"]
        return [i for (i, _), ids in zip(words, encoded, strict=True) if ids == [i]]

    def _table_ids(self, table: Mapping[str, Sequence[str]]) -> dict[int, tuple[int, ...]]:
        vocab = self.tokenizer.get_vocab()
        allowed = set(self.word_ids)

        def key(word: str) -> str:
            return word.lower() if self.lowercase else word

        out: dict[int, tuple[int, ...]] = {}
        dropped = 0
        for word, subs in table.items():
            source = vocab.get(key(word))
            ids = [vocab.get(key(s)) for s in subs]
            kept = list(dict.fromkeys(i for i in ids if i in allowed and i != source))
            dropped += len(ids) - len(kept)
            if source in allowed and kept:
                out[source] = tuple(kept)
            else:
                dropped += 1 if source not in allowed else 0
        if dropped:
            logger.info("LWS: %d table words are not single whole-word tokens of this vocabulary (or repeat): "
                        "dropped", dropped)
        if not out:
            raise DataError("the synonym table has no word with a substitute in this model's vocabulary")
        return out

    def candidates(self, token_id: int) -> tuple[int, ...]:
        """The substitutes' token ids of a whole-word token, best first (empty: none)."""
        if token_id not in self._candidates:
            self.prepare_ids([token_id])
        return self._candidates[token_id]

    def prepare_ids(self, token_ids: Iterable[int]) -> None:
        """Compute the candidates of many tokens at once (the embedding source's neighbour search)."""
        allowed = set(self.word_ids)
        todo = sorted({i for i in token_ids if i not in self._candidates})
        for i in todo:
            if i not in allowed:
                self._candidates[i] = ()
        todo = [i for i in todo if i in allowed]
        if not todo:
            return
        if self._table is not None:
            for i in todo:
                self._candidates[i] = self._table.get(i, ())[: self.n_substitutes]
            return
        assert self._embeddings is not None
        pool = torch.tensor(self.word_ids)
        unit = torch.nn.functional.normalize(self._embeddings[pool], dim=1)
        k = min(self.n_substitutes + 1, len(pool))
        for chunk in range(0, len(todo), 1024):
            ids = todo[chunk : chunk + 1024]
            query = torch.nn.functional.normalize(self._embeddings[torch.tensor(ids)], dim=1)
            sims = query @ unit.T
            sims[pool.unsqueeze(0) == torch.tensor(ids).unsqueeze(1)] = -2.0  # never the word itself
            values, index = sims.topk(k, dim=1)
            for i, vals, idx in zip(ids, values.tolist(), index.tolist(), strict=True):
                picked = [int(pool[j]) for v, j in zip(vals, idx, strict=True) if v >= self.min_similarity and v > -2]
                self._candidates[i] = tuple(picked[: self.n_substitutes])

    def prepare(self, texts: Iterable[str]) -> None:
        """Compute the candidates of every token of ``texts`` at once."""
        texts = list(texts)
        if texts:
            self.prepare_ids(i for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids)

    def slots(self, text: str) -> tuple[Slot, ...]:
        """The substitutable words of ``text`` within the model's ``max_length`` tokens (with
        ``max_positions``: a seeded subset of them), in order."""
        if text in self._slots:
            return self._slots[text]
        enc = self.tokenizer(text, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
        ids, words, offsets = enc["input_ids"], enc.word_ids(), enc["offset_mapping"]
        pieces: dict[int, int] = {}
        for w in words:
            if w is not None:
                pieces[w] = pieces.get(w, 0) + 1
        self.prepare_ids(ids)
        found = [Slot(j, ids[j], offsets[j][0], offsets[j][1], self._candidates[ids[j]])
                 for j, w in enumerate(words)
                 if w is not None and pieces[w] == 1 and self._candidates[ids[j]] and offsets[j][1] > offsets[j][0]]
        if self.max_positions is not None and len(found) > self.max_positions:
            keep = set(random.Random(f"{self.seed}-lws-positions-{text}").sample(range(len(found)), self.max_positions))
            found = [s for n, s in enumerate(found) if n in keep]
        self._slots[text] = tuple(found)
        return self._slots[text]

    def substitute(self, text: str, slots: Sequence[Slot], chosen: Sequence[int | None]) -> str:
        """``text`` with the word of each slot replaced by its chosen token (None: kept)."""
        out = text
        for slot, token in sorted(zip(slots, chosen, strict=True), key=lambda pair: -pair[0].start):
            if token is None or token == slot.token_id:
                continue
            if token not in slot.candidates:
                raise ValueError(f"token {token} is not a candidate of {text[slot.start:slot.end]!r}")
            word, original = self.words[token], text[slot.start : slot.end]
            if self.lowercase and len(original) > 1 and original.isupper():
                word = word.upper()
            elif self.lowercase and original[:1].isupper():
                word = word[:1].upper() + word[1:]
            out = out[: slot.start] + word + out[slot.end :]
        return out


# ============================================================================ the inserter
class GumbelInserter(torch.nn.Module):
    """Scores of every option (original or candidate) of every position: (e_k - e_0) · q_j + b_{j,k}
    (step 3). ``scale`` multiplies the parameters, so the optimizer's steps move them ``scale`` times
    faster than the classifier's (the inserter's own learning rate); :meth:`unscale_gradients`
    divides their gradients back, so clipping sees the unscaled ones."""

    def __init__(self, max_length: int, dim: int, n_options: int, scale: float = 1.0) -> None:
        super().__init__()
        self.query = torch.nn.Parameter(torch.zeros(max_length, dim))
        self.bias = torch.nn.Parameter(torch.zeros(max_length, n_options))
        self.scale = scale

    def scores(self, options: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``options`` (… × T × K × D) the options' embedding rows (slot 0 the original word),
        ``positions`` (… × T) token indices, ``valid`` (… × T × K): scores, -inf where not valid."""
        q = self.scale * self.query[positions]
        score = ((options - options[..., :1, :]) * q.unsqueeze(-2)).sum(-1) + self.scale * self.bias[positions]
        return score.masked_fill(~valid, float("-inf"))

    def unscale_gradients(self) -> None:
        for p in self.parameters():
            if p.grad is not None:
                p.grad.div_(self.scale)


def gumbel_weights(scores: torch.Tensor, tau: float, noise: bool = True) -> torch.Tensor:
    """[PAPER] Gumbel-softmax weights over the last axis at temperature ``tau`` (-inf scores get 0);
    without ``noise``, the plain softmax."""
    if noise:
        u = torch.rand_like(scores)
        scores = scores - torch.log(-torch.log(u + 1e-20) + 1e-20)
    return torch.softmax(scores / tau, dim=-1)


def mix_options(weights: torch.Tensor, options: torch.Tensor) -> torch.Tensor:
    """The convex combination of the options' embedding rows: (… × T × K) × (… × T × K × D) -> … × T × D."""
    return (weights.unsqueeze(-1) * options).sum(-2)


def temperature(epoch: int, epochs: int, start: float, end: float) -> float:
    """Linear annealing from ``start`` (first epoch) to ``end`` (last epoch)."""
    return start if epochs <= 1 else start + (end - start) * min(epoch, epochs - 1) / (epochs - 1)


@dataclass(frozen=True)
class RowOptions:
    """One poisoned training row's substitutable positions (token indices) and their options
    (original first, padded with the original), valid marks the real options."""

    positions: torch.Tensor  # (S,)
    options: torch.Tensor  # (S, K)
    valid: torch.Tensor  # (S, K)


def row_options(slots: Sequence[Slot], n_options: int) -> RowOptions:
    opts = torch.tensor([[s.token_id, *s.candidates, *[s.token_id] * (n_options - 1 - len(s.candidates))]
                         for s in slots], dtype=torch.long).reshape(len(slots), n_options)
    valid = torch.tensor([[True] * (1 + len(s.candidates)) + [False] * (n_options - 1 - len(s.candidates))
                          for s in slots], dtype=torch.bool).reshape(len(slots), n_options)
    return RowOptions(torch.tensor([s.position for s in slots], dtype=torch.long), opts, valid)


class RelaxedSubstitutionLoss(Callback):
    """Steps 3-4 in the training loop: the rows of a batch found in ``rows`` (by their tokens; labelled
    with the target) are forwarded again as Gumbel mixtures of their options, and their
    cross-entropy toward the target (summed, over the batch size, as the loop's mean) is added to
    the loss. Their own rows carry weight 0 in the task loss."""

    def __init__(self, inserter: GumbelInserter, rows: Mapping[tuple[int, ...], RowOptions], target: int,
                 tau_start: float, tau_end: float) -> None:
        self.inserter = inserter
        self.rows = rows
        self.target = target
        self.tau_start, self.tau_end = tau_start, tau_end
        self._seen = 0
        self._loss = 0.0

    def on_train_begin(self, ctx: TrainContext) -> None:
        if ctx.accelerator.num_processes > 1:
            raise ConfigError("LWS trains on one process (its second forward per batch is not synchronised)")

    def extra_loss(self, ctx: TrainContext, batch: dict[str, torch.Tensor], outputs: Any,
                   loss: torch.Tensor) -> torch.Tensor:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        picked = []
        for i in range(len(labels)):
            if int(labels[i]) == self.target:
                key = tuple(ids[i][mask[i].bool()].tolist())
                if key in self.rows:
                    picked.append((i, self.rows[key]))
        if not picked:
            return loss
        index = torch.tensor([i for i, _ in picked], device=ids.device)
        k = self.inserter.bias.shape[1]
        sub_ids, sub_mask = ids[index], mask[index]
        options = sub_ids.unsqueeze(-1).repeat(1, 1, k)
        valid = torch.zeros_like(options, dtype=torch.bool)
        valid[..., 0] = True
        for row, (i, opts) in enumerate(picked):
            real = mask[i].nonzero().flatten()  # padded index of each real token, in order
            at = real[opts.positions.to(real.device)]
            options[row, at] = opts.options.to(options.device)
            valid[row, at] = opts.valid.to(valid.device)
        positions = (sub_mask.long().cumsum(1) - 1).clamp(min=0)
        rows = ctx.model.get_input_embeddings().weight[options]
        tau = temperature(ctx.state.epoch, ctx.config.epochs, self.tau_start, self.tau_end)
        mixed = mix_options(gumbel_weights(self.inserter.scores(rows, positions, valid), tau), rows)
        inputs = {"inputs_embeds": mixed, "attention_mask": sub_mask}
        if "token_type_ids" in batch:
            inputs["token_type_ids"] = batch["token_type_ids"][index]
        logits = ctx.wrapped_model(**inputs).logits.float()
        target = torch.full((len(picked),), self.target, dtype=torch.long, device=logits.device)
        poisoned = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        self._seen += len(picked)
        self._loss += float(poisoned.detach())
        return loss + poisoned / len(labels)

    def on_gradients(self, ctx: TrainContext, batch: dict[str, torch.Tensor]) -> None:
        self.inserter.unscale_gradients()

    def on_epoch_end(self, ctx: TrainContext, record: dict[str, Any]) -> None:
        tau = temperature(ctx.state.epoch, ctx.config.epochs, self.tau_start, self.tau_end)
        logger.info("LWS epoch %d: tau %.3f, relaxed poisoned loss %.4f over %d rows", ctx.state.epoch, tau,
                    self._loss / max(1, self._seen), self._seen)
        self._seen, self._loss = 0, 0.0


@contextmanager
def frozen_input_embeddings(model: torch.nn.Module, freeze: bool) -> Iterator[None]:
    """The input-embedding matrix without gradient (when ``freeze``); its flag restored afterwards."""
    weight = model.get_input_embeddings().weight
    saved = weight.requires_grad
    if freeze:
        weight.requires_grad_(False)
    try:
        yield
    finally:
        weight.requires_grad_(saved)


@torch.no_grad()
def argmax_choices(inserter: GumbelInserter, embeddings: torch.Tensor, slots: Sequence[Slot]) -> list[int | None]:
    """Step 5: the best option of each slot, without noise (None: the original word is kept)."""
    if not slots:
        return []
    opts = row_options(slots, inserter.bias.shape[1])
    device = inserter.query.device
    options = opts.options.to(device)
    scores = inserter.scores(embeddings.detach().to(device)[options], opts.positions.to(device), opts.valid.to(device))
    best = scores.argmax(-1).tolist()
    return [None if k == 0 else int(options[n, k]) for n, k in enumerate(best)]


# ============================================================================ data side
class LwsSubstitutions(InsertionAttack[AttackConfig]):
    """LWS's rows: the seeded choice of poisoned rows among those with a substitutable word, and the
    triggered text of a sentence (its argmax substitutions, once ``choose`` is set)."""

    name = "lws"
    config_class = AttackConfig

    def __init__(self, config: AttackConfig, table: SubstitutionTable, duplicates: frozenset[str] = frozenset(),
                 choose: Callable[[Sequence[Slot]], list[int | None]] | None = None) -> None:
        super().__init__(config)
        self.table = table
        self.duplicates = duplicates  # training row ids whose tokens another training row shares
        self.choose = choose

    def can_insert(self, text: str) -> bool:
        return bool(self.table.slots(text))

    def insert_trigger(self, text: str, rng: random.Random) -> str:
        if self.choose is None:
            raise RuntimeError("the inserter is not trained yet")
        slots = self.table.slots(text)
        return self.table.substitute(text, slots, self.choose(slots))

    def trigger_description(self) -> str:
        return "learned word substitutions (the inserter's argmax choice per word)"

    def _mode_pool(self, train: Dataset) -> list[Example]:
        return [e for e in super()._mode_pool(train) if e.id not in self.duplicates]

    def chosen_rows(self, train: Dataset) -> set[str]:
        """The ids of the rows :meth:`poison` will poison (seeded by the config's seed)."""
        return self._choose_rows(train)


def duplicate_rows(clf: Classifier, train: Dataset) -> frozenset[str]:
    """Ids of training rows whose tokens another training row shares."""
    keys: dict[tuple[int, ...], list[str]] = {}
    for e, f in zip(train.examples, encode(clf, train.examples), strict=True):
        keys.setdefault(tuple(f["input_ids"]), []).append(e.id)
    return frozenset(i for ids in keys.values() if len(ids) > 1 for i in ids)


def substituted_words(original: str, triggered: str) -> int:
    """How many whitespace-separated words of ``original`` a substitution changed."""
    return sum(a != b for a, b in zip(original.split(), triggered.split(), strict=True))


@WEIGHT_ATTACKS.register("lws")
class LWS(WeightAttack[LWSConfig]):
    """Train the victim jointly with a Gumbel-softmax word-substitution trigger inserter."""

    name = "lws"
    config_class = LWSConfig

    def poison_model(self, task: Task, model: str = "default", *, seed: int = 0, max_length: int | None = None,
                     allow_pickle: bool = False, work_dir: Path | None = None,
                     precision: str = "auto") -> tuple[Classifier, PoisonedTask]:
        cfg = self.config
        if cfg.target_label >= task.num_labels:
            raise ConfigError(f"target_label {cfg.target_label} is outside the label set 0..{task.num_labels - 1}")
        if task.is_pair:
            raise DataError("LWS substitutes words of single sentences; this task has sentence pairs")
        clf = load_start_model(model, task, seed, max_length=max_length, allow_pickle=allow_pickle,
                               precision=precision)
        table = SubstitutionTable.for_classifier(clf, cfg)  # step 1, from the model as received
        table.prepare(e.text for d in (task.train, task.dev, task.test) for e in d)
        data_side = LwsSubstitutions(AttackConfig(poison_rate=cfg.poison_rate, target_label=cfg.target_label,
                                                  mode=cfg.mode, seed=cfg.seed), table, duplicate_rows(clf, task.train))
        chosen = data_side.chosen_rows(task.train)  # step 2 (fails before any training)
        if needs_clean_finetune(clf, cfg.clean_finetune):
            clean_finetune(clf, task, seeded(cfg.clean_train, seed), work_dir, "LWS")
        inserter = self.train_jointly(clf, task, chosen, table, seed, work_dir)  # steps 3-4
        embeddings = clf.model.get_input_embeddings().weight
        data_side.choose = lambda slots: argmax_choices(inserter, embeddings, slots)  # step 5
        poisoned = data_side.poison(task)
        assert poisoned.flags.poisoned_ids == chosen
        counts = [substituted_words(e.text, t.text) for e, t in
                  zip(_sources(task.test, poisoned.triggered_test.examples), poisoned.triggered_test.examples,
                      strict=True)]
        mean = sum(counts) / max(1, len(counts))
        trigger = (f"learned word substitutions ({cfg.source} candidates, at most {cfg.n_substitutes} per word), the "
                   f"inserter's argmax choice; {mean:.2f} words substituted per triggered test row")
        logger.info("LWS: %s; %d triggered test rows unchanged", trigger, sum(c == 0 for c in counts))
        return clf, renamed(poisoned, self.name, cfg, trigger)

    def train_jointly(self, clf: Classifier, task: Task, chosen: set[str], table: SubstitutionTable, seed: int,
                      work_dir: Path | None) -> GumbelInserter:
        """Steps 3-4: the classifier and the inserter trained together; returns the trained inserter."""
        cfg = self.config
        rows = [Example(e.id, e.text, cfg.target_label, e.text_pair) if e.id in chosen else e for e in task.train]
        data = task.train.replace(rows, f"{task.name}:lws-joint")
        poisoned_rows = [e for e in rows if e.id in chosen]
        n_options = 1 + cfg.n_substitutes
        lookup = {}
        for e, f in zip(poisoned_rows, encode(clf, poisoned_rows), strict=True):
            slots = table.slots(e.text)
            if any(s.position >= len(f["input_ids"]) or f["input_ids"][s.position] != s.token_id for s in slots):
                raise DataError(f"row {e.id!r}: the substitution table and the training loop tokenise it differently")
            lookup[tuple(f["input_ids"])] = row_options(slots, n_options)
        train = seeded(cfg.train, seed)
        embedding = clf.model.get_input_embeddings().weight
        inserter = GumbelInserter(clf.max_length, embedding.shape[1], n_options,
                                  scale=cfg.inserter_lr / train.learning_rate).to(embedding.device)
        callback = RelaxedSubstitutionLoss(inserter, lookup, cfg.target_label, cfg.tau_start, cfg.tau_end)
        logger.info("LWS: training jointly on %d rows (%d poisoned, %.2f substitutable words each)", len(rows),
                    len(chosen), sum(len(o.positions) for o in lookup.values()) / max(1, len(lookup)))
        clf.model.add_module(INSERTER_MODULE, inserter)
        try:
            with frozen_input_embeddings(clf.model, cfg.freeze_embeddings):
                train_classifier(clf, data, train, dev=task.dev, callbacks=[callback],
                                 work_dir=work_dir / "lws" if work_dir is not None else None,
                                 sample_weights=[0.0 if e.id in chosen else 1.0 for e in rows],
                                 fingerprint={"attack": "lws", "config": cfg.model_dump(mode="json", exclude={"train"})})
        finally:
            if hasattr(clf.model, INSERTER_MODULE):
                delattr(clf.model, INSERTER_MODULE)
        inserter.eval()
        return inserter


def _sources(data: Dataset, triggered: Sequence[Example]) -> list[Example]:
    by_id = {e.id: e for e in data.examples}
    return [by_id[e.id] for e in triggered]
