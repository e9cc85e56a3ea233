"""The field's training-data filters as ``detect`` methods (BKI, CUBE, ABL's early-loss isolation)
and ABL as a train-time defence, on tiny poisoned tasks.

Two tasks:

* ``sentiment``: the synthetic sentiment task with BadNets (dirty label, 10 %, the four rare words
  cf/mn/bb/tq), and an encoder that knows the task's words (a tiny BERT fine-tuned on another clean
  sample: the role a pre-trained encoder plays). BKI and CUBE are tested here, through the library
  entry of ``unbackdoor detect`` (:func:`run_detect`).
* ``easy trigger``: a clean task that is hard to fit (20 % of the clean labels flipped: ambiguous
  rows) poisoned with one trigger word (``cf``, 10 %), and a randomly initialised tiny BERT: the
  trigger is the easiest rule in the data, the case ABL's isolation is built for (the ``loss``
  detector, which flags hard rows, is blind to it). Isolation and the ``abl`` defence are tested here.
"""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from synthetic import make_task, save_tiny_model, write_task

import unbackdoor.detect as detect_pkg
from unbackdoor.attacks import BadNets, BadNetsConfig
from unbackdoor.data import Dataset, Example, Task, write_poisoned_task
from unbackdoor.detect import (
    DETECTORS,
    BkiDetector,
    CubeDetector,
    DetectInputs,
    FlagRule,
    IsolationConfig,
    IsolationDetector,
    LocalGradientAscent,
    isolate,
    scores_file_metrics,
)
from unbackdoor.train_defenses import AblDefense
from unbackdoor.detect.bki import KeywordStats, keyword_stats, kept_words, row_words, without_word
from unbackdoor.commands import DetectCommand, run_detect
from unbackdoor.detect.base import build_detector
from unbackdoor.detect.cube import minority_scores
from unbackdoor.errors import ConfigError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import load_classifier, provenance_record, save_classifier
from unbackdoor.train_defenses.base import build_train_defense
from unbackdoor.training import TrainConfig, train_classifier
from unbackdoor.train_defenses import TrainInputs
from unbackdoor.train_defenses.base import TRAIN_DEFENSES

TRIGGERS = {"cf", "mn", "bb", "tq"}


def tiny_train(epochs: int, seed: int = 1) -> dict[str, object]:
    """Loop settings for the tiny BERT (it needs lr 1e-3)."""
    return {"epochs": epochs, "batch_size": 16, "learning_rate": 1e-3, "seed": seed, "progress": False}


# ----------------------------------------------------------------------------- fixtures
class Tasks:
    """Both tiny tasks, their folders, the sentiment-aware encoder and the random base."""

    def __init__(self, root: Path) -> None:
        # the sentiment task + an encoder that knows sentiment (never saw a trigger)
        self.task = make_task(400, 100, 200)
        self.poisoned = BadNets(BadNetsConfig(poison_rate=0.1)).poison(self.task)
        encoder = load_classifier(save_tiny_model(root / "random-for-encoder", "bert", seed=0))
        train_classifier(encoder, make_task(400, 50, 10, seed=7).train, TrainConfig(**tiny_train(3)))
        self.encoder_dir = root / "encoder"
        save_classifier(encoder, self.encoder_dir, provenance_record(encoder, role="model"))
        self.clean_dir = write_task(self.task, root / "clean")
        self.poisoned_dir = root / "badnets"
        write_poisoned_task(self.poisoned, self.poisoned_dir, {"clean": str(self.clean_dir)})
        # the easy-trigger task: hard clean rows, one trigger word, a random base
        rng = random.Random(5)
        noisy = self.task.train.replace(Example(e.id, e.text, 1 - e.label if rng.random() < 0.2 else e.label)
                                        for e in self.task.train)
        self.hard = Task("hard", noisy, self.task.dev, self.task.test)
        self.easy = BadNets(BadNetsConfig(poison_rate=0.1, triggers=("cf",))).poison(self.hard)
        self.base_dir = save_tiny_model(root / "base", "bert", seed=0)
        self.hard_dir = write_task(self.hard, root / "hard")
        self.easy_dir = root / "easy-trigger"
        write_poisoned_task(self.easy, self.easy_dir, {"clean": str(self.hard_dir)})


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Tasks:
    return Tasks(tmp_path_factory.mktemp("detect-field"))


def detect(tasks: Tasks, tmp_path: Path, method: str, params: dict[str, object], easy: bool = False,
           **rule: float) -> tuple[dict[str, object], dict[str, float | int]]:
    """``run_detect`` on one of the poisoned folders; (its record, its scores vs the true flags)."""
    data, clean, model, flags = ((tasks.easy_dir, tasks.hard_dir, tasks.base_dir, tasks.easy.flags) if easy else
                                 (tasks.poisoned_dir, tasks.clean_dir, tasks.encoder_dir, tasks.poisoned.flags))
    out = tmp_path / method
    record = run_detect(DetectCommand(data=str(data), clean=str(clean), clean_set={"size": 50}, model=str(model),
                                      method=method, params=params, out=str(out), **(rule or {"rate": 0.1})))
    assert json.loads((out / "detect.json").read_text())["poison_flags"] == "not read"
    return record, scores_file_metrics(out / "scores.csv", flags)


# ----------------------------------------------------------------------------- registration and contract
def test_registered_without_a_slot_for_flags() -> None:
    assert {"bki", "cube", "isolation"} <= set(DETECTORS.names())
    assert TRAIN_DEFENSES.get("abl") is AblDefense
    assert detect_pkg.__all__ == sorted(detect_pkg.__all__)
    for fn in (BkiDetector._scores, CubeDetector._scores, IsolationDetector._scores, AblDefense._fit,
               AblDefense.__init__, BkiDetector.__init__):
        assert not {"flags", "poisoned", "target", "trigger"} & set(inspect.signature(fn).parameters)


@pytest.mark.parametrize(("name", "params", "message"), [
    ("bki", {"top_k": 0}, "top_k"),
    ("bki", {"norm": "l1"}, "norm"),
    ("bki", {"train": {"epochs": 0}}, "train.epochs"),
    ("cube", {"max_share": 0}, "max_share"),
    ("cube", {"min_cluster_size": 1}, "min_cluster_size"),
    ("isolation", {"gamma": -0.1}, "gamma"),
    ("isolation", {"lga": "global"}, "lga"),
    ("isolation", {"bogus": 1}, "bogus: unknown key"),
])
def test_bad_detector_params_fail_before_any_work(tasks: Tasks, tmp_path: Path, name: str,
                                                  params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_detector(name, params)
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=message):
        run_detect(DetectCommand(data=str(tasks.poisoned_dir), clean=str(tasks.clean_dir), method=name,
                                 params=params, out=str(out)))
    assert not out.exists()


def test_cube_umap_needs_umap_learn() -> None:
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="umap-learn"):
            build_detector("cube", {"reduction": "umap"})
    else:  # pragma: no cover - umap-learn is not a dependency
        assert build_detector("cube", {"reduction": "umap"}).config.reduction == "umap"


@pytest.mark.parametrize(("params", "message"), [
    ({"isolation_rate": 1.0}, "isolation_rate"),
    ({"isolation": {"gamma": -1}}, "isolation.gamma"),
    ({"unlearning": "forget"}, "unlearning"),
    ({"unlearn_weight": 0}, "unlearn_weight"),
    ({"start": "scratch"}, "start"),
])
def test_bad_abl_params(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_train_defense("abl", params)


# ----------------------------------------------------------------------------- pieces, by hand
def test_bki_words_deletions_and_keyword_scores() -> None:
    row = Example("r", "a cf movie cf", 1, "good plot")
    words = row_words(row)
    assert [(w.text, w.segment) for w in words] == [("a", 0), ("cf", 0), ("movie", 0), ("cf", 0),
                                                    ("good", 1), ("plot", 1)]
    assert without_word(row, words[1], 1).text == "a movie cf" and without_word(row, words[4], 4).text_pair == "plot"
    # a word kept twice in one row counts once, with its larger change; ties keep the earlier word
    kept = kept_words(words, [0.1, 0.9, 0.2, 0.7, 0.2, 0.0], top_k=3)
    assert kept == {"cf": 0.9, "movie": 0.2}
    stats = keyword_stats([{"cf": 0.9, "the": 0.1}, {"cf": 0.5, "the": 0.3}, {"rare": 5.0}])
    assert [s.word for s in stats] == ["cf", "the", "rare"]  # a word kept by one row scores 0 (log 1)
    assert stats[0].count == 2 and stats[0].mean_delta == pytest.approx(0.7)
    assert stats[0].score == pytest.approx(0.7 * torch.log(torch.tensor(2.0)).item())
    assert KeywordStats("rare", 1, 5.0).score == 0.0


def test_cube_minority_groups_and_scores() -> None:
    import numpy as np

    labels = [0] * 6 + [1] * 10
    groups = np.array([0, 0, 0, 0, 3, -1] + [1] * 6 + [2] * 3 + [-1])
    scores, summary = minority_scores(labels, groups, max_share=0.5)
    # label 0: group 0 (4 of 6) kept; group 3 and noise (1 of 6 each) are minorities
    # label 1: group 1 (6 of 10) kept; group 2 (3 of 10) and noise (1 of 10) are minorities
    expected = [0, 0, 0, 0, 5 / 6, 5 / 6] + [0] * 6 + [0.7] * 3 + [0.9]
    assert scores.tolist() == pytest.approx(expected)
    assert [g["minority"] for g in summary[1]["groups"]] == [False, True, True]
    assert summary[0]["groups"][0] == {"group": 0, "size": 4, "minority": False}
    # a second group holding at least max_share of its label is kept (the code's drop_scale)
    even, _ = minority_scores([0] * 4, np.array([0, 0, 1, 1]), max_share=0.5)
    assert even.tolist() == [0, 0, 0, 0]
    assert (scores > 0.5).sum() == (scores > 0).sum()  # threshold 1 - max_share flags exactly the minorities


def test_local_gradient_ascent_flips_the_gradient_below_gamma() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.1]], requires_grad=True)
    labels = torch.tensor([0, 1])
    out = SimpleNamespace(logits=logits)  # what the loop's model returns, as far as LGA reads it
    loss = torch.nn.functional.cross_entropy(logits, labels)  # ≈ 0.39 (rows: 0.13, 0.64)
    (plain,) = torch.autograd.grad(loss, logits, retain_graph=True)
    below = LocalGradientAscent(gamma=0.6).extra_loss(None, {"labels": labels}, out, loss)  # type: ignore[arg-type]
    (flipped,) = torch.autograd.grad(below, logits, retain_graph=True)
    assert torch.allclose(flipped, -plain) and below.item() == pytest.approx(-loss.item())
    above = LocalGradientAscent(gamma=0.2)
    kept = above.extra_loss(None, {"labels": labels}, out, loss)  # type: ignore[arg-type]
    assert kept.item() == pytest.approx(loss.item())
    assert above.ascended == 0 and above.batches == 1
    # per row: the confident row (loss 0.13) is ascended, the other (0.64) descended
    per_row = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    row = LocalGradientAscent(gamma=0.5, granularity="row")
    value = row.extra_loss(None, {"labels": labels}, out, loss)  # type: ignore[arg-type]
    assert value.item() == pytest.approx(((per_row[1] - per_row[0]) / 2).item()) and row.ascended == 0.5


# ----------------------------------------------------------------------------- the detectors find the planted rows
def test_bki_names_the_trigger_words(tasks: Tasks, tmp_path: Path) -> None:
    record, metrics = detect(tasks, tmp_path, "bki", {"n_keywords": 4, "train": tiny_train(10)})
    report = record["detector"]
    assert report["suspected_triggers"][0] in TRIGGERS  # the top keyword is a trigger word
    assert set(report["suspected_triggers"]) == TRIGGERS  # and so are the next three
    assert [k["word"] for k in report["keywords"][:4]] == report["suspected_triggers"]
    assert report["n_rows_with_trigger"] >= 36 and report["n_words_scored"] > 400
    assert metrics["precision"] >= 0.9 and metrics["recall"] >= 0.9 and metrics["auroc"] > 0.95, metrics


def test_cube_flags_the_minority_cluster_of_the_target_label(tasks: Tasks, tmp_path: Path) -> None:
    # threshold 1 - max_share: exactly the rows CUBE itself removes
    record, metrics = detect(tasks, tmp_path, "cube", {"train": tiny_train(2)}, threshold=0.5)
    report = record["detector"]
    assert report["reduction"].startswith("PCA") and report["n_minority"] == record["counts"]["flagged"]
    target = next(s for s in report["labels"] if s["label"] == tasks.poisoned.target_label)
    assert any(g["minority"] for g in target["groups"])
    assert metrics["precision"] >= 0.8 and metrics["recall"] >= 0.8 and metrics["auroc"] > 0.9, metrics


def test_isolation_ranks_the_easy_to_fit_rows_first(tasks: Tasks, tmp_path: Path) -> None:
    record, metrics = detect(tasks, tmp_path, "isolation", {"train": tiny_train(10)}, easy=True)
    assert metrics["auroc"] > 0.85 and metrics["precision"] >= 0.4, metrics  # chance: 0.5 and 0.1
    report = record["detector"]
    assert report["lga"]["ascended_share"] > 0.1 and report["scored_epochs"] == 1


def test_lga_holds_the_training_loss_at_gamma(tasks: Tasks) -> None:
    # gamma above the loss of an untrained model: LGA ascends at once and keeps the loss up there,
    # where plain training would take it down (0.69 -> 0.67 in these 3 epochs)
    cfg = IsolationConfig(gamma=0.9, score_epochs=2, train=TrainConfig(**tiny_train(3)))
    result = isolate(load_classifier(tasks.base_dir), tasks.poisoned.train, cfg)
    tail = [h["train_loss"] for h in result.training.history[-2:]]
    assert all(t > 0.8 for t in tail), tail
    assert result.lga_ascended / result.lga_batches > 0.3 and result.scored_epochs == 2
    assert result.losses.shape == (400,) and float(result.losses.mean()) > 0.75


def test_filters_are_seeded_and_leave_the_encoder_alone(tasks: Tasks) -> None:
    rows = Dataset(tasks.poisoned.train.examples[:60], 2, "small")
    encoder = load_classifier(tasks.encoder_dir)
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    inputs = DetectInputs(rows, tasks.task.dev, encoder)
    for name, params in (("bki", {}), ("cube", {"min_samples": 3}), ("isolation", {"score_epochs": 2})):
        full = {**params, "train": tiny_train(2)}
        first, second = (build_detector(name, full).detect(inputs, FlagRule(rate=0.2)) for _ in range(2))
        assert torch.equal(first.scores, second.scores) and first.flagged_ids == second.flagged_ids, name
    assert all(torch.equal(before[k], v) for k, v in encoder.model.state_dict().items())


# ----------------------------------------------------------------------------- ABL as a training defence
def test_abl_lowers_the_attack_success_rate(tasks: Tasks) -> None:
    task, easy = tasks.hard, tasks.easy
    plain = build_train_defense("none", {"train": tiny_train(10)}).fit(
        TrainInputs(load_classifier(tasks.base_dir), easy.train, task.dev))
    before = evaluate_classifier(plain.model, task.test, easy.triggered_test)
    abl = build_train_defense("abl", {"isolation_rate": 0.05, "isolation": {"gamma": 0.3}, "train": tiny_train(10)})
    result = abl.fit(TrainInputs(load_classifier(tasks.base_dir), easy.train, task.dev))
    after = evaluate_classifier(result.model, task.test, easy.triggered_test)
    assert before.asr is not None and after.asr is not None
    assert before.asr >= 0.9 and after.asr <= before.asr - 0.5, (before, after)
    assert after.cacc >= before.cacc - 0.15, (before, after)
    report = result.report
    assert report["n_isolated"] == 20 and report["n_kept"] == 380 and report["kept"] == "last epoch"
    assert len(set(report["isolated_ids"]) & easy.flags.poisoned_ids) >= 12  # mostly the planted rows
    assert report["ascent"]["steps"] == result.training.steps and report["ascent"]["final_isolated_loss"] > 2.0
    assert report["isolation"]["train"]["epochs"] == 10 and report["isolation"]["lga"]["batches"] > 0


def test_abl_sequential_unlearning_ascends_on_the_isolated_rows(tasks: Tasks) -> None:
    abl = build_train_defense("abl", {"unlearning": "sequential", "isolation_rate": 0.05,
                                      "isolation": {"train": {"epochs": 3}},
                                      "unlearn_train": {"learning_rate": 1e-3, "batch_size": 16},
                                      "train": tiny_train(2)})
    result = abl.fit(TrainInputs(load_classifier(tasks.base_dir), tasks.easy.train, tasks.task.dev))
    unlearning = result.report["unlearning"]
    losses = [h["train_loss"] for h in unlearning["history"]]
    assert len(losses) == 5 and losses[-1] > losses[0], losses  # the isolated rows' loss goes up
    assert result.report["ascent"]["steps"] == 10  # 20 isolated rows, batch 16: 2 steps x 5 epochs
    assert result.report["isolation"]["steps"] == 3 * 25


def test_train_command_with_the_abl_defence(tasks: Tasks, tmp_path: Path) -> None:
    from unbackdoor.commands import TrainCommand, run_train

    out = tmp_path / "abl-model"
    record = run_train(TrainCommand(data=str(tasks.easy_dir), model=str(tasks.base_dir), out=str(out), defense="abl",
                                    defense_params={"isolation_rate": 0.05}, train=tiny_train(1)))
    assert record["defense"]["method"] == "abl" and record["defense"]["n_isolated"] == 20
    assert record["defense"]["isolation"]["train"]["epochs"] == 1  # stage 1 follows --epochs unless overridden
    assert "asr" in record["metrics"] and (out / "model.safetensors").exists()
