"""``unbackdoor train --defense abl``: Anti-Backdoor Learning (Li et al., NeurIPS 2021) for text
classifiers: isolate the rows fitted fastest, then train on the rest while unlearning them.

Steps of :meth:`AblDefense._fit`:

1. **Isolation** [PAPER]: train the model on every row with local gradient ascent (LGA,
   :func:`~unbackdoor.detect.isolation.isolate`, the ``isolation`` detector's procedure) and isolate
   the ``isolation_rate`` share of rows with the lowest loss: D̂_b; the other rows are D̂_c.
   [PAPER code] stage 2 goes on training the model of stage 1 (``start=isolated``); ``start=base``
   [OURS] isolates on a copy and trains stage 2 from the untouched base instead.
2. **Unlearning**, ``unlearning=joint`` (default) [PAPER objective]: the loss of the epochs after
   isolation, L_GGA = E_{D̂_c}[ℓ] − E_{D̂_b}[ℓ]. The one training loop runs over D̂_c, and an
   ``extra_loss`` callback (:class:`AscendIsolated`) subtracts ``unlearn_weight`` × the
   cross-entropy of a batch of D̂_b at every step (gradient ascent on the isolated rows) [OURS: D̂_b
   is cycled in seeded batches of the loop's batch size].
   ``unlearning=sequential`` [PAPER code]: the official code (github.com/bboylyg/ABL) runs stage 2 as
   plain fine-tuning on D̂_c (marked optional there), then gradient ascent on D̂_b alone (5 epochs,
   at 5e-4 after training at 0.1): the loop on D̂_c, then the loop on D̂_b with the loss negated
   (:class:`AscendTaskLoss`, settings ``unlearn_train``).
3. The final weights are kept [PAPER] (``train.select_best=false`` by default): choosing the epoch
   on clean dev accuracy favours the epochs before unlearning has worked (on the tiny task of the
   tests it kept the still-backdoored first epoch of stage 2). ``train.select_best=true`` selects
   on the clean dev set, as the project's other defences do.

Other choices [OURS]: ``max_isolated_loss`` (off by default; the paper's ascent is unbounded) skips
the ascent on an isolated batch whose loss is already above it; all loop settings default to the
project's victim ones (AdamW, 3 epochs, batch 32, lr 1e-4) for both stages, the isolation stage
taking the stage-2 settings unless ``isolation.train`` overrides keys (the paper trains images from
scratch: 20 isolation epochs, 100 in all, SGD at lr 0.1). [PAPER] isolation rate 1 %, γ = 0.5, LGA
on the batch loss, unlearn weight 1 (the two expectations of L_GGA weigh the same).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from unbackdoor.config import StrictConfig
from unbackdoor.data.types import Dataset
from unbackdoor.detect.base import FlagRule, flag_indices
from unbackdoor.detect.finetuned import copy_classifier
from unbackdoor.detect.isolation import IsolationConfig, isolate
from unbackdoor.errors import DataError
from unbackdoor.inference import collate, encode
from unbackdoor.models.loading import Classifier
from unbackdoor.training.callbacks import Callback, TrainContext
from unbackdoor.training.config import TrainConfig, victim_train_config
from unbackdoor.train_defenses.base import TRAIN_DEFENSES, TrainDefense, TrainDefenseResult, TrainInputs
from unbackdoor.training.config import merge_train
from unbackdoor.training.loop import TrainResult, train_classifier

logger = logging.getLogger(__name__)


def abl_train_config() -> TrainConfig:
    """Stage-2 defaults: the victim settings [OURS], final weights kept [PAPER]."""
    return victim_train_config().model_copy(update={"select_best": False})


def unlearn_train_config() -> TrainConfig:
    """``unlearning=sequential``'s ascent: [PAPER code] 5 epochs, the last kept; [OURS] AdamW at
    lr 1e-5 (a tenth of the victim default; the code ascends at 5e-4 after training at 0.1), batch 32,
    no warm-up."""
    return TrainConfig(epochs=5, batch_size=32, learning_rate=1e-5, warmup_ratio=0.0, select_best=False)


class AblConfig(StrictConfig):
    """Options of ABL ([PAPER] / [OURS] as the module docstring says)."""

    isolation: IsolationConfig = Field(default_factory=IsolationConfig, description="stage 1, as the isolation "
                                       "detector's options (gamma, lga, score_epochs); keys of its train "
                                       "override the stage-2 settings")
    isolation_rate: float = Field(0.01, gt=0, lt=1, description="share of rows isolated (lowest loss) [PAPER: 1 %]")
    start: Literal["isolated", "base"] = Field("isolated", description="stage 2 goes on training the isolation "
                                               "model [PAPER code] or starts from the untouched base [OURS]")
    unlearning: Literal["joint", "sequential"] = Field("joint", description="joint: every step descends on the "
                                                       "kept rows and ascends on the isolated ones [PAPER "
                                                       "objective]; sequential: train on the kept rows, then "
                                                       "ascend on the isolated rows alone [PAPER code]")
    unlearn_weight: float = Field(1.0, gt=0, description="weight of the ascent term (unlearning=joint) "
                                  "[PAPER: 1]")
    max_isolated_loss: float | None = Field(None, gt=0, description="no ascent on an isolated batch whose loss is "
                                            "above this; null: unbounded, as the paper [OURS]")
    unlearn_train: TrainConfig | None = Field(None, description="unlearning=sequential: loop settings of the "
                                              "ascent on the isolated rows; keys given override 5 epochs, batch 32, "
                                              "lr 1e-5, no warm-up, last epoch kept")
    train: TrainConfig | None = Field(None, description="stage-2 loop settings; keys given override the victim "
                                      "defaults (3 epochs, batch 32, lr 1e-4) with select_best=false")


class AscendTaskLoss(Callback):
    """Gradient ascent on the loop's own rows: back-propagate the negated task loss (first among loss
    callbacks); with ``max_loss``, no step on a batch whose loss is already above it."""

    def __init__(self, max_loss: float | None = None) -> None:
        self.max_loss = max_loss
        self.steps = 0
        self.capped = 0
        self.last_loss: float | None = None

    def extra_loss(self, ctx: TrainContext, batch: dict[str, torch.Tensor], outputs: Any,
                   loss: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        self.last_loss = float(loss.detach())
        if self.max_loss is not None and self.last_loss > self.max_loss:
            self.capped += 1
            return loss * 0.0
        return -loss


class AscendIsolated(Callback):
    """Adds −weight × CE of a batch of the isolated rows to every step's loss (gradient ascent on
    them, next to the loop's descent on its own rows); cycles through them in seeded order."""

    def __init__(self, clf: Classifier, isolated: Dataset, weight: float, batch_size: int, seed: int,
                 max_loss: float | None = None) -> None:
        self.clf, self.weight, self.batch_size, self.max_loss = clf, weight, batch_size, max_loss
        self.features = encode(clf, isolated.examples)
        self.labels = isolated.labels
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: list[int] = []
        self.steps = 0
        self.capped = 0
        self.last_loss: float | None = None

    def _next_rows(self) -> list[int]:
        rows: list[int] = []
        while len(rows) < min(self.batch_size, len(self.labels)):
            if not self.queue:
                self.queue = torch.randperm(len(self.labels), generator=self.generator).tolist()
            rows.append(self.queue.pop())
        return rows

    def extra_loss(self, ctx: TrainContext, batch: dict[str, torch.Tensor], outputs: Any,
                   loss: torch.Tensor) -> torch.Tensor:
        rows = self._next_rows()
        device = batch["input_ids"].device
        inputs = {k: v.to(device) for k, v in collate(self.clf, [self.features[i] for i in rows],
                                                      [self.labels[i] for i in rows]).items()}
        isolated_loss = F.cross_entropy(ctx.wrapped_model(**inputs).logits.float(), inputs["labels"])
        self.steps += 1
        self.last_loss = float(isolated_loss.detach())
        if self.max_loss is not None and self.last_loss > self.max_loss:
            self.capped += 1
            return loss
        return loss - self.weight * isolated_loss

    def on_epoch_end(self, ctx: TrainContext, record: dict[str, Any]) -> None:
        record["isolated_loss"] = self.last_loss


@TRAIN_DEFENSES.register("abl")
class AblDefense(TrainDefense[AblConfig]):
    """Isolate the lowest-loss rows under LGA, then train on the rest with gradient ascent on them."""

    name = "abl"
    config_class = AblConfig

    def train_config(self, clf: Classifier) -> TrainConfig:
        return merge_train(abl_train_config(), self.config.train)

    def isolation_train_config(self, clf: Classifier) -> TrainConfig:
        """Stage 1's loop settings: stage 2's, overridden by the keys of ``isolation.train``."""
        return merge_train(self.train_config(clf), self.config.isolation.train)

    def check(self, inputs: TrainInputs) -> None:
        if len(inputs.rows) < 2:
            raise DataError(f"{inputs.rows.name}: ABL needs at least 2 training rows (some isolated, some kept)")

    def _fit(self, inputs: TrainInputs, work_dir: Path | None, observers: list[Callback]) -> TrainDefenseResult:
        cfg, train = self.config, self.train_config(inputs.model)
        rows, ids = inputs.rows, inputs.rows.ids

        def sub(name: str) -> Path | None:  # one checkpoint folder per loop run
            return work_dir / name if work_dir is not None else None

        # stage 1: LGA training, then the lowest-loss rows
        isolation_train = self.isolation_train_config(inputs.model)
        isolation_model = inputs.model if cfg.start == "isolated" else copy_classifier(inputs.model)
        isolation = isolate(isolation_model, rows, cfg.isolation, isolation_train, work_dir=sub("isolation"))
        isolated_ids = [ids[i] for i in flag_indices(-isolation.losses, FlagRule(rate=cfg.isolation_rate))]
        if len(isolated_ids) >= len(rows):
            raise DataError("the isolation rate isolates every training row; lower isolation_rate")
        isolated = rows.select(isolated_ids, f"{rows.name}[abl-isolated]")
        kept = rows.without(isolated_ids, f"{rows.name}[abl-kept]")
        logger.info("abl: isolated %d of %d rows (loss <= %.4f)", len(isolated), len(rows),
                    float(isolation.losses.sort().values[len(isolated) - 1]))
        # stage 2: unlearning
        fingerprint = {"defense": self.name, "config": cfg.model_dump(mode="json"), "isolated": isolated_ids}
        ascent: AscendIsolated | AscendTaskLoss
        unlearning: dict[str, Any] | None = None
        if cfg.unlearning == "joint":
            ascent = AscendIsolated(inputs.model, isolated, cfg.unlearn_weight, train.batch_size, train.seed,
                                    cfg.max_isolated_loss)
            training = train_classifier(inputs.model, kept, train, dev=inputs.dev, callbacks=[ascent, *observers],
                                        work_dir=sub("unlearning"), fingerprint=fingerprint)
        else:
            training = train_classifier(inputs.model, kept, train, dev=inputs.dev, callbacks=observers,
                                        work_dir=sub("kept"), fingerprint=fingerprint)
            ascent = AscendTaskLoss(cfg.max_isolated_loss)
            unlearn = merge_train(unlearn_train_config(), cfg.unlearn_train)
            result = train_classifier(inputs.model, isolated, unlearn, dev=inputs.dev, callbacks=[ascent, *observers],
                                      work_dir=sub("unlearning"), fingerprint=fingerprint)
            unlearning = {"train": unlearn.model_dump(), **_kept(result, unlearn)}
        report = {
            "method": self.name, "config": cfg.model_dump(mode="json"), "train": train.model_dump(),
            "isolation": {"train": isolation_train.model_dump(), **isolation.report()},
            "n_isolated": len(isolated), "isolated_ids": isolated_ids, "n_kept": len(kept),
            "ascent": {"steps": ascent.steps, "skipped_above_max_loss": ascent.capped,
                       "final_isolated_loss": ascent.last_loss},
            **_kept(training, train),
        }
        if unlearning is not None:
            report["unlearning"] = unlearning
        return TrainDefenseResult(inputs.model, training, report)


def _kept(result: TrainResult, train: TrainConfig) -> dict[str, Any]:
    """Which epoch's weights a loop run ended with, and the run's history."""
    if train.select_best and result.best_epoch is not None:
        return {"kept_epoch": result.best_epoch, "kept": "best clean dev accuracy",
                "selection_accuracy": result.best_dev_accuracy, "history": result.history}
    return {"kept_epoch": result.history[-1]["epoch"] if result.history else None, "kept": "last epoch",
            "history": result.history}
