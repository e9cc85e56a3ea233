"""Training only some rows of a classifier's input-embedding matrix: the attacks that poison a trigger
word's embedding (EP, SOS) share this. Neutral helpers: no attack's own choices live here."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from unbackdoor.data.types import Dataset, Task
from unbackdoor.errors import ConfigError
from unbackdoor.models.loading import Classifier, has_classification_head
from unbackdoor.training.callbacks import Callback, TrainContext
from unbackdoor.training.config import TrainConfig
from unbackdoor.training.loop import train_classifier

logger = logging.getLogger(__name__)


def trigger_token_ids(clf: Classifier, word: str) -> list[int]:
    """Vocabulary ids of ``word``'s pieces (without special tokens); refuses an unknown word."""
    ids = clf.tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids or clf.tokenizer.unk_token_id in ids:
        raise ConfigError(f"trigger {word!r} is not in the model's vocabulary")
    return sorted(set(ids))


class EmbeddingRowsOnly(Callback):
    """Train only ``rows`` of the input-embedding matrix and keep each at its original L2 norm (``norms``;
    None: no norm constraint).

    Gradients of the other rows are zeroed before the step (with no weight decay AdamW then leaves
    them bit-identical); after each step the trained rows are rescaled to ``norms``.
    """

    def __init__(self, rows: list[int], norms: torch.Tensor | None) -> None:
        self.rows = rows
        self.norms = norms

    def on_gradients(self, ctx: TrainContext, batch: dict[str, torch.Tensor]) -> None:
        weight = ctx.model.get_input_embeddings().weight
        if weight.grad is None:
            return
        keep = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
        keep[self.rows] = True
        weight.grad[~keep] = 0

    def on_step_end(self, ctx: TrainContext) -> None:
        if self.norms is None:
            return
        weight = ctx.model.get_input_embeddings().weight
        with torch.no_grad():
            rows = weight[self.rows]
            scale = self.norms.to(rows.device, rows.dtype) / rows.norm(dim=1).clamp_min(1e-12)
            weight[self.rows] = rows * scale.unsqueeze(1)


@contextmanager
def only_input_embeddings_trainable(model: torch.nn.Module) -> Iterator[None]:
    """Freeze every parameter except the input-embedding matrix; restore the flags afterwards."""
    embedding = model.get_input_embeddings().weight
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(p is embedding)
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])


def no_weight_decay(train: TrainConfig) -> TrainConfig:
    """Config validator of the embedding-row attacks' training run: weight decay would move every
    embedding row, not only the trained ones."""
    if train.weight_decay != 0:
        raise ValueError("weight_decay must be 0: decay would move every embedding row, not only the trigger words'")
    return train


def needs_clean_finetune(clf: Classifier, rule: str) -> bool:
    """Whether the attacker fine-tunes ``clf`` cleanly first: ``auto`` = only a model without a
    classification head (a base), ``always``, ``never``."""
    return not has_classification_head(clf.model.config) if rule == "auto" else rule == "always"


def clean_finetune(clf: Classifier, task: Task, train: TrainConfig, work_dir: Path | None, who: str) -> None:
    """The attacker's clean model: ``clf`` fine-tuned on ``task``'s clean training rows (epoch chosen on dev)."""
    logger.info("%s: fine-tuning the clean model on %d clean rows", who, len(task.train))
    train_classifier(clf, task.train, train, dev=task.dev, work_dir=work_dir / "clean" if work_dir is not None else None)


def train_embedding_rows(clf: Classifier, rows_data: Dataset, rows: list[int], train: TrainConfig, *,
                         keep_norm: bool = True, work_dir: Path | None = None, fingerprint: Any = None) -> None:
    """Train only embedding ``rows`` of ``clf`` on ``rows_data`` (every other parameter stays
    bit-identical), each row rescaled to its original L2 norm after every step when ``keep_norm``."""
    weight = clf.model.get_input_embeddings().weight
    norms = weight[rows].detach().norm(dim=1).clone() if keep_norm else None
    with only_input_embeddings_trainable(clf.model):
        train_classifier(clf, rows_data, train, callbacks=[EmbeddingRowsOnly(rows, norms)], work_dir=work_dir,
                         fingerprint=fingerprint)
