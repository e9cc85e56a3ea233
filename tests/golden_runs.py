"""A fingerprint of what every registered method produces on tiny inputs, through the command
functions the CLI runs: each attack's poisoned data (rows, flags, triggered sets), and the metrics of
a tiny-model run of every train-time defence, purify method, unlearn method and detector.

A refactor that claims to change no behaviour must leave every fingerprint as it was:
``tests/test_golden.py`` compares them with ``tests/golden.json``. To rewrite that file after an
intended change (say which in the commit):

    UNBACKDOOR_WRITE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py

Everything runs in fp32 on one thread, seeded, on the synthetic task of ``synthetic.py``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synthetic import make_task, save_tiny_model, write_task

GOLDEN = Path(__file__).with_name("golden.json")
FAST_TRAIN = {"epochs": 2, "batch_size": 16, "learning_rate": 1e-3, "progress": False}
LEARN = {**FAST_TRAIN, "epochs": 8}  # enough for the tiny model to learn the task (and the trigger)
ROUND = 6  # metrics compared at this many decimals
FP32 = "fp32"  # the fingerprints predate bf16 autocast; they check refactors, not precision


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def metric_view(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The metrics a run's behaviour shows in, rounded."""
    keep = ("cacc", "macro_f1", "asr", "robust_accuracy", "clean_to_target", "per_class_accuracy")
    out: dict[str, Any] = {}
    for key in keep:
        value = (metrics or {}).get(key)
        if isinstance(value, float):
            out[key] = round(value, ROUND)
        elif isinstance(value, list):
            out[key] = [round(v, ROUND) if isinstance(v, float) else v for v in value]
        elif value is not None:
            out[key] = value
    return out


def poisoned_view(folder: Path) -> str:
    """A hash of a poisoned data folder's rows, flags and meta (ids, texts, labels)."""
    parts = {}
    for path in sorted(folder.iterdir()):
        if path.suffix in (".tsv", ".jsonl", ".txt"):
            parts[path.name] = path.read_text(encoding="utf-8")
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    parts["meta"] = {k: v for k, v in meta.items() if k != "clean"}
    return digest(parts)


class World:
    """Tiny inputs on disk: a clean task, a base model, a BadNets victim trained from it."""

    def __init__(self, root: Path) -> None:
        from unbackdoor.commands import AttackCommand, TrainCommand, run_attack, run_train

        self.root = root
        self.data = write_task(make_task(400, 100, 120), root / "data" / "syn")
        self.base = save_tiny_model(root / "base", "bert", seed=0)
        self.poisoned = root / "poisoned"
        run_attack(AttackCommand(precision=FP32, data=str(self.data), attack="badnets", out=str(self.poisoned),
                                 params={"poison_rate": 0.15, "seed": 0}))
        self.victim = root / "victim"
        run_train(TrainCommand(precision=FP32, data=str(self.poisoned), model=str(self.base), out=str(self.victim),
                               train={**FAST_TRAIN, "epochs": 10, "seed": 1}, max_length=32))
        self.forget = root / "forget.jsonl"
        self._write_forget()

    def _write_forget(self) -> None:
        from unbackdoor.data.io import load_poisoned_task
        from unbackdoor.unlearn.oracle import forget_from_flags, write_forget_file

        write_forget_file(forget_from_flags(load_poisoned_task(self.poisoned), 1.0), self.forget)

    def out(self, name: str) -> str:
        return str(self.root / "out" / name.replace("/", "_"))


def attack_runs(world: World) -> dict[str, Callable[[], Any]]:
    from unbackdoor.attacks.base import ATTACKS
    from unbackdoor.commands import AttackCommand, run_attack

    data_free = {"synbkd", "stylebkd", "deadcode"}  # published sets / source code: not on this synthetic task

    def run(name: str) -> Callable[[], Any]:
        def go() -> Any:
            out = world.out(f"attack/{name}")
            run_attack(AttackCommand(precision=FP32, data=str(world.data), attack=name, out=out, params={"seed": 3}))
            return poisoned_view(Path(out))
        return go

    runs = {f"attack/{n}": run(n) for n in ATTACKS.names() if n not in data_free}

    def weight(name: str, params: dict[str, Any]) -> Callable[[], Any]:
        def go() -> Any:
            out, victim = world.out(f"attack/{name}"), world.out(f"attack/{name}-victim")
            run_attack(AttackCommand(precision=FP32, data=str(world.data), attack=name, out=out, victim_out=victim,
                                     model=str(world.base), max_length=32, params=params))
            return {"data": poisoned_view(Path(out)),
                    "metrics": metric_view(json.loads((Path(victim) / "unbackdoor.json").read_text())["metrics"])}
        return go

    runs["attack/ep"] = weight("ep", {"poison_rate": 0.2, "clean_train": LEARN, "train": FAST_TRAIN})
    runs["attack/lwp"] = weight("lwp", {"poison_rate": 0.2, "train": LEARN})
    return runs


def defence_runs(world: World) -> dict[str, Callable[[], Any]]:
    from unbackdoor.commands import PurifyCommand, TrainCommand, UnlearnCommand, run_purify, run_train, run_unlearn
    from unbackdoor.commands import DetectCommand, run_detect

    runs: dict[str, Callable[[], Any]] = {}
    for method, params in {"none": {}, "lora": {"train": LEARN}, "musclelora": {"train": LEARN, "reference_size": 16},
                           "reweight": {"train": LEARN}, "abl": {"train": LEARN}}.items():
        runs[f"train/{method}"] = (lambda m=method, p=params: metric_view(run_train(TrainCommand(precision=FP32, 
            data=str(world.poisoned), model=str(world.base), out=world.out(f"train/{m}"), defense=m,
            defense_params=p, train=LEARN if m == "none" else None, max_length=32))["metrics"]))
    for method in ("finetune", "reinit", "fine-pruning", "e-pur", "fine-mixing", "fine-purifying", "tsbd"):
        def purify(m: str = method) -> Any:
            run_purify(PurifyCommand(precision=FP32, model=str(world.victim), clean=str(world.data), base=str(world.base), method=m,
                                     out=world.out(f"purify/{m}"), clean_set={"size": 60, "seed": 0}))
            return evaluation(world, f"purify/{m}")
        runs[f"purify/{method}"] = purify
    for method in ("lya", "gradient-ascent", "retrain", "finetune", "repair"):
        runs[f"unlearn/{method}"] = (lambda m=method: metric_view(run_unlearn(UnlearnCommand(precision=FP32, 
            model=str(world.victim), forget=str(world.forget), retain=str(world.data), method=m, base=str(world.base),
            train_data=str(world.poisoned), eval_data=str(world.poisoned), out=world.out(f"unlearn/{m}"),
            clean_set={"size": 60, "seed": 0}))["metrics"]))
    for method in ("reweight", "loss", "bki", "cube", "isolation"):
        params = {"train": FAST_TRAIN} if method in ("bki", "cube", "isolation") else {}
        runs[f"detect/{method}"] = (lambda m=method, p=params: detection(world, run_detect(DetectCommand(precision=FP32, 
            data=str(world.poisoned), clean=str(world.data), method=m, model=str(world.base), params=p,
            out=world.out(f"detect/{m}"), max_length=32, clean_set={"size": 40, "seed": 0}))))
    return runs


def evaluation(world: World, name: str) -> dict[str, Any]:
    from unbackdoor.commands import evaluate_model, metric_summary

    return metric_view(metric_summary(evaluate_model(world.out(name), str(world.poisoned), precision=FP32)[1]))


def detection(world: World, record: dict[str, Any]) -> Any:
    """The rows a detector flags (id, label, flagged), not its scores: the scores' last digits differ between
    processors (on this tiny task the 6-digit scores of bki, isolation, loss and reweight differed between an
    Intel and an AMD CPU, and with oneDNN off; their flagged rows did not), and which rows are flagged is
    the behaviour a refactor must keep."""
    path = Path(record["config"]["out"]) / "scores.csv"
    with path.open(encoding="utf-8", newline="") as handle:
        rows = [(r["id"], r["label"], r["flagged"]) for r in csv.DictReader(handle)]
    return digest(sorted(rows))


def fingerprints(root: Path) -> dict[str, Any]:
    """Every method's fingerprint (runs them all: about a minute on one thread)."""
    world = World(root)
    runs = {**attack_runs(world), **defence_runs(world)}
    return {name: run() for name, run in sorted(runs.items())}
