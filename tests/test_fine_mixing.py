"""Fine-mixing: the mixing step (exactness, kept share, seeding, groups), the clean-only ρ search,
and purification of the planted BadNets victim."""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path

import pytest
import torch
from synthetic import make_task, make_tokenizer, save_tiny_model, tiny_config
from transformers import AutoModelForSequenceClassification

from unbackdoor.attacks import BadNets
from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyInputs
from unbackdoor.models.surgery import kept_count, parameter_groups, random_priorities
from unbackdoor.purify.fine_mixing import FineMixing, FineMixingConfig, mix_weights, mixing_masks, search_rho
from unbackdoor.selection import Trial, choose
from unbackdoor.errors import ModelError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import load_classifier
from unbackdoor.training import TrainConfig

FORBIDDEN = {"flags", "poison_flags", "trigger", "target", "target_label", "triggered", "poisoned"}




def _params(clf) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {n: p.detach().clone() for n, p in clf.model.named_parameters()}


def _load(pair: tuple[Path, Path]):  # noqa: ANN202
    return load_classifier(pair[0]), load_classifier(pair[1])


def test_rho_one_is_the_suspect_and_rho_zero_the_base(pair: tuple[Path, Path]) -> None:
    base, suspect = _load(pair)
    theta_b, theta_pre = _params(suspect), _params(base)
    mix_weights(suspect, base, 1.0)
    assert all(torch.equal(p, theta_b[n]) for n, p in suspect.model.named_parameters())
    report = mix_weights(suspect, base, 0.0)
    groups = parameter_groups(suspect.model)
    for name, p in suspect.model.named_parameters():
        expected = theta_b[name] if groups[name] == "head" else theta_pre[name]  # head=keep
        assert torch.equal(p, expected), name
    assert report.kept_share == 0.0 and report.not_mixed["head"] == ["classifier.weight", "classifier.bias"]


def test_every_element_comes_from_one_side_with_exact_kept_counts(pair: tuple[Path, Path]) -> None:
    base, suspect = _load(pair)
    theta_b, theta_pre = _params(suspect), _params(base)
    masks = mixing_masks(suspect, base, 0.3, seed=7)
    report = mix_weights(suspect, base, 0.3, seed=7)
    mixed = dict(suspect.model.named_parameters())
    for name, mask in masks.items():
        assert int(mask.sum()) == math.ceil(0.3 * mask.numel() - 1e-9), name
        assert torch.equal(mixed[name], torch.where(mask, theta_b[name], theta_pre[name])), name
    assert "classifier.weight" not in masks
    assert abs(report.kept_share - 0.3) < 0.01
    assert set(report.kept_share_by_group) == {"embeddings", "layernorm", "encoder", "pooler"}
    assert kept_count(0.3, 10) == 3 and kept_count(0.3, 7) == 3 and kept_count(1.0, 5) == 5


def test_masks_are_seeded_nested_and_independent_of_visiting_order(pair: tuple[Path, Path]) -> None:
    base, suspect = _load(pair)
    a = mixing_masks(suspect, base, 0.4, seed=3)
    b = mixing_masks(suspect, base, 0.4, seed=3)
    c = mixing_masks(suspect, base, 0.4, seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    small = mixing_masks(suspect, base, 0.2, seed=3)
    assert all(bool((small[n] <= a[n]).all()) for n in a)  # kept at 0.2 ⊂ kept at 0.4
    names = list(a)
    forward = {n: random_priorities(n, (5,), 3) for n in names}
    backward = {n: random_priorities(n, (5,), 3) for n in reversed(names)}
    assert all(torch.equal(forward[n], backward[n]) for n in names)


def test_excluded_groups_keep_the_suspects_weights(pair: tuple[Path, Path]) -> None:
    base, suspect = _load(pair)
    theta_b, theta_pre = _params(suspect), _params(base)
    report = mix_weights(suspect, base, 0.0, groups=("encoder",))
    groups = parameter_groups(suspect.model)
    for name, p in suspect.model.named_parameters():
        assert torch.equal(p, theta_pre[name] if groups[name] == "encoder" else theta_b[name]), name
    assert "bert.embeddings.word_embeddings.weight" in report.not_mixed["excluded_group"]


def test_decoder_family_mixes_all_but_the_score_head(tmp_path: Path) -> None:
    base = load_classifier(save_tiny_model(tmp_path / "base", "gpt2", seed=0))
    suspect = load_classifier(save_tiny_model(tmp_path / "suspect", "gpt2", seed=1))
    theta_b, theta_pre = _params(suspect), _params(base)
    report = mix_weights(suspect, base, 0.0)
    assert report.not_mixed["head"] == ["score.weight"]
    for name, p in suspect.model.named_parameters():
        assert torch.equal(p, theta_b[name] if name == "score.weight" else theta_pre[name]), name


def test_head_reinit_is_seeded_and_fresh(pair: tuple[Path, Path]) -> None:
    heads = []
    for _ in range(2):
        base, suspect = _load(pair)
        theta_b = _params(suspect)
        mix_weights(suspect, base, 1.0, head="reinit", seed=5)
        head = suspect.model.classifier.weight.detach().clone()
        assert not torch.equal(head, theta_b["classifier.weight"])
        assert torch.equal(suspect.model.classifier.bias, torch.zeros(2))  # the model's own initialiser
        heads.append(head)
    assert torch.equal(heads[0], heads[1])


def test_tensor_granularity_and_drift_selection(pair: tuple[Path, Path]) -> None:
    base, suspect = _load(pair)
    whole = mixing_masks(suspect, base, 0.5, granularity="tensor")
    assert all(bool(m.all()) or not bool(m.any()) for m in whole.values())
    kept = sum(int(m.sum()) for m in whole.values())
    assert 0 < kept <= 0.5 * sum(m.numel() for m in whole.values())
    drift = mixing_masks(suspect, base, 0.5, selection="drift")
    theta_b, theta_pre = _params(suspect), _params(base)
    for name, mask in drift.items():
        delta = (theta_b[name] - theta_pre[name]).abs()
        if bool(mask.any()) and not bool(mask.all()):
            assert delta[mask].max() <= delta[~mask].min(), name  # the largest drifts are reset


def test_select_within_tolerance_rule() -> None:
    def trials(*pairs: tuple[float, float]) -> list[Trial[float]]:
        return [Trial(v, a) for v, a in pairs]

    assert choose(trials((0.1, 0.80), (0.2, 0.99), (0.3, 1.0)), 1.0, 0.02) == (0.2, False)
    assert choose(trials((0.1, 0.7), (0.2, 0.9), (0.3, 0.9)), 1.0, 0.02) == (0.2, True)
    # weakest first (fine-pruning): the last that passes before the first drop, or the last that passes at all
    assert choose(trials((0, 1.0), (1, 0.99), (2, 0.9), (3, 0.99)), 1.0, 0.02, "weakest_first") == (1, False)
    assert choose(trials((0, 1.0), (1, 0.99), (2, 0.9), (3, 0.99)), 1.0, 0.02, "weakest_first", True) == (3, False)


def test_search_cannot_take_poisoned_data(pair: tuple[Path, Path]) -> None:
    poisoned = BadNets().poison(make_task(60, 20, 40))
    base, suspect = _load(pair)
    for bad in (poisoned.triggered_test, poisoned.flags, poisoned):
        with pytest.raises(TypeError):
            search_rho(suspect, base, bad, FineMixingConfig())  # type: ignore[arg-type]
    assert not set(inspect.signature(search_rho).parameters) & FORBIDDEN
    assert not set(FineMixingConfig.model_fields) & FORBIDDEN
    assert not {f.name for f in dataclasses.fields(PurifyInputs)} & FORBIDDEN


def test_registered_needs_base_and_construction_does_no_work(pair: tuple[Path, Path]) -> None:
    assert PURIFY_DEFENSES.get("fine-mixing") is FineMixing
    defence = FineMixing()
    assert vars(defence) == {"config": FineMixingConfig()}
    base, suspect = _load(pair)
    with pytest.raises(TypeError, match="base"):
        defence.purify(PurifyInputs(suspect=suspect, clean=make_task(20, 4, 4).train))


def test_base_suspect_mismatch_is_a_model_error(pair: tuple[Path, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = tiny_config("bert")
    config.intermediate_size = 48
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    other, suspect = load_classifier(tmp_path), load_classifier(pair[1])
    with pytest.raises(ModelError):
        PurifyInputs(suspect=suspect, clean=make_task(20, 4, 4).train, base=other)
    before = _params(suspect)
    with pytest.raises(ModelError):
        mix_weights(suspect, other, 0.5)
    assert all(torch.equal(p, before[n]) for n, p in suspect.model.named_parameters())  # nothing changed


def test_search_early_stop_matches_full_grid(planted) -> None:  # noqa: ANN001
    choices = []
    for full in (False, True):
        config = FineMixingConfig(rho_mode="search", rho_criterion="before_ft", search_full_grid=full)
        victim, base = load_classifier(planted.victim_dir), load_classifier(planted.base_dir)
        search = search_rho(victim, base, planted.clean, config)
        choices.append(search.chosen)
        assert search.n_selection == 20 and search.search.trials[0].value == 0.1
    assert choices[0] == choices[1]


def test_fine_mixing_removes_the_planted_backdoor(planted) -> None:  # noqa: ANN001
    victim = load_classifier(planted.victim_dir)
    before = evaluate_classifier(victim, planted.task.test, planted.poisoned.triggered_test)
    train = TrainConfig(epochs=20, batch_size=16, learning_rate=1e-3, selection_ties="last", progress=False)
    config = FineMixingConfig(rho_mode="search", train=train)
    result = FineMixing(config).purify(PurifyInputs(suspect=victim, clean=planted.clean,
                                                    base=load_classifier(planted.base_dir)))
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert before.asr >= 0.8 and after.asr <= 0.2, (before.asr, after.asr)
    assert after.cacc >= before.cacc - 0.05, (before.cacc, after.cacc)
    report = result.report
    search = report["rho_search"]
    assert report["rho"] == search["chosen"] in [c["rho"] for c in search["candidates"]]
    assert all(0 <= c["heldout_accuracy"] <= 1 for c in search["candidates"])
    assert report["groups"] == ["embeddings", "layernorm", "encoder", "pooler"]
    assert report["selection"] == "random" and abs(report["mixing"]["kept_share"] - report["rho"]) < 0.01

