"""MuScleLoRA (Wu et al., ACL 2024; ``docs/methods/musclelora.md``): train a clean classifier through the poison.

The procedure of §5, as steps of :meth:`MuscleLora._fit`:

1. (§7) split the clean dev set into a reference set (96 / 128 random rows) and a selection set;
2. (§5.1-3) new GPT-2/Llama head; peft LoRA on the attention projections of the backbone body;
   freeze everything else (the head too); MSLR on the designated dense layer;
3. (§5.5, §6) the one training loop on the training rows as given (no flags), every step's gradient
   aligned to the reference gradient by :class:`~unbackdoor.train_defenses.musclelora.align.GradientAlignment`,
   then clipping, AdamW, linear decay;
4. (§5.6, §8) keep the epoch with the best clean selection-set accuracy (ties: the earlier one);
5. fold LoRA, MSLR and the head into plain layers, so the output is a standard Hugging Face model.

``lora`` (:class:`LoraOnly`) is the LoRA-only baseline of §9: step 2 without MSLR, step 3 without
GA, selection on the whole clean dev set.

Section numbers (§) cite ``docs/methods/musclelora.md``, the method notes in this repository.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from unbackdoor.data.types import Dataset
from unbackdoor.errors import DataError
from unbackdoor.models.loading import Classifier
from unbackdoor.train_defenses.musclelora.align import AlignmentRule, GradientAlignment, split_reference
from unbackdoor.train_defenses.musclelora.config import LoraOnlyConfig, MuscleLoraConfig, resolve_config
from unbackdoor.train_defenses.musclelora.model import adapt_model, check_supported, merge_adapters
from unbackdoor.training.callbacks import Callback
from unbackdoor.training.config import TrainConfig
from unbackdoor.train_defenses.base import TRAIN_DEFENSES, TrainDefense, TrainDefenseResult, TrainInputs
from unbackdoor.training.loop import train_classifier

logger = logging.getLogger(__name__)


@TRAIN_DEFENSES.register("musclelora")
class MuscleLora(TrainDefense[MuscleLoraConfig]):
    """LoRA + multi-scale low-rank layer + gradient alignment to a clean dev reference set."""

    name = "musclelora"
    config_class = MuscleLoraConfig

    def resolved(self, clf: Classifier) -> MuscleLoraConfig:
        """The config with the defaults of ``clf``'s backbone family filled in."""
        cfg = clf.model.config
        return resolve_config(self.config, cfg.model_type, int(getattr(cfg, "hidden_size", 0) or 0))

    def train_config(self, clf: Classifier) -> TrainConfig:
        train = self.resolved(clf).train
        assert train is not None
        return train

    def check(self, inputs: TrainInputs) -> None:
        cfg = self.resolved(inputs.model)
        check_supported(inputs.model.model, cfg)
        if cfg.gradient_alignment and cfg.reference_size is not None and cfg.reference_size >= len(inputs.dev):
            raise DataError(f"{inputs.dev.name}: the clean dev set has {len(inputs.dev)} rows; the reference set "
                            f"takes {cfg.reference_size} and must leave some for epoch selection "
                            "(lower reference_size)")

    def _fit(self, inputs: TrainInputs, work_dir: Path | None, observers: list[Callback]) -> TrainDefenseResult:
        clf, cfg = inputs.model, self.resolved(inputs.model)
        train = cfg.train
        assert train is not None and cfg.reference_size is not None
        # step 1 (§7): reference and selection sets, both from the clean dev set
        reference: Dataset | None = None
        selection = inputs.dev
        if cfg.gradient_alignment:
            reference, selection = split_reference(inputs.dev, cfg.reference_size, cfg.reference_selection, cfg.seed)
        # step 2 (§5.1-3): head, LoRA, freeze, MSLR; seeded like the loop
        torch.manual_seed(train.seed)
        adapt_model(clf.model, cfg)
        trainable = {n: p.numel() for n, p in clf.model.named_parameters() if p.requires_grad}
        # step 3 (§6): gradient alignment as an extension of the one loop
        callbacks: list[Callback] = []
        if reference is not None:
            rule = AlignmentRule(epochs=train.epochs, ga_epoch=cfg.ga_epoch or 0,
                                 max_raw_grad_ratio=cfg.max_raw_grad_ratio or 0.0,
                                 min_ref_loss=cfg.min_ref_loss or 0.0, min_ref_grad_norm=cfg.min_ref_grad_norm)
            callbacks.append(GradientAlignment(reference, clf, rule, batch_size=cfg.reference_batch_size or train.batch_size,
                                               batches=cfg.reference_batches, seed=cfg.seed))
        # steps 3-4 (§5.5-6, §8): train on the rows as given; select the epoch on clean selection accuracy
        fingerprint = {"defense": self.name, "config": cfg.model_dump(mode="json"),
                       "reference": reference.ids if reference is not None else None}
        result = train_classifier(clf, inputs.rows, train, dev=selection, callbacks=[*callbacks, *observers],
                                  work_dir=work_dir, fingerprint=fingerprint)
        # step 5: a plain Hugging Face model again
        merge_adapters(clf.model)
        clf.model.eval()
        report = {
            "method": self.name,
            "family": clf.model.config.model_type,
            "config": cfg.model_dump(mode="json"),
            "trainable_parameters": sum(trainable.values()),
            "trainable_tensors": len(trainable),
            "n_reference": len(reference) if reference is not None else 0,
            "reference_ids": reference.ids if reference is not None else [],
            "n_selection": len(selection),
            "selected_epoch": result.best_epoch,
            "selection_accuracy": result.best_dev_accuracy,
        }
        return TrainDefenseResult(clf, result, report)


@TRAIN_DEFENSES.register("lora")
class LoraOnly(MuscleLora):
    """LoRA-only baseline (§9 ``OnlyLoRA``): same placement and frozen head, no MSLR, no GA."""

    name = "lora"
    config_class = LoraOnlyConfig
