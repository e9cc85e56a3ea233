"""The EXPERIMENTAL ``repair`` unlearn method (``repair.md`` §4.2–4.3, our reconstruction) on the planted
BadNets victim of ``conftest.py``: both separations remove the backdoor, relabelling changes only the
forget rows' labels, the paper's claim in small form (a forget set half benign), the base requirement,
the experimental label, and the command.

Flags and the clean task appear here only as the evaluation harness's ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from synthetic import run_cli, write_task

import unbackdoor.unlearn.repair as repair_module
from unbackdoor.config import build_config
from unbackdoor.data.types import Dataset, Example
from unbackdoor.errors import ConfigError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import load_classifier
from unbackdoor.unlearn import UnlearnInputs, build_unlearn_method, unlearn
from unbackdoor.training.ascent import STOP_GUARD, STOP_THRESHOLD
from unbackdoor.unlearn.oracle import forget_from_flags, write_forget_file
from unbackdoor.unlearn.repair import FORGET_ID_PREFIX, Repair, RepairConfig

FAST = {"learning_rate": 1e-3, "progress": False}  # the tiny model needs a larger lr than MiniLM's default
# The tiny random-init "base" needs more epochs than the default recipe to learn the task from 80 retain rows
# (with 10 epochs it stayed a constant guess, reference_accuracy 0.5).
RELABEL = {"reference_train": {**FAST, "epochs": 50}, "finetune_train": FAST}
PROJECTION = {"separation": "gradient_projection", "train": {**FAST, "max_steps": 150}}
FORBIDDEN = {"flags", "poison_flags", "trigger", "target", "target_label", "triggered", "poisoned"}


def _forget(planted) -> Dataset:  # noqa: ANN001
    return forget_from_flags(planted.poisoned, 1.0)


def _half_benign(planted) -> Dataset:  # noqa: ANN001
    """The 40 poisoned rows plus 40 benign training rows (true labels) that are not retain rows: identification
    precision 50 %."""
    poisoned, retain = planted.poisoned.flags.poisoned_ids, set(planted.clean.ids)
    benign = [e for e in planted.task.train if e.id not in poisoned and e.id not in retain][:40]
    forget = _forget(planted)
    return forget.replace([*forget.examples, *benign], "forget[50% benign]")


def _inputs(planted, forget: Dataset, base: bool = True) -> UnlearnInputs:  # noqa: ANN001
    return UnlearnInputs(load_classifier(planted.victim_dir), forget, planted.clean,
                         base=load_classifier(planted.base_dir) if base else None)


def _eval(clf, planted):  # noqa: ANN001, ANN202
    return evaluate_classifier(clf, planted.task.test, planted.poisoned.triggered_test)


def test_repair_relabel_removes_the_planted_backdoor_and_keeps_clean_accuracy(planted) -> None:  # noqa: ANN001
    inputs = _inputs(planted, _forget(planted))
    before = _eval(inputs.suspect, planted)
    result = unlearn("repair", RELABEL, inputs)
    after = _eval(result.model, planted)
    assert before.asr >= 0.8 and after.asr <= 0.1, (before.asr, after.asr)  # observed 1.0 -> 0.03
    assert after.cacc >= before.cacc - 0.01, (before.cacc, after.cacc)  # observed 1.0 -> 1.0
    report = result.report
    assert report["experimental"] is True and report["method"] == "repair" and report["separation"] == "relabel"
    assert report["reference"] == "base" and report["reference_accuracy"] >= 0.9
    assert report["n_relabel_changed"] == 40 and report["n_forget"] == 40  # every poisoned row got another label
    assert inputs.base is not None and result.model is inputs.suspect


def test_repair_gradient_projection_removes_the_planted_backdoor_without_a_base(planted) -> None:  # noqa: ANN001
    inputs = _inputs(planted, _forget(planted), base=False)
    result = unlearn("repair", PROJECTION, inputs)
    after = _eval(result.model, planted)
    assert after.asr <= 0.1 and after.cacc >= 0.95, (after.asr, after.cacc)  # observed 0.0 and 0.995
    report = result.report
    assert report["experimental"] is True and report["separation"] == "gradient_projection"
    assert report["stop_reason"] in (STOP_THRESHOLD, STOP_GUARD) and report["chosen_step"] > 0
    assert report["per_row_params"] == "all"
    assert report["per_row_param_names"] == [n for n, _ in result.model.model.named_parameters()]
    assert 0 < report["mean_beneficial_share"] <= 1


def test_head_and_last_block_are_the_cheap_per_row_scope(planted) -> None:  # noqa: ANN001
    model = load_classifier(planted.victim_dir).model
    names = [n for n, _ in model.named_parameters()]
    chosen = repair_module.per_row_names(model, "head+last", names)
    assert chosen[0].startswith("bert.encoder.layer.1.") and chosen[-1] == "classifier.bias"
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= set(chosen)
    assert not any("layer.0." in n or "embeddings" in n for n in chosen)


def test_relabel_changes_only_the_forget_rows_labels(planted, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    calls: list[tuple[Dataset, Dataset | None]] = []
    real = repair_module.train_classifier

    def spy(clf, data, config, **kwargs):  # noqa: ANN001, ANN003, ANN202 - same signature
        calls.append((data, kwargs.get("dev")))
        return real(clf, data, config, **kwargs)

    monkeypatch.setattr(repair_module, "train_classifier", spy)
    forget = _half_benign(planted)
    Repair(build_config(RepairConfig, RELABEL, "test")).unlearn(_inputs(planted, forget))
    (ref_data, ref_dev), (data, dev) = calls
    retain = set(planted.clean.examples)
    assert set(ref_data.examples) | set(ref_dev.examples) == retain  # the reference sees retain rows only
    rows = [*data.examples, *dev.examples]
    assert {e for e in rows if not e.id.startswith(FORGET_ID_PREFIX)} == retain  # retain rows unchanged
    relabelled = {e.id.removeprefix(FORGET_ID_PREFIX): e for e in rows if e.id.startswith(FORGET_ID_PREFIX)}
    assert set(relabelled) == set(forget.ids)
    true_label = {e.id: e.label for e in planted.task.train}
    poisoned = planted.poisoned.flags.poisoned_ids
    for e in forget:
        new = relabelled[e.id]
        assert (new.text, new.text_pair) == (e.text, e.text_pair)  # content kept
        assert new.label == true_label[e.id], e.id  # poisoned rows get their true label, benign ones keep it
        assert (new.label != e.label) == (e.id in poisoned)


def test_half_benign_forget_set_repair_keeps_clean_accuracy_at_least_as_well_as_lya(planted) -> None:  # noqa: ANN001
    """The abstract's claim in small form: with identification precision 50 %, erase-only (LYA) vs retain-
    beneficial (repair). Observed on the tiny task: repair CACC 1.0 / ASR 0.0; LYA CACC 0.99 / ASR 0.03 (its
    clean guard stops the ascent on the benign rows before it costs more; chosen forget accuracy ≈ 0.56). The
    gap is one test row: the claim's direction holds here, its size is not shown."""
    forget = _half_benign(planted)
    before = _eval(load_classifier(planted.victim_dir), planted)
    repaired = _eval(unlearn("repair", RELABEL, _inputs(planted, forget)).model, planted)
    lya_result = unlearn("lya", {"train": {**FAST, "max_steps": 150}}, _inputs(planted, forget))
    lya = _eval(lya_result.model, planted)
    assert repaired.asr <= 0.1 and lya.asr <= 0.1, (repaired.asr, lya.asr)
    assert repaired.cacc >= lya.cacc, (repaired.cacc, lya.cacc)
    assert repaired.cacc >= before.cacc - 0.01, (before.cacc, repaired.cacc)
    assert lya_result.report["stop_reason"] == STOP_GUARD  # benign rows keep LYA's forget accuracy up


def test_bag_of_words_reference_needs_no_base(planted) -> None:  # noqa: ANN001
    params = {"reference": "bag_of_words", "finetune_train": FAST}
    assert not build_unlearn_method("repair", params, have_base=False).needs_base
    result = unlearn("repair", params, _inputs(planted, _half_benign(planted), base=False))
    after = _eval(result.model, planted)
    assert after.asr <= 0.1 and after.cacc >= 0.99, (after.asr, after.cacc)  # observed 0.03 and 1.0
    assert result.report["reference"] == "bag_of_words" and result.report["reference_accuracy"] >= 0.9


def test_repair_options_base_requirement_and_no_flags(planted) -> None:  # noqa: ANN001
    assert RepairConfig().separation == "relabel" and RepairConfig().reference == "base"
    assert not set(RepairConfig.model_fields) & FORBIDDEN
    assert all(f.description for f in RepairConfig.model_fields.values())
    assert "EXPERIMENTAL" in (repair_module.__doc__ or "") and "EXPERIMENTAL" in (RepairConfig.__doc__ or "")
    assert "EXPERIMENTAL" in RepairConfig.model_fields["separation"].description
    assert build_unlearn_method("repair", {}, have_base=True).needs_base
    with pytest.raises(ConfigError, match="needs the suspect's clean pre-trained base"):
        build_unlearn_method("repair", {}, have_base=False)
    with pytest.raises(ConfigError, match="needs the suspect's clean pre-trained base"):
        Repair().unlearn(_inputs(planted, _forget(planted), base=False))
    build_unlearn_method("repair", {"separation": "gradient_projection"}, have_base=False)
    for bad in ({"separation": "erase"}, {"reference": "suspect"}, {"beta": -1}, {"per_row_params": "head"}):
        with pytest.raises(ConfigError):
            build_unlearn_method("repair", bad)
    with pytest.raises(TypeError):
        Repair().unlearn(planted.poisoned)  # type: ignore[arg-type]  # a poisoned task (with flags) is refused


def test_unlearn_command_records_repair_as_experimental(planted, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    clean = write_task(planted.task, tmp_path / "clean")
    forget = write_forget_file(_forget(planted), tmp_path / "flagged.jsonl")
    out = tmp_path / "repaired"
    params = ["-p", "reference_train.epochs=50", "-p", "reference_train.learning_rate=0.001",
              "-p", "reference_train.progress=false", "-p", "finetune_train.learning_rate=0.001",
              "-p", "finetune_train.progress=false"]
    code, stdout, stderr = run_cli(["unlearn", "--model", str(planted.victim_dir), "--forget", str(forget),
                                     "--retain", str(clean), "--retain-size", "100", "--method", "repair",
                                     "--base", str(planted.base_dir), *params, "--out", str(out)], capsys)
    assert code == 0, stderr
    record = json.loads((out / "unbackdoor.json").read_text(encoding="utf-8"))
    assert record["defense"]["method"] == "repair" and record["defense"]["experimental"] is True
    assert record["defense"]["separation"] == "relabel" and record["defense"]["n_relabel_changed"] == 40
    code, stdout, _ = run_cli(["unlearn", "--help"], capsys)
    assert code == 0 and "EXPERIMENTAL" in stdout
