"""Fine-purifying: indicator, selection, reset, clean-data-only API, and the planted backdoor."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from synthetic import save_tiny_model, tiny_config
from transformers import AutoModelForSequenceClassification

from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyInputs
from unbackdoor.purify.fine_purifying import (
    FinePurifying,
    FinePurifyingConfig,
    apply_reset,
    clean_fisher,
    indicator_values,
    reset_masks,
    score_dimensions,
    search_rho,
    top_dimensions_by_layer,
)
from unbackdoor.errors import ConfigError, ModelError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import load_classifier
from unbackdoor.models.loading import Classifier
from unbackdoor.models.surgery import fresh_values
from unbackdoor.training import TrainConfig

WORD_EMB = "bert.embeddings.word_embeddings.weight"
HEAD = ("classifier.weight", "classifier.bias")
TRIGGERS = ("cf", "mn", "bb", "tq")
FORBIDDEN = {"flags", "poison_flags", "trigger", "target", "target_label", "triggered", "poisoned"}



def tiny_train(epochs: int = 5) -> TrainConfig:
    """The spec's fine-tuning recipe with a learning rate a 2-layer random-init model can learn with."""
    return TrainConfig(epochs=epochs, batch_size=32, learning_rate=1e-3, selection_ties="last", progress=False)


def params_of(clf: Classifier) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in clf.model.named_parameters()}


@pytest.fixture()
def pair(planted) -> tuple[Classifier, Classifier]:  # noqa: ANN001
    return load_classifier(planted.victim_dir), load_classifier(planted.base_dir)


# ----------------------------------------------------------------------------- indicator and selection
def test_indicators_rank_as_the_spec_says() -> None:
    # coordinates: 0 large drift, F = 0 (a trigger row); 1 same drift, high F; 2 no drift; 3 small drift, low F
    drift = {"w": torch.tensor([1.0, 1.0, 0.0, 0.1])}
    fisher = {"w": torch.tensor([0.0, 4.0, 1e-3, 1e-3])}
    ratio = indicator_values(drift, fisher)["w"]
    assert int(ratio.argmax()) == 0 and float(ratio[2]) == 0.0 and bool((ratio[[0, 1, 3]] > 0).all())
    product = indicator_values(drift, fisher, indicator="product")["w"]
    assert int(product.argmax()) == 1 and float(product[0]) < float(product[1])
    assert torch.equal(indicator_values(drift, None, indicator="drift")["w"], drift["w"].double().square())
    assert int(indicator_values(drift, fisher, indicator="curvature")["w"].argmax()) == 0
    assert torch.allclose(indicator_values(drift, fisher, indicator="product", beta=-1.0)["w"], ratio)
    # δ = 0 is never reset by ratio before any coordinate with δ ≠ 0
    assert reset_masks({"w": ratio}, rho=0.25)["w"].tolist() == [True, True, False, True]
    with pytest.raises(ValueError):
        FinePurifyingConfig(indicator="random", beta=0.5)


def test_random_indicator_is_seeded_per_tensor_name() -> None:
    drift = {"a": torch.zeros(5, 3), "b": torch.zeros(7)}
    one = indicator_values(drift, None, indicator="random", seed=1)
    swapped = indicator_values({"b": drift["b"], "a": drift["a"]}, None, indicator="random", seed=1)
    assert all(torch.equal(one[n], swapped[n]) for n in drift)  # independent of visiting order
    assert not torch.equal(one["a"], indicator_values(drift, None, indicator="random", seed=2)["a"])


def test_selection_counts_ties_and_nesting() -> None:
    scores = {"a": torch.tensor([[3.0, 1.0], [1.0, 0.0]], dtype=torch.float64), "b": torch.tensor([1.0, 5.0, 1.0])}
    masks = reset_masks(scores, rho=0.5)  # d = 7 -> reset 7 - ceil(3.5) = 3; of the tied 1s the last goes
    assert masks["a"].tolist() == [[True, False], [False, False]] and masks["b"].tolist() == [False, True, True]
    per = reset_masks(scores, rho=0.5, scope="per_tensor")  # a: 4 - 2 = 2, b: 3 - 2 = 1
    assert per["a"].tolist() == [[True, False], [True, False]] and per["b"].tolist() == [False, True, False]
    assert sum(int(m.sum()) for m in reset_masks(scores, 0.3).values()) == 7 - 3  # 0.3·7 = 2.1 -> keep 3
    for r_small, r_big in ((0.2, 0.6), (0.0, 0.5)):  # kept sets nest
        small, big = reset_masks(scores, r_small), reset_masks(scores, r_big)
        assert all(bool((big[n] <= small[n]).all()) for n in scores)
    assert not any(bool(m.any()) for m in reset_masks(scores, 1.0).values())
    assert all(bool(m.all()) for m in reset_masks(scores, 0.0).values())
    with pytest.raises(ConfigError):
        reset_masks(scores, 1.5)


# ----------------------------------------------------------------------------- reset on the planted victim
def test_reset_touches_exactly_the_chosen_dimensions(planted, pair) -> None:  # noqa: ANN001
    suspect, base = pair
    before, base_params = params_of(suspect), params_of(base)
    scores = score_dimensions(suspect, base, planted.clean)
    assert set(scores.scores).isdisjoint(HEAD)  # head=keep: not scored
    masks = reset_masks(scores.scores, rho=0.9)
    again = reset_masks(score_dimensions(suspect, base, planted.clean).scores, rho=0.9)
    assert all(torch.equal(masks[n], again[n]) for n in masks)  # same inputs, same mask
    n = apply_reset(suspect, scores.reference, masks)
    assert n == scores.n_dimensions - -(-9 * scores.n_dimensions // 10)
    after = params_of(suspect)
    for name, value in after.items():
        mask = masks.get(name, torch.zeros_like(value, dtype=torch.bool))
        assert torch.equal(value[mask], base_params[name][mask]), name
        assert torch.equal(value[~mask], before[name][~mask]), name
    trigger_ids = [suspect.tokenizer.get_vocab()[w] for w in TRIGGERS]
    assert float(masks[WORD_EMB][trigger_ids].float().mean()) > 0.9  # the trigger rows are reset


def test_rho_one_keeps_the_suspect_rho_zero_gives_the_base(planted, pair) -> None:  # noqa: ANN001
    suspect, base = pair
    before, base_params = params_of(suspect), params_of(base)
    scores = score_dimensions(suspect, base, planted.clean)
    assert apply_reset(suspect, scores.reference, reset_masks(scores.scores, 1.0)) == 0
    assert all(torch.equal(p, before[n]) for n, p in params_of(suspect).items())
    apply_reset(suspect, scores.reference, reset_masks(scores.scores, 0.0))
    for name, value in params_of(suspect).items():
        assert torch.equal(value, before[name] if name in HEAD else base_params[name]), name


def test_groups_and_head_options(planted, pair) -> None:  # noqa: ANN001
    suspect, base = pair
    before, base_params = params_of(suspect), params_of(base)
    cfg = FinePurifyingConfig(groups=("encoder",), head="reinit", indicator="drift")
    scores = score_dimensions(suspect, base, planted.clean, cfg)
    assert set(scores.groups.values()) == {"encoder", "head"}
    apply_reset(suspect, scores.reference, reset_masks(scores.scores, 0.0))
    fresh = fresh_values(suspect.model, list(HEAD), seed=0)
    for name, value in params_of(suspect).items():
        if name in HEAD:
            assert torch.equal(value, fresh[name]) and not torch.equal(value, before[name])
        elif ".encoder." in name and "LayerNorm" not in name:
            assert torch.equal(value, base_params[name]), name
        else:
            assert torch.equal(value, before[name]), name


def test_fisher_along_the_path_restores_the_suspect(planted, pair) -> None:  # noqa: ANN001
    suspect, base = pair
    before = params_of(suspect)
    cfg = FinePurifyingConfig(h_point="path", path_points=3)
    scores = score_dimensions(suspect, base, planted.clean, cfg)
    assert all(torch.isfinite(s).all() for s in scores.scores.values())
    assert all(torch.equal(p, before[n]) for n, p in params_of(suspect).items())
    at_ft = clean_fisher(suspect, planted.clean, scores.reference, FinePurifyingConfig())
    assert not torch.equal(at_ft[WORD_EMB], scores.fisher[WORD_EMB])


def test_random_per_tensor_reproduces_the_fine_mixing_mask(planted, pair) -> None:  # noqa: ANN001
    fine_mixing = pytest.importorskip("unbackdoor.purify.fine_mixing")
    if not hasattr(fine_mixing, "mixing_masks"):
        pytest.skip("fine_mixing.mixing_masks is not available")
    suspect, base = pair
    scores = score_dimensions(suspect, base, planted.clean, FinePurifyingConfig(indicator="random", seed=3))
    for rho in (0.5, 0.3):
        keep = fine_mixing.mixing_masks(suspect, base, rho, seed=3)
        reset = reset_masks(scores.scores, rho, scope="per_tensor")
        assert keep.keys() == reset.keys()
        assert all(torch.equal(reset[n], ~keep[n]) for n in keep)
    tied = torch.tensor([2, 0, 1, 2, 1, 1, 0, 2, 1, 2, 0, 1], dtype=torch.float64)  # ties broken alike
    for rho in (0.1, 0.25, 0.5, 0.75):
        assert torch.equal(reset_masks({"t": tied}, rho, "per_tensor")["t"], ~fine_mixing.keep_mask_from_priorities(tied, rho))


# ----------------------------------------------------------------------------- clean data only
def test_fisher_and_indicator_take_clean_data_only(planted, pair) -> None:  # noqa: ANN001
    suspect, base = pair
    poisoned = planted.poisoned
    cfg = FinePurifyingConfig()
    for bad in (poisoned, poisoned.triggered_test, poisoned.flags):
        with pytest.raises(TypeError):
            score_dimensions(suspect, base, bad)
        with pytest.raises(TypeError):
            clean_fisher(suspect, bad, {WORD_EMB: base.model.get_parameter(WORD_EMB)}, cfg)
        with pytest.raises(TypeError):
            PurifyInputs(suspect=suspect, clean=bad, base=base)
    for fn in (score_dimensions, clean_fisher, search_rho, top_dimensions_by_layer, FinePurifying.purify):
        assert not set(inspect.signature(fn).parameters) & FORBIDDEN, fn
    assert not set(FinePurifyingConfig.model_fields) & FORBIDDEN


def test_mismatched_base_fails_before_any_work(planted, tmp_path: Path) -> None:  # noqa: ANN001
    suspect = load_classifier(planted.victim_dir)
    roberta = load_classifier(save_tiny_model(tmp_path / "roberta", "roberta"))
    config = tiny_config("bert")
    config.intermediate_size = 48
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "wide")
    load_classifier(planted.base_dir).tokenizer.save_pretrained(tmp_path / "wide")
    wide = load_classifier(tmp_path / "wide")
    for base in (roberta, wide):
        with pytest.raises(ModelError):
            PurifyInputs(suspect=suspect, clean=planted.clean, base=base)
        with pytest.raises(ModelError):
            score_dimensions(suspect, base, planted.clean)


def test_registered_and_needs_base(planted) -> None:  # noqa: ANN001
    assert PURIFY_DEFENSES.get("fine-purifying") is FinePurifying and FinePurifying.needs_base
    defence = FinePurifying()
    assert vars(defence) == {"config": FinePurifyingConfig()}
    with pytest.raises(TypeError):
        defence.purify(PurifyInputs(suspect=load_classifier(planted.victim_dir), clean=planted.clean))


# ----------------------------------------------------------------------------- the method end to end
def test_removes_the_planted_backdoor_and_keeps_clean_accuracy(planted) -> None:  # noqa: ANN001
    suspect = load_classifier(planted.victim_dir)
    victim = evaluate_classifier(suspect, planted.task.test, planted.poisoned.triggered_test)
    assert victim.asr >= 0.8
    config = FinePurifyingConfig(train=tiny_train())  # every other option at its default
    result = FinePurifying(config).purify(PurifyInputs(suspect, planted.clean, load_classifier(planted.base_dir)))
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert after.asr <= 0.2 and after.asr <= victim.asr - 0.6
    assert after.cacc >= victim.cacc - 0.05
    report = result.report
    assert report["indicator"] == "ratio" and report["rho"] == 0.5 and report["reset_fraction"] == 0.5
    assert report["n_reset"] == report["reset"]["n_scored"] // 2
    assert {row["name"] for row in report["reset"]["by_layer"]} >= {"embeddings", "encoder.layer.0", "pooler"}
    assert sum(row["n_selected"] for row in report["reset"]["by_layer"]) == report["n_reset"]
    assert report["reset"]["zero_fisher_share_of_selected"] > 0  # trigger rows: absent from the clean set
    assert report["finetune"]["n_selection"] == 20 and report["fisher"]["n_rows"] == 80


def test_rho_search_on_clean_held_out_data(planted) -> None:  # noqa: ANN001
    config = FinePurifyingConfig(rho_mode="search", rho_grid=(0.95, 0.3, 0.6), train=tiny_train(2))
    result = FinePurifying(config).purify(
        PurifyInputs(load_classifier(planted.victim_dir), planted.clean, load_classifier(planted.base_dir)))
    search = result.report["rho_search"]
    assert search["candidates"][0]["rho"] == 0.3 and search["n_held_out"] == 20
    assert result.report["rho"] == search["chosen"] in (0.3, 0.6, 0.95)
    last = search["candidates"][-1]["heldout_accuracy"]
    assert search["fallback"] == (last < search["reference_accuracy"] - 0.02)


def test_top_dimensions_by_layer_finds_the_trigger_embeddings(planted, pair) -> None:  # noqa: ANN001
    suspect, base = pair
    summary = top_dimensions_by_layer(score_dimensions(suspect, base, planted.clean), fraction=0.01)
    by_tensor = {row["name"]: row for row in summary["by_tensor"]}
    assert summary["n_selected"] == summary["n_scored"] - -(-99 * summary["n_scored"] // 100)
    assert by_tensor[WORD_EMB]["share_of_selected"] > 0.4
    layers = {row["name"]: row for row in summary["by_layer"]}
    assert max(layers, key=lambda k: layers[k]["n_selected"]) == "embeddings"
