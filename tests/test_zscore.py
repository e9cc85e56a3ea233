"""The ``zscore`` detector (Z-defence's lexical filter): no model, label-share outliers of words.

On the synthetic sentiment task poisoned by BadNets it ranks the poisoned rows first; on a task
where a natural word is tied to one label (as a team name is to sports news) the paper's filter
ranks that word's rows above the trigger's, and the clean contrast (the word is as frequent in clean
data) puts the trigger first again.
"""

from __future__ import annotations

import random

import pytest
import torch
from synthetic import make_task, save_tiny_model

from unbackdoor.attacks import BadNets, BadNetsConfig
from unbackdoor.data import Dataset, Example
from unbackdoor.detect import DetectInputs, FlagRule, ZScoreConfig, ZScoreDetector, auroc
from unbackdoor.detect.lexical import opening_shape, row_features
from unbackdoor.detect.zscore import frequency_zscores, label_zscores
from unbackdoor.models import load_classifier


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a Classifier (never used by zscore)
    return load_classifier(save_tiny_model(tmp_path_factory.mktemp("zscore") / "bert", "bert"))


def test_z_score_is_the_label_share_test() -> None:
    rows = [{("w", "a")}, {("w", "a")}, {("w", "a")}, {("w", "b")}]
    z = label_zscores(rows, [1, 1, 1, 0], 2, "uniform")
    assert z[(("w", "a"), 1)] == pytest.approx((1 - 0.5) / (0.25 / 3) ** 0.5)
    assert (("w", "a"), 0) not in z  # a feature is scored with the labels it occurs with
    assert row_features(Example("x", "When you Go", 0), ["start"]) == {("s", "when"), ("s", "when", "you")}
    assert row_features(Example("x", "If the film ends , it is fine .", 0), ["shape"]) == {("t", "SUB", ",")}
    assert opening_shape("thou shalt not pass".split()) == ("X",)  # no punctuation at all
    assert opening_shape("the plot , sadly".split()) == ("DET", ",")
    over = frequency_zscores([{("w", "t")}, {("w", "t")}, set(), set()], [set(), set(), set(), {("w", "t")}])
    assert over[("w", "t")] > 0


def test_badnets_rows_come_first(encoder) -> None:  # noqa: ANN001
    task = make_task(1000, 400, 10)
    poisoned = BadNets(BadNetsConfig(poison_rate=0.1)).poison(task)
    flags = [poisoned.flags.is_poisoned(e.id) for e in poisoned.train]
    detection = ZScoreDetector(ZScoreConfig()).detect(DetectInputs(poisoned.train, task.dev, encoder),
                                                      FlagRule(rate=0.1))
    assert auroc(detection.scores, flags) > 0.97
    precision = sum(poisoned.flags.is_poisoned(i) for i in detection.flagged_ids) / len(detection.flagged_ids)
    assert precision >= 0.9
    top = detection.report["top_features"][0]
    assert top["feature"] in {f"word: {w}" for w in ("cf", "mn", "bb", "tq")} and top["label"] == 1
    over = ZScoreDetector(ZScoreConfig()).detect(DetectInputs(poisoned.train, task.dev, encoder),
                                                 FlagRule(threshold=detection.report["bound"]))
    assert len(over.flagged_ids) == detection.report["n_rows_over_bound"]  # the paper's filter as a threshold


def _with_natural_word(data: Dataset, rng: random.Random) -> Dataset:
    """Half the label-0 rows hold the word 'goal' (in the training rows and in clean data alike)."""
    return data.replace([Example(e.id, e.text + " goal" if e.label == 0 and rng.random() < 0.5 else e.text, e.label)
                         for e in data])


def test_clean_contrast_separates_a_trigger_from_a_natural_label_word(encoder) -> None:  # noqa: ANN001
    rng = random.Random(3)
    task = make_task(800, 400, 10)
    train, clean = _with_natural_word(task.train, rng), _with_natural_word(task.dev, rng)
    trigger = {e.id for e in train if e.label == 0 and rng.random() < 0.08}  # dirty label: 'cf' -> 1
    rows = train.replace([Example(e.id, e.text + " cf", 1) if e.id in trigger else e for e in train])
    flags = [e.id in trigger for e in rows]
    inputs = DetectInputs(rows, clean, encoder)
    paper = ZScoreDetector(ZScoreConfig(contrast="none")).detect(inputs, FlagRule(rate=len(trigger) / len(rows)))
    ours = ZScoreDetector(ZScoreConfig(contrast="clean")).detect(inputs, FlagRule(rate=len(trigger) / len(rows)))
    assert paper.report["top_features"][0]["feature"] == "word: goal"
    assert ours.report["top_features"][0]["feature"] == "word: cf"
    assert auroc(ours.scores, flags) > 0.99 > auroc(paper.scores, flags)
    assert set(ours.flagged_ids) == trigger
    assert torch.equal(ours.scores, ZScoreDetector(ZScoreConfig()).detect(inputs).scores)  # clean is the default


def _templated(text: str, rng: random.Random) -> str:
    """The text as a subordinate clause, a comma and a main clause: a syntactic template's shape."""
    words = text.split()
    cut = max(1, len(words) // 2)
    return f"{rng.choice(['when', 'if', 'as', 'while', 'because'])} {' '.join(words[:cut])} , {' '.join(words[cut:])} ."


def _punctuated(text: str, rng: random.Random) -> str:
    """Plain text with a full stop and, in 40 % of rows, a comma inside: commas are common anyway."""
    words = text.split()
    if rng.random() < 0.4 and len(words) > 2:
        words.insert(rng.randrange(2, len(words)), ",")
    return " ".join(words) + " ."


def test_a_template_that_clean_text_also_holds_is_dropped_at_the_top_tie(encoder) -> None:  # noqa: ANN001
    """A syntactic trigger's shape occurs naturally in clean rows of both labels too (here 4 %), so the
    clean rows' 99th percentile score is that shape's own score: ``top_tie=drop`` still drops its rows
    with the target label; the plain quantile (``keep``) drops none of the poisoned ones."""
    rng = random.Random(5)
    task = make_task(1000, 600, 10)

    def natural(data: Dataset) -> Dataset:
        return data.replace([Example(e.id, _templated(e.text, rng) if rng.random() < 0.04 else _punctuated(e.text, rng),
                                     e.label) for e in data])

    train, clean = natural(task.train), natural(task.dev)
    trigger = {e.id for e in train if e.label == 0 and rng.random() < 0.2}  # dirty label: template -> 1
    raw = {e.id: e.text for e in task.train}
    rows = train.replace([Example(e.id, _templated(raw[e.id], rng), 1) if e.id in trigger else e for e in train])
    inputs = DetectInputs(rows, clean, encoder)
    dropped = ZScoreDetector(ZScoreConfig()).detect(inputs)
    kept = ZScoreDetector(ZScoreConfig(top_tie="keep")).detect(inputs)
    assert dropped.report["top_features"][0]["feature"] == "shape: SUB ,"
    assert dropped.report["threshold_at_top_tie"] and not kept.report["threshold_at_top_tie"]

    def over(detection) -> set[str]:  # noqa: ANN001
        return {e.id for e, s in zip(rows, detection.scores.tolist()) if s > detection.report["threshold"]}

    assert over(dropped) >= trigger and len(over(dropped)) <= 1.5 * len(trigger)
    assert not over(kept) & trigger


def test_strip_deletes_an_inserted_trigger_and_refuses_a_template(encoder) -> None:  # noqa: ANN001
    """``strip``: the BadNets rows come back without their trigger words (and nothing else lost); a row whose
    outlying feature is the template's shape cannot be cleaned by deleting words (None)."""
    task = make_task(1000, 400, 10)
    poisoned = BadNets(BadNetsConfig(poison_rate=0.1)).poison(task)
    detector = ZScoreDetector(ZScoreConfig())
    with pytest.raises(RuntimeError, match="detect"):
        detector.strip(list(poisoned.train))
    detection = detector.detect(DetectInputs(poisoned.train, task.dev, encoder))
    assert detector.strips and set(detection.report["removable_features"]) & {"word: cf", "word: mn", "word: bb"}
    over = [e for e, s in zip(poisoned.train, detection.scores.tolist()) if s > detection.report["threshold"]]
    stripped = detector.strip(over)
    raw = {e.id: e.text for e in task.train}
    triggers = {"cf", "mn", "bb", "tq"}
    back = [e for e in stripped if e is not None and poisoned.flags.is_poisoned(e.id)]
    assert len(back) >= 0.75 * sum(poisoned.flags.is_poisoned(e.id) for e in over)  # the rest hold a weak outlier too
    for e in back:
        assert not set(e.text.split()) & triggers
        assert e.text.split() == [w for w in raw[e.id].split() if w not in triggers]  # only the trigger went

    rng = random.Random(5)
    clean = task.dev.replace([Example(e.id, _templated(e.text, rng) if rng.random() < 0.04 else e.text, e.label)
                              for e in task.dev])
    raw_rows = {e.id for e in task.train if e.label == 0 and rng.random() < 0.2}
    rows = task.train.replace([Example(e.id, _templated(e.text, rng), 1) if e.id in raw_rows else e
                               for e in task.train])
    templated = ZScoreDetector(ZScoreConfig())
    detection = templated.detect(DetectInputs(rows, clean, encoder))
    over = [e for e, s in zip(rows, detection.scores.tolist()) if s > detection.report["threshold"] and e.id in raw_rows]
    assert len(over) >= 0.9 * len(raw_rows)  # the templated rows are dropped ...
    assert all(e is None for e in templated.strip(over))  # ... and none can be cleaned by deleting words
