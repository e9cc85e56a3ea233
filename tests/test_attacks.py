"""BadNets and AddSent: row choice per mode, flags by id, triggers, triggered sets, seeding,
config validation, and the poisoned-folder round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from synthetic import make_task, write_task

from unbackdoor.attacks import ATTACKS, AddSent, AddSentConfig, BadNets, BadNetsConfig
from unbackdoor.data.io import load_poisoned_task, write_poisoned_task
from unbackdoor.data.types import Dataset, Example, PoisonedTask, Task, TriggeredSet
from unbackdoor.errors import ConfigError
from unbackdoor.attacks.base import attack_task

ATTACK_NAMES = ("badnets", "addsent")
MODES = ("dirty", "mix", "clean")
BADNETS_WORDS = set(BadNetsConfig().triggers)
ADDSENT_TRIGGER = AddSentConfig().trigger


def poison(task: Task, attack: str, **params: Any) -> PoisonedTask:
    return attack_task(task, attack, params)


def has_trigger(attack: str, text: str) -> bool:
    if attack == "badnets":
        return bool(set(text.split()) & BADNETS_WORDS)
    return ADDSENT_TRIGGER in text


def without_trigger(attack: str, text: str, triggers: set[str] = BADNETS_WORDS) -> str:
    """``text`` with the inserted trigger taken out again (words re-joined by single spaces)."""
    if attack == "badnets":
        return " ".join(w for w in text.split() if w not in triggers)
    assert text.count(ADDSENT_TRIGGER) == 1
    return " ".join(text.replace(ADDSENT_TRIGGER, " ").split())


def by_id(data: Dataset | TriggeredSet) -> dict[str, Example]:
    return {e.id: e for e in data.examples}


# ============================================================================ the poisoned training set
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attack", ATTACK_NAMES)
def test_poisoned_training_set(synthetic_task: Task, attack: str, mode: str) -> None:
    rate, target = 0.15, 1
    out = poison(synthetic_task, attack, poison_rate=rate, target_label=target, mode=mode, seed=3)
    clean = synthetic_task.train
    n = round(rate * len(clean))

    # realised count, flags by id, every row keeps its source id and position
    assert out.flags.n_poisoned == n == 60
    assert out.flags.n_rows == len(out.train) == len(clean)
    assert out.train.ids == clean.ids
    assert out.flags.poisoned_ids <= set(clean.ids)
    assert out.target_label == target
    assert out.clean is synthetic_task

    source = by_id(clean)
    sources = [source[i] for i in out.flags.poisoned_ids]
    for row in out.train:
        orig = source[row.id]
        if out.flags.is_poisoned(row.id):
            assert has_trigger(attack, row.text), row.text
            assert without_trigger(attack, row.text) == orig.text
            assert row.label == (orig.label if mode == "clean" else target)
        else:
            assert row == orig  # untouched
            assert not has_trigger(attack, row.text)

    source_labels = {e.label for e in sources}
    if mode == "dirty":
        assert source_labels == {1 - target}  # only non-target rows, relabelled
    elif mode == "clean":
        assert source_labels == {target}  # clean-label: only target rows, labels kept
    else:
        assert source_labels == {0, 1}  # mix: drawn from both labels
    assert all(out.train.examples[clean.ids.index(e.id)].label == target for e in sources)


@pytest.mark.parametrize("attack", ATTACK_NAMES)
def test_target_label_zero(synthetic_task: Task, attack: str) -> None:
    out = poison(synthetic_task, attack, poison_rate=0.1, target_label=0)
    assert {synthetic_task.train.examples[int(i.split("-")[1])].label for i in out.flags.poisoned_ids} == {1}
    assert {e.label for e in out.train if out.flags.is_poisoned(e.id)} == {0}
    assert {e.label for e in out.triggered_test.examples} == {0}
    assert set(out.triggered_test.original_labels) == {1}


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.1, 0.333, 0.5])
def test_realised_count_is_rounded_rate(rate: float) -> None:
    task = make_task(n_train=123, n_dev=4, n_test=6)
    out = poison(task, "badnets", poison_rate=rate, mode="mix")
    assert out.flags.n_poisoned == round(rate * 123)
    assert out.flags.rate == pytest.approx(round(rate * 123) / 123)


@pytest.mark.parametrize("k", [1, 3])
def test_num_triggers(synthetic_task: Task, k: int) -> None:
    out = poison(synthetic_task, "badnets", poison_rate=0.1, num_triggers=k, triggers=["zq"])
    source = by_id(synthetic_task.train)
    for e in out.train:
        if out.flags.is_poisoned(e.id):
            words = e.text.split()
            assert words.count("zq") == k
            assert len(words) == len(source[e.id].text.split()) + k
            assert without_trigger("badnets", e.text, {"zq"}) == source[e.id].text
            assert not set(words) & BADNETS_WORDS  # only the configured trigger
    assert all(e.text.split().count("zq") == k for e in out.triggered_test.examples)


def test_custom_addsent_trigger(synthetic_task: Task) -> None:
    out = poison(synthetic_task, "addsent", poison_rate=0.1, trigger="  no   cross ,  no crown ")
    assert out.attack.trigger.endswith("inserted at a random position")
    poisoned = [e for e in out.train if out.flags.is_poisoned(e.id)]
    assert poisoned and all("no cross , no crown" in e.text for e in poisoned)


def test_pair_task_trigger_goes_into_first_text() -> None:
    task = make_task(40, 6, 10, pair=True)
    out = poison(task, "badnets", poison_rate=0.25)
    source = by_id(task.train)
    for e in out.train:
        assert e.text_pair == source[e.id].text_pair
        assert has_trigger("badnets", e.text) == out.flags.is_poisoned(e.id)


# ============================================================================ the triggered sets
@pytest.mark.parametrize("attack", ATTACK_NAMES)
@pytest.mark.parametrize("target", [0, 1])
def test_triggered_sets(synthetic_task: Task, attack: str, target: int) -> None:
    out = poison(synthetic_task, attack, poison_rate=0.1, target_label=target, mode="mix")
    for clean, trig in ((synthetic_task.test, out.triggered_test), (synthetic_task.dev, out.triggered_dev)):
        assert isinstance(trig, TriggeredSet)
        non_target = [e for e in clean if e.label != target]
        assert len(trig) == len(non_target)  # one per non-target row
        assert [e.id for e in trig.examples] == [e.id for e in non_target]  # aligned with the clean rows
        assert trig.target_label == target
        assert all(e.label == target for e in trig.examples)
        assert list(trig.original_labels) == [e.label for e in non_target]
        assert all(y != target for y in trig.original_labels)
        for e, orig in zip(trig.examples, non_target, strict=True):
            assert has_trigger(attack, e.text)
            assert without_trigger(attack, e.text) == orig.text


# ============================================================================ seeding
@pytest.mark.parametrize("attack", ATTACK_NAMES)
def test_same_seed_same_output(synthetic_task: Task, attack: str) -> None:
    a = poison(synthetic_task, attack, poison_rate=0.2, mode="mix", seed=7)
    b = poison(synthetic_task, attack, poison_rate=0.2, mode="mix", seed=7)
    assert a.train.examples == b.train.examples
    assert a.flags == b.flags
    assert a.triggered_test.examples == b.triggered_test.examples
    assert a.triggered_dev.examples == b.triggered_dev.examples  # type: ignore[union-attr]


@pytest.mark.parametrize("attack", ATTACK_NAMES)
def test_different_seed_different_rows(synthetic_task: Task, attack: str) -> None:
    a = poison(synthetic_task, attack, poison_rate=0.2, mode="mix", seed=7)
    b = poison(synthetic_task, attack, poison_rate=0.2, mode="mix", seed=8)
    assert a.flags.poisoned_ids != b.flags.poisoned_ids
    assert a.triggered_test.examples != b.triggered_test.examples  # other trigger positions
    assert a.flags.n_poisoned == b.flags.n_poisoned


def test_direct_class_use_matches_pipeline(synthetic_task: Task) -> None:
    direct = BadNets(BadNetsConfig(poison_rate=0.1, seed=2)).poison(synthetic_task)
    assert direct.train.examples == poison(synthetic_task, "badnets", poison_rate=0.1, seed=2).train.examples
    add = AddSent(AddSentConfig(poison_rate=0.1)).poison(synthetic_task)
    assert add.attack.name == "addsent" and add.attack.source == "synthetic"


# ============================================================================ bad configurations
BAD_CONFIGS = [
    ("rate-0", "badnets", {"poison_rate": 0}, "poison_rate"),
    ("rate-1.5", "badnets", {"poison_rate": 1.5}, "poison_rate"),
    ("rate-negative", "addsent", {"poison_rate": -0.1}, "poison_rate"),
    ("rate-rounds-to-0", "badnets", {"poison_rate": 0.001}, "poisons no row"),
    ("target-5-binary", "badnets", {"target_label": 5}, "target_label 5 is outside the label set 0..1"),
    ("target-negative", "addsent", {"target_label": -1}, "target_label"),
    ("clean-rate-too-large", "badnets", {"mode": "clean", "poison_rate": 0.6}, "has only 200 candidates"),
    ("dirty-rate-too-large", "addsent", {"mode": "dirty", "poison_rate": 0.75}, "has only 200 candidates"),
    ("unknown-mode", "badnets", {"mode": "sneaky"}, "mode"),
    ("unknown-key", "badnets", {"bogus": 1}, "bogus: unknown key"),
    ("addsent-key-on-badnets", "badnets", {"trigger": "hello"}, "trigger: unknown key"),
    ("num-triggers-0", "badnets", {"num_triggers": 0}, "num_triggers"),
    ("multi-word-trigger", "badnets", {"triggers": ["two words"]}, "single words"),
    ("no-triggers", "badnets", {"triggers": []}, "triggers"),
    ("blank-sentence", "addsent", {"trigger": "   "}, "trigger"),
    ("rate-not-a-number", "addsent", {"poison_rate": "lots"}, "poison_rate"),
]


@pytest.mark.parametrize(("attack", "params", "message"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_raises_config_error(synthetic_task: Task, attack: str, params: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        attack_task(synthetic_task, attack, params)
    assert message in str(info.value)


def test_unknown_attack_name(synthetic_task: Task) -> None:
    with pytest.raises(ConfigError, match="unknown attack 'nope'; choose one of: addsent, badnets"):
        attack_task(synthetic_task, "nope", {})
    assert set(ATTACK_NAMES) <= set(ATTACKS.names())


# ============================================================================ round trip on disk
def three_class_task() -> Task:
    def split(name: str, n: int) -> Dataset:
        return Dataset(tuple(Example(f"{name}-{i}", f"row {i} of {name} with words", i % 3) for i in range(n)),
                       3, name, ("a", "b", "c"))

    return Task("three", split("train", 30), split("dev", 9), split("test", 12))


@pytest.mark.parametrize("kind", ["binary", "three-class"])
def test_write_then_load_poisoned_round_trip(tmp_path: Path, kind: str) -> None:
    task = make_task(40, 10, 20) if kind == "binary" else three_class_task()
    clean_dir = write_task(task, tmp_path / "syn" / "clean")
    names = dict(enumerate(task.train.label_names or ()))
    (clean_dir / "meta.json").write_text(json.dumps({"labels": {str(k): v for k, v in names.items()}}), "utf-8")
    out = poison(task, "badnets", poison_rate=0.25, target_label=1, mode="mix", seed=5)
    folder = tmp_path / "syn" / "badnets"
    write_poisoned_task(out, folder, {"clean": str(clean_dir)})
    assert {p.name for p in folder.iterdir()} == {"train.tsv", "train_poison_flags.txt", "dev.tsv", "test.tsv",
                                                   "meta.json"}

    back = load_poisoned_task(folder)
    assert back.target_label == out.target_label
    assert back.train.ids == out.train.ids
    assert [(e.text, e.label) for e in back.train] == [(e.text, e.label) for e in out.train]
    assert back.flags.poisoned_ids == out.flags.poisoned_ids and back.flags.n_rows == out.flags.n_rows
    assert back.train.label_names == task.train.label_names
    for got, want in ((back.triggered_test, out.triggered_test), (back.triggered_dev, out.triggered_dev)):
        assert got is not None and want is not None
        assert [e.id for e in got.examples] == [e.id for e in want.examples]
        assert [(e.text, e.label) for e in got.examples] == [(e.text, e.label) for e in want.examples]
        assert got.original_labels == want.original_labels  # kept even where labels are not binary
    assert back.attack.name == "badnets" and back.attack.trigger == out.attack.trigger
    assert back.clean.train.labels == task.train.labels
    assert len(back.clean.test) == len(task.test)
