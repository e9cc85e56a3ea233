"""TSBD (spec methods/tsbd.md): NWC by hand, exact zeroing in the original model, the clean-unlearning
stopping rule, the two-gradient rule (by hand, and α = 0 = plain fine-tuning), clean-data-only
inputs, and what TSBD does to two tiny backdoored victims."""

from __future__ import annotations

import copy
import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import TRIGGERS, save_tiny_model

import unbackdoor.training.loop as loop_module
from unbackdoor.training.loop import evaluate_balanced_accuracy
from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset
from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyInputs
from unbackdoor.selection import finetune_with_selection
from unbackdoor.training.callbacks import FixedWeights
from unbackdoor.purify.tsbd import (
    GradientNormPenalty,
    Tsbd,
    TsbdConfig,
    activeness_aware_finetune,
    clean_unlearn,
    neuron_weight_change,
    normalise_nwc,
    perturbation,
    reinitialise_neurons,
    score_neurons,
    search_neuron_ratio,
    select_neurons,
    target_weights,
    tsbd_train_config,
    weight_changes,
    zeroing_masks,
)
from unbackdoor.errors import ConfigError, ModelError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.inference import collate, encode
from unbackdoor.models import load_classifier, provenance_record, save_classifier
from unbackdoor.purify.base import build_purify_defense
from unbackdoor.training import TrainConfig, train_classifier
from unbackdoor.training.callbacks import TrainContext, TrainState
from unbackdoor.training.loop import make_accelerator

FORBIDDEN = {"flags", "poison_flags", "trigger", "target", "target_label", "triggered", "poisoned"}
WORD_EMB = "bert.embeddings.word_embeddings.weight"


def tiny_train(epochs: int = 20) -> TrainConfig:
    """TSBD's stage-2 settings with the lr a 2-layer random-init model learns with (1e-3, not 1e-4)."""
    return tsbd_train_config().model_copy(update={"epochs": epochs, "learning_rate": 1e-3, "progress": False})


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- stage 1 by hand
def test_nwc_ranking_and_zeroing_by_hand() -> None:
    before = {"a": torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), "b": torch.zeros(3, 2)}
    after = {"a": torch.tensor([[1.5, 2.0, 1.0], [0.0, 0.25, 0.0]]),
             "b": torch.tensor([[1.0, -1.0], [0.5, 0.5], [0.0, 0.0]])}
    delta = weight_changes(before, after, ["a", "b"])
    assert torch.equal(delta["a"], torch.tensor([[0.5, 0.0, 2.0], [0.0, 0.25, 0.0]]))
    nwc = neuron_weight_change(delta)
    assert nwc["a"].tolist() == [2.5, 0.25] and nwc["b"].tolist() == [2.0, 1.0, 0.0]
    per_fan_in = normalise_nwc(nwc, delta, "per_fan_in")
    assert per_fan_in["a"].tolist() == pytest.approx([2.5 / 3, 0.25 / 3]) and per_fan_in["b"].tolist() == [1.0, 0.5, 0]
    z = normalise_nwc(nwc, delta, "per_layer_zscore")
    assert z["a"].tolist() == pytest.approx([1.0, -1.0])
    assert z["b"].tolist() == pytest.approx([1.5 ** 0.5, 0, -(1.5 ** 0.5)])
    # global ranking of the 5 pooled neurons by raw NWC: a0 2.5, b0 2.0, b1 1.0, a1 0.25, b2 0
    chosen = select_neurons(nwc, 0.6)  # ⌊0.6·5⌋ = 3
    assert chosen["a"].tolist() == [0] and chosen["b"].tolist() == [0, 1]
    assert {n: v.tolist() for n, v in select_neurons(nwc, 0.2).items()} == {"a": [0], "b": []}
    assert {n: v.tolist() for n, v in select_neurons(per_fan_in, 0.2).items()} == {"a": [], "b": [0]}  # 1.0 > 0.83
    assert select_neurons(nwc, 0.01)["a"].tolist() == [0]  # ⌊0.05⌋ = 0 -> at least one neuron (spec §8.5)
    tied = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([3.0, 3.0, 0.0])}
    assert {n: v.tolist() for n, v in select_neurons(tied, 0.4).items()} == {"a": [1], "b": [0]}  # ties: model order
    # S = Δ of a0, b0, b1 = {0.5, 0, 2, 1, 1, 0.5, 0.5}; m = 0.5 -> the ⌊3.5⌋ = 3 largest: τ = 1
    masks = zeroing_masks(delta, chosen, 0.5)
    assert masks["a"].tolist() == [[False, False, True], [False, False, False]]
    assert masks["b"].tolist() == [[True, True], [False, False], [False, False]]
    # m = 0.6 -> ⌊4.2⌋ = 4 largest: τ = 0.5, and every tie at τ is zeroed too (6 of 7, as the code)
    masks = zeroing_masks(delta, chosen, 0.6)
    assert masks["a"].tolist() == [[True, False, True], [False, False, False]]
    assert masks["b"].tolist() == [[True, True], [True, True], [False, False]]


def test_target_weights_and_their_options(pair: tuple[Path, Path], tmp_path: Path) -> None:
    model = load_classifier(pair[1]).model
    default = target_weights(model)
    assert len(default) == 12 and all(".encoder.layer." in n and n.endswith(".weight") for n in default)
    assert not any("LayerNorm" in n for n in default)
    extra = target_weights(model, include=("pooler", "head", "embeddings"))
    assert set(extra) - set(default) == {"bert.pooler.dense.weight", "classifier.weight", WORD_EMB,
                                         "bert.embeddings.position_embeddings.weight",
                                         "bert.embeddings.token_type_embeddings.weight"}
    norms = target_weights(model, "layernorm")
    assert len(norms) == 4 and all("LayerNorm.weight" in n and ".encoder." in n for n in norms)
    assert target_weights(model, module_filter=r"intermediate\.dense") == [
        "bert.encoder.layer.0.intermediate.dense.weight", "bert.encoder.layer.1.intermediate.dense.weight"]
    with pytest.raises(ModelError, match="Conv1D"):
        target_weights(load_classifier(save_tiny_model(tmp_path / "gpt2", "gpt2")).model)


def test_zeroing_touches_exactly_the_chosen_subweights_of_the_original(planted) -> None:  # noqa: ANN001
    suspect = load_classifier(planted.victim_dir)
    theta_bd = params_of(suspect.model)
    fit, _ = holdout_split(planted.clean, 0.2, 0)
    scores = score_neurons(suspect, fit, TsbdConfig())
    assert all(torch.equal(p, theta_bd[n]) for n, p in suspect.model.named_parameters())  # unlearning used a copy
    assert scores.unlearning.reached and scores.n_neurons == 2 * (4 * 32 + 64 + 32)
    chosen = select_neurons(scores.scores, 0.2)
    masks = zeroing_masks(scores.delta, chosen, 0.7)
    report = reinitialise_neurons(suspect, scores, 0.2, 0.7)
    assert report["n_chosen_neurons"] == int(0.2 * scores.n_neurons) == sum(len(r) for r in chosen.values())
    n_zeroed = sum(int(m.sum()) for m in masks.values())
    assert report["n_zeroed_subweights"] == n_zeroed >= int(0.7 * report["n_chosen_subweights"])  # ⌊m·|S|⌋ + ties
    picked = torch.cat([scores.nwc[n][r] for n, r in chosen.items()])
    rest = torch.cat([scores.nwc[n][[i for i in range(len(v)) if i not in set(chosen[n].tolist())]]
                      for n, v in scores.nwc.items()])
    assert picked.min() >= rest.max()  # global top-n by NWC
    zeroed = torch.cat([scores.delta[n][m] for n, m in masks.items()])
    kept = torch.cat([scores.delta[n][chosen[n]][~m[chosen[n]]] for n, m in masks.items()])
    assert zeroed.min() >= kept.max()  # the largest |ΔW| of the chosen neurons
    for name, p in suspect.model.named_parameters():
        if name in masks:
            mask = masks[name].view(p.shape)
            assert bool((p[mask] == 0).all()) and torch.equal(p[~mask], theta_bd[name][~mask]), name
        else:
            assert torch.equal(p, theta_bd[name]), name  # biases, LayerNorm, embeddings, pooler, head
    assert all(bool((theta_bd[n][m] != 0).all()) for n, m in masks.items())  # each zeroing is visible


def test_unlearning_stops_at_the_first_check_under_the_threshold(planted) -> None:  # noqa: ANN001
    fit, _ = holdout_split(planted.clean, 0.2, 0)
    records = {}
    for threshold in (None, 0.9, 1.0):
        clf = load_classifier(planted.victim_dir)
        records[threshold] = clean_unlearn(clf, fit, TsbdConfig(unlearn_acc_threshold=threshold))
    chance = records[None]
    assert chance.threshold == 0.5 and chance.start_accuracy > 0.9 and chance.reached
    assert chance.checks[-1] == (chance.steps, chance.final_accuracy) and chance.final_accuracy <= 0.5
    assert all(acc > 0.5 for _, acc in chance.checks[:-1])  # not a step later than needed
    assert [s for s, _ in chance.checks] == list(range(chance.steps + 1))  # checked after every step
    assert 0 < records[0.9].steps < chance.steps and records[0.9].final_accuracy <= 0.9
    assert records[1.0].steps == 0 and records[1.0].reached
    epoch_only = clean_unlearn(load_classifier(planted.victim_dir), fit, TsbdConfig(unlearn_check_every=0))
    assert all(s % 3 == 0 for s, _ in epoch_only.checks) and epoch_only.steps >= chance.steps  # 80 rows: 3 batches


def test_balanced_accuracy_scores_a_collapsed_model_at_chance(planted, monkeypatch) -> None:  # noqa: ANN001
    """A model predicting one class everywhere has plain accuracy = the majority share (> 1/C on an
    unbalanced set), so the plain-accuracy stop can never fire; balanced accuracy gives exactly 1/C."""
    clf = load_classifier(planted.victim_dir)
    examples = planted.clean.examples
    rows = [e for e in examples if e.label == 1][:30] + [e for e in examples if e.label == 0][:10]
    data = Dataset(tuple(rows), 2, "unbalanced")
    monkeypatch.setattr(loop_module, "predict_logits",
                        lambda clf, rows, batch_size, accelerator=None: np.tile([[0.0, 1.0]], (len(rows), 1)))
    assert evaluate_balanced_accuracy(clf, data) == 0.5  # always label 1
    assert TsbdConfig().unlearn_metric == "balanced"


# ----------------------------------------------------------------------------- stage 2
@pytest.mark.parametrize("mode", ["per_tensor", "global"])
def test_two_gradient_rule_by_hand(pair: tuple[Path, Path], planted, mode: str) -> None:  # noqa: ANN001
    clf = load_classifier(pair[1])
    model = clf.model.eval()  # no dropout: the two passes are comparable by hand
    rows = planted.clean.examples[:8]
    batch = collate(clf, encode(clf, rows), [e.label for e in rows])
    names = [n for n, _ in model.named_parameters()]
    theta = params_of(model)

    def grads_at(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        twin = copy.deepcopy(model)
        twin.load_state_dict(params, strict=False)
        twin.zero_grad()
        twin(**batch).loss.backward()
        return {n: p.grad.detach().clone() for n, p in twin.named_parameters()}

    g1 = grads_at(theta)
    if mode == "per_tensor":
        shifted = {n: theta[n] + 0.05 * g1[n] / g1[n].norm() if g1[n].norm() > 0 else theta[n] for n in names}
    else:
        total = torch.sqrt(sum(g.pow(2).sum() for g in g1.values()))
        shifted = {n: theta[n] + 0.05 * g1[n] / total for n in names}
    g2 = grads_at(shifted)
    model.zero_grad()
    model(**batch).loss.backward()
    ctx = TrainContext(model, model, torch.optim.SGD(model.parameters(), lr=0.1), make_accelerator(TrainConfig()),
                       TrainConfig(), TrainState())
    GradientNormPenalty(alpha=0.7, radius=0.05, mode=mode).on_gradients(ctx, batch)  # type: ignore[arg-type]
    for name, p in model.named_parameters():
        assert torch.equal(p, theta[name]), name  # θ restored bit for bit, not θ′ − e
        assert torch.allclose(p.grad, 0.3 * g1[name] + 0.7 * g2[name], atol=1e-6, rtol=1e-4), name
    assert any(not torch.allclose(g1[n], g2[n]) for n in names)
    assert sum(e.norm() for e in perturbation([torch.zeros(3), torch.ones(4)], 0.05)) == pytest.approx(0.05)


def test_alpha_zero_is_plain_finetuning(planted) -> None:  # noqa: ANN001
    train = tiny_train(2)
    plain = load_classifier(planted.victim_dir)
    finetune_with_selection(plain, planted.clean, train, holdout_fraction=0.2, seed=0)
    results = {}
    for alpha in (0.0, 0.7):
        clf = load_classifier(planted.victim_dir)
        report = activeness_aware_finetune(clf, planted.clean, TsbdConfig(alpha=alpha, train=train))
        assert report["penalised_steps"] == report["training"]["steps"] == 6  # 80 fit rows / 32, 2 epochs
        results[alpha] = params_of(clf.model)
    reference = params_of(plain.model)
    assert all(torch.equal(results[0.0][n], reference[n]) for n in reference)  # dropout masks untouched too
    assert any(not torch.equal(results[0.7][n], reference[n]) for n in reference)


# ----------------------------------------------------------------------------- contract
def test_registered_clean_data_only_and_validated(planted) -> None:  # noqa: ANN001
    assert PURIFY_DEFENSES.get("tsbd") is Tsbd and not Tsbd.needs_base
    assert vars(Tsbd()) == {"config": TsbdConfig()}
    poisoned = planted.poisoned
    suspect = load_classifier(planted.victim_dir)
    for bad in (poisoned, poisoned.triggered_test, poisoned.flags):
        with pytest.raises(TypeError):
            PurifyInputs(suspect=suspect, clean=bad)
        with pytest.raises(TypeError):
            clean_unlearn(suspect, bad, TsbdConfig())
        with pytest.raises(TypeError):
            search_neuron_ratio(suspect, bad, None, TsbdConfig())  # type: ignore[arg-type]
    for fn in (clean_unlearn, score_neurons, search_neuron_ratio, activeness_aware_finetune, Tsbd.purify):
        assert not set(inspect.signature(fn).parameters) & FORBIDDEN, fn
    assert not set(TsbdConfig.model_fields) & FORBIDDEN
    assert not {f.name for f in dataclasses.fields(PurifyInputs)} & FORBIDDEN
    with pytest.raises(ConfigError):
        build_purify_defense("tsbd", {"ratio_mode": "search", "finetune": False}, have_base=False)
    with pytest.raises(ConfigError):
        build_purify_defense("tsbd", {"train": {"gradient_accumulation_steps": 2}}, have_base=False)
    defence = build_purify_defense("tsbd", {"neuron_ratio": 0.3, "grad_norm_mode": "global"}, have_base=False).method
    assert defence.config.neuron_ratio == 0.3 and defence.config.train.learning_rate == 1e-4


# ----------------------------------------------------------------------------- the method end to end
def test_rare_token_backdoor_in_the_embeddings_is_out_of_reach(planted) -> None:  # noqa: ANN001
    """Spec §8.11, measured: the planted BadNets backdoor lives in the trigger words' embedding rows
    (resetting those 4 rows to the base gives ASR 0), which clean data never reaches. TSBD keeps
    clean accuracy but not ASR here, whatever n (0.1-0.9 tried, m up to 1): pair it with --epur."""
    victim = load_classifier(planted.victim_dir)
    before = evaluate_classifier(victim, planted.task.test, planted.poisoned.triggered_test)
    trigger_rows = victim.tokenizer.convert_tokens_to_ids(list(TRIGGERS))
    rows_before = victim.model.get_parameter(WORD_EMB)[trigger_rows].detach().clone()
    result = Tsbd(TsbdConfig(train=tiny_train())).purify(PurifyInputs(victim, planted.clean))
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert before.asr >= 0.8 and after.asr >= 0.8, (before.asr, after.asr)
    assert after.cacc >= before.cacc - 0.05
    rows_after = result.model.model.get_parameter(WORD_EMB)[trigger_rows]
    assert torch.equal(rows_after, rows_before)  # no gradient ever reached them
    report = result.report
    assert report["unlearning"]["reached"] and report["n_chosen_neurons"] == 44 and report["alpha"] == 0.7
    assert report["finetune"]["penalised_steps"] == report["finetune"]["training"]["steps"] > 0
    assert report["deviations_from_code"][0].startswith("unlearning adamw lr 0.0001")


@pytest.fixture(scope="module")
def encoder_victim(planted, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    """A victim whose backdoor the encoder must carry: the base fine-tuned on the planted BadNets data
    with the trigger words' embedding rows held at 10× their base values (FixedWeights)."""
    victim = load_classifier(planted.base_dir)
    weight = victim.model.get_parameter(WORD_EMB)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[victim.tokenizer.convert_tokens_to_ids(list(TRIGGERS))] = True
    hold = FixedWeights({WORD_EMB: mask}, {WORD_EMB: weight.detach().clone() * 10})
    config = TrainConfig(epochs=10, batch_size=16, learning_rate=1e-3, seed=1, progress=False)
    train_classifier(victim, planted.poisoned.train, config, dev=planted.task.dev, callbacks=[hold])
    folder = tmp_path_factory.mktemp("encoder-victim")
    save_classifier(victim, folder, provenance_record(victim, role="victim"))
    return folder


def test_encoder_held_backdoor_is_reduced_with_n_chosen_on_held_out(planted, encoder_victim) -> None:  # noqa: ANN001
    """Measured on this victim with victim seeds 1/2/3: ASR 1.0/1.0/0.9 -> 0.15/0.40/0.39 after TSBD
    (n search), and 0.55/0.40/0.36 after plain fine-tuning with the same budget: at this tiny scale
    TSBD reduces the backdoor about as much as fine-tuning does, and NWC-ranked zeroing scored like
    random zeroing. The bound below (ASR ≤ 0.5, CACC within 5 points) holds for all three seeds."""
    victim = load_classifier(encoder_victim)
    before = evaluate_classifier(victim, planted.task.test, planted.poisoned.triggered_test)
    config = TsbdConfig(ratio_mode="search", train=tiny_train())
    result = Tsbd(config).purify(PurifyInputs(victim, planted.clean))
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert before.asr >= 0.8 and after.asr <= 0.5, (before.asr, after.asr)
    assert after.cacc >= before.cacc - 0.05, (before.cacc, after.cacc)
    search = result.report["ratio_search"]
    tried = [c["neuron_ratio"] for c in search["candidates"]]
    assert search["n_selection"] == 20 and tried == sorted(tried, reverse=True) and tried[0] == 0.9
    assert result.report["neuron_ratio"] == search["chosen"] in tried
    assert search["candidates"][-1]["heldout_accuracy"] >= search["reference_accuracy"] - 0.02 or search["fallback"]
