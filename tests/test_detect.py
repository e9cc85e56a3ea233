"""Poisoned-row detection (``unbackdoor detect``) and the ``reweight`` training defence (spec
``multilevel.md`` §2-5): the contract refuses flags by type; the trilevel reweighting's
hypergradient is exact, its weights stay in [0, 1] and the attacker within ε; on a tiny BadNets task
the poisoned rows get clearly lower weights; per-row sample weights in the training loop; the CLI."""

from __future__ import annotations

import csv
import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from synthetic import run_cli, make_task, save_tiny_model, write_task

from unbackdoor.attacks import BadNets, BadNetsConfig
from unbackdoor.data import Dataset, Example, PoisonedTask, PoisonFlags, sample_subset, write_poisoned_task
from unbackdoor.detect import (
    DETECTORS,
    DetectInputs,
    FeatureData,
    FlagRule,
    LossDetector,
    ReweightConfig,
    ReweightDetector,
    auroc,
    build_levels,
    detection_metrics,
    flag_indices,
    learn_weights,
    scores_file_metrics,
    standardise,
)
from unbackdoor.detect.base import Detection
from unbackdoor.data.io import read_rows_file
from unbackdoor.commands import DetectCommand, run_detect
from unbackdoor.detect.output import write_scores
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.models import load_classifier, provenance_record, save_classifier
from unbackdoor.optim.multilevel import hypergradient, unroll
from unbackdoor.outputs import partial_dir
from unbackdoor.train_defenses.base import build_train_defense
from unbackdoor.training import TrainConfig, train_classifier
from unbackdoor.train_defenses import TrainInputs
from unbackdoor.train_defenses.base import TRAIN_DEFENSES


# ----------------------------------------------------------------------------- fixtures
class Poisoned:
    """A tiny BadNets task (10% of 400 rows, dirty label), a 100-row clean set, and an encoder that
    knows the task's words: the tiny BERT fine-tuned on *another* clean synthetic sample (the role a
    pre-trained encoder plays for real data: it represents sentiment, it never saw the trigger
    mapped to a label)."""

    def __init__(self, root: Path) -> None:
        self.task = make_task(400, 100, 200)
        self.poisoned = BadNets(BadNetsConfig(poison_rate=0.1)).poison(self.task)
        self.clean = sample_subset(self.task.train, size=100, seed=0, exclude=[self.task.test])
        encoder = load_classifier(save_tiny_model(root / "random", "bert", seed=0))
        train_classifier(encoder, make_task(400, 50, 10, seed=7).train,
                         TrainConfig(epochs=3, batch_size=16, learning_rate=1e-3, seed=1, progress=False))
        self.encoder_dir = root / "encoder"
        save_classifier(encoder, self.encoder_dir, provenance_record(encoder, role="model"))
        self.truth = torch.tensor([self.poisoned.flags.is_poisoned(i) for i in self.poisoned.train.ids])

    def inputs(self) -> DetectInputs:
        return DetectInputs(self.poisoned.train, self.clean, load_classifier(self.encoder_dir))


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> Poisoned:
    return Poisoned(tmp_path_factory.mktemp("detect"))


def gaussian_features(n: int = 200, d: int = 8, n_clean: int = 40, flip: int = 20, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> tuple[FeatureData, torch.Tensor]:
    """Two Gaussian classes; the first ``flip`` rows of class 0 are labelled 1 (dirty-label rows)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, d, generator=g, dtype=dtype)
    y = torch.arange(n) % 2
    x = centres[y] * 0.5 + 0.3 * torch.randn(n, d, generator=g, dtype=dtype)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.nonzero(y == 0).flatten()[:flip]] = True
    noisy_y = torch.where(flipped, torch.ones_like(y), y)
    yc = torch.arange(n_clean) % 2
    xc = centres[yc] * 0.5 + 0.3 * torch.randn(n_clean, d, generator=g, dtype=dtype)
    x, xc = standardise(x, xc)
    return FeatureData(x, noisy_y, xc, yc, 2), flipped


# ----------------------------------------------------------------------------- the contract
def test_detectors_cannot_take_flags_or_triggered_data(poisoned: Poisoned) -> None:
    enc = load_classifier(poisoned.encoder_dir)
    task = poisoned.poisoned
    for bad in (task, task.flags, task.triggered_test):
        with pytest.raises(TypeError, match="Dataset"):
            DetectInputs(bad, poisoned.clean, enc)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="Dataset"):
            DetectInputs(task.train, bad, enc)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="DetectInputs"):
        ReweightDetector().detect(task)  # type: ignore[arg-type]
    assert set(DETECTORS.names()) >= {"reweight", "loss"}
    assert "reweight" in TRAIN_DEFENSES
    for cls in (ReweightDetector, LossDetector):  # no slot for flags anywhere
        for fn in (cls.detect, cls._scores, cls.__init__):
            assert not {"flags", "poisoned", "target", "trigger"} & set(inspect.signature(fn).parameters)


def test_flag_rules_rate_threshold_and_ties() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
    assert flag_indices(scores, FlagRule(rate=0.4)) == [1, 3]
    assert flag_indices(scores, FlagRule(threshold=0.5)) == [1, 2, 3]
    assert flag_indices(scores, FlagRule(rate=0.01)) == [1]  # at least one row
    tied = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert flag_indices(tied, FlagRule(rate=0.25)) == [0]
    assert flag_indices(tied, FlagRule(rate=0.25), tiebreak=torch.tensor([0.0, 0.0, 3.0, 9.0])) == [2]
    for bad in ({}, {"rate": 0.1, "threshold": 0.5}, {"rate": 1.5}):
        with pytest.raises(ValueError):
            FlagRule(**bad)


def test_detection_metrics_hand_computed() -> None:
    rows = Dataset(tuple(Example(f"r{i}", f"text {i}", i % 2) for i in range(4)), 2)
    det = Detection(rows, torch.tensor([0.9, 0.2, 0.8, 0.2]), ["r0", "r1"], FlagRule(rate=0.5))
    m = detection_metrics(det, PoisonFlags(frozenset({"r0", "r2"}), 4))
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["auroc"] == 1.0
    assert auroc([0.5, 0.5, 0.1], [True, False, False]) == 0.75  # a tie counts one half
    with pytest.raises(ValueError, match="rows"):
        detection_metrics(det, PoisonFlags(frozenset({"r0"}), 5))


def test_scores_file_metrics_match_the_detection_written(tmp_path: Path) -> None:
    rows = Dataset(tuple(Example(f"r{i}", f"text, {i}", i % 2) for i in range(4)), 2)
    det = Detection(rows, torch.tensor([0.9, 0.2, 0.8, 0.2]), ["r0", "r1"], FlagRule(rate=0.5))
    write_scores(det, tmp_path / "scores.csv")
    # the flags may describe more rows than were scored (detect ran on a subsample)
    flags = PoisonFlags(frozenset({"r0", "r2", "r9"}), 10)
    m = scores_file_metrics(tmp_path / "scores.csv", flags)
    assert (m["precision"], m["recall"], m["auroc"], m["n_rows"], m["n_poisoned"]) == (0.5, 0.5, 1.0, 4, 2)
    assert m == detection_metrics(det, PoisonFlags(frozenset({"r0", "r2"}), 4))


# ----------------------------------------------------------------------------- the multilevel model
def test_reweight_hypergradient_matches_finite_differences_through_three_levels() -> None:
    data, _ = gaussian_features(n=12, d=3, n_clean=6, flip=2, dtype=torch.float64)
    cfg = ReweightConfig(levels=3, inner_steps=4, attack_steps=2, attack_lr=0.5, epsilon=0.2, inner_lr=2.0)
    rows = torch.arange(12)
    levels = build_levels(data, rows, cfg)
    w = torch.linspace(0.2, 0.9, 12, dtype=torch.float64)
    _, grad = hypergradient(levels, w)
    h = 1e-6
    fd = torch.stack([(hypergradient(levels, w + h * e)[0] - hypergradient(levels, w - h * e)[0]) / (2 * h)
                      for e in torch.eye(12, dtype=torch.float64)])
    assert grad.abs().max() > 1e-4
    assert torch.allclose(grad, fd, atol=1e-7, rtol=1e-5)
    # spec §5: with the attacker's budget at zero the trilevel model is the bilevel one
    flat = build_levels(data, rows, cfg.model_copy(update={"epsilon": 0.0}))
    bilevel = build_levels(data, rows, cfg.model_copy(update={"levels": 2}))
    assert torch.allclose(hypergradient(flat, w)[1], hypergradient(bilevel, w)[1], atol=1e-12)


def test_attacker_stays_within_epsilon_and_raises_the_clean_loss() -> None:
    data, _ = gaussian_features()
    cfg = ReweightConfig(levels=3, attack_steps=3, epsilon=0.05)
    levels = build_levels(data, torch.arange(len(data.y)), cfg)
    w = torch.ones(len(data.y))
    perturbation, theta = unroll(levels, [w])
    assert perturbation.norm(dim=1).max() <= 0.05 + 1e-6
    assert perturbation.norm(dim=1).max() > 0.04  # it uses its budget
    calm = build_levels(data, torch.arange(len(data.y)), cfg.model_copy(update={"levels": 2}))
    assert levels[0].objective([w, perturbation, theta]) > calm[0].objective([w, *unroll(calm, [w])])


@pytest.mark.parametrize("levels", [2, 3])
def test_weights_stay_in_unit_interval_and_flipped_rows_sink(levels: int) -> None:
    data, flipped = gaussian_features()
    result = learn_weights(data, ReweightConfig(levels=levels, batch_size=64, epochs=10))
    w = result.weights
    assert w.min() >= 0 and w.max() <= 1
    assert w[~flipped].mean() - w[flipped].mean() > 0.5
    assert auroc(1 - w, flipped) > 0.95
    assert result.history[-1]["clean_loss"] < result.history[0]["clean_loss"]


# ----------------------------------------------------------------------------- a tiny poisoned task
@pytest.mark.parametrize("levels", [2, 3])
def test_reweight_gives_poisoned_rows_clearly_lower_weights(poisoned: Poisoned, levels: int) -> None:
    detection = ReweightDetector(ReweightConfig(levels=levels)).detect(poisoned.inputs(), FlagRule(rate=0.1))
    w = 1 - detection.scores
    truth = poisoned.truth
    assert w.min() >= 0 and w.max() <= 1
    assert w[~truth].mean() - w[truth].mean() > 0.5, (w[~truth].mean(), w[truth].mean())
    metrics = detection_metrics(detection, poisoned.poisoned.flags)
    assert metrics["auroc"] > 0.95 and metrics["precision"] >= 0.85, metrics
    unrolled = detection.report["unrolled"]
    assert "linear head" in unrolled["level3_learner"] and ("level2_attacker" in unrolled) == (levels == 3)


def test_loss_baseline_ranks_poisoned_rows_high(poisoned: Poisoned) -> None:
    detection = LossDetector().detect(poisoned.inputs(), FlagRule(rate=0.1))
    metrics = detection_metrics(detection, poisoned.poisoned.flags)
    assert metrics["auroc"] > 0.9, metrics


# ----------------------------------------------------------------------------- sample weights in the loop
def _weights_after(clf_dir: Path, data: Dataset, sample_weights: Sequence[float] | None) -> dict[str, torch.Tensor]:
    clf = load_classifier(clf_dir)
    train_classifier(clf, data, TrainConfig(epochs=1, batch_size=8, learning_rate=1e-3, seed=0, progress=False),
                     sample_weights=sample_weights)
    return clf.model.state_dict()


def test_sample_weights_in_the_training_loop(tmp_path: Path) -> None:
    base = save_tiny_model(tmp_path / "m", "bert")
    data = make_task(32, 4, 4).train
    plain, ones = _weights_after(base, data, None), _weights_after(base, data, [1.0] * len(data))
    assert all(torch.equal(plain[k], ones[k]) for k in plain)
    # a row of weight 0 does not count: flipping its label changes nothing
    zero = [0.0 if i < 8 else 1.0 for i in range(len(data))]
    flipped = data.replace(Example(e.id, e.text, 1 - e.label if i < 8 else e.label) for i, e in enumerate(data))
    a, b = _weights_after(base, data, zero), _weights_after(base, flipped, zero)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], plain[k]) for k in a)
    for bad in ([1.0] * 3, [-1.0] * len(data), [0.0] * len(data)):
        with pytest.raises(DataError, match="sample weights"):
            _weights_after(base, data, bad)


# ----------------------------------------------------------------------------- the training defence
@pytest.mark.parametrize("use", ["weights", "drop"])
def test_reweight_training_defence(poisoned: Poisoned, use: str) -> None:
    defence = build_train_defense("reweight", {"levels": 3, "use": use, "drop_rate": 0.1,
                                               "train": {"epochs": 1, "progress": False}})
    inputs = TrainInputs(load_classifier(poisoned.encoder_dir), poisoned.poisoned.train, poisoned.task.dev)
    result = defence.fit(inputs)
    report = result.report
    assert report["method"] == "reweight" and report["use"] == use and "level2_attacker" in report["unrolled"]
    assert report["n_clean"] + report["n_selection"] == len(poisoned.task.dev)
    if use == "drop":
        assert report["n_dropped"] == 40
        assert len(set(report["dropped_ids"]) & poisoned.poisoned.flags.poisoned_ids) >= 30
    else:
        assert report["n_dropped"] == 0
    assert result.training.steps > 0
    with pytest.raises(ConfigError, match="use"):
        build_train_defense("reweight", {"use": "ignore"})


def test_train_command_with_the_reweight_defence(poisoned: Poisoned, folders: dict[str, Path]) -> None:
    from unbackdoor.commands import TrainCommand, run_train

    out = folders["root"] / "trained"
    record = run_train(TrainCommand(data=str(folders["poisoned"]), model=str(poisoned.encoder_dir), out=str(out),
                                    defense="reweight", defense_params={"levels": 3, "use": "drop"},
                                    train={"epochs": 1, "progress": False}))
    assert record["defense"]["method"] == "reweight" and record["defense"]["n_dropped"] == 40
    assert "level2_attacker" in record["defense"]["unrolled"] and "asr" in record["metrics"]
    assert (out / "model.safetensors").exists()


# ----------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def folders(poisoned: Poisoned, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detect-cli")
    clean = write_task(poisoned.task, root / "clean")
    write_poisoned_task(poisoned.poisoned, root / "badnets", {"clean": str(clean)})
    return {"clean": clean, "poisoned": root / "badnets", "root": root}


def test_detect_command_end_to_end(poisoned: Poisoned, folders: dict[str, Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = folders["root"] / "out"
    code, stdout, err = run_cli(["detect", "--data", str(folders["poisoned"]), "--clean",
                             str(folders["clean"]), "--clean-size", "100", "--model", str(poisoned.encoder_dir),
                             "--method", "reweight", "-p", "levels=3", "--rate", "0.1", "--out", str(out)], capsys)
    assert code == 0, err
    assert "flagged 40 of 400" in stdout
    record = json.loads((out / "detect.json").read_text())
    assert record["method"] == "reweight" and record["poison_flags"] == "not read"
    assert record["counts"] == {"rows": 400, "flagged": 40, "clean": 100}
    assert "level2_attacker" in record["detector"]["unrolled"] and record["wall_time_s"] > 0
    with (out / "scores.csv").open(encoding="utf-8", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["id"] for r in table] == poisoned.poisoned.train.ids
    assert sum(int(r["flagged"]) for r in table) == 40 and sorted(int(r["rank"]) for r in table) == list(range(1, 401))
    flagged = read_rows_file(out / "flagged.tsv", num_labels=2)
    assert len(flagged) == 40 and set(flagged.ids) == {r["id"] for r in table if r["flagged"] == "1"}
    import unbackdoor.commands as commands

    load_forget_rows = getattr(commands, "load_forget_rows", None)  # what `unlearn --forget` reads
    if load_forget_rows is not None:
        assert load_forget_rows(str(out / "flagged.tsv"), poisoned.clean).ids == flagged.ids
    by_id = {e.id: e for e in poisoned.poisoned.train}
    assert all(by_id[e.id].label == e.label for e in flagged)  # labels as trained
    assert len(set(flagged.ids) & poisoned.poisoned.flags.poisoned_ids) >= 34


def test_detect_command_library_takes_poisoned_rows_without_flags(poisoned: Poisoned, folders: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import unbackdoor.commands as command

    seen: list[object] = []
    real = command.DetectInputs

    def spy(rows: Dataset, clean: Dataset, encoder: object) -> DetectInputs:
        seen.extend([rows, clean])
        return real(rows, clean, encoder)  # type: ignore[arg-type]

    monkeypatch.setattr(command, "DetectInputs", spy)
    cmd = DetectCommand(data=str(folders["poisoned"]), clean=str(folders["clean"]), clean_set={"size": 50},
                        model=str(poisoned.encoder_dir), method="loss", threshold=2.0, max_train=200,
                        out=str(folders["root"] / "lib"))
    record = run_detect(cmd)
    assert all(type(x) is Dataset for x in seen) and not any(isinstance(x, PoisonedTask) for x in seen)
    assert record["counts"]["rows"] == 200 and record["rule"]["threshold"] == 2.0


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "nope"], "unknown detector 'nope'"),
    (["--rate", "0.1", "--threshold", "0.5"], "not both"),
    (["-p", "levels=4"], "levels"),
    (["-p", "bogus=1"], "bogus: unknown key"),
])
def test_detect_command_bad_input(folders: dict[str, Path], poisoned: Poisoned,
                                  capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    out = folders["root"] / "bad-out"
    code, _, err = run_cli(["detect", "--data", str(folders["poisoned"]), "--clean",
                        str(folders["clean"]), "--model", str(poisoned.encoder_dir), "--out", str(out), *args], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, err
    assert not out.exists() and not partial_dir(out).exists()


def test_clean_classifier_picks_the_penalty_that_predicts_best_out_of_fold() -> None:
    from unbackdoor.detect.features import clean_classifier

    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 8, generator=g) * 0.3 + torch.nn.functional.one_hot(y, 8).float()  # three separable blobs
    weight, bias, l2, accuracy = clean_classifier(x, y, 3, (1e-4, 1e-2, 10.0))
    assert l2 in (1e-4, 1e-2) and accuracy > 0.95  # 10.0 shrinks the weights to nothing
    assert ((x @ weight.T + bias).argmax(1) == y).float().mean() > 0.95
    assert weight.shape == (3, 8) and bias.shape == (3,)
