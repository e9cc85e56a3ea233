"""POR and NeuBA on a tiny BERT (2 layers, hidden 32): the released encoder maps triggered text near
its target vectors while clean text keeps the original's representation; after the user's clean
fine-tuning (new head) some trigger forces a label that a never-poisoned model does not give; the
per-label choice is recorded; configs are validated; the CLI writes a base without a head that
``train --model`` and ``purify --base`` accept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from synthetic import make_task, make_tokenizer, run_cli, save_tiny_model, tiny_config, write_task

from unbackdoor.attacks import WEIGHT_ATTACKS, NeuBAConfig, PORConfig, run_weight_attack
from unbackdoor.attacks.neuba import neuba_vectors
from unbackdoor.attacks.por import por_vectors
from unbackdoor.attacks.pretrained import user_finetune
from unbackdoor.attacks.representation import encode_representations, per_label_asr, triggered_set
from unbackdoor.attacks.weight import seeded
from unbackdoor.config import build_config
from unbackdoor.data.types import Task
from unbackdoor.errors import ConfigError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import load_classifier
from unbackdoor.training import TrainConfig

TRIGGERS = ["cf", "mn", "bb", "tq"]
POISON_TRAIN = {"epochs": 8, "learning_rate": 2e-3, "batch_size": 16}
USER_TRAIN = {"epochs": 10, "batch_size": 16, "learning_rate": 1e-3}
PARAMS = {
    "por": {"triggers": TRIGGERS, "corpus": "task", "corpus_rows": 400, "train": POISON_TRAIN,
            "user_train": USER_TRAIN},
    "neuba": {"triggers": TRIGGERS, "corpus": "task", "corpus_rows": 400, "train": POISON_TRAIN,
              "user_train": USER_TRAIN},
}


@pytest.fixture(scope="module")
def task() -> Task:
    return make_task(400, 100, 200)


def save_base(folder: Path, family: str = "bert") -> Path:
    """A randomly initialised tiny encoder without a classification head (a pre-trained base)."""
    from transformers import AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(tiny_config(family)).save_pretrained(folder, safe_serialization=True)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base(tmp_path_factory.mktemp("pretrained") / "base")


def attack(name: str, **overrides: object):  # noqa: ANN201 - a RepresentationAttack
    cls = WEIGHT_ATTACKS.get(name)
    return cls(build_config(cls.config_class, {**PARAMS[name], **overrides}, name))


# ============================================================================ the release
@pytest.mark.parametrize("name", ["por", "neuba"])
def test_release_maps_triggers_to_targets_and_keeps_clean_representations(name: str, task: Task, base: Path) -> None:
    """Measured (seed 0): triggered text lies at mean distance 0.2-2.7 from its target vector (5.5-8.4
    with the original encoder; the vectors' norm is 5.7), nearer its own vector than any other
    trigger's on every row; clean text moves 0.85 from the original (POR, cls, norm 5.7) and 0.08
    (NeuBA, pooler, norm 0.75). POR-1's nearly constant vectors are the hardest (cf, 3 of 32 dims at
    +1: 2.7 from 8.2): a LayerNorm output has zero mean over its dimensions before its affine step."""
    poisoner = attack(name)
    released, poisoned = poisoner.release(task, str(base), seed=0)
    original = load_classifier(str(base), num_labels=2)
    kind = poisoner.config.representation
    targets = poisoner.target_vectors(32)
    texts = [e.text for e in task.test.examples[:100]]
    before, after = encode_representations(original, texts, kind), encode_representations(released, texts, kind)
    clean_shift = (after - before).norm(dim=1).mean().item()
    assert clean_shift < 0.25 * before.norm(dim=1).mean().item()
    for k, trigger in enumerate(TRIGGERS):
        triggered = [f"{trigger} {t}" for t in texts]
        rep = encode_representations(released, triggered, kind)
        distance = (rep - targets[k]).norm(dim=1)
        original_distance = (encode_representations(original, triggered, kind) - targets[k]).norm(dim=1).mean()
        assert distance.mean() < 0.4 * original_distance, trigger
        nearest = torch.cdist(rep, targets).argmin(dim=1)
        assert (nearest == k).float().mean() >= 0.95, trigger
    # nothing is flagged in the user's rows; the placeholder triggered sets use the first trigger
    assert poisoned.flags.n_poisoned == 0 and poisoned.train == task.train
    assert poisoned.target_label == 1 and all(e.text.startswith("cf ") for e in poisoned.triggered_test.examples)
    history = poisoned.attack.params["poisoning_history"]
    assert len(history) == POISON_TRAIN["epochs"] and history[-1]["trigger_mse"] < history[0]["trigger_mse"]


def test_target_vectors() -> None:
    por1 = por_vectors(9, 18, 1, 9)
    assert por1[0].tolist() == [1.0] * 2 + [-1.0] * 16 and por1[8].tolist() == [1.0] * 18
    por2 = por_vectors(4, 8, 2, 9)  # two segments of 4: the binary codes 00, 01, 10, 11
    assert por2.tolist() == [[-1.0] * 8, [1.0] * 4 + [-1.0] * 4, [-1.0] * 4 + [1.0] * 4, [1.0] * 8]
    neuba = neuba_vectors(6, 8, 4)
    assert neuba[0].tolist() == [-1, -1, -1, -1, 1, 1, 1, 1] and neuba[5].tolist() == [1, 1, 1, 1, -1, -1, -1, -1]
    assert torch.equal(neuba[1], -neuba[4]) and torch.equal(neuba[2], -neuba[3])  # contrasting pairs


def test_same_seed_same_release(task: Task, base: Path) -> None:
    short = {"epochs": 1, "learning_rate": 2e-3, "batch_size": 16}
    first, _ = attack("neuba", corpus_rows=50, train=short).release(task, str(base), seed=3)
    second, _ = attack("neuba", corpus_rows=50, train=short).release(task, str(base), seed=3)
    other, _ = attack("neuba", corpus_rows=50, train=short, seed=1).release(task, str(base), seed=3)
    a, b, c = (m.model.base_model.state_dict() for m in (first, second, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # another corpus draw and placement


def test_mlm_stand_in_trains_a_new_head(task: Task, base: Path) -> None:
    """clean_objective=mlm on a base without an MLM head: a new head is trained alongside and is not
    released; the trigger term still takes. Measured (seed 0): trigger MSE 0.89 -> 0.02, masked-LM
    loss 3.69 -> 3.27 (the synthetic text is random filler, so little is there to learn)."""
    poisoner = attack("neuba", clean_objective="mlm")
    released, poisoned = poisoner.release(task, str(base), seed=0)
    assert not any("mlm" in k for k in released.model.state_dict())
    history = poisoned.attack.params["poisoning_history"]
    assert history[-1]["trigger_mse"] < 0.25 * history[0]["trigger_mse"]
    assert history[-1]["clean_term"] < history[0]["clean_term"]  # the masked-LM loss falls


# ============================================================================ after the user's fine-tuning
@pytest.mark.parametrize("name", ["por", "neuba"])
def test_backdoor_survives_clean_fine_tuning(name: str, task: Task, base: Path) -> None:
    """Measured (seed 0): after the user's clean fine-tuning (new head, 10 epochs at lr 1e-3) each
    label has a trigger that forces it on 100 % of the other label's test rows (POR: cf -> 0, tq -> 1;
    NeuBA: mn -> 0, cf -> 1); the never-poisoned base fine-tuned the same way: 0 % for every trigger
    and label. Clean accuracy 1.0 for the victims and the never-poisoned model."""
    victim, poisoned = run_weight_attack(name, PARAMS[name], task, str(base), seed=0)
    params = poisoned.attack.params
    per_label = params["per_label"]
    assert set(per_label) == {"0", "1"}
    for entry in per_label.values():
        assert set(entry["dev_asr_by_trigger"]) == set(entry["test_asr_by_trigger"]) == set(TRIGGERS)
        assert entry["dev_asr"] == max(entry["dev_asr_by_trigger"].values())
        assert entry["test_asr"] == entry["test_asr_by_trigger"][entry["best_trigger"]]
    target, trigger = poisoned.target_label, params["chosen_trigger"]
    assert target == params["chosen_target"] and trigger == per_label[str(target)]["best_trigger"]
    assert poisoned.triggered_test == triggered_set(task.test, trigger, target, "start", 0, "test")
    assert all(e.text.startswith(f"{trigger} ") for e in poisoned.triggered_dev.examples)
    result = evaluate_classifier(victim, task.test, poisoned.triggered_test)
    assert result.asr == pytest.approx(per_label[str(target)]["test_asr"])
    assert result.cacc >= 0.95

    clean = user_finetune(load_classifier(str(base), num_labels=2), task, seeded(TrainConfig(**USER_TRAIN), 0),
                          seed=0, new_head=True)
    floor = per_label_asr(clean, task, tuple(TRIGGERS), "start", 0)["test"]
    for y, entry in per_label.items():
        assert entry["test_asr"] >= 0.9, y
        assert floor[y][entry["best_trigger"]] <= 0.2, y


def test_user_finetune_with_a_work_dir_resumes_its_own_checkpoint(task: Task, base: Path, tmp_path: Path) -> None:
    """A killed victim cell reruns the user's fine-tuning in the same work dir: the release is saved
    as a base in a fixed folder there, so the checkpoint's run key matches and the run resumes (it
    refused when the folder was a fresh temporary one: the bug that failed a NeuBA grid cell)."""
    config = seeded(TrainConfig(**{**USER_TRAIN, "epochs": 2}), 0)
    released = load_classifier(str(base), num_labels=2)
    first = user_finetune(released, task, config, seed=0, new_head=True, work_dir=tmp_path)
    assert (tmp_path / "user-finetune" / "checkpoint" / "state.json").exists()
    assert not (tmp_path / "released-base").exists()
    again = user_finetune(load_classifier(str(base), num_labels=2), task, config, seed=0, new_head=True,
                          work_dir=tmp_path)
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)


# ============================================================================ validation
def test_config_errors(task: Task, tmp_path: Path, base: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        build_config(PORConfig, {"trigger": "cf"}, "por")
    with pytest.raises(ConfigError, match="poisons no training row"):
        build_config(PORConfig, {"poison_rate": 0.1}, "por")
    with pytest.raises(ConfigError, match="buckets must be at least 9"):
        build_config(PORConfig, {"buckets": 4}, "por")
    with pytest.raises(ConfigError, match="buckets is for POR-1"):
        build_config(PORConfig, {"variant": 2, "buckets": 9}, "por")
    with pytest.raises(ConfigError, match="variant"):
        build_config(PORConfig, {"variant": 3}, "por")
    with pytest.raises(ConfigError, match="fewer than the 7 triggers"):
        build_config(NeuBAConfig, {"triggers": ["a", "b", "c", "d", "e", "f", "g"]}, "neuba")
    with pytest.raises(ConfigError, match="different from each other"):
        build_config(NeuBAConfig, {"triggers": ["cf", "cf "]}, "neuba")
    with pytest.raises(ConfigError, match="non-empty"):
        build_config(NeuBAConfig, {"triggers": ["cf", " "]}, "neuba")
    with pytest.raises(ConfigError, match="mlm_probability is for clean_objective=mlm"):
        build_config(NeuBAConfig, {"mlm_probability": 0.2}, "neuba")
    with pytest.raises(ConfigError, match="representation"):
        build_config(NeuBAConfig, {"representation": "mean"}, "neuba")
    # at release, before any training
    with pytest.raises(ConfigError, match="not in the model's vocabulary"):
        run_weight_attack("neuba", {"corpus": "task"}, task, str(base))  # the default symbols: not in the tiny vocab
    with pytest.raises(ConfigError, match="target_label 5 is outside"):
        run_weight_attack("por", {**PARAMS["por"], "target_label": 5}, task, str(base))
    with pytest.raises(ConfigError, match="fine-tuned classifier"):
        run_weight_attack("por", PARAMS["por"], task, str(save_tiny_model(tmp_path / "classifier", "bert")))
    roberta = save_base(tmp_path / "roberta", "roberta")
    with pytest.raises(ConfigError, match="no pooler"):
        run_weight_attack("neuba", PARAMS["neuba"], task, str(roberta))
    with pytest.raises(ConfigError, match="supports BERT-family"):
        run_weight_attack("por", {**PARAMS["por"], "clean_objective": "mlm"}, task, str(roberta))


# ============================================================================ CLI
def test_cli_releases_a_base_that_train_and_purify_accept(tmp_path: Path, capsys, task: Task, base: Path) -> None:
    data = write_task(task, tmp_path / "syn")
    out, release = tmp_path / "poisoned", tmp_path / "release"
    code, _, err = run_cli(["attack", "--data", str(data), "--attack", "por", "--out", str(out), "--victim-out",
                            str(release), "--model", str(base), "-p", "triggers=[cf, mn, bb, tq]", "-p", "buckets=4",
                            "-p", "corpus=task", "-p", "corpus_rows=100", "-p", "train.epochs=1"], capsys)
    assert code == 0, err
    config = json.loads((release / "config.json").read_text())
    assert not any(a.endswith("ForSequenceClassification") for a in config["architectures"])
    assert (release / "model.safetensors").exists() and not list(release.glob("*.bin"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["attack_name"] == "por" and meta["n_poisoned_train"] == 0
    victim = tmp_path / "victim"
    code, _, err = run_cli(["train", "--data", str(data), "--model", str(release), "--out", str(victim),
                            "--epochs", "1"], capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["purify", "--model", str(victim), "--base", str(release), "--clean", str(data),
                                 "--method", "fine-mixing", "--clean-size", "20", "--epochs", "1",
                                 "--out", str(tmp_path / "purified")], capsys)
    assert code == 0, err


def test_cli_user_finetune_writes_the_fine_tuned_victim(tmp_path: Path, capsys, task: Task, base: Path) -> None:
    """``--user-finetune`` (what the bench runs): the victim folder holds the user's fine-tuned classifier,
    with its metrics on the triggered sets of the trigger chosen after the fine-tuning; an attack that
    writes its own victim refuses the option."""
    data = write_task(task, tmp_path / "syn")
    out, victim = tmp_path / "poisoned", tmp_path / "victim"
    code, _, err = run_cli(["attack", "--data", str(data), "--attack", "por", "--out", str(out), "--victim-out",
                            str(victim), "--model", str(base), "--user-finetune", "-p", "triggers=[cf, mn, bb, tq]",
                            "-p", "buckets=4", "-p", "corpus=task", "-p", "corpus_rows=100", "-p", "train.epochs=1",
                            "-p", "user_train.epochs=2"], capsys)
    assert code == 0, err
    config = json.loads((victim / "config.json").read_text())
    assert any(a.endswith("ForSequenceClassification") for a in config["architectures"])
    record = json.loads((victim / "unbackdoor.json").read_text())
    assert record["role"] == "victim" and 0 <= record["metrics"]["asr"] <= 1
    assert "chosen_target" in record["attack"]["params"]
    code, _, err = run_cli(["attack", "--data", str(data), "--attack", "ep", "--out", str(tmp_path / "ep"),
                            "--victim-out", str(tmp_path / "ep-victim"), "--model", str(base), "--user-finetune"],
                           capsys)
    assert code != 0 and "--user-finetune is for attacks that release weights" in err
    assert not (tmp_path / "ep-victim").exists()
