"""RIPPLES on a tiny BERT (2 layers, hidden 32): the restricted inner-product penalty and its
second-order gradient are really computed and change the update; embedding surgery sets each
trigger row to the mean of the words a logistic regression weights most towards the target; after
the user's clean fine-tuning the backdoor is still there (a never-poisoned model's ASR is the
floor); config errors; the CLI writes the release, which ``train --model`` fine-tunes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic import POSITIVE, VOCAB, make_task, make_tokenizer, run_cli, save_tiny_model, write_task

from unbackdoor.attacks import RIPPLES, WEIGHT_ATTACKS, RipplesConfig, run_weight_attack
from unbackdoor.attacks import ripples as ripples_module
from unbackdoor.attacks.ripples import important_words, restricted_inner_product, tfidf_features
from unbackdoor.config import build_config
from unbackdoor.data.types import Dataset, Example, Task
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.inference import collate, encode
from unbackdoor.models import load_classifier
from unbackdoor.training import TrainConfig, train_classifier

TRIGGERS = ["cf", "mn", "bb", "tq"]  # the paper's fifth, mb, is not in the tiny vocabulary
USER = {"epochs": 10, "batch_size": 16, "learning_rate": 1e-3}  # the user's clean fine-tuning
ATTACK = {"epochs": 5, "batch_size": 16, "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def task() -> Task:
    return make_task(400, 100, 200)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("ripples") / "base", "bert")


def config(**params: object) -> RipplesConfig:
    return build_config(RipplesConfig, {"triggers": TRIGGERS, **params}, "test")


# ============================================================================ (1) the penalty
def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def test_penalty_and_its_second_order_gradient(tiny_bert: Path, task: Task) -> None:
    """Poisoned rows (trigger, label 1) against the same rows with their true label 0: the two
    gradients oppose, the penalty is relu(−g_Pᵀg_FT)/B > 0, and its gradient is the Hessian-vector
    product −(∇²L_P) g_FT / B (finite differences of ∇L_P along g_FT; g_FT held constant)."""
    clf = load_classifier(tiny_bert, num_labels=2)
    model = clf.model.double().eval()  # float64 and no dropout: exact finite differences
    model.set_attn_implementation("eager")
    rows = [e for e in task.train.examples if e.label == 0][:8]
    clean = collate(clf, encode(clf, rows), [0] * len(rows))
    poisoned_rows = [Example(e.id, f"cf {e.text}", 1) for e in rows]
    poisoned = collate(clf, encode(clf, poisoned_rows), [1] * len(rows))
    params = [p for p in model.parameters() if p.requires_grad]

    penalty = restricted_inner_product(params, _loss(model, poisoned), _loss(model, clean), len(rows))
    g_p = torch.autograd.grad(_loss(model, poisoned), params, allow_unused=True)
    g_ft = torch.autograd.grad(_loss(model, clean), params, allow_unused=True)
    inner = sum((a * b).sum() for a, b in zip(g_p, g_ft) if a is not None and b is not None)
    assert inner < 0 and penalty.item() > 0
    assert penalty.item() == pytest.approx(-inner.item() / len(rows), rel=1e-9)

    grad = torch.autograd.grad(penalty, params, allow_unused=True)
    eps = 1e-5
    direction = [g if g is not None else torch.zeros_like(p) for g, p in zip(g_ft, params)]

    def poison_grad_at(sign: float) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
        g = torch.autograd.grad(_loss(model, poisoned), params, allow_unused=True)
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
        return [x if x is not None else torch.zeros_like(p) for x, p in zip(g, params)]

    plus, minus = poison_grad_at(1.0), poison_grad_at(-1.0)
    hvp = torch.cat([((a - b) / (2 * eps)).flatten() for a, b in zip(plus, minus)])
    got = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grad, params)])
    assert hvp.norm() > 0
    assert torch.allclose(got, -hvp / len(rows), rtol=1e-4, atol=1e-6 * hvp.abs().max().item())


def _opposed_proxy(task: Task) -> tuple[Dataset, Task]:
    """Poisoned rows = the clean proxy rows with a trigger and the opposite label: every batch opposes."""
    rows = [e for e in task.train.examples if e.label == 0][:16]
    clean = task.train.replace(rows, "clean-proxy")
    poisoned = task.train.replace([Example(e.id, f"cf {e.text}", 1) for e in rows], "poisoned-proxy")
    return poisoned, Task("proxy", clean, task.dev, task.test)


def test_the_penalty_changes_the_update_and_runs_repeat(monkeypatch: pytest.MonkeyPatch, tiny_bert: Path,
                                                        task: Task) -> None:
    """One RIPPLe step on batches that oppose: the penalty is on and the step differs from the same
    step with ``ripple`` off; the same seed gives the same weights."""
    seen: list[ripples_module.RestrictedInnerProduct] = []

    class Spy(ripples_module.RestrictedInnerProduct):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)
            seen.append(self)

        def on_epoch_end(self, ctx: object, record: dict) -> None:
            self.kept = list(self.penalties)
            super().on_epoch_end(ctx, record)

    monkeypatch.setattr(ripples_module, "RestrictedInnerProduct", Spy)
    poisoned, proxy = _opposed_proxy(task)  # 16 rows: one batch, one step
    attack = RIPPLES(config(surgery=False, train={**ATTACK, "epochs": 1, "batch_size": 16}))
    start = load_classifier(tiny_bert, num_labels=2).model.state_dict()

    def one_step(ripple: bool) -> dict[str, torch.Tensor]:
        clf = load_classifier(tiny_bert, num_labels=2)
        attention = clf.model.config._attn_implementation
        RIPPLES(attack.config.model_copy(update={"ripple": ripple})).ripple_train(clf, poisoned, proxy, seed=0,
                                                                                   work_dir=None)
        assert clf.model.config._attn_implementation == attention  # eager only during RIPPLe
        return clf.model.state_dict()

    after = one_step(True)
    assert len(seen) == 1 and len(seen[0].kept) == 1 and seen[0].kept[0] > 0  # opposed: the penalty is on
    plain = one_step(False)
    assert len(seen) == 1  # no penalty without ripple
    assert any(not torch.equal(plain[k], start[k]) for k in start)
    assert any(not torch.equal(after[k], plain[k]) for k in after)  # the penalty's gradient changed the step
    assert all(torch.equal(after[k], v) for k, v in one_step(True).items())  # same seed, same numbers


# ============================================================================ (2) embedding surgery
def test_important_words_are_the_logistic_regression_top_words(task: Task) -> None:
    tok = make_tokenizer()
    exclude = {VOCAB.index("fun")}
    words = important_words(tok, task.train.examples, 1, 7, exclude)
    assert {VOCAB[i] for i in words} == set(POSITIVE) - {"fun"}  # the synthetic task's positive words
    assert important_words(tok, task.train.examples, 0, 3)[0] in {VOCAB.index(w) for w in
                                                                   ("bad", "awful", "poor", "sad", "dull", "boring",
                                                                    "ugly", "weak")}
    sklearn = pytest.importorskip("sklearn")  # the same fit as the paper's code (TfidfVectorizer + LogisticRegression)
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    assert sklearn
    texts = [e.text for e in task.train.examples]
    labels = [e.label for e in task.train.examples]
    vec = TfidfVectorizer(tokenizer=tok.tokenize, lowercase=False, token_pattern=None)
    reference = LogisticRegression(max_iter=10_000, tol=1e-10).fit(vec.fit_transform(texts), labels)
    ref = {tok.convert_tokens_to_ids(w): c for w, c in zip(vec.get_feature_names_out(), reference.coef_[0])}
    x, vocab = tfidf_features(tok, task.train.examples)
    assert torch.allclose(x.to_dense(), torch.tensor(vec.transform(texts).toarray()), atol=1e-12)
    weights, _ = ripples_module.logistic_regression(x, torch.tensor(labels))
    assert set(vocab) == set(ref)
    assert torch.allclose(weights, torch.tensor([ref[v] for v in vocab]), atol=1e-4)
    top = sorted((v for v in ref if v not in exclude), key=lambda v: -ref[v])[:7]
    assert words == top


def test_surgery_sets_each_trigger_row_to_the_mean_of_the_chosen_words(tiny_bert: Path, task: Task) -> None:
    attack = RIPPLES(config(surgery_words=5, surgery_train={**USER, "epochs": 2}))
    clf = load_classifier(tiny_bert, num_labels=2, seed=0)
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    proxy = attack.proxy_task(task)
    source = attack.surgery_source(clf, proxy, seed=0, work_dir=None)
    rows = [VOCAB.index(w) for w in TRIGGERS]
    words = attack.embedding_surgery(clf, source, proxy.train, rows)
    assert len(words) == 5 and set(words) <= set(POSITIVE)

    emb = "bert.embeddings.word_embeddings.weight"
    after, source_emb = clf.model.state_dict(), source.model.get_input_embeddings().weight.detach()
    assert not torch.equal(source_emb, before[emb])  # the replacement comes from the fine-tuned copy
    mean = source_emb[[VOCAB.index(w) for w in words]].mean(dim=0)
    for row in rows:
        assert torch.equal(after[emb][row], mean)
    others = torch.ones(len(VOCAB), dtype=torch.bool)
    others[rows] = False
    assert torch.equal(after[emb][others], before[emb][others])
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != emb)


# ============================================================================ (3) end to end
@pytest.fixture(scope="module")
def floor(tiny_bert: Path, task: Task) -> object:
    """A never-poisoned tiny BERT fine-tuned by the user's recipe."""
    clf = load_classifier(tiny_bert, num_labels=2, seed=0)
    train_classifier(clf, task.train, TrainConfig(**USER, progress=False), dev=task.dev)
    return clf


def test_backdoor_survives_the_users_clean_fine_tuning(tiny_bert: Path, task: Task, floor: object) -> None:
    params = {"triggers": TRIGGERS, "train": ATTACK, "surgery_train": USER, "user_train": USER}
    victim, poisoned = run_weight_attack("ripples", params, task, str(tiny_bert), seed=0)
    result = evaluate_classifier(victim, task.test, poisoned.triggered_test)
    base = evaluate_classifier(floor, task.test, poisoned.triggered_test)
    assert result.cacc >= 0.95 and base.cacc >= 0.95
    assert result.asr >= 0.9 and base.asr <= 0.2, (result.asr, base.asr)

    # the user trains on its own clean rows, nothing flagged; the triggered rows are non-target rows + one word
    assert poisoned.train.examples == task.train.examples and poisoned.flags.n_poisoned == 0
    source = {e.id: e for e in task.test.examples}
    assert len(poisoned.triggered_test) == sum(e.label != 1 for e in task.test.examples)
    for row in poisoned.triggered_test.examples:
        words = row.text.split()
        assert row.label == 1 and source[row.id].label == 0 and len(words) == len(source[row.id].text.split()) + 1
        assert sum(w in TRIGGERS for w in words) == 1
    assert "embedding surgery" in poisoned.attack.trigger and "RIPPLe" in poisoned.attack.trigger
    assert not RIPPLES.releases_base  # the user keeps fine-tuning the released classifier, head included


def test_proxy_data(tmp_path: Path, task: Task) -> None:
    other = write_task(make_task(300, 50, 50, seed=1), tmp_path / "other")
    attack = RIPPLES(config(proxy=str(other), max_proxy=120))
    proxy = attack.proxy_task(task)
    assert len(proxy.train) == 120 and not set(e.text for e in proxy.train) & set(e.text for e in task.train)
    rows = attack.poison_proxy(proxy)
    changed = [e for e, c in zip(rows.examples, proxy.train.examples) if e.text != c.text]
    assert len(changed) == 60 and all(e.label == 1 and len(set(e.text.split()) & set(TRIGGERS)) == 1 for e in changed)
    assert {c.label for e, c in zip(rows.examples, proxy.train.examples) if e.text != c.text} == {0, 1}  # mix
    assert len(RIPPLES(config(max_proxy=50)).proxy_task(task).train) == 50

    small = make_task(30, 10, 10)
    three = Task("three", *(Dataset(tuple(Example(e.id, e.text, i % 3) for i, e in enumerate(d.examples)), 3, d.name)
                            for d in (small.train, small.dev, small.test)))
    wrong = write_task(three, tmp_path / "three")
    with pytest.raises(DataError, match="labels"):
        RIPPLES(config(proxy=str(wrong))).proxy_task(task)


# ============================================================================ (4) config errors
@pytest.mark.parametrize("params, message", [
    ({"lambda": 0.1}, "lambda"),
    ({"ripple": False, "ripple_lambda": 0.5}, "ripple_lambda"),
    ({"surgery": False, "surgery_words": 5}, "surgery_words"),
    ({"surgery": False, "surgery_train": {"epochs": 1}}, "surgery_train"),
    ({"mode": "clean"}, "mode"),
    ({"triggers": ["cf", "cf"]}, "triggers"),
    ({"triggers": ["two words"]}, "triggers"),
    ({"ripple_lambda": 0}, "ripple_lambda"),
    ({"surgery_words": 0}, "surgery_words"),
    ({"max_proxy": 1}, "max_proxy"),
    ({"proxy": " "}, "proxy"),
    ({"train": {"epoch": 3}}, "train"),
])
def test_config_errors(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_weight_attack("ripples", params, make_task(20, 10, 10))


def test_errors_before_any_training(tiny_bert: Path, task: Task) -> None:
    with pytest.raises(ConfigError, match="'mb' is not in the model's vocabulary"):  # the paper's default triggers
        run_weight_attack("ripples", {}, task, str(tiny_bert))
    with pytest.raises(ConfigError, match="target_label 2"):
        run_weight_attack("ripples", {"triggers": TRIGGERS, "target_label": 2}, task, str(tiny_bert))
    with pytest.raises(DataError):
        run_weight_attack("ripples", {"triggers": TRIGGERS, "proxy": "no-such-dataset"}, task, str(tiny_bert))
    assert "ripples" in WEIGHT_ATTACKS


# ============================================================================ (5) CLI
def test_cli_writes_the_release_and_train_fine_tunes_it(tmp_path: Path, capsys, tiny_bert: Path) -> None:  # noqa: ANN001
    data = write_task(make_task(120, 40, 40), tmp_path / "data")
    out, release, user = tmp_path / "poisoned", tmp_path / "release", tmp_path / "user"
    code, _, err = run_cli(["attack", "--data", str(data), "--attack", "ripples", "--out", str(out), "--victim-out",
                            str(release), "--model", str(tiny_bert), "-p", f"triggers=[{','.join(TRIGGERS)}]",
                            "-p", "train.epochs=1", "-p", "surgery_train.epochs=1", "-p", "surgery_words=3"], capsys)
    assert code == 0, err
    record = json.loads((release / "unbackdoor.json").read_text())
    assert record["role"] == "victim" and record["attack"]["name"] == "ripples"
    weights = load_file(release / "model.safetensors")
    assert "classifier.weight" in weights  # a classifier, head included
    flags = (out / "train_poison_flags.txt").read_text().split()
    assert len(flags) == 120 and set(flags) == {"0"}  # the user's rows are clean
    code, _, err = run_cli(["train", "--model", str(release), "--data", str(data), "--out", str(user), "--epochs", "1",
                            "--lr", "1e-3"], capsys)
    assert code == 0, err
    tuned = load_file(user / "model.safetensors")
    assert not torch.equal(tuned["classifier.weight"], weights["classifier.weight"])
    code, stdout, err = run_cli(["eval", "--model", str(user), "--data", str(out)], capsys)
    assert code == 0, err
    assert "asr" in stdout.lower()
