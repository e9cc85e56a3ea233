"""What the field's training-data filters share: a copy of the encoder fine-tuned on the (possibly
poisoned) rows, and what they read from it.

BKI (:mod:`.bki`), CUBE (:mod:`.cube`) and early-loss isolation (:mod:`.isolation`) all first train
a model on the training rows as given, so that it learns the backdoor if there is one, then inspect
that model. The training is the project's one loop (:func:`~unbackdoor.training.train_classifier`)
on a deep copy of ``DetectInputs.encoder`` (the caller's model is left as it was), without a dev
set: the last epoch is kept, as OpenBackdoor's filters keep the last checkpoint.

* :func:`fine_tuned_copy`: that copy, trained;
* :func:`representations`: the pooled last hidden state of each text (``cls``: the first token, as
  OpenBackdoor's ``get_repr_embeddings``; ``mean``: the masked mean over tokens, for decoder models
  whose first token sees nothing else);
* :func:`row_losses`: each row's cross-entropy under a model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from unbackdoor.data.types import Dataset
from unbackdoor.inference import predict_logits
from unbackdoor.models.loading import Classifier
from unbackdoor.training.callbacks import Callback
from unbackdoor.training.config import TrainConfig
from unbackdoor.training.loop import TrainResult, train_classifier

logger = logging.getLogger(__name__)

TRAIN_DESCRIPTION = ("training of the inspected model (a copy of the encoder) on the rows; keys given override "
                     "the victim defaults (3 epochs, batch 32, lr 1e-4)")


def copy_classifier(clf: Classifier) -> Classifier:
    """``clf`` with a deep copy of its model (the tokenizer is shared, it is never changed)."""
    return dataclasses.replace(clf, model=copy.deepcopy(clf.model))


def fine_tuned_copy(encoder: Classifier, rows: Dataset, train: TrainConfig,
                    callbacks: Sequence[Callback] = ()) -> tuple[Classifier, TrainResult]:
    """A copy of ``encoder`` fine-tuned on ``rows`` by the one training loop (last epoch kept)."""
    clf = copy_classifier(encoder)
    result = train_classifier(clf, rows, train, callbacks=callbacks)
    logger.info("fine-tuned a copy of %s on %d rows: %d steps, final train loss %.4f",
                encoder.source or "the encoder", len(rows), result.steps,
                result.history[-1]["train_loss"] if result.history else float("nan"))
    return clf, result


def row_losses(clf: Classifier, data: Dataset, batch_size: int = 128) -> torch.Tensor:
    """Cross-entropy of every row of ``data`` under ``clf`` (eval mode), in row order."""
    logits = torch.from_numpy(predict_logits(clf, data.examples, batch_size))
    return F.cross_entropy(logits, torch.tensor(data.labels), reduction="none")
