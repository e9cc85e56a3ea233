"""The ``isolation`` detector: early-loss isolation, the first stage of Anti-Backdoor Learning (ABL;
Li et al., NeurIPS 2021).

ABL's observation: a backdoor is a simpler task than the clean one, so poisoned rows are fitted
faster. Its isolation stage trains on the (possibly poisoned) rows with **local gradient ascent**
(LGA) and isolates the rows with the *lowest* loss. LGA replaces the loss ℓ by sign(ℓ − γ)·ℓ: while
ℓ is above γ it is minimised as usual, once it falls below γ it is ascended, so the loss is held
near γ. The clean rows cannot go much lower, while rows whose shortcut (the trigger) is much easier
to fit keep falling below γ: the gap between the two grows.

This is the opposite of the ``loss`` detector (:mod:`.loss`), which flags *hard* rows (dirty-label
rows whose label disagrees with a clean encoder's features) and missed AddSent and StyleBkd
(precision 2 % and 0 %, docs/results/detect.md): easy-to-fit triggers are what this one targets.

Steps (:func:`isolate`):

1. [OURS] fine-tune a copy of ``DetectInputs.encoder`` on the rows by the one training loop
   (:func:`~unbackdoor.training.train_classifier`), with LGA as an ``extra_loss`` callback
   (:class:`LocalGradientAscent`; it replaces the batch's loss, so it runs first);
2. [PAPER] each row's cross-entropy under the resulting model (the official code's
   ``compute_loss_value``, in eval mode); with ``score_epochs=k`` [OURS], the mean of each row's
   loss at the ends of the last k epochs (less noisy than one snapshot);
3. score = −loss: the lowest-loss rows are the most suspicious (ABL isolates the lowest 1 %; here
   the share is the :class:`~unbackdoor.detect.FlagRule`'s).

What follows the source and what is ours:

* [PAPER] LGA = sign(ℓ − γ)·ℓ on the batch's mean cross-entropy (``torch.sign(loss - gamma) * loss``
  in ``backdoor_isolation.py`` of github.com/bboylyg/ABL), γ = 0.5;
* [OURS] ``lga=row``: sign(ℓ_i − γ)·ℓ_i per row, then the mean (each row held near γ separately);
* [OURS] training: the project's victim settings (AdamW, 3 epochs, batch 32, lr 1e-4) on a copy of
  the pre-trained encoder. The paper trains images from scratch for T_te = 20 epochs (the code's
  default ``tuning_epochs`` is 10) by SGD at lr 0.1, which does not carry over to fine-tuning a
  pre-trained language model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.data.types import Dataset
from unbackdoor.detect.base import DETECTORS, DetectInputs, Detector, Scores
from unbackdoor.detect.finetuned import TRAIN_DESCRIPTION, copy_classifier, row_losses
from unbackdoor.models.loading import Classifier
from unbackdoor.training.callbacks import Callback, TrainContext
from unbackdoor.training.config import TrainConfig, victim_train_config
from unbackdoor.training.config import merge_train
from unbackdoor.training.loop import TrainResult, train_classifier

logger = logging.getLogger(__name__)


class IsolationConfig(StrictConfig):
    """Options of early-loss isolation ([PAPER] / [OURS] as the module docstring says)."""

    gamma: float = Field(0.5, ge=0, description="γ: LGA holds the loss near this value [PAPER: 0.5]")
    lga: Literal["batch", "row"] = Field("batch", description="LGA on the batch's mean loss [PAPER code] or on "
                                         "each row's loss [OURS]")
    score_epochs: int = Field(1, ge=1, description="score = mean loss at the ends of the last this many epochs "
                              "(at most all of them) [OURS; 1 = the loss after training, as the paper]")
    train: TrainConfig | None = Field(None, description=TRAIN_DESCRIPTION)

    def train_config(self) -> TrainConfig:
        return merge_train(victim_train_config(), self.train)


class LocalGradientAscent(Callback):
    """ABL's LGA loss: sign(ℓ − γ)·ℓ, on the batch's loss or on each row's. Replaces the loss it is
    given, so it must be the first loss callback. Counts the batches it ascended."""

    def __init__(self, gamma: float, granularity: Literal["batch", "row"] = "batch") -> None:
        self.gamma = gamma
        self.granularity = granularity
        self.batches = 0
        self.ascended = 0.0  # batches ascended (row: the share of the batch's rows)

    def extra_loss(self, ctx: TrainContext, batch: dict[str, torch.Tensor], outputs: Any,
                   loss: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        if self.granularity == "row":
            per_row = F.cross_entropy(outputs.logits.float(), batch["labels"], reduction="none")
            sign = torch.sign(per_row.detach() - self.gamma)
            self.ascended += float((sign < 0).float().mean())
            return (sign * per_row).mean()
        sign = torch.sign(loss.detach() - self.gamma)
        self.ascended += float(sign < 0)
        return sign * loss


class _EpochLosses(Callback):
    """Each row's loss at the end of every epoch; keeps the last ``keep``."""

    def __init__(self, clf: Classifier, rows: Dataset, keep: int, batch_size: int) -> None:
        self.clf, self.rows, self.batch_size = clf, rows, batch_size
        self.losses: deque[torch.Tensor] = deque(maxlen=keep)

    def on_epoch_end(self, ctx: TrainContext, record: dict[str, Any]) -> None:
        self.losses.append(row_losses(dataclasses.replace(self.clf, model=ctx.model), self.rows, self.batch_size))


@dataclass
class IsolationResult:
    """Each row's loss after the isolation epochs (row order), the loop's record, LGA's counts."""

    losses: torch.Tensor
    training: TrainResult
    lga_batches: int
    lga_ascended: float
    scored_epochs: int

    def report(self) -> dict[str, Any]:
        return {"history": self.training.history, "steps": self.training.steps, "scored_epochs": self.scored_epochs,
                "lga": {"batches": self.lga_batches, "ascended_share": self.lga_ascended / max(1, self.lga_batches)},
                "loss": {"mean": float(self.losses.mean()), "min": float(self.losses.min()),
                         "max": float(self.losses.max())}}


def isolate(clf: Classifier, rows: Dataset, cfg: IsolationConfig, train: TrainConfig | None = None,
            work_dir: Path | None = None) -> IsolationResult:
    """Train ``clf`` **in place** on ``rows`` with LGA, then each row's loss (module docstring).

    ``train``: the loop settings (default: ``cfg.train_config()``); ``work_dir``: checkpoints, so
    that a rerun resumes.
    """
    train = train if train is not None else cfg.train_config()
    lga = LocalGradientAscent(cfg.gamma, cfg.lga)
    recorder = _EpochLosses(clf, rows, cfg.score_epochs, train.eval_batch_size) if cfg.score_epochs > 1 else None
    callbacks: list[Callback] = [lga, *([recorder] if recorder is not None else [])]
    training = train_classifier(clf, rows, train, callbacks=callbacks, work_dir=work_dir,
                                fingerprint={"isolation": cfg.model_dump(mode="json")})
    if recorder is not None and recorder.losses:
        losses, scored = torch.stack(list(recorder.losses)).mean(dim=0), len(recorder.losses)
    else:  # after a resume that had nothing left to train, the recorder saw no epoch end
        losses, scored = row_losses(clf, rows, train.eval_batch_size), 1
    logger.info("isolation: %d LGA steps (%.0f%% ascended); row loss mean %.4f, min %.4f", training.steps,
                100 * lga.ascended / max(1, lga.batches), float(losses.mean()), float(losses.min()))
    return IsolationResult(losses, training, lga.batches, lga.ascended, scored)


@DETECTORS.register("isolation")
class IsolationDetector(Detector[IsolationConfig]):
    """Rows a copy of the encoder fits fastest under LGA (lowest loss) are suspected (score −loss)."""

    name = "isolation"
    config_class = IsolationConfig

    def _scores(self, inputs: DetectInputs) -> Scores:
        cfg = self.config
        clf = copy_classifier(inputs.encoder)
        result = isolate(clf, inputs.rows, cfg)
        report = {"trained": f"copy of {inputs.encoder.source or 'the encoder'}, every parameter, "
                             f"LGA (gamma {cfg.gamma}, {cfg.lga})",
                  "train": cfg.train_config().model_dump(), "n_clean": len(inputs.clean), **result.report()}
        return Scores(-result.losses, report)
