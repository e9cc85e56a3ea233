"""The training loop: determinism, resume after a kill, extension points, clean-only selection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic import make_task

from unbackdoor.attacks import BadNets
from unbackdoor.errors import DataError
from unbackdoor.models import load_classifier
from unbackdoor.training import Callback, TrainConfig, train_classifier
from unbackdoor.training.batching import epoch_batches, shard

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
FAST = TrainConfig(epochs=3, batch_size=16, learning_rate=1e-3, progress=False)


def _weights(clf) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {k: v.detach().clone() for k, v in clf.model.state_dict().items()}


def test_same_seed_same_weights(tiny_bert: Path) -> None:
    task = make_task(160, 40, 40)
    runs = []
    for _ in range(2):
        clf = load_classifier(tiny_bert)
        result = train_classifier(clf, task.train, FAST, dev=task.dev)
        runs.append((_weights(clf), result.history))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])


def test_different_seed_differs(tiny_bert: Path) -> None:
    task = make_task(160, 40, 40)
    a, b = load_classifier(tiny_bert), load_classifier(tiny_bert)
    train_classifier(a, task.train, FAST, dev=task.dev)
    train_classifier(b, task.train, FAST.model_copy(update={"seed": 1}), dev=task.dev)
    assert not torch.equal(a.model.classifier.weight, b.model.classifier.weight)


def test_batches_are_seeded_grouped_and_sharded() -> None:
    lengths = [i % 37 for i in range(1000)]
    a = epoch_batches(lengths, 16, seed=0, epoch=0, group_by_length=True)
    assert a == epoch_batches(lengths, 16, seed=0, epoch=0, group_by_length=True)
    assert a != epoch_batches(lengths, 16, seed=0, epoch=1, group_by_length=True)
    assert sorted(i for b in a for i in b) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 3  # grouped: rows of a batch have similar lengths
    shards = [shard(a, r, 2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == -(-len(a) // 2)
    assert {i for s in shards for b in s for i in b} == set(range(1000))


def test_selection_uses_clean_dev_accuracy(tiny_bert: Path) -> None:
    task = make_task(160, 40, 40)
    clf = load_classifier(tiny_bert)
    result = train_classifier(clf, task.train, FAST, dev=task.dev)
    scores = [h["dev_accuracy"] for h in result.history]
    assert result.best_epoch == scores.index(max(scores))
    assert result.best_dev_accuracy == max(scores)


def test_selection_refuses_triggered_data(tiny_bert: Path) -> None:
    """Rule 1: checkpoint selection takes clean data only; a triggered set is a type error."""
    task = make_task(160, 40, 40)
    poisoned = BadNets().poison(task)
    clf = load_classifier(tiny_bert)
    with pytest.raises(TypeError, match="evaluation only"):
        train_classifier(clf, poisoned.train, FAST, dev=poisoned.triggered_dev)
    with pytest.raises(TypeError, match="evaluation only"):
        train_classifier(clf, poisoned, FAST)


def test_label_mismatch(tiny_bert: Path) -> None:
    from unbackdoor.data import Dataset, Example

    three = Dataset(tuple(Example(f"r{i}", "good movie", i % 3) for i in range(9)), 3)
    with pytest.raises(DataError, match="3 labels but the model has 2"):
        train_classifier(load_classifier(tiny_bert), three, FAST)


class _Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_train_begin(self, ctx) -> None:  # noqa: ANN001
        self.events.append("begin")

    def extra_loss(self, ctx, batch, outputs, loss):  # noqa: ANN001, ANN201
        self.events.append("loss")
        return loss

    def on_gradients(self, ctx, batch) -> None:  # noqa: ANN001
        self.events.append("grad")

    def on_step_end(self, ctx) -> None:  # noqa: ANN001
        self.events.append("step")

    def on_epoch_end(self, ctx, record) -> None:  # noqa: ANN001
        self.events.append("epoch")


def test_hooks_run_in_order_with_accumulation(tiny_bert: Path) -> None:
    task = make_task(64, 20, 20)
    rec = _Recorder()
    config = FAST.model_copy(update={"epochs": 1, "gradient_accumulation_steps": 2})
    result = train_classifier(load_classifier(tiny_bert), task.train, config, callbacks=[rec])
    assert rec.events[0] == "begin" and rec.events[-1] == "epoch"
    assert rec.events.count("loss") == 4 and rec.events.count("step") == 2 == result.steps
    assert rec.events[1:-1] == ["loss", "loss", "grad", "step"] * 2


class _FreezeHead(Callback):
    """A gradient rewrite: zero the head's gradients (a parameter mask)."""

    def on_gradients(self, ctx, batch) -> None:  # noqa: ANN001
        for p in ctx.model.classifier.parameters():
            p.grad = torch.zeros_like(p)


class _Ascent(Callback):
    """An extra loss term: gradient ascent (negated loss)."""

    def extra_loss(self, ctx, batch, outputs, loss):  # noqa: ANN001, ANN201
        return -loss


def test_gradient_hook_and_extra_loss_take_effect(tiny_bert: Path) -> None:
    task = make_task(160, 40, 40)
    clf = load_classifier(tiny_bert)
    head = clf.model.classifier.weight.detach().clone()
    config = FAST.model_copy(update={"weight_decay": 0.0})
    train_classifier(clf, task.train, config, callbacks=[_FreezeHead()])
    assert torch.equal(clf.model.classifier.weight, head)

    up = load_classifier(tiny_bert)
    result = train_classifier(up, task.train, config, dev=task.dev, callbacks=[_Ascent()])
    assert result.history[-1]["train_loss"] > result.history[0]["train_loss"]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_resume_after_kill_gives_the_same_result(tmp_path: Path, tiny_bert: Path) -> None:
    straight = _run([str(tiny_bert), str(tmp_path / "w1"), str(tmp_path / "straight.json")])
    assert straight.returncode == 0, straight.stderr

    killed = _run([str(tiny_bert), str(tmp_path / "w2"), str(tmp_path / "resumed.json"), "--kill-at-step", "26"])
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "resumed.json").exists()
    state = json.loads((tmp_path / "w2" / "checkpoint" / "state.json").read_text())
    assert 0 < state["global_step"] < 26 + 1 and state["history"], state

    resumed = _run([str(tiny_bert), str(tmp_path / "w2"), str(tmp_path / "resumed.json")])
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "straight.json").read_text())
    b = json.loads((tmp_path / "resumed.json").read_text())
    assert b["resumed_from_step"] == state["global_step"]
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["history"] == b["history"] and a["cacc"] == b["cacc"] and a["best_epoch"] == b["best_epoch"]


def test_a_checkpoint_resumes_only_its_own_run(tmp_path: Path, tiny_bert: Path) -> None:
    from unbackdoor.errors import ConfigError

    task = make_task(64, 20, 20)
    config = FAST.model_copy(update={"epochs": 1})
    train_classifier(load_classifier(tiny_bert), task.train, config, work_dir=tmp_path)
    assert (tmp_path / "checkpoint" / "state.json").exists()
    with pytest.raises(ConfigError, match="other data or settings"):
        train_classifier(load_classifier(tiny_bert), task.train, config.model_copy(update={"learning_rate": 1e-4}),
                         work_dir=tmp_path)


def test_two_process_run_with_torchrun(tmp_path: Path, tiny_bert: Path) -> None:
    """A world of 2 (gloo on CPU): trains, keeps replicas in sync, evaluates correctly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(SCRIPT), str(tiny_bert), str(tmp_path / "w"), str(tmp_path / "ddp.json"), "--epochs", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"ddp.json.rank{r}").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # gradients were all-reduced
    assert ranks[0]["cacc"] == ranks[1]["cacc"] >= 0.9
    batches_per_epoch = 320 // 16
    assert ranks[0]["steps"] == 8 * batches_per_epoch // 2  # each process took half of the batches
