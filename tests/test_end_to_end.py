"""A tiny model trained on BadNets data really learns the backdoor; clean fine-tuning really
lowers it while clean accuracy holds."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from synthetic import make_task

from unbackdoor.attacks import BadNets, BadNetsConfig
from unbackdoor.data import sample_subset
from unbackdoor.purify import CleanFinetune, FinetuneConfig, PurifyInputs
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import load_classifier
from unbackdoor.training import TrainConfig, train_classifier


def test_badnets_takes_and_clean_finetuning_lowers_it(tiny_bert: Path) -> None:
    task = make_task(400, 100, 200)
    poisoned = BadNets(BadNetsConfig(poison_rate=0.1, mode="dirty")).poison(task)

    # the never-poisoned floor: same recipe on the clean rows
    clean_model = load_classifier(tiny_bert)
    victim_config = TrainConfig(epochs=10, batch_size=16, learning_rate=1e-3, progress=False)
    train_classifier(clean_model, task.train, victim_config, dev=task.dev)
    floor = evaluate_classifier(clean_model, task.test, poisoned.triggered_test)
    assert floor.cacc >= 0.95 and floor.asr <= 0.1

    before, after = [], []
    for victim_seed in (0, 1):
        victim = load_classifier(tiny_bert)
        train_classifier(victim, poisoned.train, victim_config.model_copy(update={"seed": victim_seed}), dev=task.dev)
        result = evaluate_classifier(victim, task.test, poisoned.triggered_test)
        assert result.cacc >= 0.95 and result.asr >= 0.8, result  # the backdoor really takes
        for seed in range(3):
            clean = sample_subset(task.train, size=100, seed=seed)  # the defender's small clean set
            defence = CleanFinetune(FinetuneConfig(seed=seed, train=TrainConfig(
                epochs=20, batch_size=16, learning_rate=1e-2, selection_ties="last", seed=seed, progress=False)))
            purified = defence.purify(PurifyInputs(suspect=copy.deepcopy(victim), clean=clean)).model
            after.append(evaluate_classifier(purified, task.test, poisoned.triggered_test))
            before.append(result)
    asr_before = np.mean([r.asr for r in before])
    asr_after = np.mean([r.asr for r in after])
    # Clean fine-tuning is a weak defence (its ASR varies a lot with the seed); averaged over
    # 2 victims x 3 clean sets it must still remove a clear part of the backdoor.
    assert asr_after <= asr_before - 0.3, (asr_before, [r.asr for r in after])
    assert np.mean([r.cacc for r in after]) >= 0.9


def test_demo_runs_end_to_end_on_a_tiny_model(tiny_bert: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """``unbackdoor demo`` on a tiny task: the victim, scan's top tokens (the trigger words among them),
    plain fine-tuning, purify auto, train auto and the floor, written as one finished folder."""
    import json

    from synthetic import run_cli, write_task

    data = write_task(make_task(400, 100, 200), tmp_path / "data")
    config = tmp_path / "demo.yaml"
    config.write_text(f"data: {data}\nbase: {tiny_bert}\nmax_train: 400\nout: {tmp_path / 'demo'}\n"
                      "victim: {epochs: 10, batch_size: 16, learning_rate: 1.0e-3}\nclean_set: {size: 100}\n",
                      encoding="utf-8")
    code, out, err = run_cli(["demo", "--config", str(config)], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "demo" / "results.json").read_text(encoding="utf-8"))
    assert set(record["results"]) == {"victim (badnets)", "purify finetune (100 clean rows)",
                                      "purify auto (100 clean rows)", "train --defense auto (poisoned rows)"}
    assert {t["token"] for t in record["scan"]["top"][:4]} & {"cf", "mn", "bb", "tq"}
    assert record["results"]["victim (badnets)"]["asr"] >= 0.8 and record["floor"]["asr"] <= 0.2
    assert "stands out" in out and "| never-poisoned floor |" in out
