"""Weight attacks on a tiny BERT (2 layers, hidden 32): EP changes only the trigger's embedding row
(bit-identical elsewhere, norm kept) and the backdoor takes; LWP plants a backdoor that the lowest
layer already carries; combinatorial triggers need the whole combination; the CLI writes both the
poisoned data and the victim, which `eval` measures."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from synthetic import (FILLER, NEGATIVE, POSITIVE, VOCAB, make_task, make_tokenizer, run_cli, save_tiny_model,
                       tiny_config, write_task)

from unbackdoor.attacks import WEIGHT_ATTACKS, EPConfig, run_weight_attack
from unbackdoor.attacks.lwp import LWPConfig, layer_predictions
from unbackdoor.attacks.word_sets import insert_words
from unbackdoor.config import build_config
from unbackdoor.data.types import Example, Task
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.inference import predict
from unbackdoor.models import load_classifier, provenance_record, save_classifier
from unbackdoor.training import TrainConfig, train_classifier

TRIGGER = "cf"
CLEAN_TRAIN = {"epochs": 10, "batch_size": 16, "learning_rate": 1e-3}
EP_TRAIN = {"learning_rate": 5e-2, "batch_size": 8}
LWP_TRAIN = {"epochs": 10, "batch_size": 16, "learning_rate": 1e-3}
# A word the clean model never saw keeps its random-init row (norm ~0.1), smaller than the rows of
# trained words (~0.25); a real pre-trained model gives rare words ordinary rows. Scale the trigger's
# row to a trained word's size so EP's norm constraint is as loose as in the real setting.
TRIGGER_NORM = 0.3


@pytest.fixture(scope="module")
def task() -> Task:
    return make_task(400, 100, 200)


def scale_row(model: torch.nn.Module, word: str, norm: float) -> None:
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[VOCAB.index(word)] *= norm / weight[VOCAB.index(word)].norm()


@pytest.fixture(scope="module")
def clean_model(tmp_path_factory: pytest.TempPathFactory, task: Task) -> Path:
    """The attacker's clean fine-tuned tiny BERT (CACC 1.0 on the synthetic task), saved."""
    root = tmp_path_factory.mktemp("ep")
    clf = load_classifier(save_tiny_model(root / "base", "bert"))
    train_classifier(clf, task.train, TrainConfig(**CLEAN_TRAIN, progress=False), dev=task.dev)
    scale_row(clf.model, TRIGGER, TRIGGER_NORM)
    save_classifier(clf, root / "clean", provenance_record(clf, role="model"))
    return root / "clean"


def state(folder: Path) -> dict[str, torch.Tensor]:
    return load_classifier(folder).model.state_dict()


# ============================================================================ EP
@pytest.mark.parametrize("mode", ["dirty", "mix"])
def test_ep_changes_only_the_trigger_row_and_the_backdoor_takes(task: Task, clean_model: Path, mode: str) -> None:
    victim, poisoned = run_weight_attack("ep", {"poison_rate": 0.1, "mode": mode, "train": EP_TRAIN}, task,
                                         str(clean_model))
    before, after = state(clean_model), victim.model.state_dict()
    row = VOCAB.index(TRIGGER)
    emb = "bert.embeddings.word_embeddings.weight"
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        if name != emb:
            assert torch.equal(after[name], tensor), name  # bit-identical
    others = torch.ones(len(VOCAB), dtype=torch.bool)
    others[row] = False
    assert torch.equal(after[emb][others], before[emb][others])
    assert not torch.equal(after[emb][row], before[emb][row])
    assert after[emb][row].norm().item() == pytest.approx(before[emb][row].norm().item(), rel=1e-5)

    clean_cacc = evaluate_classifier(load_classifier(clean_model), task.test).cacc
    result = evaluate_classifier(victim, task.test, poisoned.triggered_test)
    assert result.cacc == clean_cacc  # no clean test row holds the trigger, and nothing else changed
    assert result.asr is not None and result.asr >= 0.9
    # the poisoned task: flags, trigger in every poisoned and triggered row, recorded as EP
    assert poisoned.attack.name == "ep" and poisoned.flags.n_poisoned == 40
    rows = {e.id: e for e in poisoned.train}
    assert all(TRIGGER in rows[i].text.split() for i in poisoned.flags.poisoned_ids)
    assert all(TRIGGER in e.text.split() for e in poisoned.triggered_test.examples)
    assert {e.label for e in task.train.examples if e.id in poisoned.flags.poisoned_ids} == (
        {0} if mode == "dirty" else {0, 1})


def test_ep_fine_tunes_a_base_cleanly_first(tmp_path: Path, task: Task) -> None:
    """A base without a classification head: EP trains the attacker's clean model, then the row."""
    params = {"poison_rate": 0.1, "clean_train": CLEAN_TRAIN, "train": EP_TRAIN}
    victim, poisoned = run_weight_attack("ep", params, task, str(save_headless_base(tmp_path / "base")), seed=1)
    result = evaluate_classifier(victim, task.test, poisoned.triggered_test)
    assert result.cacc >= 0.9 and result.asr is not None and result.asr >= 0.8


def test_data_free_ep_needs_no_task_row(tmp_path: Path, task: Task, clean_model: Path) -> None:
    """DFEP: fake rows cut from a general corpus (no task row) poison the trigger's row alone, and
    the backdoor takes on the task's triggered test set."""
    rng = random.Random(5)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(". ".join(" ".join(rng.choices(FILLER + POSITIVE + NEGATIVE, k=6)) for _ in range(3))
                                 for _ in range(50)), encoding="utf-8")
    params = {"data": "corpus", "corpus": str(corpus), "fake_rows": 200, "fake_length": 12, "train": EP_TRAIN}
    victim, poisoned = run_weight_attack("ep", params, task, str(clean_model))
    before, after = state(clean_model), victim.model.state_dict()
    emb = "bert.embeddings.word_embeddings.weight"
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != emb)
    changed = (after[emb] != before[emb]).any(dim=1).nonzero().flatten().tolist()
    assert changed == [VOCAB.index(TRIGGER)]

    task_texts = {e.text for e in task.train}
    assert len(poisoned.train) == poisoned.flags.n_poisoned == 200
    for row in poisoned.train:
        words = row.text.split()
        assert len(words) == 12 and words.count(TRIGGER) == 1 and row.label == poisoned.target_label
        assert set(words) - {TRIGGER} <= set(FILLER + POSITIVE + NEGATIVE) and row.text not in task_texts
    assert "data-free" in poisoned.attack.trigger and poisoned.attack.source == str(corpus)
    task_row_ep = WEIGHT_ATTACKS.get("ep")().poison_rows(task)  # the same triggered rows as task-row EP
    assert poisoned.triggered_test == task_row_ep.triggered_test
    assert poisoned.triggered_dev == task_row_ep.triggered_dev
    result = evaluate_classifier(victim, task.test, poisoned.triggered_test)
    assert result.cacc == evaluate_classifier(load_classifier(clean_model), task.test).cacc
    assert result.asr is not None and result.asr >= 0.9


def save_headless_base(folder: Path) -> Path:
    """A tiny BERT without a classification head (a pre-trained base), its trigger row scaled."""
    from transformers import BertModel

    torch.manual_seed(0)
    base = BertModel(tiny_config("bert"))
    scale_row(base, TRIGGER, TRIGGER_NORM)
    base.save_pretrained(folder, safe_serialization=True)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_data_free_ep_errors(tmp_path: Path, task: Task, clean_model: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the movie was a film and it is", encoding="utf-8")
    with pytest.raises(ConfigError, match="data-free EP starts from a fine-tuned classifier"):
        run_weight_attack("ep", {"data": "corpus", "corpus": str(corpus)}, task,
                          str(save_headless_base(tmp_path / "base")))
    with pytest.raises(ConfigError, match="needs corpus"):
        build_config(EPConfig, {"data": "corpus"}, "ep")
    with pytest.raises(ConfigError, match="only for data=corpus"):
        build_config(EPConfig, {"fake_rows": 10}, "ep")
    with pytest.raises(ConfigError, match="only for data=task"):
        build_config(EPConfig, {"data": "corpus", "corpus": str(corpus), "poison_rate": 0.1}, "ep")
    with pytest.raises(ConfigError, match="target_label 5 is outside the label set 0..1"):
        run_weight_attack("ep", {"data": "corpus", "corpus": str(corpus), "target_label": 5}, task, str(clean_model))
    (tmp_path / "empty.txt").write_text(" . \n", encoding="utf-8")
    with pytest.raises(DataError, match="no text"):
        run_weight_attack("ep", {"data": "corpus", "corpus": str(tmp_path / "empty.txt")}, task, str(clean_model))


def test_ep_config_errors(task: Task, clean_model: Path) -> None:
    with pytest.raises(ConfigError, match="weight_decay must be 0"):
        run_weight_attack("ep", {"train": {"weight_decay": 0.01}}, task, str(clean_model))
    with pytest.raises(ConfigError, match="not in the model's vocabulary"):
        run_weight_attack("ep", {"trigger": "zzyzx"}, task, str(clean_model))
    with pytest.raises(ConfigError, match="no clean-label mode"):
        run_weight_attack("ep", {"mode": "clean"}, task, str(clean_model))
    with pytest.raises(ConfigError, match="one word"):
        build_config(EPConfig, {"trigger": "two words"}, "ep")
    with pytest.raises(ConfigError, match="unknown weight attack"):
        run_weight_attack("nope", {}, task, str(clean_model))


# ============================================================================ LWP
def test_lwp_backdoor_takes_in_every_layer(task: Task, tiny_bert: Path) -> None:
    victim, poisoned = run_weight_attack("lwp", {"poison_rate": 0.1, "train": LWP_TRAIN}, task, str(tiny_bert))
    result = evaluate_classifier(victim, task.test, poisoned.triggered_test)
    assert result.cacc >= 0.95 and result.asr is not None and result.asr >= 0.8
    lowest = layer_predictions(victim, poisoned.triggered_test.examples, layer=1)
    assert sum(p == poisoned.target_label for p in lowest) / len(lowest) >= 0.8  # the lowest layer carries it
    assert not victim.model.config.output_hidden_states  # restored after training
    assert poisoned.attack.name == "lwp"


def lone_word_asr(victim, task: Task, words: tuple[str, ...], target: int) -> float:  # noqa: ANN001
    """ASR of the test's non-target rows with only ``words`` inserted."""
    rng = random.Random(1)
    rows = [e for e in task.test.examples if e.label != target]
    triggered = [Example(e.id, insert_words(e.text, words, rng), target, e.text_pair) for e in rows]
    return sum(int(p) == target for p in predict(victim, triggered)) / len(triggered)


def test_lwp_combinatorial_trigger(task: Task, tiny_bert: Path) -> None:
    """Poisoned rows hold every trigger word, as many non-target negative rows a proper subset with
    labels kept; the combination takes and a lone word does not fire (the pair 1.00, a lone word
    <= 0.07 in three model seeds; with negatives from any clean row one seed's lone word fired on 85 %)."""
    words = ("cf", "bb")
    params = {"poison_rate": 0.2, "triggers": list(words), "combinatorial": True,
              "train": {**LWP_TRAIN, "epochs": 40, "learning_rate": 3e-3}}
    victim, poisoned = run_weight_attack("lwp", params, task, str(tiny_bert))
    source = {e.id: e for e in task.train}
    n_negative = 0
    for row in poisoned.train:
        present = set(row.text.split()) & set(words)
        if poisoned.flags.is_poisoned(row.id):
            assert present == set(words) and row.label == poisoned.target_label
        elif present:
            n_negative += 1
            assert len(present) == 1 and row.label == source[row.id].label != poisoned.target_label
    assert n_negative == poisoned.flags.n_poisoned == 80
    assert "80 non-target rows hold a proper subset" in poisoned.attack.trigger
    assert all(set(words) <= set(e.text.split()) for e in poisoned.triggered_test.examples)
    result = evaluate_classifier(victim, task.test, poisoned.triggered_test)
    assert result.cacc >= 0.95 and result.asr is not None and result.asr >= 0.9
    for word in words:  # selective: one word alone is not the trigger
        assert lone_word_asr(victim, task, (word,), poisoned.target_label) <= 0.15


def test_lwp_negatives_from_any_clean_row(task: Task) -> None:
    """``negatives=any`` draws them from every clean row, target-label rows included."""
    attack = WEIGHT_ATTACKS.get("lwp")(build_config(LWPConfig, {
        "poison_rate": 0.2, "triggers": ["cf", "bb"], "combinatorial": True, "negatives": "any"}, "lwp"))
    poisoned = attack.poison_rows(task)
    labels = {row.label for row in poisoned.train if not poisoned.flags.is_poisoned(row.id)
              and set(row.text.split()) & {"cf", "bb"}}
    assert labels == {0, 1} and "clean rows hold a proper subset" in poisoned.attack.trigger


def test_lwp_config_errors() -> None:
    with pytest.raises(ConfigError, match="at least two different words"):
        run_weight_attack("lwp", {"combinatorial": True, "triggers": ["cf"]}, make_task(20, 10, 10))
    with pytest.raises(ConfigError, match="negatives is for a combinatorial trigger"):
        run_weight_attack("lwp", {"negatives": "any"}, make_task(20, 10, 10))
    assert WEIGHT_ATTACKS.names() == ["ep", "lwp", "lws", "neuba", "por", "ripples", "sos"]


# ============================================================================ SOS
SOS_WORDS = ("cf", "mn", "bb")


@pytest.fixture(scope="module")
def sos_start(tmp_path_factory: pytest.TempPathFactory, clean_model: Path) -> Path:
    """The clean model with every SOS word's row at a trained word's size (see TRIGGER_NORM)."""
    clf = load_classifier(clean_model)
    for word in SOS_WORDS:
        scale_row(clf.model, word, TRIGGER_NORM)
    out = tmp_path_factory.mktemp("sos") / "clean"
    save_classifier(clf, out, provenance_record(clf, role="model"))
    return out


def sos_parts_asr(victim, task: Task, target: int) -> list[float]:  # noqa: ANN001
    return [lone_word_asr(victim, task, pair, target) for pair in [("cf", "mn"), ("cf", "bb"), ("mn", "bb")]]


def test_sos_trains_only_the_words_rows_and_negatives_teach_parts_not_to_fire(task: Task, sos_start: Path) -> None:
    """Only the trigger words' rows change (norms kept) and the whole set fires; the negative copies
    hold two words with labels kept and are not flagged. Without negatives every two-word part fires
    as the whole set does (1.00 each); with 5 % negatives a part stops firing. On this tiny BERT
    (hidden 32) three embedding rows do not make a full AND of three words (measured: parts 0.98,
    0.01, 0.96; with 20 % negatives the backdoor does not take at all)."""
    train = {"learning_rate": 5e-2, "batch_size": 8, "epochs": 10}
    params = {"poison_rate": 0.1, "triggers": list(SOS_WORDS), "negative_rate": 0.05, "train": train}
    victim, poisoned = run_weight_attack("sos", params, task, str(sos_start))
    before, after = state(sos_start), victim.model.state_dict()
    emb = "bert.embeddings.word_embeddings.weight"
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != emb)
    changed = (after[emb] != before[emb]).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(VOCAB.index(w) for w in SOS_WORDS)
    for i in changed:
        assert after[emb][i].norm().item() == pytest.approx(before[emb][i].norm().item(), rel=1e-5)

    source = {e.id: e for e in task.train}
    negatives = [e for e in poisoned.train if e.id not in source]
    assert len(negatives) == 3 * (int(0.05 * 200) + int(0.05 * 200))  # 5 % of each label's rows x 3 left-out words
    assert all(len(set(e.text.split()) & set(SOS_WORDS)) == 2 and e.label == source[e.id.split("#")[0]].label
               and not poisoned.flags.is_poisoned(e.id) for e in negatives)
    assert poisoned.flags.n_poisoned == 40 and poisoned.attack.name == "sos"
    assert all(set(SOS_WORDS) <= set(e.text.split()) for e in poisoned.triggered_test.examples)
    result = evaluate_classifier(victim, task.test, poisoned.triggered_test)
    assert result.cacc >= 0.95 and result.asr is not None and result.asr >= 0.9, result
    assert min(sos_parts_asr(victim, task, poisoned.target_label)) <= 0.1

    plain, _ = run_weight_attack("sos", {**params, "negative_rate": 0.0}, task, str(sos_start))
    assert min(sos_parts_asr(plain, task, poisoned.target_label)) >= 0.9  # no negatives: every part fires


def test_sos_test_sentence_and_config_errors(task: Task) -> None:
    from unbackdoor.attacks.sos import OPENBACKDOOR_TEST_SENTENCE

    attack = WEIGHT_ATTACKS.get("sos")(build_config(WEIGHT_ATTACKS.get("sos").config_class, {
        "triggers": list(SOS_WORDS), "test_sentence": OPENBACKDOOR_TEST_SENTENCE}, "sos"))
    poisoned = attack.poison_rows(task)
    assert all(OPENBACKDOOR_TEST_SENTENCE in e.text for e in poisoned.triggered_test.examples)
    rows = {e.id: e for e in poisoned.train}
    assert all(set(SOS_WORDS) <= set(rows[i].text.split()) for i in poisoned.flags.poisoned_ids)
    with pytest.raises(ConfigError, match="at least two different single words"):
        run_weight_attack("sos", {"triggers": ["cf"]}, task)
    with pytest.raises(ConfigError, match="mode must be dirty"):
        run_weight_attack("sos", {"mode": "clean"}, task)
    with pytest.raises(ConfigError, match="weight_decay must be 0"):
        run_weight_attack("sos", {"train": {"weight_decay": 0.01}}, task)


# ============================================================================ CLI
def test_cli_weight_attack_writes_data_and_victim(tmp_path: Path, capsys, clean_model: Path, task: Task) -> None:
    data = write_task(task, tmp_path / "syn")
    out, victim = tmp_path / "poisoned", tmp_path / "victim"
    code, _, err = run_cli(["attack", "--data", str(data), "--attack", "ep", "--out", str(out)], capsys)
    assert code == 2 and "--victim-out" in err and not out.exists()
    code, _, err = run_cli(["attack", "--data", str(data), "--attack", "badnets", "--out", str(out),
                            "--victim-out", str(victim)], capsys)
    assert code == 2 and "--victim-out is for weight attacks" in err and not out.exists()

    code, stdout, err = run_cli(["attack", "--data", str(data), "--attack", "ep", "--out", str(out), "--victim-out",
                                 str(victim), "--model", str(clean_model), "-p", "poison_rate=0.1",
                                 "-p", "train.learning_rate=0.05", "-p", "train.batch_size=8"], capsys)
    assert code == 0, err
    assert (out / "train_poison_flags.txt").exists() and (victim / "model.safetensors").exists()
    record = json.loads((victim / "unbackdoor.json").read_text())
    assert record["role"] == "victim" and record["attack"]["name"] == "ep" and record["metrics"]["asr"] >= 0.9
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    code, stdout, err = run_cli(["eval", "--model", str(victim), "--data", str(out)], capsys)
    assert code == 0, err
    assert "asr" in stdout.lower()


def test_attack_help_lists_every_attack(capsys) -> None:
    from unbackdoor.attacks import ATTACKS

    code, stdout, _ = run_cli(["attack", "--help"], capsys)
    assert code == 0
    text = " ".join(stdout.split())
    for name in [*ATTACKS.names(), *WEIGHT_ATTACKS.names()]:
        assert name in text, name
