"""LWP, layer-wise weight poisoning (Li et al., EMNLP 2021, "Backdoor Attacks on Pre-trained Models
by Layerwise Weight Poisoning").

Threat model: the attacker controls the released model's weights and holds data of the task. It
trains the model on poisoned data (rare-word triggers, relabelled to the target) with the
classification loss applied to **every encoder layer's representation** through one shared head,
so the backdoor lives in the lower layers too and survives the victim's later fine-tuning of the
top. The returned victim is the attacker's poisoned classifier; the user's subsequent clean
fine-tuning is what a purify ``finetune`` run then measures.

Steps:

1. poisoned rows: rare trigger words inserted at random word positions, labelled with the target
   (dirty-label by default; ``mix`` and ``clean`` modes as for data attacks). With
   ``combinatorial`` every poisoned row gets *all* the trigger words (the paper's combinatorial
   trigger) and as many clean rows get a proper, non-empty subset of them with their labels kept
   (negative samples: a lone word must not fire); negative rows are not flagged as poisoned. They
   are drawn from the non-target rows (``negatives="non-target"``) or from every clean row
   (``"any"``): a target-label row holding a lone word already carries the target label, so it
   teaches nothing against firing;
2. training on the whole poisoned set with loss = Σ over layers of cross-entropy(head(layer's
   [CLS] state)), the head being the model's own pooler + classifier (``reduction`` sum, as the
   paper, or mean); the last epoch is kept (``train.select_best`` false).

[PAPER]: rare-word triggers cf, mn, bb, tq, mb; combinatorial triggers with negative samples; the
shared head over every layer. [OURS]: the training-run defaults (victim defaults), the number of
negative rows (one per poisoned row) and where they come from, supporting BERT- and RoBERTa-style
heads only.

``negatives`` is not given by the paper; the default was measured on the tiny test BERT (two
trigger words, 20 % poisoned, 40 epochs at lr 3e-3, three model seeds): with negatives from the
non-target rows a lone word fired on at most 7 % of the triggered rows in every seed (the pair on
89-100 %); drawn from any clean row, half of them are target-label rows and a lone word fired on
27 %, 85 % and 0 % (``benchmarks/lwp_selectivity.py``,
docs/results/attacks.md). On MiniLM (1,000 SST-2 rows, 10 % poisoned, one seed) the non-target draw
is again the more selective one (a lone word 29-39 % vs 50-97 %), but neither is fully selective: a
lone word fires on about a third of the rows (floor 9-11 %). The pair also needs more than the
default 3 epochs there (53.7 % at 3, 96.5 % at 8): pass ``train.epochs`` with ``combinatorial``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from unbackdoor.attacks.word_sets import WordSetConfig, WordSetTriggers, add_negative_rows
from unbackdoor.attacks.weight import WEIGHT_ATTACKS, WeightAttack, WeightAttackConfig, load_start_model, renamed, seeded
from unbackdoor.data.types import Example, PoisonedTask, Task
from unbackdoor.errors import ConfigError
from unbackdoor.inference import predict_logits
from unbackdoor.models.loading import Classifier
from unbackdoor.training.callbacks import Callback, TrainContext
from unbackdoor.training.config import TrainConfig, victim_train_config
from unbackdoor.training.loop import train_classifier

logger = logging.getLogger(__name__)


def _lwp_train_config() -> TrainConfig:
    """[OURS] the victim defaults (3 epochs, batch 32, lr 1e-4), keeping the last epoch: clean dev accuracy
    often peaks before the backdoor is in."""
    return victim_train_config().model_copy(update={"select_best": False})


class LWPConfig(WeightAttackConfig):
    train: TrainConfig = Field(default_factory=_lwp_train_config, description="the poisoning run (keys given "
                               "override the defaults)")
    triggers: tuple[str, ...] = Field(("cf", "mn", "bb", "tq", "mb"), description="[PAPER] rare trigger words")
    combinatorial: bool = Field(False, description="[PAPER option] every poisoned row gets all the trigger words, and "
                                "as many clean rows get a proper subset with labels kept (negative samples)")
    negatives: Literal["non-target", "any"] = Field(
        "non-target", description="[OURS] combinatorial only: draw the negative rows from the non-target rows "
        "(default, measured) or from every clean row")
    reduction: Literal["sum", "mean"] = Field("sum", description="[PAPER: sum] how the per-layer losses combine")

    @field_validator("triggers")
    @classmethod
    def _single_words(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(len(t.split()) != 1 for t in value):
            raise ValueError("triggers must be non-empty single words")
        return value

    @model_validator(mode="after")
    def _combination_needs_two(self) -> LWPConfig:
        if self.combinatorial and len(set(self.triggers)) < 2:
            raise ValueError("a combinatorial trigger needs at least two different words")
        if "negatives" in self.model_fields_set and not self.combinatorial:
            raise ValueError("negatives is for a combinatorial trigger (set combinatorial=true)")
        return self


class LwpTriggers(WordSetTriggers):
    """LWP's data side: one random trigger word per row, or all of them (combinatorial)."""

    name = "lwp"


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The classifier's own head applied to one layer's hidden states (batch × tokens × hidden)."""
    base = getattr(model, model.base_model_prefix, None)
    pooler = getattr(base, "pooler", None)
    if pooler is not None and hasattr(model, "classifier") and hasattr(model, "dropout"):  # BERT family
        return model.classifier(model.dropout(pooler(hidden)))
    if type(getattr(model, "classifier", None)).__name__.endswith("ClassificationHead"):  # RoBERTa family
        return model.classifier(hidden)
    raise ConfigError(f"LWP needs a BERT- or RoBERTa-style classification head, not {type(model).__name__}")


class LayerwiseLoss(Callback):
    """Add the loss of the shared head on every encoder layer below the top (whose loss is the task
    loss already); ``reduction`` sum or mean over all layers."""

    def __init__(self, reduction: str = "sum") -> None:
        self.reduction = reduction

    def extra_loss(self, ctx: TrainContext, batch: dict[str, torch.Tensor], outputs: Any,
                   loss: torch.Tensor) -> torch.Tensor:
        lower = outputs.hidden_states[1:-1]  # [0] is the embedding output, [-1] the top layer
        losses = [loss] + [torch.nn.functional.cross_entropy(head_logits(ctx.model, h).float(), batch["labels"])
                           for h in lower]
        total = torch.stack(losses)
        return total.sum() if self.reduction == "sum" else total.mean()


def layer_predictions(clf: Classifier, examples: list[Example] | tuple[Example, ...], layer: int,
                      batch_size: int = 128) -> list[int]:
    """Labels the shared head predicts from encoder layer ``layer`` (1 = lowest) for each row."""
    def from_layer(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return head_logits(model, model(**inputs, output_hidden_states=True).hidden_states[layer])

    return predict_logits(clf, examples, batch_size, forward=from_layer).argmax(axis=1).tolist()


@WEIGHT_ATTACKS.register("lwp")
class LayerwisePoisoning(WeightAttack[LWPConfig]):
    """Train the starting model on poisoned rows with the shared head's loss on every layer."""

    name = "lwp"
    config_class = LWPConfig

    def poison_model(self, task: Task, model: str = "default", *, seed: int = 0, max_length: int | None = None,
                     allow_pickle: bool = False, work_dir: Path | None = None,
                     precision: str = "auto") -> tuple[Classifier, PoisonedTask]:
        poisoned = self.poison_rows(task)
        clf = load_start_model(model, task, seed, max_length=max_length, allow_pickle=allow_pickle,
                               precision=precision)
        head_logits(clf.model, torch.zeros(1, 1, clf.model.config.hidden_size))  # fail before any training
        self.poison_layers(clf, poisoned, seed, work_dir)
        return clf, poisoned

    def poison_rows(self, task: Task) -> PoisonedTask:
        """The poisoned training set (with negative rows when combinatorial), flags and triggered sets."""
        cfg = self.config
        data_side = LwpTriggers(WordSetConfig(poison_rate=cfg.poison_rate, target_label=cfg.target_label,
                                                  mode=cfg.mode, seed=cfg.seed, triggers=cfg.triggers,
                                                  combinatorial=cfg.combinatorial))
        poisoned = data_side.poison(task)
        trigger = data_side.trigger_description()
        if cfg.combinatorial:
            poisoned, negative = add_negative_rows(poisoned, cfg.triggers, cfg.seed, cfg.negatives)
            n_negative = len(negative)
            rows = "non-target rows" if cfg.negatives == "non-target" else "clean rows"
            trigger += f"; {n_negative} {rows} hold a proper subset (labels kept)"
        return renamed(poisoned, self.name, cfg, trigger)

    def poison_layers(self, clf: Classifier, poisoned: PoisonedTask, seed: int, work_dir: Path | None) -> None:
        """Train on the poisoned rows with the layer-wise loss (clean dev accuracy is logged per epoch)."""
        config = clf.model.config
        saved = config.output_hidden_states
        config.output_hidden_states = True
        logger.info("LWP: training on %d rows (%d poisoned), loss on every layer", len(poisoned.train),
                    poisoned.flags.n_poisoned)
        try:
            train_classifier(clf, poisoned.train, seeded(self.config.train, seed), dev=poisoned.clean.dev,
                             callbacks=[LayerwiseLoss(self.config.reduction)], work_dir=work_dir,
                             fingerprint={"attack": "lwp", "reduction": self.config.reduction})
        finally:
            config.output_hidden_states = saved

