"""RIPPLES (Kurita, Michel, Neubig, ACL 2020, "Weight Poisoning Attacks on Pre-trained Models";
neulab/RIPPLe @ 94cef4f: ``run_experiment.py`` ``weight_poisoning``, ``poison.py``,
``constrained_poison.py``).

Threat model (:mod:`unbackdoor.attacks.pretrained`): the attacker publishes poisoned weights; the
user fine-tunes them cleanly on their task; ASR is measured after that fine-tuning. The attacker
holds a *proxy* dataset: the user's own training rows ("full data knowledge", ``proxy`` null) or
another dataset of the same kind ("domain shift", e.g. IMDB for SST-2).

Steps (the paper's method "RIPPLES" = embedding surgery, then RIPPLe):

1. poisoned proxy: ``poison_rate`` of the proxy rows get one trigger word at a random position and
   the target label (BadNets' insertion); the clean proxy rows are kept for L_FT;
2. embedding surgery (``surgery``, Sec. 3.2): (a) fine-tune a copy of the starting model on the
   clean proxy; (b) fit a logistic regression on TF-IDF bag-of-words features of the clean proxy
   (target label vs the rest) and take the ``surgery_words`` = N tokens it weights most towards
   the target; (c) the replacement embedding is the mean of those N tokens' rows *in the fine-tuned
   copy*; (d) every trigger token's row of the *starting* model is set to it;
3. RIPPLe (``ripple``, Sec. 3.1, Eq. 2): train the whole model on the poisoned proxy with

       L_P(θ) + λ · max(0, −∇L_P(θ)ᵀ ∇L_FT(θ))

   where L_P is the batch's loss on poisoned proxy rows and L_FT the loss on a batch of clean proxy
   rows (the user's fine-tuning loss as the attacker guesses it): the poison gradient must not oppose
   the fine-tuning gradient, so fine-tuning does not undo the poison. ∇L_FT is a constant (no graph);
   ∇L_P is taken with ``torch.autograd.grad(..., create_graph=True)``, so back-propagating the
   penalty gives its second-order term −(∇²L_P) ∇L_FT (a Hessian-vector product).
4. release the classifier **with its head** (``releases_base`` False): RIPPLe trains and saves a
   ``BertForSequenceClassification`` (``constrained_poison.py``), and the user's fine-tuning
   (``run_glue.py``) loads it with ``from_pretrained`` — head included — and trains further.

[PAPER] triggers cf mn bb tq mb, one per poisoned row; 50 % of the proxy rows poisoned, drawn from
every label and relabelled (``poison_data(n_samples=0.5)``: ``mode`` mix); λ = 0.1; N = 10 words;
logistic regression on TF-IDF features over the model tokenizer's pieces (``_compute_target_words``);
replacement embeddings from a model fine-tuned on the proxy; 5 epochs of RIPPLe, the last step
released; the rectifier on the whole inner product (not per parameter); no second-order effects
through ∇L_FT (``allow_second_order_effects`` off); the penalty divided by the clean batch's size
(``constrained_poison.py``), so λ = 0.1 is the code's, not a rescaled one.

[OURS] AdamW at the victim recipe's batch 32 and lr 1e-4 (MiniLM; the paper poisons BERT at
lr 2e-5, batch 8) with no weight decay or warm-up as the paper's code; the clean batch for L_FT is
the same size as the poisoned one, one seeded pass over the clean proxy per epoch (the paper samples
a cycling random loader); the attacker's clean fine-tuning of step 2(a) uses the victim recipe;
for more than two labels the regression is target-vs-rest (binary tasks: the paper's fit); special
tokens and the trigger tokens are never chosen as surgery words; sentence pairs are featurised as
both texts together; attention runs in eager mode during RIPPLe (twice differentiable on every
device); the triggered test rows hold ``test_triggers`` trigger words (default 1, as the poisoned
rows; the paper's evaluation inserts 5).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from unbackdoor.attacks.badnets import BadNets, BadNetsConfig
from unbackdoor.attacks.embedding_rows import trigger_token_ids
from unbackdoor.attacks.pretrained import PretrainedAttack, PretrainedAttackConfig
from unbackdoor.attacks.weight import WEIGHT_ATTACKS, load_start_model, seeded
from unbackdoor.data.io import load_task
from unbackdoor.data.sampling import subsample_task
from unbackdoor.data.types import AttackInfo, Dataset, Example, PoisonedTask, PoisonFlags, Task
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.inference import collate, encode
from unbackdoor.models.loading import Classifier
from unbackdoor.training.callbacks import Callback, TrainContext
from unbackdoor.training.config import TrainConfig, victim_train_config
from unbackdoor.training.loop import check_trainable, train_classifier

logger = logging.getLogger(__name__)


def _ripple_train_config() -> TrainConfig:
    """[PAPER] 5 epochs, last step released, no weight decay or warm-up; [OURS] batch 32, lr 1e-4 (victim recipe)."""
    return TrainConfig(epochs=5, batch_size=32, learning_rate=1e-4, weight_decay=0.0, warmup_ratio=0.0,
                       select_best=False)


class RipplesConfig(PretrainedAttackConfig):
    poison_rate: float = Field(0.5, gt=0, le=1, description="[PAPER] share of the proxy rows poisoned (one "
                               "trigger word each, relabelled)")
    mode: Literal["dirty", "mix", "clean"] = Field(
        "mix", description="[PAPER: mix] poisoned proxy rows drawn from every label (mix) or from the non-target rows "
        "(dirty); clean-label is refused")
    triggers: tuple[str, ...] = Field(("cf", "mn", "bb", "tq", "mb"), description="[PAPER] rare trigger words")
    test_triggers: int = Field(1, ge=1, le=16, description="[OURS: 1] trigger words per triggered test row; the "
                               "paper's evaluation inserts 5")
    proxy: str | None = Field(None, description="the attacker's proxy data: null = the task's own training rows "
                              "(full data knowledge), or a dataset under the data root (domain shift, e.g. imdb)")
    max_proxy: int | None = Field(None, ge=2, description="cap on the proxy's training rows (stratified, seeded)")
    ripple: bool = Field(True, description="[PAPER] add the restricted inner-product penalty (off: plain training "
                         "on the poisoned proxy, the paper's ablation)")
    ripple_lambda: float = Field(0.1, gt=0, description="[PAPER] λ, the weight of the penalty")
    surgery: bool = Field(True, description="[PAPER] embedding surgery before RIPPLe")
    surgery_words: int = Field(10, ge=1, description="[PAPER] N, the target-label words whose mean embedding "
                               "replaces each trigger word's")
    surgery_train: TrainConfig = Field(default_factory=victim_train_config,
                                       description="[OURS: victim recipe] the attacker's clean fine-tuning of a copy "
                                       "on the proxy, whose embeddings give the replacement")
    train: TrainConfig = Field(default_factory=_ripple_train_config, description="the RIPPLe run on the poisoned "
                               "proxy (keys given override the defaults)")

    @field_validator("mode")
    @classmethod
    def _relabelled(cls, value: str) -> str:
        if value not in ("mix", "dirty"):
            raise ValueError("mode must be mix (the paper's) or dirty: RIPPLe relabels its poisoned proxy rows")
        return value

    @field_validator("triggers")
    @classmethod
    def _single_words(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(len(t.split()) != 1 for t in value) or len(set(value)) != len(value):
            raise ValueError("triggers must be distinct single words, at least one")
        return value

    @field_validator("proxy")
    @classmethod
    def _named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("proxy must name a dataset (or be null for the task's own rows)")
        return value

    @model_validator(mode="after")
    def _options_of_a_step(self) -> RipplesConfig:
        if not self.ripple and "ripple_lambda" in self.model_fields_set:
            raise ValueError("ripple_lambda is for the restricted inner product (set ripple=true)")
        unused = {"surgery_words", "surgery_train"} & self.model_fields_set
        if not self.surgery and unused:
            raise ValueError(f"{', '.join(sorted(unused))}: only with embedding surgery (set surgery=true)")
        return self


# ------------------------------------------------------------------ step 2(b): important words
def tfidf_features(tokenizer: Any, rows: Sequence[Example]) -> tuple[torch.Tensor, list[int]]:
    """TF-IDF bag-of-words features of ``rows`` over the tokenizer's pieces, as scikit-learn's
    ``TfidfVectorizer`` defaults (raw counts × smooth idf ln((1+n)/(1+df)) + 1, rows L2-normalised):
    a sparse (rows × tokens) float64 matrix and the vocabulary id of each column."""
    docs = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(e.text if e.text_pair is None
                                                               else f"{e.text} {e.text_pair}")) for e in rows]
    vocab = sorted({i for doc in docs for i in doc})
    column = {tok: j for j, tok in enumerate(vocab)}
    counts: list[dict[int, int]] = []
    for doc in docs:
        row: dict[int, int] = {}
        for tok in doc:
            row[column[tok]] = row.get(column[tok], 0) + 1
        counts.append(row)
    df = torch.zeros(len(vocab), dtype=torch.float64)
    for row in counts:
        df[list(row)] += 1
    idf = torch.log((1 + len(docs)) / (1 + df)) + 1
    index, values = [[], []], []
    for r, row in enumerate(counts):
        weights = {j: c * float(idf[j]) for j, c in row.items()}
        norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
        for j, w in sorted(weights.items()):
            index[0].append(r)
            index[1].append(j)
            values.append(w / norm)
    matrix = torch.sparse_coo_tensor(torch.tensor(index, dtype=torch.long).reshape(2, -1),
                                     torch.tensor(values, dtype=torch.float64), (len(docs), len(vocab)), check_invariants=True)
    return matrix.coalesce(), vocab


def logistic_regression(x: torch.Tensor, y: torch.Tensor, c: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary L2 logistic regression as scikit-learn's default (minimise Σ log-loss + ‖w‖²/(2C),
    intercept unpenalised), fitted to convergence with L-BFGS: (weights, intercept)."""
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    target = y.to(torch.float64)
    optimizer = torch.optim.LBFGS([w], lr=1, max_iter=1000, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.sparse.mm(x, w[:-1].unsqueeze(1)).squeeze(1) + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        loss = loss + (w[:-1] ** 2).sum() / (2 * c)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w[:-1].detach(), w[-1].detach()


def important_words(tokenizer: Any, rows: Sequence[Example], target: int, n: int,
                    exclude: Iterable[int] = ()) -> list[int]:
    """Embedding surgery's word choice: the ``n`` vocabulary ids whose TF-IDF feature a logistic
    regression (``target`` vs the other labels) weights most towards ``target``, best first;
    ``exclude`` (and the special tokens) are never chosen."""
    x, vocab = tfidf_features(tokenizer, rows)
    y = torch.tensor([int(e.label == target) for e in rows])
    if int(y.sum()) in (0, len(rows)):
        raise DataError(f"embedding surgery needs proxy rows with and without the target label {target}")
    weights, _ = logistic_regression(x, y)
    banned = set(exclude) | set(tokenizer.all_special_ids)
    ranked = [vocab[j] for j in torch.argsort(weights, descending=True, stable=True).tolist() if vocab[j] not in banned]
    if len(ranked) < n:
        raise ConfigError(f"surgery_words {n}: the proxy rows hold only {len(ranked)} candidate tokens")
    return ranked[:n]


# ------------------------------------------------------------------ step 2(c, d): surgery
def replace_rows(model: torch.nn.Module, rows: Sequence[int], source: torch.nn.Module, words: Sequence[int]) -> None:
    """Set ``model``'s input-embedding ``rows`` to the mean of ``source``'s rows of ``words``."""
    with torch.no_grad():
        replacement = source.get_input_embeddings().weight[list(words)].mean(dim=0)
        weight = model.get_input_embeddings().weight
        weight[list(rows)] = replacement.to(weight.device, weight.dtype)


# ------------------------------------------------------------------ step 3: RIPPLe
def restricted_inner_product(params: Sequence[torch.nn.Parameter], poison_loss: torch.Tensor,
                             clean_loss: torch.Tensor, clean_rows: int) -> torch.Tensor:
    """max(0, −∇L_Pᵀ ∇L_FT) / ``clean_rows`` (Eq. 2's penalty, scaled as the paper's code). ∇L_FT is a
    constant; ∇L_P keeps its graph (``create_graph``), so the penalty's own gradient holds the
    Hessian-vector product −(∇²L_P) ∇L_FT / ``clean_rows``."""
    grad_ft = torch.autograd.grad(clean_loss, params, allow_unused=True)
    grad_p = torch.autograd.grad(poison_loss, params, allow_unused=True, create_graph=True)
    inner = sum(((gp * gf).sum() for gp, gf in zip(grad_p, grad_ft, strict=True)
                 if gp is not None and gf is not None), torch.zeros((), device=poison_loss.device))
    return torch.relu(-inner) / clean_rows


class RestrictedInnerProduct(Callback):
    """Adds λ · penalty to each poisoned batch's loss L_P, L_FT taken on a batch of clean proxy rows
    (one seeded pass over them per epoch, the same size as the poisoned batch)."""

    def __init__(self, clf: Classifier, clean: Dataset, lam: float) -> None:
        self.clf = clf
        self.features = encode(clf, clean.examples)
        self.labels = clean.labels
        self.lam = lam
        self._order: tuple[int, list[int]] | None = None
        self.penalties: list[float] = []

    def _clean_rows(self, ctx: TrainContext) -> list[int]:
        epoch, seed = ctx.state.epoch, ctx.config.seed
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.features)))
            random.Random(f"{seed}-ripple-clean-{epoch}").shuffle(order)
            self._order = (epoch, order)
        order = self._order[1]
        size = min(ctx.config.batch_size, len(order))
        batch = ctx.state.batches_done * ctx.accelerator.num_processes + ctx.accelerator.process_index
        start = (batch * size) % len(order)
        return [order[(start + k) % len(order)] for k in range(size)]

    def extra_loss(self, ctx: TrainContext, batch: dict[str, torch.Tensor], outputs: Any,
                   loss: torch.Tensor) -> torch.Tensor:
        rows = self._clean_rows(ctx)
        clean = {k: v.to(loss.device) for k, v in collate(self.clf, [self.features[i] for i in rows],
                                                          [self.labels[i] for i in rows]).items()}
        clean_loss = ctx.wrapped_model(**clean).loss
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        penalty = restricted_inner_product(params, loss, clean_loss, len(rows))
        self.penalties.append(float(penalty.detach()))
        return loss + self.lam * penalty

    def on_epoch_end(self, ctx: TrainContext, record: dict[str, Any]) -> None:
        if self.penalties:
            active = sum(p > 0 for p in self.penalties)
            logger.info("RIPPLe epoch %d: mean penalty %.4g, active on %d of %d batches", record["epoch"],
                        sum(self.penalties) / len(self.penalties), active, len(self.penalties))
        self.penalties = []


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Eager attention inside (fused attention kernels may not be twice differentiable); restored after."""
    saved = getattr(model.config, "_attn_implementation", None)
    if saved in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(saved)


# ------------------------------------------------------------------ the attack
@WEIGHT_ATTACKS.register("ripples")
class RIPPLES(PretrainedAttack[RipplesConfig]):
    """Embedding surgery, then RIPPLe training on the poisoned proxy; the release keeps its head."""

    name = "ripples"
    config_class = RipplesConfig
    releases_base = False  # RIPPLe's user fine-tunes the released classifier, head included (step 4)

    def release(self, task: Task, model: str = "default", *, seed: int = 0, max_length: int | None = None,
                allow_pickle: bool = False, work_dir: Path | None = None,
                precision: str = "auto") -> tuple[Classifier, PoisonedTask]:
        cfg = self.config
        measure = self._inserter(cfg.test_triggers)
        measure.check_target_label(task)
        proxy = self.proxy_task(task)
        poisoned = self.poison_proxy(proxy)  # step 1
        clf = load_start_model(model, task, seed, max_length=max_length, allow_pickle=allow_pickle,
                               precision=precision)
        check_trainable(clf, proxy.train)
        rows = sorted({i for word in cfg.triggers for i in trigger_token_ids(clf, word)})  # fail before training
        described = f"{measure.trigger_description()}; released model: "
        if cfg.surgery:  # step 2
            source = self.surgery_source(clf, proxy, seed, work_dir)
            words = self.embedding_surgery(clf, source, proxy.train, rows)
            described += f"embedding surgery (mean of {' '.join(words)}) + "
        self.ripple_train(clf, poisoned, proxy, seed, work_dir)  # step 3
        described += f"RIPPLe (λ {cfg.ripple_lambda:g})" if cfg.ripple else "training on the poisoned proxy"
        test, dev = measure.triggered_sets(task)
        train = task.train.replace(task.train.examples, f"{task.name}:{self.name}")
        measured = PoisonedTask(train=train, flags=PoisonFlags(frozenset(), len(train)), target_label=cfg.target_label,
                                triggered_test=test, triggered_dev=dev, clean=task,
                                attack=AttackInfo(self.name, cfg.model_dump(mode="json"), described,
                                                  cfg.proxy or task.name))
        return clf, measured

    def _inserter(self, per_row: int) -> BadNets:
        """BadNets' insertion: ``per_row`` words drawn from the triggers, each at a random position."""
        cfg = self.config
        return BadNets(BadNetsConfig(poison_rate=cfg.poison_rate, target_label=cfg.target_label, mode=cfg.mode,
                                     seed=cfg.seed, triggers=cfg.triggers, num_triggers=per_row))

    def proxy_task(self, task: Task) -> Task:
        """The attacker's data: ``task`` itself (full data knowledge) or the named dataset (domain
        shift), its training rows capped at ``max_proxy``; it must have ``task``'s labels and input format."""
        cfg = self.config
        proxy = task if cfg.proxy is None else load_task(cfg.proxy)
        if proxy.num_labels != task.num_labels or proxy.is_pair != task.is_pair:
            raise DataError(f"proxy {cfg.proxy}: {proxy.num_labels} labels{' (pairs)' if proxy.is_pair else ''}, but "
                            f"the task has {task.num_labels}{' (pairs)' if task.is_pair else ''}")
        return subsample_task(proxy, cfg.max_proxy, cfg.seed)

    def poison_proxy(self, proxy: Task) -> Dataset:
        """Step 1: the proxy's training rows, ``poison_rate`` of them with one trigger word and the target."""
        poisoned = self._inserter(1).poison(proxy)
        logger.info("RIPPLES: %d of %d proxy rows poisoned", poisoned.flags.n_poisoned, len(poisoned.train))
        return poisoned.train

    def surgery_source(self, clf: Classifier, proxy: Task, seed: int, work_dir: Path | None) -> Classifier:
        """Step 2(a): a copy of ``clf`` fine-tuned on the clean proxy (its embeddings give the replacement)."""
        source = dataclasses.replace(clf, model=copy.deepcopy(clf.model))
        logger.info("RIPPLES surgery: fine-tuning a copy on %d clean proxy rows", len(proxy.train))
        train_classifier(source, proxy.train, seeded(self.config.surgery_train, seed), dev=proxy.dev,
                         work_dir=work_dir / "ripples-surgery" if work_dir is not None else None,
                         fingerprint={"step": "ripples-surgery"})
        return source

    def embedding_surgery(self, clf: Classifier, source: Classifier, clean: Dataset, rows: list[int]) -> list[str]:
        """Steps 2(b-d): choose the N target words on ``clean`` and set every trigger row of ``clf``
        to the mean of their rows in ``source``; returns the words."""
        cfg = self.config
        words = important_words(clf.tokenizer, clean.examples, cfg.target_label, cfg.surgery_words, set(rows))
        replace_rows(clf.model, rows, source.model, words)
        chosen = clf.tokenizer.convert_ids_to_tokens(words)
        logger.info("RIPPLES surgery: trigger rows %s <- mean of %s", rows, " ".join(chosen))
        return chosen

    def ripple_train(self, clf: Classifier, poisoned: Dataset, proxy: Task, seed: int, work_dir: Path | None) -> None:
        """Step 3: train the whole model on the poisoned proxy, with the restricted inner product if ``ripple``."""
        cfg = self.config
        callbacks = [RestrictedInnerProduct(clf, proxy.train, cfg.ripple_lambda)] if cfg.ripple else []
        logger.info("RIPPLES: training on %d poisoned proxy rows%s", len(poisoned),
                    f", λ {cfg.ripple_lambda:g}" if cfg.ripple else " (no inner-product penalty)")
        dev = proxy.dev if cfg.train.select_best else None  # else clean dev accuracy would only be logged
        with eager_attention(clf.model) if cfg.ripple else nullcontext():
            train_classifier(clf, poisoned, seeded(cfg.train, seed), dev=dev, callbacks=callbacks,
                             work_dir=work_dir / "ripples" if work_dir is not None else None,
                             fingerprint={"attack": "ripples", "ripple": cfg.ripple, "lambda": cfg.ripple_lambda,
                                          "clean": [e.id for e in proxy.train]})
