"""The ``contrast`` detector: rows a classifier tells apart from the clean set, cut by an empirical-null FDR.

A "style" of many words (each poisoned row draws 4 of 20 style words) is found with about the
precision the FDR rule promises; a clean training set loses only a few rows; the cut follows the rule
it states; a label without clean rows is not cut.
"""

from __future__ import annotations

import random

import pytest
import torch
from synthetic import make_task, save_tiny_model

from unbackdoor.data import Dataset, Example
from unbackdoor.detect import ContrastConfig, ContrastDetector, DetectInputs, FlagRule
from unbackdoor.detect.null import fdr_cut
from unbackdoor.models import load_classifier

STYLE = [f"s{i}" for i in range(20)]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a Classifier (never used by contrast)
    return load_classifier(save_tiny_model(tmp_path_factory.mktemp("contrast") / "bert", "bert"))


def _styled(train: Dataset, rate: float, seed: int) -> tuple[Dataset, set[str]]:
    """Dirty-label 'style': a share of the label-0 rows get 4 style words each and label 1."""
    rng = random.Random(seed)
    chosen = {e.id for e in train if e.label == 0 and rng.random() < rate}
    rows = [Example(e.id, " ".join(rng.sample(STYLE, 4)) + " " + e.text, 1) if e.id in chosen else e for e in train]
    return train.replace(rows), chosen


def test_fdr_cut_keeps_the_longest_list_within_the_false_share() -> None:
    train = torch.tensor([9.0, 8.0, 7.0, 6.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    clean = torch.tensor([6.5, 1.0, 0.6, 0.3, 0.2, 0.1, 0.0, -1.0], dtype=torch.float64)
    cut, k, share = fdr_cut(train, clean, fdr=0.3)
    # top 4: one clean score (6.5) is >= 6.0, so 8 x 1/8 = 1 expected false among 4 -> 0.25
    assert (k, share) == (4, pytest.approx(0.25)) and 1.0 < cut < 6.0
    assert fdr_cut(train, clean, fdr=0.2)[1] == 3  # 8 x 0/8 = 0 false among the top 3; 0.25 > 0.2 at 4
    assert fdr_cut(train, torch.tensor([], dtype=torch.float64), fdr=0.2)[1] == 0  # no null: nothing selected


def test_a_style_of_many_weak_words_is_found(encoder) -> None:  # noqa: ANN001
    task = make_task(1000, 400, 10)
    rows, chosen = _styled(task.train, 0.2, seed=1)
    inputs = DetectInputs(rows, task.dev, encoder)
    found = ContrastDetector(ContrastConfig()).detect(inputs, FlagRule(threshold=0.0))
    flagged = set(found.flagged_ids)
    assert found.report["n_rows_over_threshold"] == len(flagged)
    assert len(flagged & chosen) / len(chosen) >= 0.7  # recall
    assert len(flagged & chosen) / len(flagged) >= 0.7  # precision, near 1 - fdr
    groups = {g["label"]: g for g in found.report["groups"]}
    assert groups[1]["selected"] > 0 and groups[1]["estimated_fdr"] <= 0.2
    again = ContrastDetector(ContrastConfig()).detect(inputs)
    assert torch.equal(found.scores, again.scores)  # same seed, same scores


def test_a_clean_training_set_loses_few_rows(encoder) -> None:  # noqa: ANN001
    task = make_task(1000, 400, 10)
    found = ContrastDetector(ContrastConfig()).detect(DetectInputs(task.train, task.dev, encoder),
                                                      FlagRule(threshold=0.0))
    assert len(found.flagged_ids) <= 0.03 * len(task.train)


def test_a_label_without_clean_rows_is_not_cut(encoder) -> None:  # noqa: ANN001
    task = make_task(600, 300, 10)
    rows, _ = _styled(task.train, 0.2, seed=2)
    clean = task.dev.replace([e for e in task.dev if e.label == 0])
    found = ContrastDetector(ContrastConfig()).detect(DetectInputs(rows, clean, encoder), FlagRule(threshold=0.0))
    labels = {e.id: e.label for e in rows}
    assert all(labels[i] == 0 for i in found.flagged_ids)
    assert {g["label"]: g["selected"] for g in found.report["groups"]}[1] == 0
