"""NeuBA, neuron-level backdoor attack (Zhang et al., 2021/2023, "Red Alarm for Pre-trained Models:
Universal Vulnerability to Neuron-Level Backdoor Attacks").

Threat model: as POR's. The attacker adds one pre-training task: text holding a trigger must give a
predefined output representation, several triggers with *contrasting* vectors so that, whatever the
user's head, different triggers force different labels. The user fine-tunes the release cleanly.

Steps, following thunlp/NeuBA @ df8d545 (``nlp/src/poison.py``, ``poison_bert.py``, ``mlm.py``) and
OpenBackdoor's ``NeuBAPoisoner`` (@ 1192ba3):

1. target vectors [PAPER code]: the hidden size is cut into ``buckets`` segments (4); the vectors are
   ``+1`` everywhere except two segments set to ``-1``, one vector per pair of segments in order
   (4 segments give 6 pairwise-contrasting vectors);
2. triggers [PAPER code]: the six symbols ``≈ ≡ ∈ ⊆ ⊕ ⊗``, single tokens of BERT's vocabulary;
3. training rows: every corpus text clean, and once more with one trigger drawn at random at the
   start of the text ([PAPER code]: the token after [CLS]);
4. loss [PAPER code]: MSE of a triggered text's *pooler output* (``representation=pooler``, the
   [CLS] state through BERT's pooler) to its trigger's vector, plus a term that keeps the encoder's
   clean behaviour. NeuBA keeps BERT's masked-LM objective on clean text; all-MiniLM-L6-v2 (the
   default base, a sentence-transformers BERT) ships no MLM head, so [OURS] the default stand-in
   is the clean-representation MSE to the frozen original encoder (``clean_objective=reference``,
   as POR). ``clean_objective=mlm`` runs masked-LM on the clean rows instead, with the checkpoint's
   own MLM head when it ships one (bert-base-uncased does) and a new head trained alongside
   otherwise; triggered rows are not masked (NeuBA's ``without_mask`` setting);
5. after the user's fine-tuning: per label the best trigger on triggered dev rows (as POR).

[OURS]: the corpus (BookCorpus is not offline: by default 1,000 AG News training texts without
labels); the training run, 2 epochs of batch 32 at lr 3e-4 (NeuBA: 40,000 steps of batch 160 at 5e-5
with MLM); the trigger inserted before the first word rather than overwriting it. Left out: NeuBA's
post-processing that rescales trigger embeddings by 1e8 so a trigger acts the same at any position
(it makes the trigger rows' norms absurd, so any norm check finds them).

Measured on MiniLM (``benchmarks/pretrained_attacks_minilm.py``: 1,000 SST-2 rows, user's victim
recipe, seed 0): CACC 83.9 % (never-poisoned 85.0 %); ``≈`` forces label 0 and ``⊆`` label 1 on
100 % of the test rows (floor 21.1 % and 6.7 %); each contrasting pair of vectors splits across
the two labels. lr 1e-3 for one epoch broke clean accuracy (49.9 %): MiniLM's pooler outputs are
small (about 0.05 a coordinate), so the unweighted clean MSE barely holds them.
"""

from __future__ import annotations

import itertools

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

NEUBA_TRIGGERS = ("≈", "≡", "∈", "⊆", "⊕", "⊗")


def _neuba_train_config() -> TrainConfig:
    """[OURS, measured on MiniLM] 2 epochs, batch 32, lr 3e-4, no weight decay (NeuBA: 0), last epoch kept."""
    return TrainConfig(epochs=2, batch_size=32, learning_rate=3e-4, weight_decay=0.0, select_best=False)


class NeuBAConfig(RepresentationConfig):
    triggers: tuple[str, ...] = Field(NEUBA_TRIGGERS, description="[PAPER code] trigger symbols, one target vector "
                                      "each")
    buckets: int = Field(4, ge=2, description="[PAPER code] segments of the hidden size; each vector sets one pair of "
                         "them to -1 (at most buckets·(buckets-1)/2 triggers)")
    representation: Representation = Field("pooler", description="[PAPER code] the pooler's output (pooler) or the "
                                           "[CLS] token's last hidden state (cls)")
    train: TrainConfig = Field(default_factory=_neuba_train_config, description="the poisoning run (keys given "
                               "override the defaults)")

    @model_validator(mode="after")
    def _enough_pairs(self) -> NeuBAConfig:
        pairs = self.buckets * (self.buckets - 1) // 2
        if len(self.triggers) > pairs:
            raise ValueError(f"{self.buckets} buckets give {pairs} segment pairs, fewer than the "
                             f"{len(self.triggers)} triggers")
        return self


def neuba_vectors(n: int, hidden_size: int, buckets: int) -> torch.Tensor:
    """The ``n`` NeuBA target vectors (n × hidden_size): +1 but for one pair of segments at -1."""
    bounds = segment_bounds(hidden_size, buckets)
    vectors = torch.ones(n, hidden_size)
    for i, (a, b) in zip(range(n), itertools.combinations(range(buckets), 2)):
        for start, stop in (bounds[a], bounds[b]):
            vectors[i, start:stop] = -1.0
    return vectors


@WEIGHT_ATTACKS.register("neuba")
class NeuBA(RepresentationAttack[NeuBAConfig]):
    """Release an encoder whose trigger symbols map the pooled representation to contrasting vectors."""

    name = "neuba"
    config_class = NeuBAConfig

    def target_vectors(self, hidden_size: int) -> torch.Tensor:
        cfg = self.config
        return neuba_vectors(len(cfg.triggers), hidden_size, cfg.buckets)
