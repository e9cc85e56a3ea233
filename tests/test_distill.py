"""Distillation into the clean base: the transfer set holds clean words only, the soft term reaches
the loop, and the planted backdoor is gone from the student while clean accuracy holds (better than
re-initialising to the base with the same few clean labels)."""

from __future__ import annotations

import pytest
import torch
from synthetic import make_task

from unbackdoor.data.types import Dataset
from unbackdoor.errors import ConfigError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import load_classifier
from unbackdoor.purify import PURIFY_DEFENSES, Distill, DistillConfig, PurifyInputs, Reinit, ReinitConfig
from unbackdoor.models.vocabulary import candidate_tokens, word_neighbours
from unbackdoor.purify.distill import recombined_views
from unbackdoor.training import SoftTargets, TrainConfig, evaluate_accuracy, train_classifier


def test_views_are_seeded_and_hold_only_the_rows_words() -> None:
    rows = make_task(30, 4, 4).train.examples
    a = recombined_views(rows, 4, splice=0.5, word_drop=0.2, seed=1)
    assert a == recombined_views(rows, 4, splice=0.5, word_drop=0.2, seed=1)
    assert len(a) == 4 * len(rows) and len({e.id for e in a}) == len(a)
    vocabulary = {w for e in rows for w in e.text.split()}
    assert all(e.text and set(e.text.split()) <= vocabulary for e in a)
    assert any(e.text not in {r.text for r in rows} for e in a)  # something new to ask the teacher


def test_substitutes_are_the_clean_bases_whole_word_neighbours(planted) -> None:  # noqa: ANN001
    base = load_classifier(planted.base_dir)
    rows = make_task(30, 4, 4).train.examples
    table = word_neighbours(base, (w for e in rows for w in e.text.split()), 3)
    assert table and all(len(v) == 3 and w not in v for w, v in table.items())
    pool = set(candidate_tokens(base))
    assert all(set(v) <= pool for v in table.values())
    assert not pool & {"cf", "mn", "bb", "tq", "3d", ";", "[PAD]", "[UNK]"}  # 2-letter, non-alphabetic, special
    views = recombined_views(rows, 4, splice=0.5, word_drop=0.0, seed=1, substitute=1.0, neighbours=table)
    assert all(set(e.text.split()) <= pool | {w for r in rows for w in r.text.split()} for e in views)
    assert views != recombined_views(rows, 4, splice=0.5, word_drop=0.0, seed=1)  # words were replaced


def test_soft_targets_are_checked_and_change_training(tiny_bert) -> None:  # noqa: ANN001
    data = make_task(40, 8, 8).train
    with pytest.raises(ConfigError):
        SoftTargets(torch.full((3, 2), 0.7), 0.5, 2.0)
    with pytest.raises(ConfigError):  # one row per training row
        train_classifier(load_classifier(tiny_bert), data, TrainConfig(epochs=1, progress=False),
                         soft_targets=SoftTargets(torch.full((3, 2), 0.5), 0.5, 2.0))
    flipped = torch.tensor([[0.0, 1.0] if y == 0 else [1.0, 0.0] for y in data.labels])
    accuracy = []
    for soft in (None, SoftTargets(flipped, 1.0, 1.0)):
        clf = load_classifier(tiny_bert)
        train_classifier(clf, data, TrainConfig(epochs=10, batch_size=8, learning_rate=3e-3, progress=False),
                         soft_targets=soft)
        accuracy.append(evaluate_accuracy(clf, data))
    assert accuracy[0] >= 0.9 and accuracy[1] <= 0.1, accuracy  # weight 1: the teacher's (opposite) labels won


def test_registered_and_validated() -> None:
    assert PURIFY_DEFENSES.get("distill") is Distill
    assert vars(Distill()) == {"config": DistillConfig()}
    with pytest.raises(ValueError):
        DistillConfig(weight=1.5)


def test_distill_removes_the_planted_backdoor_and_beats_reinit(planted) -> None:  # noqa: ANN001
    victim = load_classifier(planted.victim_dir)
    before = evaluate_classifier(victim, planted.task.test, planted.poisoned.triggered_test)
    with pytest.raises(TypeError):  # the suspect's clean base is required
        Distill().purify(PurifyInputs(suspect=victim, clean=planted.clean))
    clean = Dataset(planted.clean.examples[:40], planted.clean.num_labels, "clean40")
    train = TrainConfig(epochs=6, batch_size=16, learning_rate=3e-3, selection_ties="last", progress=False)
    result = Distill(DistillConfig(train=train)).purify(
        PurifyInputs(suspect=victim, clean=clean, base=load_classifier(planted.base_dir)))
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert before.asr >= 0.8 and after.asr <= 0.1, (before.asr, after.asr)
    reinit = Reinit(ReinitConfig(train=TrainConfig(epochs=20, batch_size=16, learning_rate=3e-3,
                                                   selection_ties="last", progress=False))).purify(
        PurifyInputs(suspect=load_classifier(planted.victim_dir), clean=clean, base=load_classifier(planted.base_dir)))
    alone = evaluate_classifier(reinit.model, planted.task.test, planted.poisoned.triggered_test)
    # the teacher adds what 32 fitting labels alone do not give (measured: 0.925 vs 0.845)
    assert after.cacc >= 0.9 and after.cacc >= alone.cacc + 0.04, (after.cacc, alone.cacc)
    report = result.report
    assert report["n_fit"] + report["n_selection"] == 40 and report["n_views"] == 24 * report["n_fit"]
    assert report["teacher_fit_agreement"] >= 0.9 and report["reset"]["scope"] == "all"
