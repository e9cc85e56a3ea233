"""Fine-pruning: activation statistics over non-pad tokens, the dormant-first schedule and the
selection rule, the pruning mask kept through fine-tuning, the clean-only API, and a run on the
planted BadNets victim."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pydantic
import pytest
import torch
from synthetic import make_task, save_tiny_model

from unbackdoor.attacks import BadNets
from unbackdoor.data import Dataset, Example
from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyInputs
from unbackdoor.purify.fine_pruning import (
    FinePruning,
    FinePruningConfig,
    collect_activations,
    dormant_ranking,
    find_prune_sites,
    pruned_units,
    pruning_steps,
    row_statistic,
    select_pruning_level,
)
from unbackdoor.errors import ModelError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import load_classifier
from unbackdoor.training import TrainConfig

FAST = TrainConfig(epochs=2, batch_size=8, learning_rate=1e-2, weight_decay=0.1, progress=False)



def _rows(texts: list[str]) -> Dataset:
    return Dataset(tuple(Example(f"r{i}", t, i % 2) for i, t in enumerate(texts)), 2, "hand-built")


# --- activations over non-pad tokens -----------------------------------------------------------


def test_row_statistic_ignores_pad_positions() -> None:
    acts = torch.tensor([[[1.0, -2.0], [3.0, -4.0], [1e6, 1e6]],  # row 0: 2 real tokens, 1 pad
                         [[-5.0, 6.0], [1e6, -1e6], [1e6, 1e6]]])  # row 1: 1 real token, 2 pads
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(row_statistic(acts, mask, "mean"), torch.tensor([[2.0, -3.0], [-5.0, 6.0]]))
    assert torch.equal(row_statistic(acts, mask, "mean_abs"), torch.tensor([[2.0, 3.0], [5.0, 6.0]]))
    assert torch.equal(row_statistic(acts, mask, "first_token"), torch.tensor([[1.0, -2.0], [-5.0, 6.0]]))
    left_padded = torch.tensor([[0, 1, 1], [0, 0, 1]])  # first_token = first *real* token
    assert torch.equal(row_statistic(acts, left_padded, "first_token"), torch.tensor([[3.0, -4.0], [1e6, 1e6]]))
    pooled = torch.tensor([[1.0, -2.0]])  # one vector per row: used as is
    assert torch.equal(row_statistic(pooled, None, "mean_abs"), torch.tensor([[1.0, 2.0]]))


@pytest.mark.parametrize("statistic", ["mean", "first_token", "mean_abs"])
def test_hooked_activations_over_a_padded_batch_match_unpadded_rows(tiny_bert: Path, statistic: str) -> None:
    clf = load_classifier(tiny_bert)
    data = _rows(["good", "the movie was very good and the plot was fun", "bad film", "a dull boring story"])
    sites = find_prune_sites(clf, "ffn", "all")
    padded = collect_activations(clf, data, sites, statistic, batch_size=4)  # one batch, padded
    single = collect_activations(clf, data, sites, statistic, batch_size=1)  # no padding at all
    assert set(padded) == {"bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"}
    for name in padded:
        assert padded[name].shape == (64,)
        torch.testing.assert_close(padded[name], single[name], rtol=1e-5, atol=1e-6)


# --- dormant-first schedule and the selection rule ------------------------------------------------


def test_pruning_steps_per_layer_and_global() -> None:
    stats = {"a": torch.arange(64.0).flip(0), "b": torch.arange(64.0) + 100}
    ranking = dormant_ranking(stats)
    assert ranking["a"][:3].tolist() == [63, 62, 61] and ranking["b"][:3].tolist() == [0, 1, 2]

    per_layer = pruning_steps(stats, "per_layer", step=0.01)  # ceil(0.64) = 1 unit per layer per step
    assert len(per_layer) == 65 and per_layer[0] == {"a": 0, "b": 0} and per_layer[5] == {"a": 5, "b": 5}
    assert pruned_units(ranking, per_layer[2]) == {"a": [62, 63], "b": [0, 1]}

    pooled = pruning_steps(stats, "global", step=0.01)  # ceil(1.28) = 2 units per step, lowest overall
    assert [sum(c.values()) for c in pooled[:4]] == [0, 2, 4, 6]
    assert pooled[32] == {"a": 64, "b": 0} and pooled[33] == {"a": 64, "b": 2} and pooled[-1] == {"a": 64, "b": 64}

    capped = pruning_steps(stats, "per_layer", step=0.1, max_ratio=0.5)  # 7 per step, at most 32
    assert [c["a"] for c in capped] == [0, 7, 14, 21, 28, 32]


def test_chosen_level_is_the_largest_within_tolerance_on_a_stubbed_curve() -> None:
    curve = [0.90, 0.90, 0.95, 0.85, 0.80, 0.88, 0.60]
    asked: list[int] = []

    def accuracy_at(i: int) -> float:
        asked.append(i)
        return curve[i]

    chosen, seen = select_pruning_level(accuracy_at, len(curve), tolerance=0.05)
    assert chosen == 3  # a drop of exactly δ (0.85) is within; 0.80 is not, and the search stops there
    assert seen == curve[:5] and asked == [0, 1, 2, 3, 4]
    assert select_pruning_level(curve.__getitem__, len(curve), 0.05, "full_sweep") == (5, curve)
    assert select_pruning_level(curve.__getitem__, len(curve), 0.0)[0] == 2  # gains and ties pass
    assert select_pruning_level(curve.__getitem__, len(curve), 1.0, "full_sweep")[0] == 6


# --- the mask through fine-tuning, the families, the config ------------------------------------------


def test_pruned_columns_stay_exactly_zero_after_finetuning(tiny_bert: Path) -> None:
    clf = load_classifier(tiny_bert)
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    config = FinePruningConfig(layers="all", tolerance=1.0, max_ratio=0.5, train=FAST)
    result = FinePruning(config).purify(PurifyInputs(clf, make_task(60, 4, 4).train))
    report = result.report
    assert report["n_pruned"] == 64 and report["pruning_ratio"] == 0.5
    assert report["finetune"]["training"]["steps"] > 0
    weights = result.model.model.state_dict()
    for site, units in report["pruned_units"].items():
        w, w0 = weights[f"{site}.weight"], before[f"{site}.weight"]
        kept = [u for u in range(w.shape[1]) if u not in units]
        assert len(units) == 32
        assert torch.all(w[:, units] == 0), site
        assert not torch.equal(w[:, kept], w0[:, kept]), site  # the rest was trained


def test_roberta_sites_and_a_prune_only_run(tmp_path: Path) -> None:
    clf = load_classifier(save_tiny_model(tmp_path / "roberta", "roberta"))
    ffn = find_prune_sites(clf, "ffn", 2)
    assert [s.name for s in ffn] == ["roberta.encoder.layer.0.output.dense", "roberta.encoder.layer.1.output.dense"]
    assert [s.name for s in find_prune_sites(clf, "pooled")] == ["classifier.out_proj"]
    config = FinePruningConfig(unit="pooled", tolerance=1.0, max_ratio=0.25, finetune=False)
    report = FinePruning(config).purify(PurifyInputs(clf, make_task(40, 4, 4).train)).report
    units = report["pruned_units"]["classifier.out_proj"]
    assert len(units) == 8 and "finetune" not in report
    assert torch.all(clf.model.classifier.out_proj.weight[:, units] == 0)


def test_bert_pooled_site_is_the_classifier(tiny_bert: Path) -> None:
    sites = find_prune_sites(load_classifier(tiny_bert), "pooled")
    assert [(s.name, s.n_units) for s in sites] == [("classifier", 32)]


def test_unsupported_family_is_a_clear_error(tmp_path: Path) -> None:
    clf = load_classifier(save_tiny_model(tmp_path / "gpt2", "gpt2"))
    with pytest.raises(ModelError, match="supports bert and roberta.*not 'gpt2'"):
        FinePruning().purify(PurifyInputs(clf, make_task(20, 4, 4).train))


def test_config_checks(tiny_bert: Path) -> None:
    with pytest.raises(pydantic.ValidationError):
        FinePruningConfig(unit="pooled", layers="all")
    with pytest.raises(pydantic.ValidationError):
        FinePruningConfig(layers=0)
    with pytest.raises(ModelError, match="last 3 layers"):
        find_prune_sites(load_classifier(tiny_bert), "ffn", 3)
    assert FinePruningConfig(layers=2).layers == 2 and FinePruningConfig(layers="all").layers == "all"


# --- the API cannot take poisoned data -------------------------------------------------------------


def test_the_api_takes_no_poisoned_data(tiny_bert: Path) -> None:
    assert PURIFY_DEFENSES.get("fine-pruning") is FinePruning and not FinePruning.needs_base
    poisoned = BadNets().poison(make_task(60, 10, 20))
    clf = load_classifier(tiny_bert)
    for leak in (poisoned.triggered_test, poisoned.flags, poisoned):
        with pytest.raises(TypeError):
            PurifyInputs(suspect=clf, clean=leak)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        FinePruning().purify(poisoned)  # type: ignore[arg-type]
    assert list(inspect.signature(FinePruning.purify).parameters) == ["self", "inputs", "work_dir"]
    forbidden = {"flags", "poison_flags", "trigger", "target", "target_label", "triggered", "poisoned", "test"}
    assert not set(FinePruningConfig.model_fields) & forbidden
    with pytest.raises(pydantic.ValidationError):
        FinePruningConfig(poisoned=True)  # type: ignore[call-arg]
    assert vars(FinePruning()) == {"config": FinePruningConfig()}  # construction does no work


# --- end to end on the planted victim ----------------------------------------------------------------


def test_fine_pruning_on_the_planted_victim(planted) -> None:  # noqa: ANN001
    victim = load_classifier(planted.victim_dir)
    before = evaluate_classifier(victim, planted.task.test, planted.poisoned.triggered_test)
    result = FinePruning().purify(PurifyInputs(victim, planted.clean))  # defaults
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    report = result.report
    curve = report["accuracy_curve"]
    assert curve[0]["n_pruned"] == 0 and curve[0]["accuracy"] == report["reference_accuracy"]
    assert report["reference_accuracy"] - report["pruned_accuracy"] <= FinePruningConfig().tolerance + 1e-9
    assert report["pruning_ratio"] == report["n_pruned"] / report["n_units"] > 0
    assert report["sites"] == ["bert.encoder.layer.1.output.dense"]
    assert json.loads(json.dumps(report)) == report  # goes into unbackdoor.json as is
    weight = result.model.model.state_dict()["bert.encoder.layer.1.output.dense.weight"]
    assert torch.all(weight[:, report["pruned_units"]["bert.encoder.layer.1.output.dense"]] == 0)
    # Measured: CACC 1.0 -> 1.0, ASR 1.0 -> 1.0 (the whole last-layer FFN is pruned within δ and
    # the backdoor survives). Fine-pruning is a weak baseline; only "no harm" is asserted.
    assert after.cacc >= 0.9, (before.cacc, after.cacc)
    assert after.asr <= before.asr, (before.asr, after.asr)
