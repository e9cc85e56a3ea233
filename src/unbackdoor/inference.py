"""Tokenising rows in the classifier's input format and predicting, on one or many processes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from unbackdoor.data.types import Example
from unbackdoor.errors import DataError
from unbackdoor.models.loading import Classifier


def encode(clf: Classifier, examples: Sequence[Example]) -> list[dict[str, list[int]]]:
    """Token ids of each row, truncated to the classifier's ``max_length`` (no padding)."""
    paired = examples[0].text_pair is not None
    if clf.pair is not None and paired != clf.pair:
        kind = "a sentence-pair model" if clf.pair else "a single-sentence model"
        got = "sentence pairs" if paired else "single sentences"
        raise DataError(f"this is {kind} but the data has {got}")
    texts = [e.text for e in examples]
    pairs = [e.text_pair or "" for e in examples] if paired else None
    enc = clf.tokenizer(texts, pairs, truncation=True, max_length=clf.max_length, padding=False)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(examples))]


def collate(clf: Classifier, features: Sequence[dict[str, list[int]]], labels: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row (dynamic padding)."""
    batch = clf.tokenizer.pad(list(features), padding=True, return_tensors="pt")
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
