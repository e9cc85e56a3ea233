"""Rule 2: a defence never receives poison flags, the trigger, or triggered data."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from synthetic import make_task

from unbackdoor.attacks import BadNets
from unbackdoor.data import Dataset
from unbackdoor.purify import PURIFY_DEFENSES, PurifyInputs
from unbackdoor.models import load_classifier


@pytest.fixture(scope="module")
def poisoned():
    return BadNets().poison(make_task(100, 20, 40))


def test_dataset_has_no_flag_field() -> None:
    fields = {f.name for f in dataclasses.fields(Dataset)}
    assert fields == {"examples", "num_labels", "name", "label_names"}


@pytest.mark.parametrize("bad", ["triggered_test", "triggered_dev", "flags", "task"])
def test_purify_inputs_reject_evaluation_only_data(tiny_bert: Path, poisoned, bad: str) -> None:  # noqa: ANN001
    value = poisoned if bad == "task" else getattr(poisoned, bad)
    with pytest.raises(TypeError):
        PurifyInputs(suspect=load_classifier(tiny_bert), clean=value)


def test_no_defence_signature_has_a_slot_for_flags_trigger_or_target() -> None:
    forbidden = {"flags", "poison_flags", "trigger", "target", "target_label", "triggered", "poisoned"}
    for field in dataclasses.fields(PurifyInputs):
        assert field.name not in forbidden
    for name in PURIFY_DEFENSES.names():
        cls = PURIFY_DEFENSES.get(name)
        params = set(inspect.signature(cls.purify).parameters) | set(cls.config_class.model_fields)
        assert not params & forbidden, (name, params & forbidden)


def test_purify_takes_only_purify_inputs(tiny_bert: Path, poisoned) -> None:  # noqa: ANN001
    defence = PURIFY_DEFENSES.get("finetune")()
    with pytest.raises(TypeError):
        defence.purify(poisoned)  # type: ignore[arg-type]


def test_defence_construction_does_no_work() -> None:
    for name in PURIFY_DEFENSES.names():
        cls = PURIFY_DEFENSES.get(name)
        defence = cls()
        assert vars(defence) == {"config": cls.config_class()}
