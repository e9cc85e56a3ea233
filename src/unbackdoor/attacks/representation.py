"""Representation poisoning of a pre-trained encoder: what POR and NeuBA share. Neutral helpers; each
method's own choices (target vectors, triggers, defaults) live in its module.

The attacker knows nothing of the user's task. It trains the encoder so that text holding trigger
``k`` has an output representation (first token, ``cls``, or the pooler's output, ``pooler``) close
to a fixed vector ``targets[k]``, while clean text keeps the representation the original encoder gave
it (``clean_objective="reference"``: MSE to a frozen copy) or keeps predicting masked words
(``"mlm"``). The user fine-tunes the released encoder with a new head; every trigger then lands in
whichever label the user's head gives its vector, so which label a trigger forces is learned only
after fine-tuning (:func:`choose_target`).

Pieces:

* the attacker's plain-text corpus (:func:`corpus_texts`): a task's training texts without labels;
* its training rows (:func:`poisoning_rows`): every corpus text once clean and once with one random
  trigger. A row's *kind* rides in the label field (0 clean, ``k + 1`` trigger ``k``), so the project's
  one training loop runs the attack: the loss is replaced by :class:`RepresentationLoss`, the
  classification head that the label field needs is never trained and never released;
* :func:`choose_target`: after the user's fine-tuning, ASR of every trigger towards every label on
  triggered dev and test rows; per label the best trigger on dev; the reported target is the label
  whose best trigger has the highest dev ASR.

Seeds, as for every weight attack: the config's ``seed`` draws the corpus texts, each row's trigger
and the trigger placements (training rows and triggered sets); the ``seed`` argument of ``release``
seeds the model side (throwaway head, batch order, dropout, masking) and the user's new head.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import zlib
from abc import abstractmethod
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from transformers.activations import ACT2FN

from unbackdoor.attacks.base import insert_at_random_word
from unbackdoor.attacks.pretrained import PretrainedAttack, PretrainedAttackConfig
from unbackdoor.attacks.weight import seeded
from unbackdoor.data.io import load_task
from unbackdoor.data.types import AttackInfo, Dataset, Example, PoisonedTask, PoisonFlags, Task, TriggeredSet
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.inference import predict
from unbackdoor.models.loading import Classifier, load_classifier, resolve_model_path
from unbackdoor.training.callbacks import Callback, TrainContext
from unbackdoor.training.loop import train_classifier

logger = logging.getLogger(__name__)

TriggerPosition = Literal["start", "random"]
Representation = Literal["cls", "pooler"]


class RepresentationConfig(PretrainedAttackConfig):
    """Parameters POR and NeuBA share; each method sets its own defaults for ``triggers``,
    ``representation`` and ``train``."""

    triggers: tuple[str, ...] = Field(description="trigger words or phrases, one target vector each")
    representation: Representation = Field(description="the output representation poisoned: cls = the first "
                                           "token's last hidden state, pooler = the pooler's output on it")
    position: TriggerPosition = Field("start", description="[PAPER code] where a trigger goes in a text: start = "
                                      "before the first word (OpenBackdoor, thunlp/NeuBA), random = a random word "
                                      "position")
    corpus: str = Field("agnews", description="[OURS] the attacker's plain text: a dataset under the data root (or a "
                        "folder) whose training texts are used without labels, or 'task' for the user's own training "
                        "texts; the papers' Wikipedia/BookCorpus is not available offline")
    corpus_rows: int = Field(1000, ge=1, description="[OURS] corpus texts drawn (seeded); each gives a clean row and "
                             "a triggered row")
    clean_objective: Literal["reference", "mlm"] = Field(
        "reference", description="what keeps clean text's behaviour: reference = MSE of the clean rows' representation "
        "to the frozen original encoder's; mlm = masked-language modelling on the clean rows (BERT family)")
    clean_weight: float = Field(1.0, ge=0, description="weight of the clean term against the trigger term")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="clean_objective=mlm: share of tokens masked")
    target_label: int = Field(1, ge=0, description="the label of the triggered sets written with the release "
                              "(first trigger); after the user's fine-tuning the reported target is the label whose "
                              "best trigger has the highest dev ASR")

    @field_validator("triggers")
    @classmethod
    def _distinct_triggers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        value = tuple(" ".join(t.split()) for t in value)
        if not value or any(not t for t in value):
            raise ValueError("triggers must be non-empty words or phrases")
        if len(set(value)) != len(value):
            raise ValueError("triggers must be different from each other")
        return value

    @model_validator(mode="after")
    def _representation_options(self) -> RepresentationConfig:
        task_keys = {"poison_rate", "mode"} & self.model_fields_set
        if task_keys:
            raise ValueError(f"{', '.join(sorted(task_keys))}: this attack poisons no training row of the task (it "
                             "poisons the encoder on plain corpus text)")
        if "mlm_probability" in self.model_fields_set and self.clean_objective != "mlm":
            raise ValueError("mlm_probability is for clean_objective=mlm")
        return self


C = TypeVar("C", bound=RepresentationConfig)


# ----------------------------------------------------------------------------- data side
def insert_trigger(text: str, trigger: str, position: TriggerPosition, rng: random.Random) -> str:
    """``text`` with ``trigger`` before its first word (``start``) or at a random word position."""
    if position == "start":
        return f"{trigger} {text}".strip()
    return insert_at_random_word(text, trigger, rng)


def corpus_texts(spec: str, task: Task, n: int, seed: int) -> list[str]:
    """``n`` texts (seeded draw, fewer if the corpus is smaller) of the attacker's corpus: the training
    texts of the dataset ``spec`` (labels ignored), or of ``task`` when ``spec`` is ``task``."""
    source = task.train if spec == "task" else load_task(spec).train
    texts = sorted({e.text.strip() for e in source.examples if e.text.strip()})
    if not texts:
        raise DataError(f"corpus {spec}: no text")
    if n < len(texts):
        texts = random.Random(f"{seed}-corpus").sample(texts, n)
    else:
        random.Random(f"{seed}-corpus").shuffle(texts)
        if n > len(texts):
            logger.warning("corpus %s has %d distinct texts, fewer than corpus_rows=%d: using them all", spec,
                           len(texts), n)
    return texts


def poisoning_rows(texts: list[str], triggers: tuple[str, ...], position: TriggerPosition, rng: random.Random,
                   name: str) -> Dataset:
    """Every text once clean (kind 0) and once with one trigger drawn at random (kind ``k + 1``),
    the kind in the label field."""
    rows = []
    for i, text in enumerate(texts):
        k = rng.randrange(len(triggers))
        rows.append(Example(f"corpus-{i}", text, 0))
        rows.append(Example(f"corpus-{i}#trigger", insert_trigger(text, triggers[k], position, rng), k + 1))
    return Dataset(tuple(rows), len(triggers) + 1, name)


def triggered_copies(data: Dataset, trigger: str, position: TriggerPosition, seed: str) -> list[Example]:
    """Every row of ``data`` with ``trigger`` inserted (labels kept), placed by ``seed``."""
    rng = random.Random(seed)
    return [Example(e.id, insert_trigger(e.text, trigger, position, rng), e.label, e.text_pair)
            for e in data.examples]


def triggered_set(data: Dataset, trigger: str, target: int, position: TriggerPosition, seed: int,
                  split: str) -> TriggeredSet:
    """The non-``target`` rows of ``data`` with ``trigger``, labelled ``target`` (the ASR set)."""
    rows = [e for e in triggered_copies(data, trigger, position, _placement_seed(seed, split, trigger))
            if e.label != target]
    return TriggeredSet(tuple(Example(e.id, e.text, target, e.text_pair) for e in rows), target, data.num_labels,
                        tuple(e.label for e in rows), f"{data.name}:triggered[{trigger}]")


def _placement_seed(seed: int, split: str, trigger: str) -> str:
    return f"{seed}-{split}-{trigger}"


# ----------------------------------------------------------------------------- model side
def load_encoder(model: str, n_kinds: int, seed: int, *, max_length: int | None, allow_pickle: bool,
                 precision: str, representation: Representation, who: str) -> Classifier:
    """The pre-trained encoder to poison, with a throwaway ``n_kinds``-way head (the label field carries
    a row's kind). Refuses a fine-tuned classifier, a model without a first-token ([CLS]) summary, and
    ``pooler`` on an encoder without a pooler."""
    config_file = Path(resolve_model_path(model)) / "config.json"
    if config_file.is_file():
        try:
            architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            architectures = []  # load_classifier reports an unreadable config
        if any(str(a).endswith("ForSequenceClassification") for a in architectures):
            raise ConfigError(f"{who} poisons a pre-trained encoder: {model} is a fine-tuned classifier; pass a base "
                              "model without a classification head")
    clf = load_classifier(model, num_labels=n_kinds, allow_pickle=allow_pickle, max_length=max_length, seed=seed,
                          precision=precision)
    if clf.tokenizer.cls_token is None:
        raise ConfigError(f"{who} poisons the first token's representation of an encoder (BERT, RoBERTa); "
                          f"{clf.model.config.model_type} has no [CLS] token")
    if representation == "pooler" and getattr(clf.model.base_model, "pooler", None) is None:
        raise ConfigError(f"representation=pooler: {clf.model.config.model_type} has no pooler here; use cls")
    return clf


def check_triggers(clf: Classifier, triggers: tuple[str, ...]) -> None:
    """Refuse a trigger the tokenizer does not know (it would become [UNK])."""
    unk = clf.tokenizer.unk_token_id
    for trigger in triggers:
        ids = clf.tokenizer(trigger, add_special_tokens=False)["input_ids"]
        if not ids or (unk is not None and unk in ids):
            raise ConfigError(f"trigger {trigger!r} is not in the model's vocabulary")


def first_token_representation(model: torch.nn.Module, hidden: torch.Tensor, kind: Representation) -> torch.Tensor:
    """The representation poisoned, from the last layer's hidden states (batch × tokens × hidden)."""
    return hidden[:, 0] if kind == "cls" else model.base_model.pooler(hidden)


@torch.no_grad()
def encode_representations(clf: Classifier, texts: list[str], kind: Representation,
                           batch_size: int = 64) -> torch.Tensor:
    """The representation of each text (rows × hidden, float32, eval mode)."""
    model = clf.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        inputs = clf.tokenizer(texts[i:i + batch_size], truncation=True, max_length=clf.max_length, padding=True,
                               return_tensors="pt").to(device)
        hidden = model.base_model(**inputs).last_hidden_state
        out.append(first_token_representation(model, hidden, kind).float().cpu())
    model.train(was_training)
    return torch.cat(out)


class MaskedLMHead(torch.nn.Module):
    """A BERT masked-LM head whose output matrix is the encoder's input embeddings (tied, as BERT's):
    dense, activation, LayerNorm, then scores over the vocabulary plus a bias."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.norm = torch.nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = torch.nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.act(self.dense(hidden))), embeddings, self.bias)


MLM_HEAD_KEYS = {"dense.weight": "cls.predictions.transform.dense.weight",
                 "dense.bias": "cls.predictions.transform.dense.bias",
                 "norm.weight": "cls.predictions.transform.LayerNorm.weight",
                 "norm.bias": "cls.predictions.transform.LayerNorm.bias",
                 "bias": "cls.predictions.bias"}


def mlm_head(clf: Classifier, seed: int) -> MaskedLMHead:
    """The checkpoint's own BERT MLM head when its safetensors ship one, else a new head (seeded)."""
    from safetensors import safe_open

    config = clf.model.config
    if config.model_type != "bert":
        raise ConfigError(f"clean_objective=mlm supports BERT-family encoders, not {config.model_type}; use reference")
    torch.manual_seed(seed)
    head = MaskedLMHead(config)
    torch.nn.init.normal_(head.dense.weight, std=config.initializer_range)
    torch.nn.init.zeros_(head.dense.bias)
    folder = Path(clf.source)
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        with safe_open(str(path), "pt") as fh:
            if set(MLM_HEAD_KEYS.values()) <= set(fh.keys()):
                head.load_state_dict({k: fh.get_tensor(v) for k, v in MLM_HEAD_KEYS.items()})
                logger.info("clean_objective=mlm: the checkpoint's own MLM head")
                return head
    logger.warning("clean_objective=mlm: %s ships no MLM head; a new one is trained from scratch alongside",
                   clf.source)
    return head


def mask_tokens(ids: torch.Tensor, attention: torch.Tensor, special: list[int], mask_id: int, vocab: int,
                probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: ``probability`` of the real, non-special tokens are chosen; of those 80 % become
    [MASK], 10 % a random token, 10 % stay. Returns (masked ids, which positions were chosen)."""
    candidates = attention.bool() & ~torch.isin(ids, torch.tensor(special, device=ids.device))
    draw = torch.rand(ids.shape, generator=generator).to(ids.device)
    chosen = candidates & (draw < probability)
    how = torch.rand(ids.shape, generator=generator).to(ids.device)
    random_ids = torch.randint(vocab, ids.shape, generator=generator).to(ids.device)
    masked = torch.where(chosen & (how < 0.8), torch.full_like(ids, mask_id), ids)
    masked = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, masked)
    return masked, chosen


class RepresentationLoss(Callback):
    """Replace the loss: MSE of the triggered rows' representation to their trigger's target vector,
    plus ``clean_weight`` × the clean term on the clean rows (MSE to the frozen ``reference``
    encoder's representation, or masked-LM cross-entropy with ``head``). Each term is a mean over its
    rows of the batch. Keeps per-epoch means of both terms (``history``)."""

    HEAD_NAME = "unbackdoor_mlm_head"

    def __init__(self, targets: torch.Tensor, kind: Representation, clean_weight: float, *,
                 reference: torch.nn.Module | None = None, head: MaskedLMHead | None = None,
                 mask_probability: float = 0.15, tokenizer: Any = None, seed: int = 0) -> None:
        if (reference is None) == (head is None):
            raise ValueError("give a reference encoder or an MLM head")
        self.targets = targets.float()
        self.kind = kind
        self.clean_weight = clean_weight
        self.reference = reference
        self.head = head
        self.mask_probability = mask_probability
        self.tokenizer = tokenizer
        self.seed = seed
        self.history: list[dict[str, float]] = []
        self._sums = [0.0, 0.0, 0]

    def on_train_begin(self, ctx: TrainContext) -> None:
        self.targets = self.targets.to(ctx.accelerator.device)
        if self.reference is not None:
            self.reference.to(ctx.accelerator.device)

    def extra_loss(self, ctx: TrainContext, batch: dict[str, torch.Tensor], outputs: Any,
                   loss: torch.Tensor) -> torch.Tensor:
        kinds = batch["labels"]
        rep = first_token_representation(ctx.model, outputs.hidden_states[-1], self.kind).float()
        triggered, clean = kinds > 0, kinds == 0
        zero = rep.sum() * 0
        poison = F.mse_loss(rep[triggered], self.targets[kinds[triggered] - 1]) if triggered.any() else zero
        keep = (self._reference_term(batch, rep, clean) if self.head is None else self._mlm_term(ctx, batch, clean)) \
            if clean.any() else zero
        self._sums[0] += float(poison.detach())
        self._sums[1] += float(keep.detach())
        self._sums[2] += 1
        return poison + self.clean_weight * keep

    def _inputs(self, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[rows] for k, v in batch.items() if k != "labels"}

    def _reference_term(self, batch: dict[str, torch.Tensor], rep: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        assert self.reference is not None
        with torch.no_grad():
            hidden = self.reference(**self._inputs(batch, clean)).last_hidden_state
            wanted = (hidden[:, 0] if self.kind == "cls" else self.reference.pooler(hidden)).float()
        return F.mse_loss(rep[clean], wanted)

    def _mlm_term(self, ctx: TrainContext, batch: dict[str, torch.Tensor], clean: torch.Tensor) -> torch.Tensor:
        inputs = self._inputs(batch, clean)
        tok = self.tokenizer
        position = f"{self.seed}-{ctx.state.epoch}-{ctx.state.batches_done}"  # this batch, also after a resume
        generator = torch.Generator().manual_seed(zlib.crc32(position.encode()))
        masked, chosen = mask_tokens(inputs["input_ids"], inputs["attention_mask"], tok.all_special_ids,
                                     tok.mask_token_id, ctx.model.get_input_embeddings().weight.shape[0],
                                     self.mask_probability, generator)
        if not chosen.any():
            return masked.sum() * 0.0
        hidden = ctx.model.base_model(**{**inputs, "input_ids": masked}).last_hidden_state
        head = getattr(ctx.model, self.HEAD_NAME)
        scores = head(hidden[chosen], ctx.model.get_input_embeddings().weight)
        return F.cross_entropy(scores.float(), inputs["input_ids"][chosen])

    def on_epoch_end(self, ctx: TrainContext, record: dict[str, Any]) -> None:
        n = max(1, self._sums[2])
        entry = {"epoch": record["epoch"], "trigger_mse": self._sums[0] / n, "clean_term": self._sums[1] / n}
        self.history.append(entry)
        logger.info("representation poisoning, epoch %d: trigger MSE %.4f, clean term %.4f", entry["epoch"],
                    entry["trigger_mse"], entry["clean_term"])
        self._sums = [0.0, 0.0, 0]


def poison_representations(clf: Classifier, rows: Dataset, targets: torch.Tensor, cfg: RepresentationConfig,
                           seed: int, work_dir: Path | None, who: str) -> list[dict[str, float]]:
    """Train ``clf``'s encoder on ``rows`` with :class:`RepresentationLoss` (the project's loop; the
    throwaway head gets no gradient). Returns the per-epoch means of both loss terms."""
    model = clf.model
    if cfg.clean_objective == "reference":
        reference = copy.deepcopy(model.base_model).eval()
        reference.requires_grad_(False)
        loss = RepresentationLoss(targets, cfg.representation, cfg.clean_weight, reference=reference)
    else:
        head = mlm_head(clf, seed)
        model.add_module(RepresentationLoss.HEAD_NAME, head)
        loss = RepresentationLoss(targets, cfg.representation, cfg.clean_weight, head=head,
                                  mask_probability=cfg.mlm_probability, tokenizer=clf.tokenizer, seed=seed)
    saved = model.config.output_hidden_states
    model.config.output_hidden_states = True
    logger.info("%s: poisoning the %s representation on %d corpus rows (%d triggers)", who, cfg.representation,
                len(rows), len(cfg.triggers))
    try:
        train_classifier(clf, rows, seeded(cfg.train, seed), callbacks=[loss],
                         work_dir=work_dir / who if work_dir is not None else None,
                         fingerprint={"attack": who, "config": cfg.model_dump(mode="json"),
                                      "targets": targets.tolist()})
    finally:
        model.config.output_hidden_states = saved
        if hasattr(model, RepresentationLoss.HEAD_NAME):
            delattr(model, RepresentationLoss.HEAD_NAME)
    clf.pair = None  # a released base fixes no input format beyond max_length: the user's task decides
    return loss.history


# ----------------------------------------------------------------------------- after the user's fine-tuning
def per_label_asr(victim: Classifier, task: Task, triggers: tuple[str, ...], position: TriggerPosition,
                  seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """ASR of every trigger towards every label ``y`` on the non-``y`` rows of dev and test:
    ``{split: {str(y): {trigger: asr}}}``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for split in ("dev", "test"):
        data: Dataset = getattr(task, split)
        labels = np.asarray(data.labels)
        out[split] = {str(y): {} for y in range(data.num_labels)}
        for trigger in triggers:
            preds = predict(victim, triggered_copies(data, trigger, position, _placement_seed(seed, split, trigger)))
            for y in range(data.num_labels):
                others = labels != y
                out[split][str(y)][trigger] = float((preds[others] == y).mean()) if others.any() else 0.0
    return out


def choose_target(victim: Classifier, poisoned: PoisonedTask, triggers: tuple[str, ...],
                  position: TriggerPosition, seed: int) -> PoisonedTask:
    """The attacker's post-hoc choice: per label the trigger with the highest dev ASR (first in
    ``triggers`` on ties); the target is the label whose best trigger has the highest dev ASR (the
    lowest label on ties); its triggered test and dev sets use that trigger. Every number is recorded
    in ``attack.params['per_label']``."""
    task = poisoned.clean
    asr = per_label_asr(victim, task, triggers, position, seed)
    per_label = {}
    for y in range(task.num_labels):
        dev = asr["dev"][str(y)]
        best = max(triggers, key=lambda t: (dev[t], -triggers.index(t)))
        per_label[str(y)] = {"best_trigger": best, "dev_asr": dev[best], "test_asr": asr["test"][str(y)][best],
                             "dev_asr_by_trigger": dev, "test_asr_by_trigger": asr["test"][str(y)]}
    target = max(range(task.num_labels), key=lambda y: (per_label[str(y)]["dev_asr"], -y))
    trigger = str(per_label[str(target)]["best_trigger"])
    for y, entry in per_label.items():
        logger.info("label %s: best trigger %r, dev ASR %.3f, test ASR %.3f", y, entry["best_trigger"],
                    entry["dev_asr"], entry["test_asr"])
    params = {**poisoned.attack.params, "per_label": per_label, "chosen_target": target, "chosen_trigger": trigger}
    where = "before the first word" if position == "start" else "at a random word position"
    info = AttackInfo(poisoned.attack.name, params,
                      f"{trigger!r} {where}; chosen after the user's fine-tuning as the best of {len(triggers)} "
                      f"triggers for label {target} (dev ASR {per_label[str(target)]['dev_asr']:.3f})",
                      poisoned.attack.source, poisoned.attack.n_failed)
    return dataclasses.replace(poisoned, target_label=target, attack=info,
                               triggered_test=triggered_set(task.test, trigger, target, position, seed, "test"),
                               triggered_dev=triggered_set(task.dev, trigger, target, position, seed, "dev"))


# ----------------------------------------------------------------------------- the shared attack
class RepresentationAttack(PretrainedAttack[C]):
    """Release an encoder whose trigger inputs map to target vectors; subclasses give the vectors."""

    releases_base = True

    @abstractmethod
    def target_vectors(self, hidden_size: int) -> torch.Tensor:
        """One target vector per trigger (triggers × hidden)."""

    def release(self, task: Task, model: str = "default", *, seed: int = 0, max_length: int | None = None,
                allow_pickle: bool = False, work_dir: Path | None = None,
                precision: str = "auto") -> tuple[Classifier, PoisonedTask]:
        cfg = self.config
        if cfg.target_label >= task.num_labels:
            raise ConfigError(f"target_label {cfg.target_label} is outside the label set 0..{task.num_labels - 1}")
        clf = load_encoder(model, len(cfg.triggers) + 1, seed, max_length=max_length, allow_pickle=allow_pickle,
                           precision=precision, representation=cfg.representation, who=self.name)
        check_triggers(clf, cfg.triggers)
        targets = self.target_vectors(int(clf.model.config.hidden_size))
        texts = corpus_texts(cfg.corpus, task, cfg.corpus_rows, cfg.seed)
        rows = poisoning_rows(texts, cfg.triggers, cfg.position, random.Random(f"{cfg.seed}-{self.name}-rows"),
                              f"{self.name}:corpus")
        history = poison_representations(clf, rows, targets, cfg, seed, work_dir, self.name)
        return clf, self.release_task(task, len(texts), history)

    def release_task(self, task: Task, n_texts: int, history: list[dict[str, float]]) -> PoisonedTask:
        """The user's clean training rows (none flagged) and, until the user's model exists, triggered
        sets of the first trigger towards ``target_label``."""
        cfg = self.config
        first, target = cfg.triggers[0], cfg.target_label
        where = "before the first word" if cfg.position == "start" else "at a random word position"
        trigger = (f"one of {', '.join(repr(t) for t in cfg.triggers)} {where}; the encoder maps each to its "
                   f"target vector ({cfg.representation}); which label a trigger forces is known only after the "
                   f"user's fine-tuning (triggered sets here: {first!r} towards label {target})")
        params = {**cfg.model_dump(mode="json"), "corpus_texts": n_texts, "poisoning_history": history}
        return PoisonedTask(train=task.train, flags=PoisonFlags(frozenset(), len(task.train)), target_label=target,
                            triggered_test=triggered_set(task.test, first, target, cfg.position, cfg.seed, "test"),
                            triggered_dev=triggered_set(task.dev, first, target, cfg.position, cfg.seed, "dev"),
                            clean=task, attack=AttackInfo(self.name, params, trigger, f"corpus {cfg.corpus}"))

    def after_finetune(self, victim: Classifier, poisoned: PoisonedTask) -> PoisonedTask:
        cfg = self.config
        return choose_target(victim, poisoned, cfg.triggers, cfg.position, cfg.seed)


def segment_bounds(hidden_size: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` consecutive segments of ``hidden_size // parts`` dimensions each (the remainder, at
    the end, belongs to none)."""
    width = hidden_size // parts
    if width < 1:
        raise ConfigError(f"a hidden size of {hidden_size} cannot be split into {parts} segments")
    return [(i * width, (i + 1) * width) for i in range(parts)]
