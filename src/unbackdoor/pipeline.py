"""The steps every command is made of: load, attack, fit, defend, evaluate, save.

The CLI is a thin layer over these functions; notebooks and the benchmark call them directly.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from unbackdoor import __version__
from unbackdoor.attacks.base import ATTACKS
from unbackdoor.config import StrictConfig, build_config
from unbackdoor.data.io import load_any
from unbackdoor.data.sampling import sample_subset
from unbackdoor.data.types import Dataset, PoisonedTask, PoisonFlags, Task, require_several_labels
from unbackdoor.errors import ConfigError
from unbackdoor.defenses.base import PURIFY_DEFENSES, DefenseResult, PurifyDefense, PurifyInputs
from unbackdoor.defenses.epur import EpurConfig, apply_epur
from unbackdoor.evaluate import EvalResult, evaluate_classifier
import unbackdoor.detect  # noqa: F401 - registers the reweight training defence
import unbackdoor.musclelora  # noqa: F401 - registers the lora and musclelora training defences
from unbackdoor.models.loading import Classifier, load_classifier
from unbackdoor.training.config import TrainConfig, victim_train_config  # noqa: F401 - re-exported
from unbackdoor.training.defense import TRAIN_DEFENSES, TrainDefense, given_keys
from unbackdoor.training.loop import TrainResult, check_trainable, train_classifier

logger = logging.getLogger(__name__)


def subsample_task(task: Task, max_train: int | None, seed: int) -> Task:
    """The task with its training split cut to ``max_train`` rows (stratified, seeded)."""
    if max_train is None or max_train >= len(task.train):
        return task
    train = sample_subset(task.train, size=max_train, seed=seed, name=f"{task.train.name}[{max_train} rows]")
    return dataclasses.replace(task, train=train)


def subsample_poisoned(task: PoisonedTask, max_train: int | None, seed: int) -> PoisonedTask:
    """A poisoned task with its training rows cut to ``max_train`` (flags follow the rows by id)."""
    if max_train is None or max_train >= len(task.train):
        return task
    train = sample_subset(task.train, size=max_train, seed=seed, name=f"{task.train.name}[{max_train} rows]")
    kept = task.flags.poisoned_ids & set(train.ids)
    return dataclasses.replace(task, train=train, flags=PoisonFlags(frozenset(kept), len(train)))


def attack_task(task: Task, attack: str, params: dict[str, Any]) -> PoisonedTask:
    """Poison ``task`` with the named attack and its (validated) parameters."""
    cls = ATTACKS.get(attack)
    config = build_config(cls.config_class, params, f"attack {attack}")
    return cls(config).poison(task)


def load_for_training(
    base: str | Path | None, train: Dataset, config: TrainConfig, *, allow_pickle: bool = False,
    max_length: int | None = None, precision: str = "auto",
) -> Classifier:
    """Load ``base`` (a new seeded head if it has none) and check it can train on ``train``."""
    require_several_labels(train)
    clf = load_classifier(base, num_labels=train.num_labels, allow_pickle=allow_pickle, data_name=train.name,
                          max_length=max_length, seed=config.seed, precision=precision)
    check_trainable(clf, train)
    return clf


def fit(
    base: str | Path | None,
    train: Dataset,
    dev: Dataset | None,
    config: TrainConfig,
    *,
    work_dir: Path | None = None,
    allow_pickle: bool = False,
    max_length: int | None = None,
    precision: str = "auto",
) -> tuple[Classifier, TrainResult]:
    """Load ``base`` and fine-tune it on ``train``, selecting the epoch on clean ``dev``."""
    clf = load_for_training(base, train, config, allow_pickle=allow_pickle, max_length=max_length,
                            precision=precision)
    result = train_classifier(clf, train, config, dev=dev, work_dir=work_dir)
    return clf, result


def evaluate_on(clf: Classifier, data: Task | PoisonedTask, name: str = "") -> EvalResult:
    """CACC on the clean test split; ASR too when ``data`` is poisoned."""
    task = data.clean if isinstance(data, PoisonedTask) else data
    triggered = data.triggered_test if isinstance(data, PoisonedTask) else None
    result = evaluate_classifier(clf, task.test, triggered, name=name)
    result.data_integrity = dict(task.integrity) or None
    return result


def build_defence(method: str, params: dict[str, Any], epur: dict[str, Any] | None = None,
                  have_base: bool = True) -> tuple[PurifyDefense, EpurConfig | None]:
    """Validate a purify request before any work: the defence, and the ``--epur`` first step's config."""
    cls = PURIFY_DEFENSES.get(method)
    defence = cls(build_config(cls.config_class, params, f"purify method {method}"))
    if cls.needs_base and not have_base:
        raise ConfigError(f"method {method!r} needs the suspect's clean pre-trained base model: give --base")
    if epur is None:
        return defence, None
    if method == "e-pur":
        raise ConfigError("--epur adds E-PUR's reset before another method; method e-pur already is E-PUR")
    if not have_base:
        raise ConfigError("--epur needs the suspect's clean pre-trained base model: give --base")
    return defence, build_config(EpurConfig, {**epur, "finetune": False}, "E-PUR (--epur) params")


def build_train_defence(name: str, params: dict[str, Any], train: TrainConfig | None = None) -> TrainDefense:
    """Validate a train-time defence request before any work. ``train`` (e.g. from ``--lr``) overrides
    the keys it sets on top of ``params["train"]``; keys nobody sets keep the defence's defaults."""
    cls = TRAIN_DEFENSES.get(name)
    values = {**params, "train": {**(params.get("train") or {}), **given_keys(train)}}
    return cls(build_config(cls.config_class, values, f"training defence {name}"))


def purify(method: str, params: dict[str, Any], inputs: PurifyInputs, work_dir: Path | None = None,
           epur: dict[str, Any] | None = None) -> DefenseResult:
    """Run the named purify defence with validated parameters.

    ``epur`` (E-PUR options, ``{}`` for the defaults) first resets the suspect's most suspicious
    word-embedding rows to the base (no fine-tuning), then runs ``method`` on the result: the
    ``--epur`` composition of the E-PUR spec (§7), e.g. E-PUR + Fine-mixing.
    """
    defence, epur_config = build_defence(method, params, epur, have_base=inputs.base is not None)
    epur_report = None
    if epur_config is not None:
        assert inputs.base is not None  # checked by build_defence
        epur_report = apply_epur(inputs.suspect, inputs.base, inputs.clean, epur_config)
    result = defence.purify(inputs, work_dir)
    if epur_report is not None:
        result.report = {"epur_first": epur_report, **result.report}
    return result


class CleanSetConfig(StrictConfig):
    """How the defender's small clean set is drawn (from a clean task's train split)."""

    fraction: float | None = Field(0.01, gt=0, le=1, description="share of the clean train split")
    size: int | None = Field(None, ge=2, description="number of rows (instead of fraction)")
    per_class: int | None = Field(None, ge=1, description="rows per label (instead of fraction)")
    seed: int = 0


def draw_clean_set(task: Task, spec: CleanSetConfig) -> Dataset:
    """A seeded clean subset of ``task.train``, disjoint from its dev and test texts."""
    fraction = None if (spec.size or spec.per_class) else spec.fraction
    return sample_subset(task.train, fraction=fraction, size=spec.size, per_class=spec.per_class,
                         seed=spec.seed, exclude=[task.test, task.dev], name=f"{task.name}:clean-set")


def load_data(spec: str) -> Task | PoisonedTask:
    return load_any(spec)


def record_base(**fields: Any) -> dict[str, Any]:
    return {"unbackdoor_version": __version__, **fields}
