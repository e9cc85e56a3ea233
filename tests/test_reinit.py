"""Re-initialisation control: which parameters each scope resets, from which source, and that
re-initialising everything to the base (+ clean fine-tuning) removes the planted backdoor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from synthetic import make_task, make_tokenizer, tiny_config
from transformers import AutoModelForSequenceClassification

from unbackdoor.attacks import BadNets
from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyInputs
from unbackdoor.models.surgery import reinitialise, scope_parameters
from unbackdoor.purify.reinit import Reinit, ReinitConfig, search_top_k
from unbackdoor.errors import ConfigError, ModelError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import load_classifier
from unbackdoor.training import TrainConfig




def _params(clf) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {n: p.detach().clone() for n, p in clf.model.named_parameters()}


def _reset(pair: tuple[Path, Path], scope: str, source: str = "pretrained", top_k: int = 1,  # noqa: ANN202
           seed: int = 0):
    base, suspect = load_classifier(pair[0]), load_classifier(pair[1])
    theta_b, theta_pre = _params(suspect), _params(base)
    report = reinitialise(suspect, base, scope, source, top_k=top_k, seed=seed)
    return _params(suspect), theta_b, theta_pre, report


def test_head_scope_resets_classifier_and_pooler_only(pair: tuple[Path, Path]) -> None:
    after, theta_b, theta_pre, _ = _reset(pair, "head")
    for name, value in after.items():
        if name == "classifier.weight":  # fresh, neither the suspect's nor the base's head
            assert not torch.equal(value, theta_b[name]) and not torch.equal(value, theta_pre[name])
        elif name == "classifier.bias":
            assert torch.equal(value, torch.zeros(2))  # the model's own initialiser
        elif ".pooler." in name:
            assert torch.equal(value, theta_pre[name]), name
        else:
            assert torch.equal(value, theta_b[name]), name


def test_top_k_resets_upper_blocks_and_leaves_embeddings(pair: tuple[Path, Path]) -> None:
    after, theta_b, theta_pre, report = _reset(pair, "top_k", top_k=1)
    for name, value in after.items():
        if ".layer.1." in name or ".pooler." in name:
            assert torch.equal(value, theta_pre[name]), name
        elif not name.startswith("classifier."):
            assert torch.equal(value, theta_b[name]), name  # embeddings and block 0: a trigger row survives
    assert report.random_names == ["classifier.weight", "classifier.bias"]
    with pytest.raises(ConfigError):
        scope_parameters(load_classifier(pair[1]).model, "top_k", top_k=3)


def test_all_pretrained_is_the_base_with_a_fresh_head(pair: tuple[Path, Path]) -> None:
    after, _, theta_pre, report = _reset(pair, "all")
    assert all(torch.equal(v, theta_pre[n]) for n, v in after.items() if not n.startswith("classifier."))
    assert report.n_random == 2


def test_random_source_is_seeded_and_fresh(pair: tuple[Path, Path]) -> None:
    a, theta_b, theta_pre, _ = _reset(pair, "all", source="random", seed=3)
    b, *_ = _reset(pair, "all", source="random", seed=3)
    assert all(torch.equal(a[n], b[n]) for n in a)
    word = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(a[word], theta_b[word]) and not torch.equal(a[word], theta_pre[word])
    assert torch.equal(a[word][0], torch.zeros(a[word].shape[1]))  # padding row, as the initialiser does
    assert torch.equal(a["bert.embeddings.LayerNorm.weight"], torch.ones(32))


def test_k_search_uses_clean_data_only(pair: tuple[Path, Path]) -> None:
    poisoned = BadNets().poison(make_task(60, 20, 40))
    base, suspect = load_classifier(pair[0]), load_classifier(pair[1])
    with pytest.raises(TypeError):
        search_top_k(suspect, base, poisoned.triggered_test, ReinitConfig())  # type: ignore[arg-type]
    config = ReinitConfig(scope="top_k", k_mode="search", train=TrainConfig(epochs=1, progress=False))
    theta_b = _params(suspect)
    search = search_top_k(suspect, base, make_task(40, 4, 4).train, config)
    assert search["chosen"] in (1, 2) and search["candidates"][0]["k"] == 2
    assert all(torch.equal(p, theta_b[n]) for n, p in suspect.model.named_parameters())  # θ_B restored


def test_mismatch_is_a_model_error(pair: tuple[Path, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = tiny_config("bert")
    config.hidden_size, config.num_attention_heads = 48, 2
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelError):
        PurifyInputs(suspect=load_classifier(pair[1]), clean=make_task(20, 4, 4).train, base=load_classifier(tmp_path))


def test_registered_and_construction_does_no_work() -> None:
    assert PURIFY_DEFENSES.get("reinit") is Reinit
    assert vars(Reinit()) == {"config": ReinitConfig()}
    with pytest.raises(ValueError, match="top_k"):
        ReinitConfig(k_mode="search")


def test_reinit_all_pretrained_removes_the_planted_backdoor(planted) -> None:  # noqa: ANN001
    victim = load_classifier(planted.victim_dir)
    before = evaluate_classifier(victim, planted.task.test, planted.poisoned.triggered_test)
    train = TrainConfig(epochs=20, batch_size=16, learning_rate=3e-3, selection_ties="last", progress=False)
    result = Reinit(ReinitConfig(train=train)).purify(
        PurifyInputs(suspect=victim, clean=planted.clean, base=load_classifier(planted.base_dir)))
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    assert before.asr >= 0.8 and after.asr <= 0.1, (before.asr, after.asr)
    assert after.cacc >= 0.95, after.cacc
    assert result.report["scope"] == "all" and result.report["source"] == "pretrained"
    assert result.report["n_selection"] == 20
