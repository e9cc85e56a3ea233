"""MuScleLoRA: the multi-scale low-rank layer, the trainable set per family, merging back to a plain
model, the gradient-alignment rule in the real loop, the clean-dev-only reference set, the CLI, and a
tiny poisoned task on which it keeps the backdoor out where plain fine-tuning learns it."""

from __future__ import annotations

import inspect
import math
import random
import re
from pathlib import Path

import pytest
import torch
from synthetic import FILLER, NEGATIVE, POSITIVE, make_task, save_tiny_model, tiny_config
from transformers import AutoConfig, AutoModelForSequenceClassification

from unbackdoor.attacks import BadNets, BadNetsConfig
from unbackdoor.commands import TrainCommand, run_train
from unbackdoor.config import build_config
from unbackdoor.data import Dataset, Example, Task
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import load_classifier, provenance_record, save_classifier
from unbackdoor.train_defenses.musclelora import (
    AlignmentRule,
    GradientAlignment,
    LowRankHead,
    LoraOnlyConfig,
    MslrConfig,
    MultiScaleLowRankLinear,
    MuscleLora,
    MuscleLoraConfig,
    adapt_model,
    align_gradients,
    aligned_gradient,
    merge_adapters,
    resolve_config,
    split_reference,
    trainable_parameter_names,
)
from unbackdoor.train_defenses.musclelora import defense as musclelora_defense
from unbackdoor.train_defenses.base import build_train_defense
from unbackdoor.training import Callback, TrainConfig, TrainResult, train_classifier
from unbackdoor.train_defenses import TRAIN_DEFENSES, PlainFinetune, TrainInputs

FAMILIES = ("bert", "roberta", "gpt2", "llama")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: save_tiny_model(root / f, f) for f in FAMILIES}


def _adapted(folder: Path, **params: object):  # noqa: ANN202
    clf = load_classifier(folder)
    cfg = resolve_config(MuscleLoraConfig(**params), clf.model.config.model_type, clf.model.config.hidden_size)
    torch.manual_seed(0)
    adapt_model(clf.model, cfg)
    return clf, cfg


# ----------------------------------------------------------------------------- the layer (§4)
def test_mslr_output_is_w0x_plus_b0_plus_scaled_multiscale_low_rank() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = MultiScaleLowRankLinear(base, MslrConfig(scales=(1, 3, 5), inner_rank=2, alpha=6))
    kappa = torch.tensor([1.0, 1, 3, 3, 5, 5])
    assert torch.equal(layer.kappa, kappa) and "kappa" in dict(layer.named_buffers())
    assert layer.scaling == 3.0  # α_m / r_in, not α_m / (n·r_in)
    x = torch.randn(4, 12)
    expected = x @ w0.T + b0 + 3.0 * (x @ layer.mslr_L.T * kappa) @ layer.mslr_R.T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer(torch.zeros(1, 12)), b0[None])  # no bias on the low-rank path
    assert torch.allclose(layer.merged()(x), expected, atol=1e-5)
    # both factors Kaiming-uniform (a=√5), neither zero; only they are trainable
    assert layer.mslr_L.abs().max() <= 1 / math.sqrt(12) and layer.mslr_L.abs().min() > 0
    assert layer.mslr_R.abs().max() <= 1 / math.sqrt(6) and layer.mslr_R.abs().min() > 0
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["mslr_L", "mslr_R"]
    assert torch.equal(layer.base_layer.weight, w0)


def test_kappa_scales_the_update_inside_the_forward_pass() -> None:
    """κ acts in the forward pass (not folded into L): with equal factors, the k=4 component's gradients
    are 4x the k=1 component's, which under Adam means a larger effective step for larger scales."""
    torch.manual_seed(0)
    layer = MultiScaleLowRankLinear(torch.nn.Linear(8, 3), MslrConfig(scales=(1, 4), alpha=1))
    with torch.no_grad():
        layer.mslr_L[1] = layer.mslr_L[0]
        layer.mslr_R[:, 1] = layer.mslr_R[:, 0]
    layer(torch.randn(5, 8)).pow(2).sum().backward()
    assert torch.allclose(layer.mslr_L.grad[1], 4 * layer.mslr_L.grad[0], rtol=1e-4)
    assert torch.allclose(layer.mslr_R.grad[:, 1], 4 * layer.mslr_R.grad[:, 0], rtol=1e-4)
    assert torch.allclose(layer.delta_weight(), 5 * torch.outer(layer.mslr_R[:, 0], layer.mslr_L[0]))


# ----------------------------------------------------------------------------- placement (§3)
EXPECTED_TRAINABLE = {
    "bert": [r"bert\.encoder\.layer\.\d\.attention\.self\.(query|value)\.lora_[AB]\.default\.weight",
             r"bert\.pooler\.dense\.mslr_[LR]"],
    "roberta": [r"roberta\.encoder\.layer\.\d\.attention\.self\.(query|value)\.lora_[AB]\.default\.weight",
                r"classifier\.dense\.mslr_[LR]"],
    "gpt2": [r"transformer\.h\.\d\.attn\.c_attn\.lora_[AB]\.default\.weight", r"score\.dense\.mslr_[LR]"],
    "llama": [r"model\.layers\.\d\.self_attn\.(q_proj|v_proj)\.lora_[AB]\.default\.weight",
              r"score\.dense\.mslr_[LR]"],
}
EXPECTED_COUNT = {"bert": 2 * 2 * 2 + 2, "roberta": 2 * 2 * 2 + 2, "gpt2": 2 * 2 + 2, "llama": 2 * 2 * 2 + 2}


@pytest.mark.parametrize("family", FAMILIES)
def test_only_lora_and_mslr_factors_are_trainable(tiny_models: dict[str, Path], family: str) -> None:
    clf, cfg = _adapted(tiny_models[family])
    names = trainable_parameter_names(clf.model)
    assert len(names) == EXPECTED_COUNT[family], names
    for name in names:
        assert any(re.fullmatch(p, name) for p in EXPECTED_TRAINABLE[family]), name
    assert all(any(re.fullmatch(p, n) for n in names) for p in EXPECTED_TRAINABLE[family])
    if family in ("gpt2", "llama"):
        head = clf.model.score
        assert isinstance(head, LowRankHead) and head.out_proj.weight.shape == (2, 16)
        assert isinstance(head.dense, MultiScaleLowRankLinear) and head.dense.base_layer.bias is None
        assert head.dense.kappa.tolist() == [1, 2, 3, 4] and head.dense.scaling == 4
    lora_only = trainable_parameter_names(_adapted(tiny_models[family], mslr=False)[0].model)
    assert lora_only == [n for n in names if "mslr" not in n]


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_is_a_plain_model_with_the_same_outputs(tiny_models: dict[str, Path], family: str,
                                                            tmp_path: Path) -> None:
    clf, _ = _adapted(tiny_models[family])
    with torch.no_grad():  # give LoRA a non-zero effect (B starts at zero)
        for name, p in clf.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    clf.model.eval()
    batch = clf.tokenizer(["good film cf", "the plot was awful and dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = clf.model(**batch).logits
        merge_adapters(clf.model)
        after = clf.model(**batch).logits
    assert torch.allclose(before, after, atol=1e-5)
    plain = AutoModelForSequenceClassification.from_config(tiny_config(family))
    assert {n: p.shape for n, p in clf.model.named_parameters()} == {n: p.shape for n, p in plain.named_parameters()}
    save_classifier(clf, tmp_path / "m", provenance_record(clf, role="model"))
    reloaded = load_classifier(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(reloaded.model.eval()(**batch).logits, before, atol=1e-5)


def test_family_defaults_and_overrides() -> None:
    bert = resolve_config(MuscleLoraConfig(train=TrainConfig(learning_rate=1e-3)), "bert", 384)
    assert bert.mslr_scales == (1, 4, 8, 12, 16, 20, 24, 28) and bert.mslr_alpha == 6 and bert.lora_rank == 8
    assert bert.reference_size == 96 and (bert.ga_epoch, bert.max_raw_grad_ratio, bert.min_ref_loss) == (1, 0.1, 0.4)
    assert bert.train is not None and bert.train.learning_rate == 1e-3  # the key given wins ...
    assert (bert.train.epochs, bert.train.batch_size, bert.train.warmup_ratio, bert.train.weight_decay) == (10, 32, 0, 0)
    assert resolve_config(MuscleLoraConfig(), "roberta", 768).mslr_scales == (1, 2, 4, 6, 8, 10, 12, 14, 16)
    assert resolve_config(MuscleLoraConfig(), "bert", 768).train.learning_rate == 2e-5  # the spec's BERT-base value
    assert resolve_config(MuscleLoraConfig(), "bert", 384).train.learning_rate == 1e-3  # small encoders (measured)
    assert resolve_config(LoraOnlyConfig(), "bert", 384).train.learning_rate == 1e-3
    assert resolve_config(MuscleLoraConfig(), "bert", 1024).mslr_scales == tuple(range(1, 10))
    gpt2 = resolve_config(MuscleLoraConfig(mslr_alpha=2.0), "gpt2", 1600)
    assert (gpt2.lora_targets, gpt2.lora_rank, gpt2.lora_alpha, gpt2.mslr_alpha) == (("c_attn",), 2, 8, 2.0)
    assert (gpt2.reference_size, gpt2.ga_epoch, gpt2.max_raw_grad_ratio, gpt2.min_ref_loss) == (128, 0, 0, 0)
    assert gpt2.train is not None and (gpt2.train.learning_rate, gpt2.train.epochs, gpt2.train.batch_size) == (1e-5, 5, 16)
    with pytest.raises(ConfigError, match="not 'distilbert'"):
        resolve_config(MuscleLoraConfig(), "distilbert", 768)
    with pytest.raises(ConfigError, match="bogus: unknown key"):
        build_train_defense("musclelora", {"bogus": 1})
    with pytest.raises(ConfigError, match="unknown training defence 'nope'"):
        build_train_defense("nope", {})
    # CLI flags (--lr) override the defence's own train keys, which override the family defaults
    d = build_train_defense("musclelora", {"train": {"epochs": 4, "learning_rate": 1.0}}, TrainConfig(learning_rate=0.5))
    assert isinstance(d, MuscleLora) and d.config.train is not None
    assert (d.config.train.epochs, d.config.train.learning_rate) == (4, 0.5)
    assert sorted(TRAIN_DEFENSES.names()) == ["abl", "auto", "clean-only", "lora", "musclelora", "none", "reweight"]


# ----------------------------------------------------------------------------- gradient alignment (§6)
def test_aligned_gradient_is_the_clean_direction_with_the_projection_size() -> None:
    torch.manual_seed(0)
    r = torch.randn(5, 3)
    for g in (torch.randn(5, 3), -r + 0.1 * torch.randn(5, 3)):  # agreeing and conflicting raw gradients
        a = aligned_gradient(g, r)
        assert a is not None
        assert torch.allclose(torch.cosine_similarity(a.flatten(), r.flatten(), dim=0), torch.tensor(1.0), atol=1e-5)
        assert torch.allclose(a.norm(), (g * r).sum().abs() / r.norm(), atol=1e-5)  # |⟨g,r⟩| / ‖r‖
    assert aligned_gradient(torch.zeros(3), torch.ones(3)) is None
    assert aligned_gradient(torch.ones(3), torch.zeros(3)) is None
    rule = AlignmentRule(epochs=10, ga_epoch=1, max_raw_grad_ratio=0.1, min_ref_loss=0.4, min_ref_grad_norm=5e-7)
    assert rule.mode(0, ref_loss=0.5, ref_grad_norm=1.0) == "aligned"
    assert rule.mode(0, ref_loss=0.3, ref_grad_norm=1.0) == "raw"  # epoch < G
    assert rule.mode(2, ref_loss=0.3, ref_grad_norm=1.0) == "mixed"
    assert rule.mode(2, ref_loss=0.9, ref_grad_norm=1e-8) == "mixed"  # gate needs m > τ_g too
    assert rule.raw_share(1) == 0 and math.isclose(rule.raw_share(9), 0.1 * 8 / 9)
    g, r = torch.randn(4), torch.randn(4)
    mixed = align_gradients([g], [r], "mixed", 0.25)[0]
    assert torch.allclose(mixed, 0.75 * aligned_gradient(g, r) + 0.25 * g)
    assert align_gradients([g], [r], "raw", 0.25)[0] is g


class _Grads(Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_gradients(self, ctx, batch) -> None:  # noqa: ANN001
        self.steps.append({n: p.grad.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad})


class _CheckAligned(Callback):
    """After GA: recompute this step's reference gradient (dropout off, so exactly) and compare."""

    def __init__(self, ga: GradientAlignment, raw: _Grads) -> None:
        self.ga, self.raw, self.checked = ga, raw, 0

    def on_gradients(self, ctx, batch) -> None:  # noqa: ANN001
        refs, ref_loss = self.ga.reference_gradient(ctx)
        assert ref_loss > 0.4  # the gate: purely aligned
        raw = self.raw.steps[-1]
        for (name, p), r in zip(self.ga._params, refs, strict=True):
            g = raw[name]
            if not (g.any() and r.any()):
                assert torch.equal(p.grad, g), name  # zero raw or reference gradient: raw kept
                continue
            expected = (g * r).sum().abs() / (r * r).sum() * r
            assert torch.allclose(p.grad, expected, rtol=1e-4, atol=1e-9), name
            cos = torch.cosine_similarity(p.grad.flatten(), r.flatten(), dim=0)
            assert cos > 0.9999, name
            self.checked += 1


def test_gradient_alignment_rewrites_every_step_in_the_loop(tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / "m", "bert")
    cfg = AutoConfig.from_pretrained(folder)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0  # reference gradient recomputable exactly
    cfg.save_pretrained(folder)
    task = make_task(64, 40, 10)
    clf, mcfg = _adapted(folder)
    reference, _ = split_reference(task.dev, 24)
    ga = GradientAlignment(reference, clf, AlignmentRule(epochs=1), batch_size=8)
    raw = _Grads()
    check = _CheckAligned(ga, raw)
    train = TrainConfig(epochs=1, batch_size=16, learning_rate=1e-3, max_steps=3, progress=False)
    result = train_classifier(clf, task.train, train, callbacks=[raw, ga, check])
    # step 1: LoRA B, MSLR L and R (A's gradient is zero while B is); steps 2-3: all 10 tensors
    assert result.steps == 3 and check.checked == 6 + 10 + 10


def test_same_seed_same_musclelora_model(tiny_models: dict[str, Path]) -> None:
    task = make_task(96, 60, 10)
    weights = []
    for _ in range(2):
        clf = load_classifier(tiny_models["bert"])
        cfg = MuscleLoraConfig(reference_size=20, train=TrainConfig(epochs=2, learning_rate=1e-3, progress=False))
        MuscleLora(cfg).fit(TrainInputs(clf, task.train, task.dev))
        weights.append({k: v.clone() for k, v in clf.model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_checkpointed_run_resumes_and_refuses_other_settings(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    task = make_task(96, 60, 10)

    def fit(**params: object):  # noqa: ANN202
        clf = load_classifier(tiny_models["bert"])
        cfg = MuscleLoraConfig(reference_size=20, train=TrainConfig(epochs=2, learning_rate=1e-3, progress=False),
                               **params)
        return clf, MuscleLora(cfg).fit(TrainInputs(clf, task.train, task.dev), work_dir=tmp_path / "work")

    first, r1 = fit()
    assert r1.report["trainable_parameters"] == 2 * 2 * (8 * 32 + 32 * 8) + 2 * 8 * 32  # LoRA q/v + MSLR L, R
    again, r2 = fit()  # the finished run's checkpoint is restored (LoRA/MSLR keys): same model, nothing retrained
    assert r2.training.resumed_from_step == r1.training.steps and r2.training.history == r1.training.history
    assert all(torch.equal(first.model.state_dict()[k], v) for k, v in again.model.state_dict().items())
    with pytest.raises(ConfigError, match="other data or settings"):
        fit(mslr_alpha=3.0)


# ----------------------------------------------------------------------------- the reference set (§7)
def test_reference_set_comes_from_clean_dev_never_from_training_rows(tiny_models: dict[str, Path],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    task = make_task(80, 60, 20)
    poisoned = BadNets().poison(task)
    clf = load_classifier(tiny_models["bert"])
    for bad_rows, bad_dev in ((poisoned, task.dev), (poisoned.flags, task.dev), (task.train, poisoned.triggered_test),
                              (task.train, poisoned)):
        with pytest.raises(TypeError):
            TrainInputs(clf, bad_rows, bad_dev)  # type: ignore[arg-type]
    fields = set(inspect.signature(TrainInputs).parameters) | set(inspect.signature(MuscleLora.fit).parameters)
    assert not fields & {"flags", "poison_flags", "trigger", "target_label", "triggered", "poisoned"}

    seen: dict[str, object] = {}

    def fake_train(clf, data, config, *, dev, callbacks, work_dir, fingerprint):  # noqa: ANN001, ANN202
        seen.update(data=data, dev=dev, callbacks=callbacks)
        return TrainResult([], None, None, 0, 0.0, 0.0, 0.0)

    monkeypatch.setattr(musclelora_defense, "train_classifier", fake_train)
    result = MuscleLora(MuscleLoraConfig(reference_size=25)).fit(TrainInputs(clf, poisoned.train, task.dev))
    (ga,) = [c for c in seen["callbacks"] if isinstance(c, GradientAlignment)]  # type: ignore[attr-defined]
    ref_ids, sel_ids = set(ga.reference.ids), set(seen["dev"].ids)  # type: ignore[attr-defined]
    assert len(ref_ids) == 25 and ref_ids | sel_ids == set(task.dev.ids) and not ref_ids & sel_ids
    assert not ref_ids & set(poisoned.train.ids)  # (train ids are "train-*", dev ids "dev-*")
    assert seen["data"] is poisoned.train
    assert result.report["reference_ids"] == ga.reference.ids and result.report["n_selection"] == 35

    # random split [CODE] is seeded and not stratified; the stratified option keeps label shares
    a, _ = split_reference(task.dev, 25, seed=3)
    assert a.ids == split_reference(task.dev, 25, seed=3)[0].ids != split_reference(task.dev, 25, seed=4)[0].ids
    strat, _ = split_reference(task.dev, 20, "stratified")
    assert strat.label_counts() == {0: 10, 1: 10}
    with pytest.raises(DataError, match="must leave some for epoch selection"):
        MuscleLora().check(TrainInputs(clf, task.train, task.dev))  # 96 reference rows of 60


# ----------------------------------------------------------------------------- the tiny poisoned task
def _restricted_rows(n: int, split: str, k: int) -> Dataset:
    """Sentiment rows that use only the first ``k`` words of each sentiment list."""
    rng = random.Random(f"pre-{split}")
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 9))]
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randint(0, len(words)), rng.choice((POSITIVE if label else NEGATIVE)[:k]))
        rows.append(Example(f"{split}-{i}", " ".join(words), label))
    return Dataset(tuple(rows), 2, f"pretrain:{split}")


@pytest.fixture(scope="module")
def pretrained_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for a pre-trained encoder: a tiny BERT trained on clean sentiment rows that use half of
    the sentiment words, then given a fresh random head (so the task still has to be learned)."""
    root = tmp_path_factory.mktemp("pretrained")
    clf = load_classifier(save_tiny_model(root / "init", "bert", seed=0))
    pre = Task("pretrain", _restricted_rows(400, "train", 4), _restricted_rows(100, "dev", 4), _restricted_rows(10, "test", 4))
    train_classifier(clf, pre.train, TrainConfig(epochs=5, batch_size=16, learning_rate=1e-3, progress=False), dev=pre.dev)
    torch.manual_seed(123)
    clf.model.classifier.reset_parameters()
    save_classifier(clf, root / "base", provenance_record(clf, role="model"))
    return root / "base"


def test_musclelora_keeps_the_backdoor_out_where_plain_finetuning_learns_it(pretrained_base: Path) -> None:
    task = make_task(400, 200, 200)
    poisoned = BadNets(BadNetsConfig(poison_rate=0.1, mode="dirty")).poison(task)
    # Same data, same seed, same loop settings: the spec's BERT defaults with a tiny-model learning rate.
    train = TrainConfig(learning_rate=3e-3, progress=False)
    muscle = MuscleLora(MuscleLoraConfig(train=train))
    loop = muscle.train_config(load_classifier(pretrained_base))
    plain = PlainFinetune(PlainFinetune.config_class(train=loop))
    results = {}
    for name, defence in (("plain", plain), ("musclelora", muscle)):
        clf = load_classifier(pretrained_base)
        out = defence.fit(TrainInputs(clf, poisoned.train, task.dev))
        results[name] = evaluate_classifier(out.model, task.test, poisoned.triggered_test)
    p, m = results["plain"], results["musclelora"]
    # Measured here: plain CACC 1.00 / ASR 0.93; MuScleLoRA CACC 0.935 / ASR 0.13 (= its clean error on
    # label-0 rows). Over 6 pre-training draws: plain ASR 0.62-1.00 at CACC 1.00; MuScleLoRA ASR
    # 0.03-0.22, always within 0.02 of its clean label-0 error, CACC 0.84-0.935.
    assert p.cacc >= 0.95 and p.asr is not None and p.asr >= 0.8, p  # the backdoor takes under plain fine-tuning
    assert m.cacc >= 0.85 and m.asr is not None, m
    assert m.asr <= p.asr - 0.5, (p.asr, m.asr)
    clean_error_on_non_target = 1 - (m.per_class_accuracy[0] or 0.0)  # ASR rows are triggered label-0 rows
    assert m.asr <= clean_error_on_non_target + 0.1, (m.asr, clean_error_on_non_target)  # the trigger adds ~nothing


# ----------------------------------------------------------------------------- the command
def test_train_command_with_musclelora(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from synthetic import write_task

    task = make_task(64, 50, 20)
    write_task(task, tmp_path / "data")
    values = {"data": str(tmp_path / "data"), "model": str(tiny_models["gpt2"]), "out": str(tmp_path / "out"),
              "defense": "musclelora", "defense_params": {"reference_size": 16}, "train": {"epochs": 1, "progress": False}}
    record = run_train(build_config(TrainCommand, values, "test"))
    assert record["defense"]["method"] == "musclelora" and record["defense"]["n_reference"] == 16
    assert record["config"]["train"]["learning_rate"] == 1e-5 and record["config"]["train"]["epochs"] == 1  # LLM default
    clf = load_classifier(tmp_path / "out")
    assert type(clf.model).__name__ == "GPT2ForSequenceClassification"
    assert isinstance(clf.model.score, torch.nn.Linear)

    for i, (params, err) in enumerate((({"bogus": 1}, ConfigError), ({"reference_size": 50}, DataError))):
        out = tmp_path / f"bad-{i}"
        bad = build_config(TrainCommand, {**values, "defense_params": params, "out": str(out)}, "test")
        with pytest.raises(err):
            run_train(bad)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*"))  # nothing started
