"""Metric code matches the written definitions on hand-computed cases (evaluation.md rule 7)."""

from __future__ import annotations

import pytest

from unbackdoor.evaluate import (
    EvalResult,
    accuracy,
    attack_success_rate,
    clean_to_target,
    defence_effectiveness_rating,
    macro_f1,
    markdown_table,
    per_class_accuracy,
    recorded_clean_to_target,
    robust_accuracy,
)


def test_accuracy_f1_per_class_by_hand() -> None:
    y, p = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 0, 2]
    assert accuracy(y, p) == pytest.approx(4 / 6)
    assert per_class_accuracy(y, p, 4) == [pytest.approx(2 / 3), 0.5, 1.0, None]
    # F1: class0 tp2 fp1 fn1 -> 2/3; class1 tp1 fp1 fn1 -> 1/2; class2 -> 1; class3 absent -> skipped
    assert macro_f1(y, p, 4) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_majority_predictor_has_high_accuracy_but_low_macro_f1() -> None:
    y = [0] * 9 + [1]
    p = [0] * 10
    assert accuracy(y, p) == 0.9
    assert macro_f1(y, p, 2) == pytest.approx((2 * 9 / (2 * 9 + 1) + 0) / 2)


def test_asr_and_robust_accuracy() -> None:
    preds = [1, 1, 0, 2]
    assert attack_success_rate(preds, target_label=1) == 0.5
    assert robust_accuracy(preds, [0, 2, 0, 2]) == 0.5
    assert robust_accuracy(preds, [None, None, None, None]) is None


def test_clean_to_target_counts_clean_non_target_rows_predicted_as_the_target() -> None:
    y, p = [0, 0, 0, 2, 1, 1], [1, 0, 1, 1, 1, 0]  # non-target rows 0, 0, 0, 2 -> 1, 0, 1, 1
    assert clean_to_target(y, p, target_label=1) == 0.75
    assert clean_to_target([1, 1], [0, 1], target_label=1) is None
    # records: kept as measured; older binary records from the non-target class's accuracy
    assert recorded_clean_to_target({"clean_to_target": 0.3, "per_class_accuracy": [0.1, 0.9]}) == 0.3
    assert recorded_clean_to_target({"per_class_accuracy": [0.8, 0.6], "target_label": 0}) == pytest.approx(0.4)
    assert recorded_clean_to_target({"per_class_accuracy": [0.8, 0.6]}, target_label=1) == pytest.approx(0.2)
    assert recorded_clean_to_target({"per_class_accuracy": [0.8, 0.6]}) is None  # target unknown
    assert recorded_clean_to_target({"per_class_accuracy": [0.8, 0.6, 0.5]}, target_label=1) is None


def test_der_follows_the_docstring_formula() -> None:
    # ASR 0.9 -> 0.1, ACC 0.9 -> 0.85: (0.8 - 0.05 + 1) / 2
    assert defence_effectiveness_rating(0.9, 0.1, 0.9, 0.85) == pytest.approx(0.875)
    # accuracy went up: no bonus; ASR went up: no bonus
    assert defence_effectiveness_rating(0.5, 0.6, 0.8, 0.9) == pytest.approx(0.5)


def test_markdown_table_reports_the_floor() -> None:
    victim = EvalResult("v", cacc=0.9, macro_f1=0.9, per_class_accuracy=[0.9, 0.9], n_clean=10, asr=0.95, robust_accuracy=0.05)
    floor = EvalResult("f", cacc=0.88, macro_f1=0.88, per_class_accuracy=[0.9, 0.86], n_clean=10, asr=0.12, robust_accuracy=0.88)
    table = markdown_table([("victim", victim)], floor)
    assert "| victim | 90.0 | 90.0 | 95.0 | 5.0 | +83.0 |" in table
    assert "| never-poisoned floor | 88.0 | 88.0 | 12.0 | 88.0 | +0.0 |" in table
