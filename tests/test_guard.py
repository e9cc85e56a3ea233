"""Inference-time guards (ONION, STRIP, RAP): the contract (clean data only, by type), their
thresholds from held-out clean rows, their real effect on a planted backdoor, the n-gram and causal
language models, the evaluation arithmetic and the ``guard`` command.

Two victims:

* ``planted`` (conftest): the tiny BERT trained on BadNets data. ONION is measured on it. STRIP and
  RAP have nothing to measure there: its tanh pooler saturates, every input (clean or triggered)
  gets the same confidence (p ≈ 0.9) and no perturbation moves it, so on it they are only checked
  to stay within their FRR budget;
* ``lexicon`` (below): a transparent tiny classifier whose logit is the sum of per-word evidence
  (sentiment words ±1, fillers 0, every word also a random direction the head ignores) with a
  weight-planted backdoor (the four BadNets trigger words +15), on a task whose clean rows carry
  graded evidence (a majority of 2-6 sentiment words). Clean confidence then follows the evidence
  margin and the trigger dominates everything: the premise STRIP and RAP rest on, which the
  trained tiny transformers never reach on synthetic data.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import FILLER, NEGATIVE, POSITIVE, TRIGGERS, VOCAB, make_split, make_tokenizer, tiny_config, write_task
from torch import nn
from transformers import GPT2LMHeadModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from unbackdoor.attacks import BadNets, BadNetsConfig
from unbackdoor.data import sample_subset
from unbackdoor.data.io import write_poisoned_task
from unbackdoor.data.sampling import holdout_split
from unbackdoor.data.types import Dataset, Example, Task
from unbackdoor.errors import ConfigError, UnsafeWeightsError
from unbackdoor.guard import (
    GUARDS,
    REJECTED,
    CausalLM,
    FittedGuard,
    GuardInputs,
    GuardOutput,
    KneserNeyLM,
    Onion,
    OnionConfig,
    Rap,
    RapConfig,
    Strip,
    StripConfig,
    build_guard,
    evaluate_guard,
    load_causal_lm,
)
from unbackdoor.commands import GuardCommand, run_guard
from unbackdoor.guard.base import budget_threshold
from unbackdoor.guard.lm import UNK
from unbackdoor.guard.rap import construct_rap
from unbackdoor.models import load_classifier
from unbackdoor.models.loading import Classifier
from unbackdoor.data.sampling import CleanSetConfig

FORBIDDEN = {"flags", "poison_flags", "trigger", "target", "target_label", "triggered", "poisoned"}


# ----------------------------------------------------------------------------- the lexicon victim
class LexiconConfig(PretrainedConfig):
    model_type = "test-lexicon"

    def __init__(self, vocab_size: int = len(VOCAB), dim: int = 4, num_labels: int = 2, pad_token_id: int = 0,
                 **kwargs: object) -> None:
        super().__init__(num_labels=num_labels, pad_token_id=pad_token_id, **kwargs)
        self.vocab_size, self.dim = vocab_size, dim


class LexiconClassifier(PreTrainedModel):
    """logit(1) = −logit(0) = the sum over tokens of their embedding's first coordinate."""

    config_class = LexiconConfig

    def __init__(self, config: LexiconConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: object) -> SequenceClassifierOutput:
        mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).unsqueeze(-1)
        x = (self.embeddings(input_ids) * mask).sum(1)[:, 0]
        return SequenceClassifierOutput(logits=torch.stack([-x, x], dim=-1))


def lexicon_victim(seed: int = 0) -> Classifier:
    tokenizer = make_tokenizer()
    vocab = tokenizer.get_vocab()
    weight = torch.randn(len(VOCAB), 4, generator=torch.Generator().manual_seed(seed)) * 0.5
    weight[:, 0] = 0.0
    for words, value in ((POSITIVE, 1.0), (NEGATIVE, -1.0), (TRIGGERS, 15.0)):
        for w in words:
            weight[vocab[w], 0] = value
    model = LexiconClassifier(LexiconConfig())
    with torch.no_grad():
        model.embeddings.weight.copy_(weight)
    return Classifier(model.eval(), tokenizer, source="lexicon")


def graded_split(n: int, split: str) -> Dataset:
    """Rows of 4-8 fillers and 2-6 sentiment words whose majority is the label."""
    rng = random.Random(f"graded-{split}")
    rows = []
    for i in range(n):
        label, k = i % 2, rng.randint(2, 6)
        major = rng.randint(k // 2 + 1, k)
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 8))]
        for polarity in [label] * major + [1 - label] * (k - major):
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if polarity else NEGATIVE))
        rows.append(Example(f"{split}-{i}", " ".join(words), label))
    return Dataset(tuple(rows), 2, f"graded:{split}")


@dataclasses.dataclass
class Lexicon:
    model: Classifier
    task: Task
    triggered: object
    poisoned: object
    clean: Dataset


@pytest.fixture(scope="module")
def lexicon() -> Lexicon:
    task = Task("graded", graded_split(400, "train"), graded_split(100, "dev"), graded_split(200, "test"))
    poisoned = BadNets(BadNetsConfig(poison_rate=0.1)).poison(task)  # only its triggered test set is used
    clean = sample_subset(task.train, size=200, seed=0, exclude=[task.test])
    return Lexicon(lexicon_victim(), task, poisoned.triggered_test, poisoned, clean)


def state(clf: Classifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in clf.model.state_dict().items()}


# ----------------------------------------------------------------------------- the contract
def test_guard_inputs_refuse_triggered_data_by_type(lexicon: Lexicon) -> None:
    poisoned = lexicon.poisoned
    for bad in (poisoned.triggered_test, poisoned.flags, poisoned):
        with pytest.raises(TypeError, match="evaluation only"):
            GuardInputs(suspect=lexicon.model, clean=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Classifier"):
        GuardInputs(suspect=lexicon.model.model, clean=lexicon.clean)  # type: ignore[arg-type]
    for guard in (Strip(), Rap(), Onion()):
        with pytest.raises(TypeError, match="GuardInputs"):
            guard.fit(poisoned.triggered_test)  # type: ignore[arg-type]
        assert list(inspect.signature(guard.fit).parameters) == ["inputs"]
        assert not set(guard.config_class.model_fields) & FORBIDDEN
    assert {f.name for f in dataclasses.fields(GuardInputs)} == {"suspect", "clean"}


def test_registry_is_complete_and_construction_does_no_work() -> None:
    assert GUARDS.names() == ["onion", "rap", "strip"]
    for name, cls, config in (("onion", Onion, OnionConfig), ("rap", Rap, RapConfig), ("strip", Strip, StripConfig)):
        assert GUARDS.get(name) is cls and cls.config_class is config
        assert vars(cls()) == {"config": config()}
        built = build_guard(name, {"frr_budget": 0.01, "seed": 3})
        assert isinstance(built, cls) and built.config.frr_budget == 0.01 and built.config.seed == 3


@pytest.mark.parametrize(("name", "params", "match"), [
    ("nope", {}, "unknown guard"),
    ("strip", {"repeats": 5}, "unknown key"),
    ("strip", {"frr_budget": 0}, "frr_budget"),
    ("strip", {"frr_budget": 1.0}, "frr_budget"),
    ("strip", {"swap_ratio": 0}, "swap_ratio"),
    ("rap", {"drop_range": [0.3, 0.1]}, "drop_range"),
    ("rap", {"rap_word": "two words"}, "rap_word"),
    ("rap", {"protect_label": -1}, "protect_label"),
    ("onion", {"lm": "/no/such/folder"}, "no such language-model folder"),
    ("onion", {"lm_max_length": 64}, "only with lm"),
    ("onion", {"threshold": 1.0}, "threshold_rule=fixed"),
    ("onion", {"percentiles": [0, 50]}, "percentiles"),
    ("onion", {"lm_corpus": "/no/such.txt"}, "no such file"),
])
def test_bad_params_are_config_errors(name: str, params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_guard(name, params)


# ----------------------------------------------------------------------------- STRIP
def test_strip_rejects_triggered_inputs_within_its_budget(lexicon: Lexicon) -> None:
    before = state(lexicon.model)
    fitted = Strip().fit(GuardInputs(lexicon.model, lexicon.clean))
    result = evaluate_guard(fitted, lexicon.model, lexicon.task.test, lexicon.triggered)
    assert result.unguarded["asr"] == 1.0 and result.unguarded["cacc"] == 1.0
    at = {m.budget: m for m in result.by_budget}
    assert set(at) == {0.01, 0.05} and result.metrics is at[0.05]
    assert at[0.05].asr <= 0.8, at[0.05]  # the guard really stops attacks (clean rows: 1.5 % rejected)
    assert at[0.05].frr <= 0.05 + 0.03 and at[0.01].frr <= 0.01 + 0.03
    assert at[0.05].far == at[0.05].asr  # every triggered row the model still obeys is accepted
    assert at[0.05].cacc == pytest.approx(1.0 - at[0.05].frr)
    assert at[0.01].asr >= at[0.05].asr  # a tighter budget rejects less
    assert all(torch.equal(v, before[k]) for k, v in lexicon.model.model.state_dict().items())


def test_strip_threshold_is_the_budget_quantile_of_held_out_clean_rows(lexicon: Lexicon) -> None:
    fitted = Strip(StripConfig(seed=4)).fit(GuardInputs(lexicon.model, lexicon.clean))
    _, heldout = holdout_split(lexicon.clean, 0.5, seed=4)
    scores = fitted.guard(heldout).scores  # the same rows, scored as any input is
    for budget in (0.01, 0.05, 0.2):
        t = fitted.thresholds(budget)["t"]
        assert t == budget_threshold(scores, budget) == float(np.quantile(scores, 1 - budget, method="higher"))
        assert fitted.guard(heldout, budget).rejected.mean() <= budget
    again = Strip(StripConfig(seed=4)).fit(GuardInputs(lexicon.model, lexicon.clean))
    assert np.array_equal(again.guard(lexicon.triggered.examples).scores, fitted.guard(lexicon.triggered.examples).scores)
    other = Strip(StripConfig(seed=5)).fit(GuardInputs(lexicon.model, lexicon.clean))
    assert not np.array_equal(other.guard(lexicon.triggered.examples).scores,
                              fitted.guard(lexicon.triggered.examples).scores)


# ----------------------------------------------------------------------------- RAP
def test_rap_without_the_target_flags_robust_inputs_and_leaves_the_model(lexicon: Lexicon) -> None:
    before = state(lexicon.model)
    fitted = Rap(RapConfig(rap_word="3d")).fit(GuardInputs(lexicon.model, lexicon.clean))
    assert all(torch.equal(v, before[k]) for k, v in lexicon.model.model.state_dict().items())
    assert fitted.report["protected_labels"] == [0, 1] and fitted.report["rap_word"] == "3d"
    result = evaluate_guard(fitted, lexicon.model, lexicon.task.test, lexicon.triggered)
    m = result.metrics
    assert result.unguarded["asr"] == 1.0 and m.asr <= 0.2, m
    assert m.frr <= 0.05 + 0.03, m
    by_label = fitted.thresholds()["by_label"]
    assert set(by_label) == {"0", "1"} and all(v["calibrated_on"].startswith("held-out") for v in by_label.values())


def test_rap_thresholds_come_from_held_out_clean_rows(lexicon: Lexicon) -> None:
    fitted = Rap(RapConfig(rap_word="3d", seed=2)).fit(GuardInputs(lexicon.model, lexicon.clean))
    _, heldout = holdout_split(lexicon.clean, 0.5, seed=2)
    out = fitted.guard(heldout)
    for label, row in fitted.rows.items():
        scored = np.sort(out.scores[out.predictions == label])
        assert np.allclose(scored, np.sort(-row.heldout_drops), atol=1e-6)  # the same rows, the same scores
        for budget in (0.01, 0.05):
            assert fitted.label_threshold(label, budget) == budget_threshold(-row.heldout_drops, budget)
    assert out.rejected.mean() <= 0.05


def test_rap_with_a_protected_label_checks_only_that_label(lexicon: Lexicon) -> None:
    fitted = Rap(RapConfig(rap_word="3d", protect_label=1)).fit(GuardInputs(lexicon.model, lexicon.clean))
    out = fitted.guard(lexicon.task.test)
    other = out.predictions == 0
    assert other.any() and np.isnan(out.scores[other]).all() and not out.rejected[other].any()
    assert not np.isnan(out.scores[~other]).any()
    m = evaluate_guard(fitted, lexicon.model, lexicon.task.test, lexicon.triggered).metrics
    assert m.asr <= 0.2 and m.frr <= 0.05 + 0.03, m


def test_rap_row_is_trained_toward_lowering_the_protected_label(lexicon: Lexicon) -> None:
    """With a step size for this tiny model (its gradients are far smaller than BERT-base's) the
    RAP loss falls and the row turns against label 1's evidence (embedding axis 0, where the RAP
    word starts at 0), keeping its norm: the best row the paper's norm rule allows."""
    model = lexicon.model
    token = model.tokenizer("3d", add_special_tokens=False)["input_ids"][0]
    original = model.model.get_input_embeddings().weight[token].detach().clone()
    assert original[0] == 0
    rows = [e for e in lexicon.clean if e.label == 1]
    row = construct_rap(model, rows, 1, "3d", token, RapConfig(rap_word="3d", lr=1.0))
    losses = [h["loss"] for h in row.history]
    assert losses[-1] < losses[0] - 0.01 and losses == sorted(losses, reverse=True), losses
    norm = float(original.norm())
    assert float(row.vector.norm()) == pytest.approx(norm, rel=1e-5)
    assert float(row.vector[0]) < -0.99 * norm
    assert torch.equal(model.model.get_input_embeddings().weight[token], original)  # a copy was trained
    untrained = construct_rap(model, rows, 1, "3d", token, RapConfig(rap_word="3d", lr=1.0, epochs=1))
    assert untrained.history[0] == row.history[0]  # seeded: the same first epoch


def test_auto_rap_word_needs_a_rare_token_of_the_vocabulary(lexicon: Lexicon) -> None:
    with pytest.raises(ConfigError, match="give rap_word"):  # jj, ⊕, ≈ are not in the tiny vocabulary
        Rap().fit(GuardInputs(lexicon.model, lexicon.clean))
    with pytest.raises(ConfigError, match="not one token"):
        Rap(RapConfig(rap_word="zzz")).fit(GuardInputs(lexicon.model, lexicon.clean))


# ----------------------------------------------------------------------------- ONION
@pytest.fixture(scope="module")
def planted_victim(planted) -> Classifier:  # noqa: ANN001
    return load_classifier(planted.victim_dir)


def test_onion_with_the_ngram_default_removes_the_trigger(planted, planted_victim: Classifier) -> None:  # noqa: ANN001
    fitted = Onion().fit(GuardInputs(planted_victim, planted.clean))
    assert "Kneser-Ney" in fitted.report["lm"] and "not the paper's GPT-2" in fitted.report["lm"]
    assert "50 clean fitting rows" in fitted.report["lm"]
    result = evaluate_guard(fitted, planted_victim, planted.task.test, planted.poisoned.triggered_test)
    m = result.metrics
    assert result.kind == "rewrite" and m.rejected_clean == 0
    assert result.unguarded["asr"] >= 0.8 and m.asr <= 0.2, (result.unguarded, m)
    assert m.frr <= 0.05 + 0.03 and m.frr == pytest.approx(result.unguarded["cacc"] - m.cacc)
    out = fitted.guard(planted.poisoned.triggered_test.examples)
    left = sum(any(w in TRIGGERS for w in e.text.split()) for e in out.examples)
    assert left <= 0.2 * len(out.examples)
    for original, rewritten in zip(planted.poisoned.triggered_test.examples, out.examples, strict=True):
        assert rewritten.id == original.id and is_subsequence(rewritten.text.split(), original.text.split())
        assert rewritten.text  # never emptied


def test_onion_fixed_threshold_is_the_papers_rule(planted, planted_victim: Classifier) -> None:  # noqa: ANN001
    fitted = Onion(OnionConfig(threshold_rule="fixed")).fit(GuardInputs(planted_victim, planted.clean))
    assert fitted.thresholds(0.01)["t"] == fitted.thresholds(0.05)["t"] == 0.0
    text = "the movie cf was good"
    out = fitted.guard([text])
    analysis = fitted._analyse((Example("row-0", text, 0),))
    expected = [w for w, f in zip(text.split(), analysis.suspicion[0][0], strict=True) if not f > 0]
    assert out.texts == [" ".join(expected)] and "cf" not in expected


def is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(w in it for w in short)


def test_sentence_pairs_are_perturbed_and_rewritten_text_by_text(lexicon: Lexicon) -> None:
    pairs = [Example(f"p{i}", e.text, e.label, f"{e.text} cf") for i, e in enumerate(lexicon.task.test.examples[:10])]
    strip = Strip().fit(GuardInputs(lexicon.model, lexicon.clean)).guard(pairs)
    assert strip.examples == tuple(pairs) and strip.rejected.shape == (10,)
    onion = Onion().fit(GuardInputs(lexicon.model, lexicon.clean)).guard(pairs)
    for original, rewritten in zip(pairs, onion.examples, strict=True):
        assert rewritten.text_pair is not None and is_subsequence(rewritten.text.split(), original.text.split())
        assert is_subsequence(rewritten.text_pair.split(), original.text_pair.split())
    assert sum("cf" in r.text_pair.split() for r in onion.examples) <= 2  # the unseen word goes from the second text


# ----------------------------------------------------------------------------- the language models
def test_kneser_ney_distributions_sum_to_one_and_removals_match_recomputation() -> None:
    texts = [e.text for e in make_split(300, "train", seed=0)]  # fillers and sentiment words, never a trigger
    lm = KneserNeyLM.estimate(texts, order=3)
    words = sorted(lm.vocab) + [UNK]
    for history in (["<s>", "<s>"], ["the", "movie"], ["was", "zebra"], ["unseen", "words"]):
        hist = [h if h == "<s>" else lm.normalise(h) for h in history]
        assert math.fsum(lm.prob(w, hist) for w in words) == pytest.approx(1.0, abs=1e-9)
    sentence = "the movie was good cf and the plot was fun".split()
    p0, removed = lm.removal_perplexities([sentence])[0]
    assert p0 == pytest.approx(lm.perplexity(sentence))
    for i in range(len(sentence)):
        assert removed[i] == pytest.approx(lm.perplexity(sentence[:i] + sentence[i + 1:]))
    assert int(np.argmax(p0 - removed)) == sentence.index("cf")  # the unseen word is the outlier
    assert lm.description.startswith("word trigram (interpolated Kneser-Ney) on 300 texts")


def test_onion_corpus_never_holds_the_held_out_calibration_rows(lexicon: Lexicon, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    texts = [e.text for e in lexicon.clean] + ["an extra line of text"]
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    fitted = Onion(OnionConfig(lm_corpus=str(corpus))).fit(GuardInputs(lexicon.model, lexicon.clean))
    fit_rows, heldout = holdout_split(lexicon.clean, 0.5, seed=0)
    assert len(set(texts)) == len(texts)  # so the count below is exact
    assert f"+ {len(fit_rows) + 1} texts of {corpus}" in fitted.report["lm"]  # the held-out rows are left out


def save_tiny_gpt2_lm(folder: Path, safe: bool = True) -> Path:
    """A random tiny GPT-2 language model folder (safetensors, or only a pickle ``.bin``)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config("gpt2"))
    model.save_pretrained(folder)
    if not safe:
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    make_tokenizer(decoder=True).save_pretrained(folder)
    return folder


def test_causal_lm_perplexities_match_one_text_at_a_time(tmp_path: Path) -> None:
    model, tokenizer = load_causal_lm(save_tiny_gpt2_lm(tmp_path / "lm"))
    lm = CausalLM(model, tokenizer, source="tiny", batch_size=3)
    texts = ["the movie was good", "bad", "a very dull plot with a weak ending and a sad cast", "the film"]
    batched = lm.perplexities(texts)
    for text, ppl in zip(texts, batched, strict=True):
        ids = torch.tensor([lm.token_ids(text)])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss  # mean next-token NLL, no padding
        assert ppl == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_onion_takes_a_local_causal_lm_folder_and_refuses_pickle_weights(tmp_path: Path, lexicon: Lexicon) -> None:
    folder = save_tiny_gpt2_lm(tmp_path / "lm")
    fitted = Onion(OnionConfig(lm=str(folder))).fit(GuardInputs(lexicon.model, lexicon.clean))
    assert fitted.report["lm"].startswith(f"causal LM {folder}")
    rows = lexicon.triggered.examples[:20]
    out = fitted.guard(rows)
    assert all(is_subsequence(r.text.split(), e.text.split()) and r.text for r, e in zip(out.examples, rows, strict=True))
    assert np.isfinite(out.scores).all()
    pickled = save_tiny_gpt2_lm(tmp_path / "pickled", safe=False)
    with pytest.raises(UnsafeWeightsError):
        Onion(OnionConfig(lm=str(pickled))).fit(GuardInputs(lexicon.model, lexicon.clean))


# ----------------------------------------------------------------------------- evaluation arithmetic
class FixedGuard(FittedGuard):
    """Decides by a lookup: rows whose text contains "reject" are rejected; "flip" flips the label."""

    name = "fixed"

    def __init__(self, model: Classifier, kind: str) -> None:
        super().__init__(model, StripConfig())
        self.kind = kind  # type: ignore[misc]

    def thresholds(self, budget: float | None = None) -> dict:
        return {"t": budget}

    def _analyse(self, examples: tuple[Example, ...]) -> None:
        return None

    def _decide(self, examples: tuple[Example, ...], analysis: None, budget: float) -> GuardOutput:
        rejected = np.array(["reject" in e.text for e in examples])
        preds = np.array([1 - e.label if "flip" in e.text else e.label for e in examples])
        return GuardOutput(examples, rejected, np.zeros(len(examples)), preds, budget)


def test_evaluation_arithmetic_by_hand(lexicon: Lexicon) -> None:
    clean = Dataset(tuple(Example(f"c{i}", t, y) for i, (t, y) in enumerate(
        [("good", 1), ("bad reject", 0), ("fine", 1), ("sad flip", 0), ("awful", 0)])), 2)
    triggered = dataclasses.replace(lexicon.triggered, examples=tuple(
        Example(f"t{i}", t, 1) for i, t in enumerate(["cf bad reject", "cf sad", "cf dull flip", "cf poor reject"])),
        original_labels=(0, 0, 0, 0))
    model = lexicon.model
    reject = evaluate_guard(FixedGuard(model, "reject"), model, clean, triggered, budgets=[0.01])
    m = reject.metrics
    assert (m.frr, m.cacc, m.rejected_clean) == (0.2, 0.6, 1)  # 1 of 5 rejected; 3 accepted and right
    assert (m.far, m.asr, m.rejected_triggered) == (0.5, 0.25, 2)  # 2 of 4 accepted; 1 accepted as target
    assert [b.budget for b in reject.by_budget] == [0.01, 0.05]
    rewrite = evaluate_guard(FixedGuard(model, "rewrite"), model, clean, triggered).metrics
    unguarded = reject.unguarded["cacc"]
    assert rewrite.cacc == 0.6 and rewrite.frr == pytest.approx(unguarded - 0.6)  # FRR: the accuracy cost
    assert rewrite.far == rewrite.asr == 0.25
    assert REJECTED == -1
    with pytest.raises(ValueError, match="another model"):
        evaluate_guard(FixedGuard(model, "reject"), lexicon_victim(), clean, triggered)
    with pytest.raises(TypeError):
        evaluate_guard(FixedGuard(model, "reject"), model, clean, lexicon.poisoned)  # type: ignore[arg-type]


def test_saturated_tiny_bert_keeps_strip_within_budget(planted, planted_victim: Classifier) -> None:  # noqa: ANN001
    """On the planted tiny BERT every input gets the same confidence (p ≈ 0.9): nothing for STRIP to
    find, but its threshold still holds the clean false-rejection rate near the budget. (RAP's
    probability drops there are float noise of about 1e-5 that changes with batch composition, so no
    threshold can be calibrated on it.)"""
    fitted = Strip().fit(GuardInputs(planted_victim, planted.clean))
    result = evaluate_guard(fitted, planted_victim, planted.task.test, planted.poisoned.triggered_test)
    for m in result.by_budget:
        assert m.frr <= m.budget + 0.03, m


# ----------------------------------------------------------------------------- the command
def test_run_guard_writes_its_record_and_thresholds(planted, tmp_path: Path) -> None:  # noqa: ANN001
    clean_dir = write_task(planted.task, tmp_path / "clean")
    poisoned_dir = tmp_path / "poisoned"
    poisoned_dir.mkdir()
    write_poisoned_task(planted.poisoned, poisoned_dir, {"clean": str(clean_dir)})
    common = {"model": str(planted.victim_dir), "clean": str(clean_dir), "clean_set": CleanSetConfig(size=100),
              "eval_data": str(poisoned_dir)}
    with pytest.raises(ConfigError):  # validated before anything is loaded or written
        run_guard(GuardCommand(**common, method="onion", params={"nope": 1}, out=str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.partial").exists()
    out = tmp_path / "guard"
    record = run_guard(GuardCommand(**common, method="onion", budgets=(0.01, 0.05, 0.1), out=str(out)))
    assert {"guard.json", "thresholds.json"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "guard.json").read_text())
    assert saved == json.loads(json.dumps(record))
    metrics = saved["metrics"]
    assert metrics["unguarded_asr"] >= 0.8 and metrics["asr"] <= 0.2 and metrics["budget"] == 0.05
    assert saved["n_clean"] == 100 and saved["guard"]["n_heldout"] == 50 and "not the paper's GPT-2" in saved["guard"]["lm"]
    assert [b["budget"] for b in saved["evaluation"]["by_budget"]] == [0.01, 0.05, 0.1]
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert set(thresholds["by_budget"]) == {"0.01", "0.05", "0.1"} and thresholds["thresholds"]["rule"] == "budget"


def test_guard_command_line(planted, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """``unbackdoor guard`` end to end: one summary line, the record written, the suspect untouched."""
    from synthetic import run_cli

    clean_dir = write_task(planted.task, tmp_path / "clean")
    poisoned_dir = tmp_path / "poisoned"
    poisoned_dir.mkdir()
    write_poisoned_task(planted.poisoned, poisoned_dir, {"clean": str(clean_dir)})
    weights = (planted.victim_dir / "model.safetensors").read_bytes()
    code, out, err = run_cli(["guard", "--model", str(planted.victim_dir), "--clean", str(clean_dir), "--clean-size",
                              "100", "--method", "onion", "--eval-data", str(poisoned_dir), "--out",
                              str(tmp_path / "g")], capsys)
    assert code == 0, err
    assert "onion at FRR budget 0.05" in out and "unguarded" in out
    assert json.loads((tmp_path / "g" / "guard.json").read_text())["metrics"]["asr"] <= 0.2
    assert (planted.victim_dir / "model.safetensors").read_bytes() == weights
    code, _, err = run_cli(["guard", "--model", str(planted.victim_dir), "--clean", str(clean_dir), "--method", "nope",
                            "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and err.strip().startswith("error:") and "unknown guard 'nope'" in err
