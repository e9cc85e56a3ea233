"""``clean-only``: the baseline that fine-tunes the base on part of the clean dev set and never reads the
(possibly poisoned) training rows."""

from __future__ import annotations

import pytest
import torch

from unbackdoor.errors import ConfigError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import load_classifier
from unbackdoor.train_defenses import TRAIN_DEFENSES, TrainInputs, build_train_defense
from unbackdoor.train_defenses.auto import with_clean_rows
from unbackdoor.train_defenses.clean_only import CleanOnly, CleanOnlyConfig

FORBIDDEN = {"flags", "poison_flags", "trigger", "target", "target_label", "triggered", "poisoned", "attack"}
LEARN = {"epochs": 10, "batch_size": 16, "learning_rate": 1e-3, "seed": 1, "progress": False}


def test_clean_only_is_registered_validated_and_has_no_slot_for_the_attack() -> None:
    assert TRAIN_DEFENSES.get("clean-only") is CleanOnly
    assert not set(CleanOnlyConfig.model_fields) & FORBIDDEN
    assert vars(CleanOnly()) == {"config": CleanOnlyConfig()}  # no work in __init__
    for params, message in (({"clean_rows": 0}, "clean_rows"), ({"clean_rows": 1}, "clean_rows"),
                            ({"bogus": 1}, "bogus: unknown key")):
        with pytest.raises(ConfigError, match=message):
            build_train_defense("clean-only", params)


def test_clean_only_never_reads_the_training_rows_and_has_no_backdoor(planted) -> None:  # noqa: ANN001
    """Trained once with the poisoned rows and once with the clean ones as its training rows: the same
    weights to the bit (the rows are not read), no backdoor, and the clean rows are those auto adds. The
    clean set: the task's 400 clean training rows (its 100 dev rows are too few to teach a random tiny BERT)."""
    config, clean = CleanOnlyConfig(train=LEARN), planted.task.train
    models = []
    for rows in (planted.poisoned.train, planted.task.dev):
        result = CleanOnly(config).fit(TrainInputs(load_classifier(planted.base_dir), rows, clean))
        models.append(result)
    first, second = (m.model.model.state_dict() for m in models)
    assert all(torch.equal(first[k], second[k]) for k in first)
    report = models[0].report
    assert report["n_clean_trained"] == 200 and report["n_clean_selecting"] == 200
    assert report["n_rows_ignored"] == len(planted.poisoned.train)
    victim = evaluate_classifier(load_classifier(planted.victim_dir), planted.task.test, planted.poisoned.triggered_test)
    after = evaluate_classifier(models[0].model, planted.task.test, planted.poisoned.triggered_test)
    assert victim.asr >= 0.8 and after.asr <= 0.2, (victim.asr, after.asr)
    assert after.cacc >= 0.85, after
    inputs = TrainInputs(load_classifier(planted.base_dir), planted.poisoned.train, clean)
    _, added = with_clean_rows(inputs, 0.5, LEARN["seed"])  # auto's step 3a with the same seed
    assert report["clean_trained_ids"] == [e.id for e in added]
