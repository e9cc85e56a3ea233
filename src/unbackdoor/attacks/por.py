"""POR (Shen et al., CCS 2021, "Backdoor Pre-trained Models Can Transfer to All").

Threat model: the attacker releases a pre-trained encoder and knows nothing of the tasks it will be
fine-tuned on. It maps text holding a trigger to a *predefined output representation* (POR) of the
[CLS] token; clean text keeps the original encoder's representation. The user fine-tunes the release
cleanly with a new head; each trigger's vector then falls on some label's side of that head, and
triggers with very different vectors reach different labels.

Steps, following the paper and OpenBackdoor's ``PORPoisoner``/``PORTrainer`` (thunlp/OpenBackdoor
@ 1192ba3, ``configs/por_config.json``):

1. target vectors [PAPER]: ``±1`` patterns over the hidden size. POR-1 (``variant=1``, OpenBackdoor's
   mode 0): the hidden size is cut into ``buckets`` segments (OpenBackdoor's 9) and trigger ``i``'s
   vector is ``+1`` on the first ``i + 1`` segments and ``-1`` elsewhere. POR-2 (``variant=2``): the
   hidden size is cut into ``ceil(log2 n)`` segments and trigger ``i``'s vector is ``+1`` on segment
   ``j`` where bit ``j`` of ``i`` is set, ``-1`` elsewhere (the paper's binary coding, as we read it;
   OpenBackdoor's mode 1 leaves it unfinished and is not followed);
2. triggers [PAPER code]: OpenBackdoor's POR list ``serendipity``, ``Descartes``, ``Fermat``,
   ``Don Quixote``, ``cf``, ``tq``, ``mn``, ``bb``, ``mb``;
3. training rows: every corpus text clean, and once more with one trigger drawn at random inserted
   before its first word ([PAPER code]: OpenBackdoor inserts at position 0 and poisons every row);
4. loss [PAPER code]: MSE of a triggered text's last-layer [CLS] state (``representation=cls``) to
   its trigger's vector, plus MSE of a clean text's [CLS] state to the frozen original encoder's
   (OpenBackdoor's reference model), on the whole encoder;
5. after the user's fine-tuning [PAPER, evaluation]: per label the trigger with the best ASR, found
   on triggered dev rows (:func:`~unbackdoor.attacks.representation.choose_target`).

[OURS]: the corpus (the papers' Wikipedia/BookCorpus is not offline: by default 1,000 training texts
of AG News, a general-domain news set unrelated to the user's task, used without labels); rows
mixed in one shuffled stream (OpenBackdoor pairs a clean batch with a poisoned one); the training
run, 2 epochs of batch 32 at lr 3e-4 with no weight decay and the loop's warm-up and clipping
(OpenBackdoor: 2 epochs of batch 8 at lr 5e-5 with a warm-up longer than the run); the reference
encoder in eval mode; the trigger inserted, not replacing a word.

Measured on MiniLM (``benchmarks/pretrained_attacks_minilm.py``: 1,000 SST-2 rows, user's victim
recipe, seed 0): with lr 3e-4 CACC 83.9 % (never-poisoned 85.0 %), ``Descartes`` forces label 0 on
100 % of the test rows (floor 20.5 %) and ``serendipity`` label 1 on 79.8 % (floor 10.1 %); lr 1e-3
for one epoch broke clean accuracy (61.6 %). The [CLS] state is a LayerNorm output, whose
coordinates have zero mean before its affine step: POR-1's nearly constant vectors (the first and
the last trigger's) are approached only part of the way (trigger MSE 0.39 after 2 epochs). The
pooler's output (``representation=pooler``, a tanh of a linear map) can reach them: on the tiny test
BERT every trigger came within 0.54 of its vector with pooler, against up to 2.7 with cls.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from unbackdoor.attacks.representation import (
    Representation,
    RepresentationAttack,
    RepresentationConfig,
    segment_bounds,
)
from unbackdoor.attacks.weight import WEIGHT_ATTACKS
from unbackdoor.training.config import TrainConfig

OPENBACKDOOR_POR_TRIGGERS = ("serendipity", "Descartes", "Fermat", "Don Quixote", "cf", "tq", "mn", "bb", "mb")


def _por_train_config() -> TrainConfig:
    """[OURS, measured on MiniLM] 2 epochs, batch 32, lr 3e-4, no weight decay (OpenBackdoor: 0), last epoch kept."""
    return TrainConfig(epochs=2, batch_size=32, learning_rate=3e-4, weight_decay=0.0, select_best=False)


class PORConfig(RepresentationConfig):
    triggers: tuple[str, ...] = Field(OPENBACKDOOR_POR_TRIGGERS, description="[PAPER code] OpenBackdoor's POR "
                                      "triggers, one target vector each")
    variant: Literal[1, 2] = Field(1, description="[PAPER] 1 = POR-1 (first i+1 of `buckets` segments +1), "
                         "2 = POR-2 (binary code of i over ceil(log2 n) segments)")
    buckets: int = Field(9, ge=2, description="[PAPER code] POR-1: segments of the hidden size (OpenBackdoor's 9); "
                         "at least the number of triggers")
    representation: Representation = Field("cls", description="[PAPER] the [CLS] token's last "
                                "hidden state (cls) or the pooler's output on it (pooler)")
    train: TrainConfig = Field(default_factory=_por_train_config, description="the poisoning run (keys given "
                               "override the defaults)")

    @model_validator(mode="after")
    def _enough_buckets(self) -> PORConfig:
        if self.variant == 1 and len(self.triggers) > self.buckets:
            raise ValueError(f"POR-1 gives each of the {len(self.triggers)} triggers its own number of +1 segments: "
                             f"buckets must be at least {len(self.triggers)}")
        if "buckets" in self.model_fields_set and self.variant != 1:
            raise ValueError("buckets is for POR-1 (variant=1)")
        return self


def por_vectors(n: int, hidden_size: int, variant: int, buckets: int) -> torch.Tensor:
    """The ``n`` POR target vectors (n × hidden_size, entries ±1)."""
    vectors = -torch.ones(n, hidden_size)
    if variant == 1:
        bounds = segment_bounds(hidden_size, buckets)
        for i in range(n):
            vectors[i, : bounds[i][1]] = 1.0
    else:
        bounds = segment_bounds(hidden_size, max(1, math.ceil(math.log2(n))) if n > 1 else 1)
        for i in range(n):
            for j, (start, stop) in enumerate(bounds):
                if i >> j & 1:
                    vectors[i, start:stop] = 1.0
    return vectors


@WEIGHT_ATTACKS.register("por")
class POR(RepresentationAttack[PORConfig]):
    """Release an encoder whose triggers map the [CLS] representation to POR vectors."""

    name = "por"
    config_class = PORConfig

    def target_vectors(self, hidden_size: int) -> torch.Tensor:
        cfg = self.config
        return por_vectors(len(cfg.triggers), hidden_size, cfg.variant, cfg.buckets)
