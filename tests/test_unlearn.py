"""Unlearning: the EWC penalty, which rows the Fisher sees, the stopping rules, LYA and vanilla gradient
ascent on the planted BadNets victim, the retrain baseline, the input contract, the oracle forget set and
the ``unbackdoor unlearn`` command."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from synthetic import run_cli, TRIGGERS, make_task, write_task

import unbackdoor.unlearn.lya as lya_module
from unbackdoor.attacks import BadNets
from unbackdoor.data.io import write_poisoned_task
from unbackdoor.data.types import Dataset, Example
from unbackdoor.config import build_config
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import load_classifier
from unbackdoor.optim.fisher import diagonal_fisher
from unbackdoor.outputs import partial_dir
from unbackdoor.training.loop import evaluate_accuracy
from unbackdoor.unlearn import (
    UNLEARN_METHODS,
    AscentConfig,
    EwcPenalty,
    GradientAscent,
    Lya,
    LyaConfig,
    Retrain,
    RetrainConfig,
    UnlearnInputs,
    build_unlearn_method,
    ewc_penalty,
    remove_forget_rows,
    unlearn,
)
from unbackdoor.training.ascent import STOP_BUDGET, STOP_GUARD, STOP_THRESHOLD, plan_ascent
from unbackdoor.unlearn.lya import fisher_terms
from unbackdoor.unlearn.oracle import forget_from_flags, write_forget_file

FORBIDDEN = {"flags", "poison_flags", "trigger", "target", "target_label", "triggered", "poisoned"}
FAST = {"learning_rate": 1e-3, "progress": False}  # the tiny model needs a larger lr than MiniLM's default
CACC_TOLERANCE = 0.05  # LYA may cost at most 5 points of clean accuracy on the planted victim


def _lya(**values: object) -> LyaConfig:
    """A LyaConfig as the CLI builds it: a partial ``train`` keeps the method's other defaults."""
    return build_config(LyaConfig, values, "test")


def _ga(**values: object) -> AscentConfig:
    return build_config(AscentConfig, values, "test")


def _forget(planted, fraction: float = 1.0, seed: int = 0) -> Dataset:  # noqa: ANN001
    return forget_from_flags(planted.poisoned, fraction, seed)


def _inputs(planted, forget: Dataset | None = None) -> UnlearnInputs:  # noqa: ANN001
    return UnlearnInputs(load_classifier(planted.victim_dir), forget or _forget(planted), planted.clean)


def _eval(clf, planted):  # noqa: ANN001, ANN202
    return evaluate_classifier(clf, planted.task.test, planted.poisoned.triggered_test)


# ----------------------------------------------------------------------------- EWC
def test_ewc_penalty_is_zero_at_the_anchor_and_quadratic() -> None:
    gen = torch.Generator().manual_seed(0)
    anchor = {"w": torch.randn(4, 3, generator=gen, dtype=torch.float64),
              "b": torch.randn(3, generator=gen, dtype=torch.float64)}
    fisher = {n: torch.rand(t.shape, generator=gen, dtype=torch.float64) for n, t in anchor.items()}
    step = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in anchor.items()}
    at = lambda k: {n: anchor[n] + k * step[n] for n in anchor}  # noqa: E731
    assert float(ewc_penalty(anchor, anchor, fisher, 7.0)) == 0.0
    one, two = float(ewc_penalty(at(1), anchor, fisher, 7.0)), float(ewc_penalty(at(2), anchor, fisher, 7.0))
    assert one > 0 and two == pytest.approx(4 * one, rel=1e-12)
    by_hand = 3.5 * sum(float((fisher[n] * step[n] ** 2).sum()) for n in anchor)
    assert one == pytest.approx(by_hand, rel=1e-12)


def test_ewc_callback_adds_the_penalty_and_its_gradient_is_lambda_f_delta() -> None:
    model = torch.nn.Linear(3, 2).double()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher = {n: torch.rand(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    callback = EwcPenalty(anchor, {n: 5.0 * f for n, f in fisher.items()})  # precision = λ F with λ = 5
    ctx = SimpleNamespace(model=model)
    callback.on_train_begin(ctx)  # type: ignore[arg-type]
    task_loss = torch.tensor(1.5, dtype=torch.float64)
    total = callback.extra_loss(ctx, {}, None, task_loss)  # type: ignore[arg-type]
    with torch.no_grad():
        expected = 1.5 + float(ewc_penalty(dict(model.named_parameters()), anchor, fisher, 5.0))
    assert float(total.detach()) == pytest.approx(expected)
    total.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, 5.0 * fisher[name] * 0.1), name


# ----------------------------------------------------------------------------- which rows the Fisher sees
@pytest.fixture
def fisher_spy(monkeypatch: pytest.MonkeyPatch) -> list[set[Example]]:
    """The rows (id, text, label) of every Fisher estimate: poisoned rows share their clean row's id."""
    seen: list[set[Example]] = []

    def spy(clf, data, **kwargs):  # noqa: ANN001, ANN003, ANN202 - a test double with the same signature
        seen.append(set(data.examples))
        return diagonal_fisher(clf, data, **kwargs)

    monkeypatch.setattr(lya_module, "diagonal_fisher", spy)
    return seen


def test_fisher_is_estimated_on_the_retain_set_only_by_default(planted, fisher_spy) -> None:  # noqa: ANN001
    forget = _forget(planted)
    Lya(_lya(train={**FAST, "max_steps": 1})).unlearn(_inputs(planted, forget))
    assert fisher_spy == [set(planted.clean.examples)]
    assert not fisher_spy[0] & set(forget.examples)


@pytest.mark.parametrize("combine", ["sum", "pooled"])
def test_retain_plus_forget_fisher_sees_both_but_never_the_monitored_slice(planted, fisher_spy,  # noqa: ANN001
                                                                           combine: str) -> None:
    forget = _forget(planted)
    cfg = _lya(fisher_data="retain+forget", fisher_combine=combine, train={**FAST, "max_steps": 1})
    result = Lya(cfg).unlearn(_inputs(planted, forget))
    plan = plan_ascent(forget, planted.clean, cfg)
    assert fisher_spy == [set(planted.clean.examples), set(plan.ascend.examples)]
    assert not fisher_spy[1] & set(plan.monitor.examples)
    assert result.report["fisher_rows_forget"] == len(plan.ascend) == 32


def test_fisher_terms_weigh_sum_and_pooled_as_documented(planted,  # noqa: ANN001
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    victim = load_classifier(planted.victim_dir)
    names = ["classifier.weight"]
    retain, forget = planted.clean, _forget(planted, 0.25)  # 100 and 10 rows
    value = {len(retain): 2.0, len(forget): 8.0}
    fake = lambda clf, data, **kw: {n: torch.full((2, 32), value[len(data)]) for n in kw["params"]}  # noqa: E731
    monkeypatch.setattr(lya_module, "diagonal_fisher", fake)
    cfg = dict(fisher_norm="none", fisher_data="retain+forget", lam=3.0)
    terms, _ = fisher_terms(victim, retain, forget, _lya(**cfg, lam_forget=0.5), names)
    assert [(lam, float(f[names[0]][0, 0])) for lam, f in terms] == [(3.0, 2.0), (0.5, 8.0)]
    terms, _ = fisher_terms(victim, retain, forget, _lya(**cfg, fisher_combine="pooled"), names)
    assert len(terms) == 1 and terms[0][0] == 3.0
    assert float(terms[0][1][names[0]][0, 0]) == pytest.approx((100 * 2.0 + 10 * 8.0) / 110)


def test_retain_fisher_leaves_trigger_embeddings_free_and_forget_fisher_covers_them(planted) -> None:  # noqa: ANN001
    victim = load_classifier(planted.victim_dir)
    word = "bert.embeddings.word_embeddings.weight"
    rows = victim.tokenizer.convert_tokens_to_ids(list(TRIGGERS))
    cfg = _lya(fisher_data="retain+forget", fisher_norm="none")
    (_, retain_f), (_, forget_f) = fisher_terms(victim, planted.clean, _forget(planted), cfg, [word])[0]
    assert torch.count_nonzero(retain_f[word][rows]) == 0  # variant A cannot shield the trigger rows
    assert all(float(forget_f[word][r].sum()) > 0 for r in rows)  # variant B does


# ----------------------------------------------------------------------------- LYA and gradient ascent
def test_lya_removes_the_planted_backdoor_and_keeps_clean_accuracy(planted) -> None:  # noqa: ANN001
    inputs = _inputs(planted)
    before = _eval(inputs.suspect, planted)
    result = Lya(_lya(train=FAST)).unlearn(inputs)
    after = _eval(result.model, planted)
    assert before.asr >= 0.8 and after.asr <= 0.1, (before.asr, after.asr)
    assert after.cacc >= before.cacc - CACC_TOLERANCE, (before.cacc, after.cacc)
    assert after.robust_accuracy >= 0.9  # binary task: RA = 1 − ASR on the triggered non-target rows
    report = result.report
    assert report["reconstructed"] and report["lam"] == 10.0 and report["fisher_data"] == "retain"
    assert report["stop_reason"] in (STOP_THRESHOLD, STOP_GUARD) and report["chosen_step"] > 0
    assert report["n_forget"] == 40 and report["n_ascended"] + report["n_monitored"] == 40


def test_gradient_ascent_without_stopping_collapses_to_one_class(planted) -> None:  # noqa: ANN001
    cfg = _ga(train={**FAST, "max_steps": 60}, stop_forget_accuracy=None, clean_guard=None, keep="last")
    result = GradientAscent(cfg).unlearn(_inputs(planted))
    after = _eval(result.model, planted)
    target = planted.poisoned.target_label
    assert result.report["stop_reason"] == STOP_BUDGET and result.report["training"]["steps"] == 60
    assert after.asr == 0.0  # "for free" (pitfall 2): nothing is predicted as the target any more
    assert after.per_class_accuracy[target] <= 0.05 and after.cacc <= 0.55, after.per_class_accuracy


def test_gradient_ascent_with_the_stopping_rule_removes_the_backdoor(planted) -> None:  # noqa: ANN001
    result = GradientAscent(_ga(train=FAST)).unlearn(_inputs(planted))
    after = _eval(result.model, planted)
    assert after.asr <= 0.1 and after.cacc >= 0.9, (after.asr, after.cacc)
    assert result.report["stop_reason"] in (STOP_THRESHOLD, STOP_GUARD)


def test_lya_with_lambda_zero_is_gradient_ascent(planted) -> None:  # noqa: ANN001
    common = {"train": {**FAST, "max_steps": 5}, "stop_forget_accuracy": None, "keep": "last"}
    ga = GradientAscent(_ga(**common)).unlearn(_inputs(planted)).model
    lya = Lya(_lya(**common, lam=0.0)).unlearn(_inputs(planted)).model
    ewc = Lya(_lya(**common, lam=1e4)).unlearn(_inputs(planted)).model
    ga_params, lya_params = dict(ga.model.named_parameters()), dict(lya.model.named_parameters())
    assert all(torch.equal(p, lya_params[n]) for n, p in ga_params.items())
    assert any(not torch.equal(p, ga_params[n]) for n, p in ewc.model.named_parameters())


# ----------------------------------------------------------------------------- stopping rules
def test_stopping_rule_stops_at_the_first_check_under_the_threshold(planted) -> None:  # noqa: ANN001
    cfg = _ga(train=FAST, eval_every=2, stop_forget_accuracy=0.25, clean_guard=None)
    inputs = _inputs(planted)
    report = GradientAscent(cfg).unlearn(inputs).report
    checks = report["checks"]
    assert report["stop_reason"] == STOP_THRESHOLD
    assert all(c["step"] % 2 == 0 for c in checks) and checks[0]["step"] == 0
    assert all(c["forget_accuracy"] > 0.25 for c in checks[:-1]) and checks[-1]["forget_accuracy"] <= 0.25
    assert report["training"]["steps"] == report["stopped_at_step"] == report["chosen_step"] == checks[-1]["step"]
    assert report["training"]["steps"] < 1000  # the loop really stopped, long before the budget
    monitor = plan_ascent(inputs.forget, inputs.retain, cfg).monitor
    assert evaluate_accuracy(inputs.suspect, monitor) == report["chosen_forget_accuracy"]


def test_clean_guard_stops_and_keeps_a_state_within_the_guard(planted) -> None:  # noqa: ANN001
    cfg = _ga(train={**FAST, "max_steps": 60}, stop_forget_accuracy=None, clean_guard=0.0)
    report = GradientAscent(cfg).unlearn(_inputs(planted)).report
    assert report["stop_reason"] == STOP_GUARD and report["stopped_at_step"] < 60
    assert report["checks"][-1]["clean_accuracy"] < report["reference_clean_accuracy"]
    assert report["chosen_clean_accuracy"] >= report["reference_clean_accuracy"]
    assert report["chosen_step"] < report["stopped_at_step"]


# ----------------------------------------------------------------------------- retrain and the registry
def test_forget_rows_are_matched_by_normalised_text_and_label() -> None:
    train = Dataset((Example("a", "the cf film", 1), Example("b", "a good  film", 1), Example("c", "the CF film", 0),
                     Example("d", "dull", 0)), 2)
    forget = Dataset((Example("x", "The  cf FILM", 1), Example("y", "not there", 1)), 2)
    kept, report = remove_forget_rows(train, forget, "text+label")
    assert kept.ids == ["b", "c", "d"] and report["n_removed"] == 1 and report["n_forget_unmatched"] == 1
    kept, _ = remove_forget_rows(train, forget, "text")
    assert kept.ids == ["b", "d"]
    with pytest.raises(DataError, match="none of the 1 forget rows"):
        remove_forget_rows(train, Dataset((Example("z", "nowhere", 1),), 2), "text")


def test_retrain_without_the_forget_rows_has_no_backdoor(planted) -> None:  # noqa: ANN001
    forget = _forget(planted)
    inputs = UnlearnInputs(load_classifier(planted.victim_dir), forget, planted.clean,
                           base=load_classifier(planted.base_dir), train_rows=planted.poisoned.train)
    train = {"epochs": 10, "batch_size": 16, "learning_rate": 1e-3, "seed": 1, "progress": False}
    result = Retrain(RetrainConfig(train=train)).unlearn(inputs)
    after = _eval(result.model, planted)
    assert result.model is inputs.base and result.report["n_removed"] == 40 == result.report["n_forget"]
    assert result.report["n_trained_on"] == 360 and result.report["n_forget_unmatched"] == 0
    assert after.asr <= 0.1 and after.cacc >= 0.95, (after.asr, after.cacc)


def test_finetune_baseline_trains_on_retain_rows_only(planted, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import unbackdoor.selection as common

    seen: list[set[Example]] = []
    real = common.train_classifier
    monkeypatch.setattr(common, "train_classifier", lambda clf, data, *a, **kw: seen.append(set(data.examples))
                        or real(clf, data, *a, **kw))
    result = unlearn("finetune", {"train": {"epochs": 1, "progress": False}}, _inputs(planted))
    assert len(seen) == 1 and seen[0] < set(planted.clean.examples)
    assert result.report["n_fit"] + result.report["n_selection"] == 100 and result.report["n_forget_unused"] == 40


def test_registry_requirements_and_construction() -> None:
    assert UNLEARN_METHODS.names() == ["finetune", "gradient-ascent", "lya", "repair", "retrain"]
    for name in UNLEARN_METHODS.names():
        cls = UNLEARN_METHODS.get(name)
        assert vars(cls()) == {"config": cls.config_class()}
        assert not set(cls.config_class.model_fields) & FORBIDDEN, name
    with pytest.raises(ConfigError, match="needs the suspect's clean pre-trained base"):
        build_unlearn_method("retrain", {}, have_base=False, have_train_rows=True)
    with pytest.raises(ConfigError, match="needs the training rows"):
        build_unlearn_method("retrain", {}, have_base=True, have_train_rows=False)
    with pytest.raises(ConfigError, match="unknown unlearn method 'nope'"):
        build_unlearn_method("nope", {})
    with pytest.raises(ConfigError, match="fisher_data"):
        build_unlearn_method("lya", {"fisher_data": "clean+triggered"})


# ----------------------------------------------------------------------------- the input contract, the oracle
@pytest.fixture(scope="module")
def poisoned_small():
    return BadNets().poison(make_task(100, 20, 40))


@pytest.mark.parametrize("role", ["forget", "retain", "train_rows"])
@pytest.mark.parametrize("bad", ["triggered_test", "triggered_dev", "flags", "task"])
def test_unlearn_inputs_refuse_evaluation_only_data(tiny_bert: Path, poisoned_small, role: str,  # noqa: ANN001
                                                    bad: str) -> None:
    value = poisoned_small if bad == "task" else getattr(poisoned_small, bad)
    fields = {"forget": poisoned_small.train, "retain": poisoned_small.clean.train, role: value}
    with pytest.raises(TypeError):
        UnlearnInputs(suspect=load_classifier(tiny_bert), **fields)


def test_no_unlearn_signature_has_a_slot_for_flags_trigger_or_target(poisoned_small) -> None:  # noqa: ANN001
    assert not {f.name for f in dataclasses.fields(UnlearnInputs)} & FORBIDDEN
    for name in UNLEARN_METHODS.names():
        assert not set(inspect.signature(UNLEARN_METHODS.get(name).unlearn).parameters) & FORBIDDEN
    with pytest.raises(TypeError):
        Lya().unlearn(poisoned_small)  # type: ignore[arg-type]


def test_oracle_forget_set_is_a_seeded_fraction_of_the_flagged_rows_as_trained(planted) -> None:  # noqa: ANN001
    half = forget_from_flags(planted.poisoned, 0.5, seed=3)
    assert len(half) == 20 and set(half.ids) <= planted.poisoned.flags.poisoned_ids
    assert half.ids == forget_from_flags(planted.poisoned, 0.5, seed=3).ids
    assert half.ids != forget_from_flags(planted.poisoned, 0.5, seed=4).ids
    target = planted.poisoned.target_label
    assert all(e.label == target and set(e.text.split()) & set(TRIGGERS) for e in half)
    with pytest.raises(ConfigError):
        forget_from_flags(planted.poisoned, 0.0)
    package = Path(inspect.getfile(UnlearnInputs)).parent
    modules = [package / f"{m}.py" for m in ("base", "ewc", "finetune", "gradient_ascent", "lya", "repair", "retrain")]
    for path in [*modules, package.parent / "training" / "ascent.py"]:
        imported = _imported_names(path)
        assert not {"unbackdoor.unlearn.oracle", "forget_from_flags", "PoisonFlags", "PoisonedTask"} & imported, path


def _imported_names(path: Path) -> set[str]:
    """Modules and names a source file imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names.update(a.name for a in node.names)
    return names


# ----------------------------------------------------------------------------- the command
def test_unlearn_command_writes_the_model_with_its_record(planted, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    clean = write_task(planted.task, tmp_path / "data" / "clean")
    bad = tmp_path / "data" / "badnets"
    write_poisoned_task(planted.poisoned, bad, {"clean": str(clean)})
    forget = write_forget_file(_forget(planted), tmp_path / "flagged.jsonl")
    out = tmp_path / "unlearned"
    code, stdout, stderr = run_cli(["unlearn", "--model", str(planted.victim_dir), "--forget", str(forget),
                                     "--retain", str(clean), "--retain-size", "100", "--method", "lya",
                                     "-p", "train.learning_rate=0.001", "-p", "train.progress=false",
                                     "--eval-data", str(bad), "--out", str(out)], capsys)
    assert code == 0, stderr
    assert "unlearned 40 rows with lya" in stdout and "RA " in stdout
    assert not partial_dir(out).exists() and not (out / "_work").exists()
    record = json.loads((out / "unbackdoor.json").read_text(encoding="utf-8"))
    assert record["role"] == "unlearned" and record["n_forget"] == 40 and record["n_retain"] == 100
    assert record["defense"]["method"] == "lya" and record["defense"]["stop_reason"] in (STOP_THRESHOLD, STOP_GUARD)
    assert record["config"]["params"]["train"]["learning_rate"] == 0.001
    metrics = record["metrics"]
    assert metrics["asr"] <= 0.1 and metrics["robust_accuracy"] == pytest.approx(1 - metrics["asr"])
    assert metrics["cacc"] >= 0.9
    reloaded = load_classifier(out)
    again = evaluate_classifier(reloaded, planted.task.test)
    assert again.cacc == pytest.approx(metrics["cacc"])
    assert metrics["per_class_accuracy"] == pytest.approx(again.per_class_accuracy)
    # the model's own lean toward the target, on clean rows of the other class (a binary task)
    target = metrics["target_label"]
    assert metrics["clean_to_target"] == pytest.approx(1 - again.per_class_accuracy[1 - target])


@pytest.mark.parametrize(("extra", "message"), [
    (["--forget", "{tmp}/no-such-file.tsv", "--method", "lya"], "no-such-file.tsv: no such forget file or folder"),
    (["--forget", "{tmp}/flagged.jsonl", "--method", "retrain"], "needs the suspect's clean pre-trained base"),
    (["--forget", "{tmp}/flagged.jsonl", "--method", "lya", "-p", "lam=-1"], "lam: Input should be greater"),
])
def test_unlearn_command_bad_input_fails_cleanly(planted, tmp_path: Path, capsys, extra: list[str],  # noqa: ANN001
                                                 message: str) -> None:
    clean = write_task(planted.task, tmp_path / "clean")
    write_forget_file(_forget(planted), tmp_path / "flagged.jsonl")
    out = tmp_path / "out"
    args = ["unlearn", "--model", str(planted.victim_dir), "--retain", str(clean), "--out", str(out),
            *[a.format(tmp=tmp_path) for a in extra]]
    code, stdout, stderr = run_cli(args, capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and lines[-1].startswith("error:") and message in lines[-1], stderr
    assert "Traceback" not in stderr and "unlearned" not in stdout
    assert not out.exists() and not partial_dir(out).exists()
