"""``--epur``: E-PUR's embedding reset as the first step of another purify method."""

from __future__ import annotations

import pytest

from unbackdoor.purify import PurifyInputs
from unbackdoor.errors import ConfigError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import load_classifier
from unbackdoor.purify.base import build_purify_defense, epur_first, purify

TRIGGERS = {"cf", "mn", "bb", "tq"}
FAST_TRAIN = {"epochs": 3, "batch_size": 16, "learning_rate": 1e-3, "progress": False}


def test_epur_then_fine_mixing_resets_the_triggers_first_and_removes_the_backdoor(planted) -> None:  # noqa: ANN001
    victim, base = load_classifier(planted.victim_dir), load_classifier(planted.base_dir)
    before = evaluate_classifier(victim, planted.task.test, planted.poisoned.triggered_test)
    params = {"rho": 0.9, "train": FAST_TRAIN}  # keeps 90% of the suspect: mixing alone leaves the backdoor
    alone = purify("fine-mixing", params, PurifyInputs(suspect=load_classifier(planted.victim_dir),
                                                       clean=planted.clean, base=load_classifier(planted.base_dir)))
    result = purify("fine-mixing", params, PurifyInputs(suspect=victim, clean=planted.clean, base=base),
                    epur={"n_reset": 4})
    first = result.report["before"][0]
    assert {t["token"] for t in first["reset_tokens"]} == TRIGGERS
    assert "finetune" not in first  # the composed step only resets; the method does the fine-tuning
    mixed_alone = evaluate_classifier(alone.model, planted.task.test, planted.poisoned.triggered_test)
    composed = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert before.asr >= 0.8 and mixed_alone.asr >= 0.8, (before.asr, mixed_alone.asr)
    assert composed.asr <= 0.2, composed.asr
    assert composed.cacc >= before.cacc - 0.05, (before.cacc, composed.cacc)


@pytest.mark.parametrize(("method", "epur", "have_base", "message"), [
    ("e-pur", {}, True, "already is E-PUR"),
    ("finetune", {}, False, "--epur needs"),
    ("fine-purifying", None, False, "needs the suspect's clean pre-trained base"),
    ("fine-mixing", {"n_reset": -1}, True, "n_reset"),
])
def test_bad_requests_fail_before_any_work(method: str, epur: dict | None, have_base: bool, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_purify_defense(method, {}, have_base=have_base, before=epur_first(method, epur))
