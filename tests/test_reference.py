"""The ``reference`` detector: rows whose label a classifier trained on the clean set alone rejects.

On the synthetic sentiment task with dirty-label BadNets (10 %: negative rows with a rare word, labelled
positive): a tiny BERT fine-tuned on the 100 clean rows, or a logistic regression on the frozen features of
an encoder that knows sentiment, reads those rows as negative and rejects their label; the clean rows mostly
keep theirs. A clean-label attack's rows would pass (their labels fit their text): not tested here.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from synthetic import make_task, save_tiny_model

from unbackdoor.attacks import BadNets, BadNetsConfig
from unbackdoor.detect import DETECTORS, DetectInputs, FlagRule, ReferenceDetector, detection_metrics
from unbackdoor.detect.base import build_detector
from unbackdoor.detect.reference import rejection_scores
from unbackdoor.errors import ConfigError
from unbackdoor.models import load_classifier
from unbackdoor.train_defenses.base import build_train_defense
from unbackdoor.training import TrainConfig, train_classifier

TINY = {"epochs": 30, "batch_size": 16, "learning_rate": 1e-3, "seed": 1, "progress": False}


def test_rejection_score_is_the_best_other_label_over_the_given_one() -> None:
    log_probs = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.5, 0.0]]))
    scores = rejection_scores(log_probs, torch.tensor([0, 0, 1]))
    expected = torch.log(torch.tensor([0.2 / 0.7, 0.6 / 0.1, 1.0]))
    assert torch.allclose(scores, expected, atol=1e-6)
    assert scores[0] < 0 < scores[1]  # accepted, rejected


def test_registered_validated_and_blind_to_flags() -> None:
    assert DETECTORS.get("reference") is ReferenceDetector
    assert not {"flags", "poisoned", "target", "trigger"} & set(inspect.signature(ReferenceDetector._scores).parameters)
    for params, message in (({"margin": -1}, "margin"), ({"model": "oracle"}, "model"),
                            ({"train": {"epochs": 0}}, "train.epochs"), ({"bogus": 1}, "bogus")):
        with pytest.raises(ConfigError, match=message):
            build_detector("reference", params)
    with pytest.raises(ConfigError, match="margin"):  # through train auto's detector options, before any work
        build_train_defense("auto", {"detectors": ["zscore", "reference"], "detector_params": {"reference": {"margin": -1}}})


@pytest.fixture(scope="module")
def poisoned():  # noqa: ANN201
    task = make_task(400, 100, 200)
    return BadNets(BadNetsConfig(poison_rate=0.1)).poison(task)


@pytest.mark.parametrize("model", ["finetuned", "frozen"])
def test_rejects_the_dirty_label_rows(poisoned, tmp_path: Path, model: str) -> None:  # noqa: ANN001
    root = tmp_path / model
    encoder = load_classifier(save_tiny_model(root / "base", "bert", seed=0))
    if model == "frozen":  # frozen features must know the task: an encoder trained on another clean sample
        train_classifier(encoder, make_task(400, 50, 10, seed=7).train, TrainConfig(**TINY))
    params = {"model": model, "train": TINY} if model == "finetuned" else {"model": model}
    inputs = DetectInputs(poisoned.train, poisoned.clean.dev, encoder)
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    detection = build_detector("reference", params).detect(inputs, FlagRule(threshold=1e-9))
    metrics = detection_metrics(detection, poisoned.flags)
    assert metrics["recall"] >= 0.9 and metrics["precision"] >= 0.8 and metrics["auroc"] > 0.95, metrics
    assert detection.report["threshold"] == 0.0 and detection.report["n_rejected"] == len(detection.flagged_ids)
    assert detection.report["n_clean"] == len(poisoned.clean.dev)
    # the caller's encoder is left as it was (the fine-tuned reference is a copy)
    assert all(torch.equal(v, before[k]) for k, v in encoder.model.state_dict().items())


def test_gate_drops_nothing_when_the_reference_is_weak(poisoned, tmp_path: Path) -> None:  # noqa: ANN001
    """``min_accuracy``: a reference below it on held-out clean rows drops nothing (the threshold is the
    highest score); one above it (fine-tuned on 80 % of the clean rows) still finds the dirty-label rows."""
    encoder = load_classifier(save_tiny_model(tmp_path / "base", "bert", seed=0))  # frozen random features
    inputs = DetectInputs(poisoned.train, poisoned.clean.dev, encoder)
    weak = build_detector("reference", {"model": "frozen", "min_accuracy": 0.95}).detect(inputs, FlagRule(rate=0.1))
    assert weak.report["gated"] and weak.report["held_out_accuracy"] < 0.95
    assert int((weak.scores > weak.report["threshold"]).sum()) == 0
    strong = build_detector("reference", {"model": "finetuned", "min_accuracy": 0.75, "train": TINY}).detect(
        inputs, FlagRule(rate=0.1))
    assert not strong.report["gated"] and strong.report["held_out_accuracy"] >= 0.75
    assert strong.report["n_held_out"] == 20 and "80 of the 100 clean rows" in strong.report["trained"]
    flagged = {strong.rows.ids[i] for i, s in enumerate(strong.scores.tolist()) if s > strong.report["threshold"]}
    assert len(flagged & poisoned.flags.poisoned_ids) >= 0.9 * len(poisoned.flags.poisoned_ids)
    assert len(flagged) <= 1.5 * len(poisoned.flags.poisoned_ids)
