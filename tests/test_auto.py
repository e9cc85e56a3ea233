"""``auto``: the purify and train-time defences that choose from what the defender holds, never the
attack (its name, the flags, triggered rows), and record their choices."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from unbackdoor.data import Dataset, Example
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import load_classifier
from unbackdoor.purify import PURIFY_DEFENSES, PurifyInputs
from unbackdoor.purify.auto import AutoPurify, AutoPurifyConfig, epur_step
from unbackdoor.train_defenses import TRAIN_DEFENSES, TrainInputs
from unbackdoor.train_defenses.auto import AutoTrain, AutoTrainConfig, gap_cut, label_balance

FORBIDDEN = {"flags", "poison_flags", "trigger", "target", "target_label", "triggered", "poisoned", "attack"}
FAST = {"epochs": 3, "batch_size": 16, "learning_rate": 1e-3, "progress": False}


def test_auto_is_registered_and_its_api_has_no_slot_for_the_attack() -> None:
    assert "auto" in PURIFY_DEFENSES and "auto" in TRAIN_DEFENSES
    for cls, config in ((AutoPurify, AutoPurifyConfig), (AutoTrain, AutoTrainConfig)):
        assert not set(config.model_fields) & FORBIDDEN
        assert not {f.name for f in dataclasses.fields(PurifyInputs)} & FORBIDDEN
        assert not {f.name for f in dataclasses.fields(TrainInputs)} & FORBIDDEN
        for method in ("purify", "fit"):
            if hasattr(cls, method):
                assert not set(inspect.signature(getattr(cls, method)).parameters) & FORBIDDEN


def test_purify_auto_resets_standing_out_embeddings_first_and_removes_the_backdoor(planted) -> None:  # noqa: ANN001
    victim, base = load_classifier(planted.victim_dir), load_classifier(planted.base_dir)
    before = evaluate_classifier(victim, planted.task.test, planted.poisoned.triggered_test)
    # scan's rule: the tiny vocabulary has 44 scored rows, fewer than E-PUR's default top 200
    config = AutoPurifyConfig(epur_rule="scan", encoder_step="always", encoder_params={"train": {**FAST, "epochs": 5}})
    result = AutoPurify(config).purify(PurifyInputs(suspect=victim, clean=planted.clean, base=base))
    choices = result.report["choices"]
    assert set(choices["scan"]["standing_out"]) & {"cf", "mn", "bb", "tq"}  # the trigger rows drifted
    assert choices["steps"] == ["e-pur", "fine-purifying"]
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert before.asr >= 0.8 and after.asr <= 0.2, (before.asr, after.asr)
    assert after.cacc >= before.cacc - 0.05


def test_purify_auto_embedding_step_rules() -> None:
    always, scan = AutoPurifyConfig(), AutoPurifyConfig(epur_rule="scan")
    assert epur_step(0, always) == [("e-pur", {"n_reset": 200, "finetune": False})]  # E-PUR's own top rows
    assert epur_step(350, always)[0][1]["n_reset"] == 350  # at least every row scan flags
    assert epur_step(0, AutoPurifyConfig(epur_params={"n_reset": 50}))[0][1]["n_reset"] == 50
    assert epur_step(0, scan) == [] and epur_step(3, scan) == [("e-pur", {"n_reset": 3, "finetune": False})]


def test_purify_auto_without_a_base_falls_back_to_clean_finetuning(planted) -> None:  # noqa: ANN001
    config = AutoPurifyConfig()
    result = AutoPurify(config).purify(PurifyInputs(suspect=load_classifier(planted.victim_dir), clean=planted.clean))
    assert result.report["choices"]["steps"] == ["finetune"] and result.report["choices"]["base"] is False


def test_gap_cut_finds_the_separate_group_and_keeps_almost_everything_without_one() -> None:
    scores = torch.tensor([-0.01] * 10 + [-0.5] * 80 + [-0.6] * 10)
    assert gap_cut(scores, 0.01, 0.35)[0] == 10  # the group's edge
    assert gap_cut(scores, 0.01, 0.05)[0] == 1  # its edge lies beyond max_drop: no group inside, min_drop
    smooth = -torch.linspace(0, 1, 100)  # no separate group at all
    assert gap_cut(smooth, 0.01, 0.35)[0] == 1


@pytest.fixture(scope="module")
def sentiment_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT that knows the synthetic sentiment task (never saw a trigger): the clean base."""
    from synthetic import make_task, save_tiny_model

    from unbackdoor.models import provenance_record, save_classifier
    from unbackdoor.training import TrainConfig, train_classifier

    root = tmp_path_factory.mktemp("auto-base")
    encoder = load_classifier(save_tiny_model(root / "random", "bert", seed=0))
    train_classifier(encoder, make_task(400, 50, 10, seed=7).train, TrainConfig(**{**FAST, "seed": 1}))
    save_classifier(encoder, root / "base", provenance_record(encoder, role="model"))
    return root / "base"


def test_train_auto_drops_the_flagged_group_and_trains_without_the_backdoor(planted, sentiment_base) -> None:  # noqa: ANN001
    """CUBE's minority clusters form the separate group on the tiny task: the cut falls at its edge
    (most poisoned rows dropped, few clean ones), and the model retrained on the rest is clean."""
    train = {**FAST, "epochs": 10, "seed": 1}
    config = AutoTrainConfig(detectors=["cube"], detector_params={"cube": {"train": {**FAST, "epochs": 2}}}, train=train,
                             balance="dev", shift_bias="dev", suspects="drop")
    result = AutoTrain(config).fit(TrainInputs(load_classifier(sentiment_base), planted.poisoned.train, planted.task.dev))
    dropped = set(result.report["dropped_ids"])
    assert set(result.report["choices"]["label_shares"]) == {"kept", "dev"}  # the retraining was reweighted
    calibration = result.report["choices"]["bias_shift"]  # and its head bias shifted to the dev shares
    assert calibration["applied"] and abs(sum(calibration["offsets"])) < 1e-6, calibration
    poisoned = planted.poisoned.flags.poisoned_ids
    assert len(dropped & poisoned) >= 0.8 * len(poisoned) and len(dropped) <= 1.5 * len(poisoned), len(dropped)
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert after.asr <= 0.2 and after.cacc >= 0.9, after
    assert result.report["choices"]["steps"][0]["drop_rule"] == "gap"  # CUBE calibrates no threshold
    assert result.report["n_trained"] == 400 - len(dropped) + result.report["choices"]["n_clean_trained"]


def test_train_auto_reference_drops_the_rows_whose_label_the_clean_reference_rejects(  # noqa: ANN001
        planted, sentiment_base) -> None:
    """The ``reference`` detector's threshold (0: the reference labels the row otherwise) is the calibrated cut
    train auto uses: the dirty-label rows go, few clean ones with them, and the retrained model is clean."""
    config = AutoTrainConfig(detectors=["reference"], detector_params={"reference": {"model": "frozen"}},
                             train={**FAST, "epochs": 10, "seed": 1})
    result = AutoTrain(config).fit(TrainInputs(load_classifier(sentiment_base), planted.poisoned.train, planted.task.dev))
    step = result.report["choices"]["steps"][0]
    assert step["drop_rule"] == "calibrated" and step["score_at_cut"] == 0.0
    dropped, poisoned = set(result.report["dropped_ids"]), planted.poisoned.flags.poisoned_ids
    assert len(dropped & poisoned) >= 0.9 * len(poisoned) and len(dropped) <= 1.5 * len(poisoned), len(dropped)
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert after.asr <= 0.2 and after.cacc >= 0.9, after


def test_train_auto_default_runs_its_detectors_in_turn(planted, sentiment_base) -> None:  # noqa: ANN001
    """The default composition: Z-defence's word statistics drop the BadNets rows, then the contrast and
    isolation score only the rows left, in turn; the model retrained on the rest is clean."""
    train = {**FAST, "epochs": 10, "seed": 1}
    config = AutoTrainConfig(detector_params={"isolation": {"train": {**FAST, "epochs": 2}}}, train=train)
    assert config.detectors == ["zscore", "contrast", "isolation"]
    result = AutoTrain(config).fit(TrainInputs(load_classifier(sentiment_base), planted.poisoned.train, planted.task.dev))
    first, second, third = result.report["choices"]["steps"]
    poisoned = planted.poisoned.flags.poisoned_ids
    by_zscore = set(result.report["dropped_ids"][:first["n_dropped"]])
    assert first["detector"] == "zscore" and first["drop_rule"] == "calibrated"
    assert first["score_at_cut"] == result.report["detectors"]["zscore"]["threshold"]  # the clean rows' 99th percentile score
    assert len(by_zscore & poisoned) >= 0.9 * len(poisoned), first["n_dropped"]
    assert second["detector"] == "contrast" and second["drop_rule"] == "calibrated"
    assert second["rows_scored"] == 400 - first["n_dropped"] and second["score_at_cut"] == 0.0  # its FDR cut
    assert third["detector"] == "isolation" and third["rows_scored"] == second["rows_scored"] - second["n_dropped"]
    assert result.report["config"]["suspects"] == "drop" and result.report["choices"]["n_returned"] == 0
    assert result.report["n_trained"] == (400 - first["n_dropped"] - second["n_dropped"] - third["n_dropped"]
                                          + result.report["choices"]["n_clean_trained"])
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert after.asr <= 0.2 and after.cacc >= 0.9, after


@pytest.mark.parametrize(("params", "message"), [({"detectors": ["nope"]}, "unknown detector 'nope'"),
                                               ({"detector_params": {"zscore": {"bogus": 1}}}, "bogus: unknown key"),
                                               ({"detector_params": {"cube": {}}}, "which detectors does not list"),
                                               ({"drop": "all"}, "drop"), ({"max_drop": 1.5}, "max_drop")])
def test_bad_auto_options_fail_before_any_work(params: dict, message: str) -> None:
    from unbackdoor.errors import ConfigError
    from unbackdoor.train_defenses import build_train_defense

    with pytest.raises(ConfigError, match=message):
        build_train_defense("auto", params)


def test_label_balance_weighs_the_kept_rows_as_the_clean_dev_labels() -> None:
    kept = Dataset([Example(str(i), "x", 1 if i < 6 else 0) for i in range(8)], name="kept", num_labels=2)  # 75 % label 1
    dev = Dataset([Example(f"d{i}", "x", i % 2) for i in range(10)], name="dev", num_labels=2)  # 50 %
    weights, shares = label_balance(kept, dev)
    assert shares == {"kept": {0: 0.25, 1: 0.75}, "dev": {0: 0.5, 1: 0.5}}
    assert sum(weights) == pytest.approx(len(kept))  # mean weight 1
    by_label = {y: sum(w for w, e in zip(weights, kept, strict=True) if e.label == y) for y in (0, 1)}
    assert by_label[0] == pytest.approx(by_label[1])  # each label weighs as in dev


@pytest.fixture(scope="module")
def ep_suspect(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """(base, EP victim, poisoned task): a tiny BERT fine-tuned cleanly from ``base``, then EP's one
    trigger row (``cf``) trained: a backdoor that lives in one embedding row only."""
    from synthetic import VOCAB, make_task, save_tiny_model

    from unbackdoor.attacks import run_weight_attack
    from unbackdoor.models import provenance_record, save_classifier
    from unbackdoor.training import TrainConfig, train_classifier

    root = tmp_path_factory.mktemp("auto-ep")
    task = make_task(400, 100, 200)
    base = save_tiny_model(root / "base", "bert")
    clf = load_classifier(base)
    train_classifier(clf, task.train, TrainConfig(epochs=10, batch_size=16, learning_rate=1e-3, progress=False),
                     dev=task.dev)
    weight = clf.model.get_input_embeddings().weight
    with torch.no_grad():  # a rare word's row at a trained word's size, as in a real pre-trained model
        weight[VOCAB.index("cf")] *= 0.3 / weight[VOCAB.index("cf")].norm()
    save_classifier(clf, root / "clean", provenance_record(clf, role="model"))
    victim, poisoned = run_weight_attack("ep", {"poison_rate": 0.1, "train": {"learning_rate": 5e-2, "batch_size": 8}},
                                         task, str(root / "clean"))
    save_classifier(victim, root / "victim", provenance_record(victim, role="model"))
    return base, root / "victim", poisoned


def test_purify_auto_trigger_probe_skips_the_encoder_step_when_the_reset_removed_the_backdoor(ep_suspect) -> None:  # noqa: ANN001
    base, victim_dir, poisoned = ep_suspect
    victim = load_classifier(victim_dir)
    before = evaluate_classifier(victim, poisoned.clean.test, poisoned.triggered_test)
    clean = Dataset(tuple(poisoned.clean.dev.examples[:60]), poisoned.clean.dev.num_labels, "clean")
    config = AutoPurifyConfig(epur_rule="scan")  # encoder_step=if_trigger_remains, the default
    result = AutoPurify(config).purify(PurifyInputs(suspect=victim, clean=clean, base=load_classifier(base)))
    choices = result.report["choices"]
    assert "cf" in choices["scan"]["standing_out"]
    probe = choices["trigger_probe"]
    assert probe["before"]["excess"] >= 0.1 and probe["after"]["excess"] < 0.1, probe
    assert choices["steps"] == ["e-pur"]  # no fine-tuning after the reset
    after = evaluate_classifier(result.model, poisoned.clean.test, poisoned.triggered_test)
    assert before.asr >= 0.9 and after.asr <= 0.1, (before.asr, after.asr)
    assert after.cacc >= before.cacc - 0.02


def test_purify_auto_trigger_probe_on_badnets(planted, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """On the tiny BadNets victim the flagged rows' reset alone removes the backdoor (the probe sees it,
    and the measured ASR agrees); when the probe finds the tokens still a trigger, the encoder step runs."""
    import unbackdoor.purify.auto as auto

    victim, base = load_classifier(planted.victim_dir), load_classifier(planted.base_dir)
    config = AutoPurifyConfig(epur_rule="scan", encoder_step="if_trigger_remains",
                              encoder_params={"train": {**FAST, "epochs": 5}})
    result = AutoPurify(config).purify(PurifyInputs(suspect=victim, clean=planted.clean, base=base))
    probe = result.report["choices"]["trigger_probe"]
    assert probe["before"]["excess"] >= 0.3 and probe["after"]["excess"] < 0.1, probe
    assert result.report["choices"]["steps"] == ["e-pur"]
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert after.asr <= 0.2 and after.cacc >= 0.9, (after.asr, after.cacc)

    monkeypatch.setattr(auto, "probe_candidates", lambda *a, **k: {"flagged": 0.6, "control": 0.0, "excess": 0.6})
    result = AutoPurify(config).purify(PurifyInputs(suspect=load_classifier(planted.victim_dir), clean=planted.clean,
                                                    base=base))
    choices = result.report["choices"]
    assert choices["steps"] == ["e-pur", "fine-purifying"] and "still act as a trigger" in choices["why"]
    assert [step["method"] for step in result.report["steps"]["before"]] == ["e-pur"]  # the reset, recorded once


def test_average_states_is_the_elementwise_mean_of_float_tensors() -> None:
    from unbackdoor.train_defenses.auto import average_states

    a = {"w": torch.tensor([1.0, 3.0]), "ids": torch.tensor([0, 1])}
    b = {"w": torch.tensor([3.0, 5.0]), "ids": torch.tensor([0, 1])}
    out = average_states([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0])) and torch.equal(out["ids"], a["ids"])


def test_train_auto_soup_averages_retrained_models_and_stays_clean(planted, sentiment_base) -> None:  # noqa: ANN001
    """soup=2: two retrainings from the same start (seeds 1 and 2), weights averaged, then the model is
    measured: the backdoor stays out and the record names both members."""
    config = AutoTrainConfig(detectors=["zscore"], soup=2, train={**FAST, "epochs": 10, "seed": 1})
    result = AutoTrain(config).fit(TrainInputs(load_classifier(sentiment_base), planted.poisoned.train, planted.task.dev))
    soup = result.report["choices"]["soup"]
    assert soup["members"] == 2 and len(soup["member_dev_accuracy"]) == 2 and 0 <= soup["dev_accuracy"] <= 1
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert after.asr <= 0.2 and after.cacc >= 0.9, after


@pytest.mark.parametrize("relabeller", ["retrained", "clean"])
def test_train_auto_relabel_gives_back_the_dirty_label_rows_with_their_true_label(  # noqa: ANN001
        planted, sentiment_base, relabeller: str) -> None:
    """suspects=relabel: the relabeller (the model trained without the dropped rows, or a classifier of the
    clean dev set's frozen features) rejects the dirty-label rows' target label; they come back with their
    true label (the clean copy's), so the trigger is taught against the target, and the rows whose label it
    accepts stay out."""
    config = AutoTrainConfig(detectors=["zscore"], suspects="relabel", relabeller=relabeller,
                             train={**FAST, "epochs": 10, "seed": 1})
    result = AutoTrain(config).fit(TrainInputs(load_classifier(sentiment_base), planted.poisoned.train, planted.task.dev))
    report, poisoned = result.report, set(planted.poisoned.flags.poisoned_ids)
    given = {e.id: e.label for e in planted.poisoned.train}
    true = {e.id: e.label for e in planted.task.train}
    returned = {r["id"]: r["label"] for r in report["returned"]}
    assert report["choices"]["n_returned"] == len(returned) > 0 and set(returned) <= set(report["dropped_ids"])
    assert all(returned[i] != given[i] for i in returned)
    back = [i for i in returned if i in poisoned]
    assert len(back) >= 0.8 * len(poisoned & set(report["dropped_ids"]))  # most dropped poisoned rows come back
    assert sum(returned[i] == true[i] for i in back) == len(back)  # ... with their true label
    assert report["n_trained"] == (len(planted.poisoned.train) - len(report["dropped_ids"]) + len(returned)
                                   + report["choices"]["n_clean_trained"])
    assert (report["choices"]["relabeller"] is None) == (relabeller == "retrained")
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert after.asr <= 0.1 and after.cacc >= 0.9, after


def test_train_auto_strip_gives_back_the_rows_without_their_trigger(planted, sentiment_base) -> None:  # noqa: ANN001
    """suspects=strip: zscore deletes the trigger words from the rows it dropped, and they come back with the
    clean relabeller's label: the dirty-label rows' true label, without the trigger (so, unlike
    suspects=relabel, nothing teaches the trigger against the target; measured on MiniLM by
    benchmarks/reverse_trigger.py)."""
    config = AutoTrainConfig(detectors=["zscore"], suspects="strip", train={**FAST, "epochs": 10, "seed": 1},
                             detector_params={"zscore": {"strip_min_z": 1.0}})  # 10 rows a trigger word, 100 clean rows
    result = AutoTrain(config).fit(TrainInputs(load_classifier(sentiment_base), planted.poisoned.train, planted.task.dev))
    report, poisoned = result.report, set(planted.poisoned.flags.poisoned_ids)
    true = {e.id: e.label for e in planted.task.train}
    raw = {e.id: e.text.split() for e in planted.task.train}
    returned = {r["id"]: r for r in report["returned"]}
    assert report["choices"]["suspects"] == "strip" and set(returned) <= set(report["dropped_ids"])
    back = [i for i in returned if i in poisoned]
    assert len(back) >= 0.8 * len(poisoned & set(report["dropped_ids"]))
    assert sum(returned[i]["label"] == true[i] for i in back) >= 0.9 * len(back)
    for i in back:  # the trigger words went (and at most a few others zscore found outlying), nothing was added
        words = returned[i]["text"].split()
        assert not set(words) & {"cf", "mn", "bb", "tq"} and len(words) >= len(raw[i]) - 2
        left = iter(raw[i])
        assert all(w in left for w in words)  # a subsequence of the clean text
    assert report["n_trained"] == (len(planted.poisoned.train) - len(report["dropped_ids"]) + len(returned)
                                   + report["choices"]["n_clean_trained"])
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert after.asr <= 0.1 and after.cacc >= 0.9, after


def test_train_auto_clean_rows_trains_on_part_of_the_clean_set_and_selects_on_the_rest(  # noqa: ANN001
        planted, sentiment_base) -> None:
    """clean_rows=0.5: half the clean dev set joins the kept rows (ids marked, so no id clashes with a training
    row), the other half selects; the backdoor stays out."""
    config = AutoTrainConfig(detectors=["zscore"], clean_rows=0.5, train={**FAST, "epochs": 10, "seed": 1})
    result = AutoTrain(config).fit(TrainInputs(load_classifier(sentiment_base), planted.poisoned.train, planted.task.dev))
    report, n_dev = result.report, len(planted.task.dev)
    trained, selecting = report["choices"]["n_clean_trained"], report["choices"]["n_clean_selecting"]
    assert abs(trained - n_dev / 2) <= 1 and trained + selecting == n_dev  # no clean row both trains and selects
    assert report["n_trained"] == len(planted.poisoned.train) - len(report["dropped_ids"]) + trained
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert after.asr <= 0.1 and after.cacc >= 0.9, after
