"""Diagonal Fisher (``unbackdoor.optim.fisher``): per-example, clean data only, deterministic."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from synthetic import make_task, save_tiny_model

from unbackdoor.attacks import BadNets
from unbackdoor.data import Dataset
from unbackdoor.errors import ModelError
from unbackdoor.inference import collate, encode
from unbackdoor.models import load_classifier
from unbackdoor.models.loading import Classifier
from unbackdoor.optim import diagonal_fisher

HEAD = ("classifier.weight", "classifier.bias")



@pytest.fixture(scope="module")
def data() -> Dataset:
    return make_task(16, 4, 4, seed=3).train


@pytest.fixture()
def clf(tiny_bert: Path) -> Classifier:
    return load_classifier(tiny_bert)


def _row_inputs(clf: Classifier, data: Dataset) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    for feature, label in zip(encode(clf, data.examples), data.labels, strict=True):
        yield {k: v for k, v in collate(clf, [feature]).items()}, label


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float noise, relative to the largest Fisher entry overall."""
    scale = max(float(t.abs().max()) for t in a.values())
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_head_fisher_matches_hand_computation(clf: Classifier, data: Dataset) -> None:
    """∂CE/∂W = (p − e_y) hᵀ and ∂CE/∂b = p − e_y for the linear head on the pooled output h."""
    model = clf.model.eval()
    expected = {"empirical": [torch.zeros(2, 32), torch.zeros(2)], "true": [torch.zeros(2, 32), torch.zeros(2)]}
    with torch.no_grad():
        for inputs, y in _row_inputs(clf, data):
            h = model.bert(**inputs).pooler_output[0]
            p = F.softmax(model.classifier(h), dim=-1)
            for mode, labels in (("empirical", [(1.0, y)]), ("true", [(float(p[c]), c) for c in range(2)])):
                for w, c in labels:
                    residual = p - F.one_hot(torch.tensor(c), 2).float()
                    expected[mode][0] += w * torch.outer(residual, h).square()
                    expected[mode][1] += w * residual.square()
    for mode, (fw, fb) in expected.items():
        got = diagonal_fisher(clf, data, mode=mode, params=HEAD)  # type: ignore[arg-type]
        assert set(got) == set(HEAD)
        torch.testing.assert_close(got["classifier.weight"], fw / len(data), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got["classifier.bias"], fb / len(data), rtol=1e-4, atol=1e-7)


def test_matches_explicit_per_example_backward(clf: Classifier, data: Dataset) -> None:
    model = clf.model.eval()
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for inputs, y in _row_inputs(clf, data):
        model.zero_grad()
        F.cross_entropy(model(**inputs).logits, torch.tensor([y])).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                expected[n] += p.grad.square()
    model.zero_grad()
    _close(diagonal_fisher(clf, data), {n: t / len(data) for n, t in expected.items()})


@pytest.mark.parametrize("mode", ["empirical", "sampled", "true"])
def test_vectorised_matches_loop(clf: Classifier, data: Dataset, mode: str) -> None:
    loop = diagonal_fisher(clf, data, mode=mode)  # type: ignore[arg-type]
    _close(loop, diagonal_fisher(clf, data, mode=mode, estimator="vmap", batch_size=3))  # type: ignore[arg-type]


def test_differs_from_squared_batch_mean_gradient(clf: Classifier, data: Dataset) -> None:
    model = clf.model.eval()
    batch = collate(clf, encode(clf, data.examples), data.labels)
    model.zero_grad()
    model(**batch).loss.backward()
    squared_mean = sum(float(p.grad.square().sum()) for p in model.parameters() if p.grad is not None)
    model.zero_grad()
    fisher = sum(float(t.sum()) for t in diagonal_fisher(clf, data).values())
    assert fisher > 1.5 * squared_mean  # mean of squares ≥ square of the mean, far from equal here


def test_non_negative_deterministic_and_model_untouched(clf: Classifier, data: Dataset) -> None:
    clf.model.train()
    before = {n: p.detach().clone() for n, p in clf.model.named_parameters()}
    for mode in ("empirical", "sampled"):
        a = diagonal_fisher(clf, data, mode=mode, seed=7)  # type: ignore[arg-type]
        b = diagonal_fisher(clf, data, mode=mode, seed=7)  # type: ignore[arg-type]
        assert a.keys() == set(before)
        for n in a:
            assert torch.equal(a[n], b[n]), n
            assert a[n].dtype == torch.float32 and a[n].shape == before[n].shape
            assert bool((a[n] >= 0).all()), n
    assert clf.model.training  # mode restored
    assert all(p.grad is None for p in clf.model.parameters())
    for n, p in clf.model.named_parameters():
        assert torch.equal(p, before[n])


def test_max_rows_and_parameter_subset(clf: Classifier, data: Dataset) -> None:
    full = diagonal_fisher(clf, data)
    assert torch.equal(diagonal_fisher(clf, data, max_rows=len(data))["classifier.bias"], full["classifier.bias"])
    capped = diagonal_fisher(clf, data, max_rows=4, params=HEAD)
    assert set(capped) == set(HEAD) and not torch.equal(capped["classifier.bias"], full["classifier.bias"])
    with pytest.raises(ValueError):
        diagonal_fisher(clf, data, params=["no.such.parameter"])


def test_takes_clean_labelled_data_only(clf: Classifier) -> None:
    poisoned = BadNets().poison(make_task(60, 10, 40))
    for bad in (poisoned, poisoned.triggered_test, poisoned.flags, list(poisoned.clean.train.examples)):
        with pytest.raises(TypeError):
            diagonal_fisher(clf, bad)  # type: ignore[arg-type]
    forbidden = {"flags", "poison_flags", "trigger", "target", "target_label", "triggered", "poisoned"}
    assert not set(inspect.signature(diagonal_fisher).parameters) & forbidden


def test_decoder_models_use_the_loop(tmp_path: Path, data: Dataset) -> None:
    gpt2 = load_classifier(save_tiny_model(tmp_path / "gpt2", "gpt2"))
    fisher = diagonal_fisher(gpt2, data, max_rows=6)
    assert all(bool(torch.isfinite(t).all() and (t >= 0).all()) for t in fisher.values())
    with pytest.raises(ModelError, match="loop"):  # GPT-2's padding check cannot run under vmap
        diagonal_fisher(gpt2, data, max_rows=6, estimator="vmap")
