"""Label-share calibration (unbackdoor.calibration): the offsets solve the share equations; a tiny
BERT trained on rows where one label dominates leans toward it, and after calibration on the clean
dev rows it predicts the dev shares, fewer rows of the other label flip, and the saved model keeps
the shift; a head without a bias is left alone; train auto records the step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_task, save_tiny_model

from unbackdoor.calibration import _mean_softmax, calibrate_to_dev, output_layer, prior_offsets
from unbackdoor.inference import predict_logits
from unbackdoor.models import load_classifier
from unbackdoor.models.saving import provenance_record, save_classifier
from unbackdoor.training import TrainConfig
from unbackdoor.training.loop import train_classifier


@pytest.mark.parametrize("classes", [2, 4])
def test_prior_offsets_match_the_shares(classes: int) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, classes)) * 3 + np.arange(classes)  # leaning to the last class
    shares = rng.dirichlet(np.ones(classes))
    b = prior_offsets(logits, shares)
    assert np.allclose(_mean_softmax(logits + b), shares, atol=1e-5)
    assert abs(b.mean()) < 1e-9


def test_a_class_absent_from_dev_keeps_offset_zero() -> None:
    logits = np.random.default_rng(1).normal(size=(50, 3))
    b = prior_offsets(logits, np.array([0.5, 0.5, 0.0]))
    assert b[2] == 0 and np.isfinite(b).all()


@pytest.fixture(scope="module")
def leaning(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - (classifier, task)
    """A tiny BERT trained briefly on rows that are 85 % label 1: it calls most label-0 rows 1."""
    task = make_task(400, 200, 200, seed=3)
    rows = [e for e in task.train.examples if e.label == 1] + [e for e in task.train.examples if e.label == 0][:35]
    clf = load_classifier(save_tiny_model(tmp_path_factory.mktemp("lean") / "m", "bert", seed=0))
    train_classifier(clf, task.train.replace(rows), TrainConfig(epochs=1, batch_size=16, learning_rate=1e-3,
                                                                progress=False, seed=0))
    return clf, task


def test_calibration_removes_the_lean_and_is_saved(leaning, tmp_path: Path) -> None:  # noqa: ANN001
    clf, task = leaning
    negatives = [e for e in task.test.examples if e.label == 0]
    flipped_before = float((predict_logits(clf, negatives).argmax(1) == 1).mean())
    report = calibrate_to_dev(clf, task.dev)
    assert report["applied"] and report["predicted_shares_before"][1] >= 0.7, report
    assert abs(report["predicted_shares_after"][1] - 0.5) < 0.1, report
    flipped_after = float((predict_logits(clf, negatives).argmax(1) == 1).mean())
    assert flipped_after < flipped_before - 0.2, (flipped_before, flipped_after)
    assert report["dev_accuracy_after"] >= report["dev_accuracy_before"]
    save_classifier(clf, tmp_path / "saved", provenance_record(clf, role="model"))
    again = load_classifier(tmp_path / "saved")
    assert torch.equal(output_layer(again).bias, output_layer(clf).bias)


def test_a_head_without_bias_is_left_alone(tmp_path: Path) -> None:
    clf = load_classifier(save_tiny_model(tmp_path / "gpt2", "gpt2", seed=0))
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    report = calibrate_to_dev(clf, make_task(40, 20, 20).dev)
    assert report == {"applied": False, "reason": "the classification head has no bias"}
    assert all(torch.equal(before[k], v) for k, v in clf.model.state_dict().items())
