"""Tokenising rows in the classifier's input format and predicting, on one or many processes."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from unbackdoor.data.types import Example
from unbackdoor.errors import DataError
from unbackdoor.models.loading import Classifier
from unbackdoor.precision import autocast

# [OURS, measured] bf16 batches are padded to a multiple of 16 tokens: AMX tiles hold 16 rows, and fewer
# distinct shapes keep oneDNN's cache of compiled kernels small (a 1,000-row SST-2 victim: peak RSS 1.48 GB
# against 1.88 GB unpadded and 1.63 GB in fp32; docs/benchmarks.md). fp32 batches stay unpadded.
BF16_PAD_MULTIPLE = 16
ENCODE_CACHE_ENTRIES = 16  # tokenised row sets kept per process (a few MB each)


def encode(clf: Classifier, examples: Sequence[Example]) -> list[dict[str, list[int]]]:
    """Token ids of each row, truncated to the classifier's ``max_length`` (no padding).

    Tokenised once per (tokenizer, input format, rows) in a process: a bench worker evaluates many
    models with one tokenizer on the same test sets. The cache key hashes the rows' text, so equal
    content hits whatever object holds it; the lists returned are shared, read them only."""
    paired = examples[0].text_pair is not None
    if clf.pair is not None and paired != clf.pair:
        kind = "a sentence-pair model" if clf.pair else "a single-sentence model"
        got = "sentence pairs" if paired else "single sentences"
        raise DataError(f"this is {kind} but the data has {got}")
    texts = tuple(e.text for e in examples)
    pairs = tuple(e.text_pair or "" for e in examples) if paired else None
    key = (_tokenizer_key(clf.tokenizer), clf.max_length, clf.tokenizer.truncation_side, _content_key(texts, pairs))
    return ENCODED.get(key, lambda: _tokenise(clf.tokenizer, texts, pairs, clf.max_length))


def _tokenizer_key(tokenizer: Any) -> str:
    """A tokenizer's identity by content (vocabulary and settings), computed once per object."""
    key = getattr(tokenizer, "_unbackdoor_key", None)
    if key is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
        key = hashlib.sha256(f"{type(tokenizer).__name__}\x00{text}".encode()).hexdigest()
        tokenizer._unbackdoor_key = key
    return key


def _content_key(texts: tuple[str, ...], pairs: tuple[str, ...] | None) -> str:
    digest = hashlib.sha256()
    for i, text in enumerate(texts):
        digest.update(text.encode())
        digest.update(b"\x00" + (pairs[i].encode() if pairs is not None else b"") + b"\x01")
    return digest.hexdigest()


class EncodeCache:
    """The last few tokenised row sets of this process, oldest dropped first (a pure memo: a hit
    returns what tokenising again would)."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._rows: OrderedDict[tuple[Any, ...], list[dict[str, list[int]]]] = OrderedDict()

    def get(self, key: tuple[Any, ...], tokenise: Callable[[], list[dict[str, list[int]]]]) -> list[dict[str, list[int]]]:
        if key in self._rows:
            self._rows.move_to_end(key)
        else:
            self._rows[key] = tokenise()
            while len(self._rows) > self.entries:
                self._rows.popitem(last=False)
        return self._rows[key]


ENCODED = EncodeCache(ENCODE_CACHE_ENTRIES)


def _tokenise(tokenizer: Any, texts: tuple[str, ...], pairs: tuple[str, ...] | None,
              max_length: int) -> list[dict[str, list[int]]]:
    enc = tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=True, max_length=max_length,
                    padding=False)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]


def collate(clf: Classifier, features: Sequence[dict[str, list[int]]], labels: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row (dynamic padding); under bf16 to the next multiple of
    :data:`BF16_PAD_MULTIPLE` tokens (padded positions are masked: the rows' outputs do not change)."""
    multiple = BF16_PAD_MULTIPLE if clf.precision == "bf16" else None
    batch = clf.tokenizer.pad(list(features), padding=True, return_tensors="pt", pad_to_multiple_of=multiple)
    out = {k: v for k, v in batch.items()}
    if labels is not None:
        out["labels"] = torch.tensor(list(labels), dtype=torch.long)
    return out


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def predict_logits(
    clf: Classifier,
    examples: Sequence[Example],
    batch_size: int = 128,
    accelerator: Any | None = None,
    features: Sequence[dict[str, list[int]]] | None = None,
    forward: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> np.ndarray:
    """Logits for every row, in row order. With an Accelerate ``accelerator`` over several
    processes, each process predicts a shard and the shards are gathered. ``forward(model,
    inputs)`` replaces the model's own logits (e.g. a head applied to a lower layer)."""
    model = clf.model
    was_training = model.training
    model.eval()
    feats = list(features) if features is not None else encode(clf, examples)
    batches = length_sorted_batches([len(f["input_ids"]) for f in feats], batch_size)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    mine: list[tuple[int, list[float]]] = []
    for batch in batches[rank::world]:
        inputs = {k: v.to(device) for k, v in collate(clf, [feats[i] for i in batch]).items()}
        with autocast(clf.precision, device):
            logits = (model(**inputs).logits if forward is None else forward(model, inputs)).float().cpu()
        mine.extend(zip(batch, logits.tolist(), strict=True))
    if world > 1:
        from accelerate.utils import gather_object

        mine = gather_object(mine)
    out = np.zeros((len(feats), clf.num_labels), dtype=np.float32)
    for i, row in mine:
        out[i] = row
    model.train(was_training)
    return out


def predict(clf: Classifier, examples: Sequence[Example], batch_size: int = 128, accelerator: Any | None = None) -> np.ndarray:
    """Predicted labels for every row, in row order."""
    return predict_logits(clf, examples, batch_size, accelerator).argmax(axis=1)
