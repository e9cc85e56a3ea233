"""RAP (Yang et al., EMNLP 2021): robustness-aware perturbations. A triggered input is far more
robust than a clean one, so a perturbation tuned to shake clean inputs a little barely moves it.

Steps, as the paper names them:

1. *constructing the RAP*: a rare word whose word-embedding row alone is trained, on clean rows of
   the protected label, so that inserting it as the first word lowers the protected label's
   probability by Δ = p(x) − p(x ⊕ rap) within [a, b]: loss = λ · mean(max(a − Δ, 0)) +
   mean(max(Δ − b, 0)); after every gradient step the row is rescaled to its original norm;
2. *threshold*: the FRR-budget quantile of Δ over held-out clean rows the model predicts as the
   protected label;
3. *detection*: an input the model predicts as the protected label whose Δ is below the threshold
   (too robust) is rejected; inputs predicted as other labels pass.

Following the paper's code (lancopku/RAP ``rap_defense.py``, ``evaluate_rap_performance.py``) and
OpenBackdoor's ``RAPDefender``: 5 epochs, batches of 32, plain gradient steps of size 1e-2 on the
row, [a, b] = [0.1, 0.3], λ = 1, the rescaling to the original norm, the row's gradient never zeroed
between steps (a running sum; the official code keeps it "to get faster convergence";
``zero_grad=true`` takes plain steps), the word inserted first, the training rows the clean rows
labelled with the protected label in one seeded shuffled order, and the suspect in eval mode.

Ours, not the paper's:

* the suspect is never modified: the trained row lives outside the model and, through a forward
  hook on the input-embedding layer, replaces the embedding of the *first* occurrence of the RAP
  word's token in each input (the inserted word; a later natural occurrence keeps its own
  embedding). The suspect's weights stay bit-identical;
* ``rap_word=auto`` picks the first of :data:`RAP_WORDS` that is one token of the model's vocabulary
  and occurs in no clean row. The paper's "cf" is not among them: it is this project's default
  BadNets/EP trigger, and a defender must not pick the attacker's word by accident;
* ``protect_label`` unset: the defender does not know the target label. One RAP row is trained per
  label (on clean rows of that label), each with its own threshold, and an input is checked with
  the RAP of the label the model predicts for it. The published method assumes the protected label
  is known (``protect_label=k``);
* the row is trained on the clean fitting rows and the threshold set on held-out clean rows (the
  official code uses one held-out set for both); when no held-out row is predicted as a label, the
  held-out rows labelled with it calibrate it instead;
* the suspicion score is −Δ.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from unbackdoor.data.types import Dataset, Example
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.guard.base import GUARDS, Guard, GuardConfig, RejectingGuard, ScoredRows, budget_threshold
from unbackdoor.inference import collate, encode, predict_logits
from unbackdoor.models.loading import Classifier

logger = logging.getLogger(__name__)

# [OURS] rare single tokens of BERT's uncased vocabulary (all-MiniLM-L6-v2: ids 29017, 1612, 1606)
RAP_WORDS = ("jj", "⊕", "≈")


class RapConfig(GuardConfig):
    """RAP's options; see the module docstring for what follows the paper and what is ours."""

    rap_word: str = Field("auto", description="[OURS] the RAP word, one token of the model's vocabulary; auto = "
                          f"the first of {', '.join(RAP_WORDS)} that is one and occurs in no clean row "
                          "(the paper: cf)")
    protect_label: int | None = Field(None, ge=0, description="[PAPER] the protected (target) label; unset: "
                                      "[OURS] one RAP per label, checked by the predicted label")
    epochs: int = Field(5, ge=1, description="[PAPER] passes over the clean rows of the label")
    train_batch_size: int = Field(32, ge=1, description="[PAPER] rows per RAP step")
    lr: float = Field(1e-2, gt=0, description="[PAPER] step size of the row's gradient steps")
    drop_range: tuple[float, float] = Field((0.1, 0.3), description="[PAPER] [a, b]: the wanted drop of the "
                                            "protected label's probability on clean rows")
    scale: float = Field(1.0, gt=0, description="[PAPER] λ, weight of the too-small-drop term")
    zero_grad: bool = Field(False, description="[PAPER] false: the official code's running gradient sum; true: "
                            "plain gradient steps")

    @field_validator("rap_word")
    @classmethod
    def _one_word(cls, value: str) -> str:
        if len(value.split()) != 1:
            raise ValueError("rap_word must be one word")
        return value.strip()

    @field_validator("drop_range")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        a, b = value
        if not 0 <= a < b <= 1:
            raise ValueError("drop_range [a, b] needs 0 <= a < b <= 1")
        return value


# ----------------------------------------------------------------------------- the RAP word and its row
def single_token_id(model: Classifier, word: str) -> int | None:
    """The vocabulary id of ``word`` when it is exactly one known token, else None."""
    ids = model.tokenizer(word, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 and ids[0] != model.tokenizer.unk_token_id else None


def choose_rap_word(model: Classifier, wanted: str, clean: Iterable[Example]) -> tuple[str, int]:
    """The RAP word and its token id: ``wanted``, or for ``auto`` the first of :data:`RAP_WORDS` that
    is one token and occurs in no clean row."""
    seen = {w.lower() for e in clean for t in (e.text, e.text_pair) if t for w in t.split()}
    if wanted != "auto":
        token = single_token_id(model, wanted)
        if token is None:
            raise ConfigError(f"rap_word {wanted!r} is not one token of the model's vocabulary")
        if wanted.lower() in seen:
            logger.warning("RAP: the RAP word %r occurs in the clean rows", wanted)
        return wanted, token
    for word in RAP_WORDS:
        token = single_token_id(model, word)
        if token is not None and word not in seen:
            return word, token
    raise ConfigError(f"none of {', '.join(RAP_WORDS)} is one unused token of the model's vocabulary: give rap_word")


def with_rap_word(examples: Sequence[Example], word: str) -> list[Example]:
    """Each row with ``word`` inserted as its first word (of the first text of a pair)."""
    return [Example(e.id, f"{word} {e.text}", e.label, e.text_pair) for e in examples]


@contextmanager
def rap_embedding(model: Classifier, token_id: int, vector: torch.Tensor) -> Iterator[None]:
    """While active, the first ``token_id`` of each input is embedded as ``vector`` (a forward hook;
    the model's weights are not touched)."""

    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        ids = args[0]
        hit = ids == token_id
        first = hit & (hit.long().cumsum(dim=1) == 1)
        return torch.where(first.unsqueeze(-1), vector.to(output.dtype), output)

    handle = model.model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def label_probs(logits: np.ndarray | torch.Tensor, label: int) -> torch.Tensor:
    """The softmax probability of ``label`` in each row of ``logits``."""
    return torch.softmax(torch.as_tensor(logits).float(), dim=-1)[:, label]


# ----------------------------------------------------------------------------- step 1: constructing the RAP
@dataclass
class RapRow:
    """One label's trained RAP row, its training curve and its held-out clean drops."""

    label: int
    vector: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)
    heldout_drops: np.ndarray = field(default_factory=lambda: np.empty(0))
    calibrated_on: str = ""


def rap_loss(drop: torch.Tensor, cfg: RapConfig) -> torch.Tensor:
    """λ · mean(max(a − Δ, 0)) + mean(max(Δ − b, 0))."""
    a, b = cfg.drop_range
    return cfg.scale * F.relu(a - drop).mean() + F.relu(drop - b).mean()


def construct_rap(model: Classifier, rows: Sequence[Example], label: int, word: str, token_id: int,
                  cfg: RapConfig) -> RapRow:
    """Step 1: train a copy of the RAP word's embedding row on ``rows`` (the model stays frozen)."""
    clf = model.model
    weight = clf.get_input_embeddings().weight
    vector = weight[token_id].detach().clone().requires_grad_(True)
    norm = vector.detach().norm()
    p_orig = label_probs(predict_logits(model, rows, cfg.batch_size), label).to(weight.device)
    features = encode(model, with_rap_word(rows, word))
    order = list(range(len(rows)))
    random.Random(f"{cfg.seed}-rap-{label}").shuffle(order)
    a, b = cfg.drop_range
    grad_sum = torch.zeros_like(vector)
    history = []
    was_training = clf.training
    clf.eval()
    try:
        for epoch in range(cfg.epochs):
            loss_sum, in_range = 0.0, 0
            for start in range(0, len(order), cfg.train_batch_size):
                idx = order[start:start + cfg.train_batch_size]
                inputs = {k: v.to(weight.device) for k, v in collate(model, [features[i] for i in idx]).items()}
                with torch.enable_grad(), rap_embedding(model, token_id, vector):
                    drop = p_orig[idx] - label_probs(clf(**inputs).logits, label)
                    loss = rap_loss(drop, cfg)
                    (grad,) = torch.autograd.grad(loss, vector)
                grad_sum = grad if cfg.zero_grad else grad_sum + grad
                with torch.no_grad():
                    vector -= cfg.lr * grad_sum
                    vector *= norm / vector.norm().clamp_min(1e-12)
                loss_sum += loss.item() * len(idx)
                in_range += int(((drop >= a) & (drop <= b)).sum().item())
            history.append({"epoch": epoch + 1, "loss": loss_sum / len(rows), "in_range": in_range / len(rows)})
    finally:
        clf.train(was_training)
    logger.info("RAP label %d: loss %.4f, %.0f%% of rows in range after %d epochs", label, history[-1]["loss"],
                100 * history[-1]["in_range"], cfg.epochs)
    return RapRow(label, vector.detach(), history)


@torch.no_grad()
def probability_drops(model: Classifier, examples: Sequence[Example], label: int, word: str, token_id: int,
                      vector: torch.Tensor, logits: np.ndarray, batch_size: int) -> np.ndarray:
    """Δ = p(label | x) − p(label | x with the RAP word first) for each row (``logits``: on x)."""
    if not examples:
        return np.empty(0)
    with rap_embedding(model, token_id, vector):
        rap_logits = predict_logits(model, with_rap_word(examples, word), batch_size)
    return (label_probs(logits, label) - label_probs(rap_logits, label)).numpy().astype(np.float64)


# ----------------------------------------------------------------------------- steps 2-3: threshold, detection
class FittedRap(RejectingGuard):
    """RAP with one trained row per protected label and its held-out clean drops."""

    name: ClassVar[str] = "rap"

    def __init__(self, model: Classifier, config: RapConfig, word: str, token_id: int,
                 rows: dict[int, RapRow]) -> None:
        super().__init__(model, config)
        self.word = word
        self.token_id = token_id
        self.rows = rows

    def label_threshold(self, label: int, budget: float) -> float:
        """Threshold on suspicion −Δ for inputs predicted as ``label`` (+inf: never rejected)."""
        row = self.rows.get(label)
        return budget_threshold(-row.heldout_drops, budget) if row is not None else float("inf")

    def thresholds(self, budget: float | None = None) -> dict[str, Any]:
        b = budget or self.budget
        by_label = {str(k): {"t": self.label_threshold(k, b), "rejects_drop_below": -self.label_threshold(k, b),
                             "calibrated_on": r.calibrated_on} for k, r in sorted(self.rows.items())}
        return {"on": "suspicion = -(drop of the predicted label's probability when the RAP word is inserted); "
                      "rows with suspicion > t of their predicted label are rejected", "rap_word": self.word,
                "by_label": by_label}

    def _analyse(self, examples: tuple[Example, ...]) -> ScoredRows:
        logits = predict_logits(self.model, examples, self.config.batch_size)
        preds = logits.argmax(axis=1)
        scores = np.full(len(examples), np.nan)
        for label, row in self.rows.items():
            idx = np.flatnonzero(preds == label)
            drops = probability_drops(self.model, [examples[i] for i in idx], label, self.word, self.token_id,
                                      row.vector, logits[idx], self.config.batch_size)
            scores[idx] = -drops
        return ScoredRows(scores=scores, predictions=preds)

    def _row_thresholds(self, analysis: ScoredRows, budget: float) -> np.ndarray:
        by_label = {k: self.label_threshold(k, budget) for k in self.rows}
        return np.array([by_label.get(int(p), float("inf")) for p in analysis.predictions])


def calibration_rows(heldout: Dataset, preds: np.ndarray, label: int) -> tuple[list[int], str]:
    """Held-out rows predicted as ``label`` (else those labelled with it), and which rule applied."""
    idx = [i for i, p in enumerate(preds) if p == label]
    if idx:
        return idx, "held-out clean rows predicted as the label"
    logger.warning("RAP: no held-out clean row is predicted as label %d; calibrating on the rows labelled with it",
                   label)
    return [i for i, e in enumerate(heldout) if e.label == label], "held-out clean rows labelled with the label"


@GUARDS.register("rap")
class Rap(Guard[RapConfig]):
    """Reject inputs of a protected label that a clean-tuned rare-word perturbation barely moves."""

    name = "rap"
    config_class = RapConfig

    def _fit(self, model: Classifier, fit_rows: Dataset, heldout: Dataset) -> FittedRap:
        cfg = self.config
        if cfg.protect_label is not None and cfg.protect_label >= model.num_labels:
            raise ConfigError(f"protect_label {cfg.protect_label} is outside the labels 0..{model.num_labels - 1}")
        word, token_id = choose_rap_word(model, cfg.rap_word, [*fit_rows, *heldout])
        labels = [cfg.protect_label] if cfg.protect_label is not None else list(range(model.num_labels))
        heldout_logits = predict_logits(model, heldout.examples, cfg.batch_size)
        heldout_preds = heldout_logits.argmax(axis=1)
        rows: dict[int, RapRow] = {}
        for label in labels:
            train = [e for e in fit_rows if e.label == label]
            if not train:
                if cfg.protect_label is not None:
                    raise DataError(f"RAP: the clean set has no row labelled {label} to construct the RAP on")
                logger.warning("RAP: no clean row labelled %d; inputs predicted as %d are not checked", label, label)
                continue
            row = construct_rap(model, train, label, word, token_id, cfg)
            idx, row.calibrated_on = calibration_rows(heldout, heldout_preds, label)
            row.heldout_drops = probability_drops(model, [heldout.examples[i] for i in idx], label, word, token_id,
                                                  row.vector, heldout_logits[idx], cfg.batch_size)
            rows[label] = row
        fitted = FittedRap(model, cfg, word, token_id, rows)
        fitted.report = {
            "rap_word": word, "rap_token_id": token_id, "protected_labels": sorted(rows),
            "unprotected_labels": [k for k in range(model.num_labels) if k not in rows],
            "training": {str(k): r.history for k, r in sorted(rows.items())},
            "heldout_mean_drop": {str(k): float(r.heldout_drops.mean()) if r.heldout_drops.size else None
                                  for k, r in sorted(rows.items())},
        }
        return fitted
