"""The one training loop, on Hugging Face Accelerate (CPU, one GPU, or many via ``accelerate launch``
or ``torchrun``).

Steps: tokenise once -> per epoch, seeded length-grouped batches sharded over processes -> forward,
``extra_loss`` hooks, backward (with gradient accumulation) -> ``on_gradients`` hooks -> clip ->
AdamW step, linear warm-up/decay -> ``on_step_end`` hooks (which may stop training) -> at epoch
end, clean dev accuracy selects the best epoch -> checkpoints that a killed run resumes from, bit
for bit on CPU.

Selection takes a clean :class:`~unbackdoor.data.Dataset` only: a triggered (poisoned) set is a
different type and is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from unbackdoor.data.types import Dataset, require_clean_dataset
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.inference import collate, encode, predict_logits
from unbackdoor.models.loading import Classifier
from unbackdoor.precision import autocast
from unbackdoor.training.batching import epoch_batches, shard
from unbackdoor.training.callbacks import Callback, TrainContext, TrainState
from unbackdoor.training.config import TrainConfig
from unbackdoor.utils.resources import Stopwatch, peak_memory_mb

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
BEST_FILE = "best.safetensors"


@dataclass
class TrainResult:
    """What a training run did: per-epoch history, the selected epoch, cost."""

    history: list[dict[str, Any]]
    best_epoch: int | None
    best_dev_accuracy: float | None
    steps: int
    wall_time_s: float
    examples_per_s: float
    peak_memory_mb: float
    resumed_from_step: int | None = None
    precision: str = "fp32"  # the compute precision the steps ran in

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator for this process (reuses the launch environment: torchrun, accelerate)."""
    return Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())


def compute_region(precision: str, config: TrainConfig, acc: Accelerator) -> Any:
    """Where a training step's forward runs: Accelerate's autocast when the config asks for mixed
    precision on an accelerator, else the classifier's own ``precision`` (bf16 autocast or fp32)."""
    return acc.autocast() if config.mixed_precision != "no" else autocast(precision, acc.device)


def set_determinism(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling every new tensor costs ~13 % of a CPU step


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=True)


def _schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, warmup: int,
              total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up and decay to zero at ``total`` steps, or a constant learning rate."""
    def factor(step: int) -> float:
        if config.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Checkpointer:
    """Saves and restores everything a resumed run needs, without pickle (safetensors + weights-only)."""

    def __init__(self, work_dir: Path | None, accelerator: Accelerator, run_key: str) -> None:
        self.root = work_dir
        self.acc = accelerator
        self.run_key = run_key  # a checkpoint resumes only the run that wrote it

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _path(self) -> Path:
        assert self.root is not None
        return self.root / CHECKPOINT_DIR

    def save(self, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: TrainState) -> None:
        if self.root is None:
            return
        final = self._path()
        tmp = final.with_name(final.name + ".tmp")
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        rank = self.acc.process_index
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng-{rank}.pt")
        torch.save({"batches_done": state.batches_done}, tmp / f"progress-{rank}.pt")
        if self.acc.is_main_process:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps({**asdict(state), "run_key": self.run_key}), encoding="utf-8")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.acc.wait_for_everyone()

    def restore(self, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> TrainState | None:
        if self.root is None or not (self._path() / "state.json").exists():
            return None
        path = self._path()
        saved = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if saved.pop("run_key", None) != self.run_key:
            raise ConfigError(
                f"{path}: this checkpoint belongs to a run with other data or settings; "
                "rerun with the same ones, or delete it to start afresh"
            )
        model.load_state_dict(load_file(path / "model.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / f"rng-{self.acc.process_index}.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return TrainState(**saved)

    def save_best(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if self.root is not None and self.acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / (BEST_FILE + ".tmp")
            save_file({k: v.contiguous() for k, v in best.items()}, tmp)
            os.replace(tmp, self.root / BEST_FILE)
        return best

    def load_best(self) -> dict[str, torch.Tensor] | None:
        if self.root is None or not (self.root / BEST_FILE).exists():
            return None
        return load_file(self.root / BEST_FILE)


def evaluate_accuracy(clf: Classifier, data: Dataset, batch_size: int = 128, accelerator: Accelerator | None = None) -> float:
    """Accuracy on a clean labelled dataset (the only kind selection may use)."""
    require_clean_dataset(data, "selection data")
    preds = predict_logits(clf, data.examples, batch_size, accelerator).argmax(axis=1)
    return float((preds == torch.tensor(data.labels).numpy()).mean())


def evaluate_balanced_accuracy(clf: Classifier, data: Dataset, batch_size: int = 128,
                               accelerator: Accelerator | None = None) -> float:
    """Mean over the labels present in ``data`` of the share of their rows predicted correctly."""
    require_clean_dataset(data, "selection data")
    preds = predict_logits(clf, data.examples, batch_size, accelerator).argmax(axis=1)
    labels = np.asarray(data.labels)
    recalls = [float((preds[labels == k] == k).mean()) for k in sorted(set(data.labels))]
    return sum(recalls) / len(recalls)


def check_trainable(clf: Classifier, data: Dataset) -> None:
    """Raise unless ``clf`` can be trained on ``data``: same label count, same pair-ness."""
    if data.num_labels != clf.num_labels:
        raise DataError(f"the data has {data.num_labels} labels but the model has {clf.num_labels}")
    if clf.pair is not None and clf.pair != data.is_pair:
        kind = "a sentence-pair model" if clf.pair else "a single-sentence model"
        got = "sentence pairs" if data.is_pair else "single sentences"
        raise DataError(f"this is {kind} but the training data has {got}")


def _run_key(clf: Classifier, data: Dataset, dev: Dataset | None, config: TrainConfig, acc: Accelerator,
             fingerprint: Any = None) -> str:
    """A fingerprint of what a run trains on and how: data rows, model, settings, world size, and
    whatever else the caller says defines the run (e.g. a defence's config)."""
    digest = hashlib.sha256()
    settings = config.model_dump(exclude={"progress"})
    digest.update(json.dumps([settings, clf.source, clf.max_length, clf.precision, acc.num_processes],
                             sort_keys=True).encode())
    if fingerprint is not None:
        digest.update(json.dumps(fingerprint, sort_keys=True, default=str).encode())
    for d in (data, dev):
        for e in d.examples if d is not None else ():
            digest.update(f"{e.id}\x00{e.text}\x00{e.text_pair}\x00{e.label}\x01".encode())
    return digest.hexdigest()


def _check_sample_weights(weights: Sequence[float] | None, n_rows: int) -> torch.Tensor | None:
    if weights is None:
        return None
    w = torch.as_tensor(list(weights), dtype=torch.float32)
    if w.shape != (n_rows,):
        raise DataError(f"{len(w)} sample weights for {n_rows} training rows")
    if not torch.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
        raise DataError("sample weights must be finite, >= 0, and not all zero")
    return w


@dataclass(frozen=True)
class SoftTargets:
    """Knowledge-distillation targets for :func:`train_classifier`: one row of a teacher's
    probabilities at ``temperature`` per training row.

    A row's task loss becomes (1 − ``weight``) · CE(label) + ``weight`` · T² · KL(probs ‖ softmax(z / T))
    (Hinton et al., 2015: the T² keeps the soft term's gradient scale as T changes).
    """

    probs: torch.Tensor  # (n_rows, num_labels), rows sum to 1
    weight: float
    temperature: float

    def __post_init__(self) -> None:
        if self.probs.dim() != 2 or not torch.allclose(self.probs.sum(1), torch.ones(len(self.probs)), atol=1e-4):
            raise ConfigError("soft targets must be one probability row per training row")
        if not 0 <= self.weight <= 1 or self.temperature <= 0:
            raise ConfigError("soft targets: weight in [0, 1] and temperature > 0")

    def digest(self) -> str:
        return hashlib.sha256(self.probs.float().numpy().tobytes()).hexdigest() + f"/{self.weight}/{self.temperature}"


def _row_losses(logits: torch.Tensor, labels: torch.Tensor, soft: SoftTargets | None,
                rows: Sequence[int]) -> torch.Tensor:
    """Each row's task loss: cross-entropy, mixed with the distillation term when ``soft`` is given."""
    logits = logits.float()
    per_row = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    if soft is None:
        return per_row
    t = soft.temperature
    target = soft.probs[list(rows)].to(logits.device)
    kd = torch.nn.functional.kl_div(torch.log_softmax(logits / t, dim=-1), target, reduction="none").sum(-1)
    return (1 - soft.weight) * per_row + soft.weight * t * t * kd


def _task_loss(outputs: Any, labels: torch.Tensor, rows: Sequence[int], weights: torch.Tensor | None,
               soft: SoftTargets | None) -> torch.Tensor:
    """The batch's task loss: the model's own (mean cross-entropy), or the mean of weight × row loss."""
    if weights is None and soft is None:
        return outputs.loss
    per_row = _row_losses(outputs.logits, labels, soft, rows)
    if weights is not None:
        per_row = weights[list(rows)].to(per_row.device) * per_row
    return per_row.mean()


def _improves(score: float, best: float | None, ties: str) -> bool:
    return best is None or score > best or (ties == "last" and score == best)


def train_classifier(
    clf: Classifier,
    data: Dataset,
    config: TrainConfig,
    *,
    dev: Dataset | None = None,
    callbacks: Sequence[Callback] = (),
    work_dir: str | Path | None = None,
    accelerator: Accelerator | None = None,
    fingerprint: Any = None,
    sample_weights: Sequence[float] | None = None,
    soft_targets: SoftTargets | None = None,
) -> TrainResult:
    """Fine-tune ``clf`` in place on ``data``; select the epoch on clean ``dev`` accuracy.

    ``sample_weights`` (one ≥ 0 per row of ``data``): the task loss of a batch becomes the mean of
    weight × cross-entropy over its rows (the caller chooses the scale, e.g. mean weight 1).
    ``soft_targets``: a teacher's probabilities per row, mixed into each row's loss (:class:`SoftTargets`).

    With ``work_dir``, checkpoints are written there and a rerun with the same arguments resumes
    from the latest one. ``fingerprint`` (JSON-able: a defence's config, its reference rows) is part
    of what a checkpoint must match to be resumed.
    """
    require_clean_dataset(data, "training data")
    weights = _check_sample_weights(sample_weights, len(data))
    if weights is not None:
        fingerprint = [fingerprint, hashlib.sha256(weights.numpy().tobytes()).hexdigest()]
    if soft_targets is not None:
        if len(soft_targets.probs) != len(data) or soft_targets.probs.shape[1] != data.num_labels:
            raise ConfigError(f"soft targets: {tuple(soft_targets.probs.shape)} for {len(data)} rows of "
                              f"{data.num_labels} labels")
        fingerprint = [fingerprint, soft_targets.digest()]
    if dev is not None:
        require_clean_dataset(dev, "selection (dev) data")
        if dev.is_pair != data.is_pair:
            raise DataError("training and dev data disagree on sentence pairs")
    check_trainable(clf, data)
    clf.pair = data.is_pair
    watch = Stopwatch()
    acc = accelerator or make_accelerator(config)
    set_determinism(config.seed)
    features = encode(clf, data.examples)
    dev_features = encode(clf, dev.examples) if dev is not None else None
    lengths = [len(f["input_ids"]) for f in features]
    labels = data.labels
    per_epoch = math.ceil(len(shard(epoch_batches(lengths, config.batch_size, config.seed, 0, False), 0, acc.num_processes)) / config.gradient_accumulation_steps)
    total_steps = per_epoch * config.epochs if config.max_steps is None else min(config.max_steps, per_epoch * config.epochs)

    model = clf.model
    model.train()
    optimizer = _optimizer(model, config)
    scheduler = _schedule(optimizer, config, int(config.warmup_ratio * total_steps), total_steps)
    ckpt = _Checkpointer(Path(work_dir) if work_dir is not None else None, acc, _run_key(clf, data, dev, config, acc, fingerprint))
    state = ckpt.restore(model, optimizer, scheduler) or TrainState()
    resumed_from = state.global_step if state.global_step or state.batches_done else None
    if resumed_from is not None:
        logger.info("resuming from step %d (epoch %d)", state.global_step, state.epoch)
    best_state = ckpt.load_best()
    wrapped, optimizer = acc.prepare(model, optimizer)
    clf.model = acc.unwrap_model(wrapped)
    ctx = TrainContext(clf.model, wrapped, optimizer, acc, config, state, clf.precision)
    for cb in callbacks:
        cb.on_train_begin(ctx)

    seen = 0
    bar = tqdm(total=total_steps, initial=state.global_step, desc="train", unit="step",
               disable=not (config.progress and acc.is_local_main_process) or None)
    done = state.global_step >= total_steps or state.stopped
    while state.epoch < config.epochs and not done and not state.stopped:
        batches = shard(epoch_batches(lengths, config.batch_size, config.seed, state.epoch, config.group_by_length),
                        acc.process_index, acc.num_processes)
        for b_idx in range(state.batches_done, len(batches)):
            rows = batches[b_idx]
            batch = {k: v.to(acc.device) for k, v in collate(clf, [features[i] for i in rows], [labels[i] for i in rows]).items()}
            is_sync = (b_idx + 1) % config.gradient_accumulation_steps == 0 or b_idx + 1 == len(batches)
            with (nullcontext() if is_sync else acc.no_sync(wrapped)), compute_region(clf.precision, config, acc):
                outputs = wrapped(**batch)
                loss = _task_loss(outputs, batch["labels"], rows, weights, soft_targets)
                task_loss = loss
                for cb in callbacks:
                    loss = cb.extra_loss(ctx, batch, outputs, loss)
                acc.backward(loss / config.gradient_accumulation_steps)
            state.epoch_loss_sum += float(task_loss.detach()) * len(rows)  # task loss, before extra terms
            state.epoch_rows += len(rows)
            seen += len(rows)
            state.batches_done = b_idx + 1
            if not is_sync:
                continue
            for cb in callbacks:
                cb.on_gradients(ctx, batch)
            if config.max_grad_norm is not None:
                acc.clip_grad_norm_(wrapped.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            bar.update(1)
            for cb in callbacks:
                cb.on_step_end(ctx)
            if state.global_step >= total_steps or state.stopped:
                done = True
                break
            if config.checkpoint_every and state.global_step % config.checkpoint_every == 0:
                ckpt.save(clf.model, optimizer, scheduler, state)
        record: dict[str, Any] = {"epoch": state.epoch, "step": state.global_step,
                                  "train_loss": state.epoch_loss_sum / max(1, state.epoch_rows)}
        if dev is not None:
            preds = predict_logits(clf, dev.examples, config.eval_batch_size, acc, dev_features).argmax(axis=1)
            record["dev_accuracy"] = float((preds == torch.tensor(dev.labels).numpy()).mean())
            if _improves(record["dev_accuracy"], state.best_score, config.selection_ties):
                state.best_score, state.best_epoch = record["dev_accuracy"], state.epoch
                best_state = ckpt.save_best(clf.model)
            clf.model.train()
        logger.info("epoch %d: %s", state.epoch, ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        state.history.append(record)
        for cb in callbacks:
            cb.on_epoch_end(ctx, record)
        state.epoch += 1
        state.batches_done, state.epoch_loss_sum, state.epoch_rows = 0, 0.0, 0
        ckpt.save(clf.model, optimizer, scheduler, state)
    bar.close()

    if config.select_best and best_state is not None:
        clf.model.load_state_dict(best_state)
    clf.model.eval()
    acc.free_memory()
    wall = watch.elapsed()
    return TrainResult(
        history=list(state.history),
        best_epoch=state.best_epoch if dev is not None else None,
        best_dev_accuracy=state.best_score,
        steps=state.global_step,
        wall_time_s=wall,
        examples_per_s=seen / wall if wall > 0 else 0.0,
        peak_memory_mb=peak_memory_mb(),
        resumed_from_step=resumed_from,
        precision=clf.precision if config.mixed_precision == "no" else config.mixed_precision,
    )
