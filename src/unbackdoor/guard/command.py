"""``unbackdoor guard``: set a guard up in front of a suspect model and, given poisoned evaluation
data, measure it.

Inputs: the suspect model, a clean task whose train split is sampled for the guard's clean set (as
for ``purify``: seeded, stratified, disjoint from its dev and test texts), the guard and its
parameters, and optionally evaluation data: a clean task (FRR and CACC on its test split) or a
poisoned folder (also FAR and ASR on its triggered test set). The evaluation data is never shown to
the guard.

Output folder (written atomically):

* ``guard.json``: inputs, configs, what the guard built (its report: e.g. ONION's language model,
  RAP's word and training curve), the evaluation at every budget, wall time, peak memory;
* ``thresholds.json``: the fitted thresholds at the configured budget and at every evaluated one.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from unbackdoor import __version__
from unbackdoor.config import CommandConfig, StrictConfig
from unbackdoor.data.io import load_any, load_task
from unbackdoor.data.sampling import sample_subset
from unbackdoor.data.types import Dataset, PoisonedTask, Task, TriggeredSet
from unbackdoor.errors import DataError
from unbackdoor.guard.base import FittedGuard, GuardInputs, build_guard
from unbackdoor.guard.evaluation import DEFAULT_BUDGETS, GuardEvaluation, evaluate_guard
from unbackdoor.models.loading import load_classifier
from unbackdoor.outputs import atomic_output_dir, check_output_free, write_json
from unbackdoor.pipeline import CleanSetConfig, draw_clean_set
from unbackdoor.utils.resources import Stopwatch, peak_memory_mb

logger = logging.getLogger(__name__)

RECORD_FILE, THRESHOLDS_FILE = "guard.json", "thresholds.json"


class GuardCommand(CommandConfig):
    model: str = Field(description="the suspect model folder (it is never changed)")
    clean: str = Field(description="clean data the defender holds (its train split is sampled)")
    clean_set: CleanSetConfig = Field(default_factory=CleanSetConfig)
    method: str = Field("strip", description="guard: onion, rap, strip")
    params: dict[str, Any] = Field(default_factory=dict, description="guard options (unbackdoor.guard.OnionConfig, "
                                   "RapConfig, StripConfig)")
    eval_data: str | None = Field(None, description="measure the guard on this clean or poisoned data (FRR, CACC; "
                                  "FAR and ASR when poisoned); never shown to the guard")
    budgets: tuple[float, ...] = Field(DEFAULT_BUDGETS, description="FRR budgets reported besides the guard's own")
    max_eval: int | None = Field(None, ge=2, description="evaluate on a seeded subsample of at most this many clean "
                                 "test rows and as many triggered rows")
    max_length: int | None = Field(None, ge=8, le=4096, description="tokens per input (default: the model's saved "
                                   "format, else 128)")
    out: str = Field(description="output folder (guard.json, thresholds.json)")

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < b < 1 for b in value):
            raise ValueError("every FRR budget must be in (0, 1)")
        return value


def data_reference(spec: str) -> str:
    """A name under the data root as given, a folder as its absolute path."""
    path = Path(spec)
    return str(path.resolve()) if path.is_dir() else spec


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinite floats as None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def subsample_triggered(triggered: TriggeredSet, n: int | None, seed: int) -> TriggeredSet:
    """At most ``n`` rows of ``triggered``, drawn with ``seed`` (evaluation only)."""
    if n is None or n >= len(triggered):
        return triggered
    keep = sorted(random.Random(f"{seed}-guard-eval").sample(range(len(triggered)), n))
    return TriggeredSet(tuple(triggered.examples[i] for i in keep), triggered.target_label, triggered.num_labels,
                        tuple(triggered.original_labels[i] for i in keep), f"{triggered.name}[{n} rows]")


def evaluation_sets(data: Task | PoisonedTask, max_eval: int | None, seed: int) -> tuple[Dataset, TriggeredSet | None]:
    """The clean test split and, for poisoned data, the triggered test set (each subsampled to ``max_eval``)."""
    clean_test, triggered = (data.clean.test, data.triggered_test) if isinstance(data, PoisonedTask) else (data.test, None)
    if max_eval is not None and max_eval < len(clean_test):
        clean_test = sample_subset(clean_test, size=max_eval, seed=seed, name=f"{clean_test.name}[{max_eval} rows]")
    return clean_test, subsample_triggered(triggered, max_eval, seed) if triggered is not None else None


def metric_summary(evaluation: GuardEvaluation) -> dict[str, Any]:
    """The headline numbers at the guard's own budget, next to the unguarded model's."""
    m = evaluation.metrics
    return {"budget": m.budget, "frr": m.frr, "far": m.far, "cacc": m.cacc, "asr": m.asr,
            "unguarded_cacc": evaluation.unguarded["cacc"], "unguarded_asr": evaluation.unguarded["asr"],
            "n_clean": evaluation.n_clean, "n_triggered": evaluation.n_triggered,
            "target_label": evaluation.target_label}


def thresholds_record(fitted: FittedGuard, budgets: tuple[float, ...]) -> dict[str, Any]:
    wanted = sorted({*budgets, fitted.budget})
    return {"method": fitted.name, "kind": fitted.kind, "budget": fitted.budget,
            "thresholds": fitted.thresholds(), "by_budget": {f"{b:g}": fitted.thresholds(b) for b in wanted}}


def run_guard(cmd: GuardCommand) -> dict[str, Any]:
    """Validate the request, load the model and clean set, fit the guard, evaluate it, write the outputs."""
    guard = build_guard(cmd.method, cmd.params)  # fail before loading anything
    lm_inputs = [getattr(guard.config, k, None) for k in ("lm", "lm_corpus")]
    out = check_output_free(cmd.out, cmd.overwrite, inputs=[cmd.model, cmd.clean, cmd.eval_data, *lm_inputs])
    clean = draw_clean_set(load_task(cmd.clean), cmd.clean_set)
    eval_data = load_any(cmd.eval_data) if cmd.eval_data is not None else None
    if eval_data is not None and eval_data.train.num_labels != clean.num_labels:
        raise DataError(f"--eval-data {cmd.eval_data} has {eval_data.train.num_labels} labels but --clean "
                        f"{cmd.clean} has {clean.num_labels}")
    model = load_classifier(cmd.model, num_labels=clean.num_labels, allow_pickle=cmd.allow_pickle, precision=cmd.precision,
                            max_length=cmd.max_length, data_name=cmd.clean)
    watch = Stopwatch()
    fitted = guard.fit(GuardInputs(suspect=model, clean=clean))
    evaluation = None
    if eval_data is not None:
        clean_test, triggered = evaluation_sets(eval_data, cmd.max_eval, cmd.clean_set.seed)
        del eval_data  # past this line only the clean test rows and the triggered set are used
        evaluation = evaluate_guard(fitted, model, clean_test, triggered, cmd.budgets)
    record = json_safe({
        "unbackdoor_version": __version__,
        "method": cmd.method,
        "kind": fitted.kind,
        "config": cmd.model_dump(mode="json"),
        "model": model.source,
        "input_format": model.input_format(),
        "clean": data_reference(cmd.clean),
        "n_clean": len(clean),
        "eval_data": data_reference(cmd.eval_data) if cmd.eval_data is not None else None,
        "guard": fitted.report,
        "metrics": metric_summary(evaluation) if evaluation is not None else None,
        "evaluation": evaluation.to_dict() if evaluation is not None else None,
        "wall_time_s": watch.elapsed(),
        "peak_memory_mb": peak_memory_mb(),
        "outputs": {"record": RECORD_FILE, "thresholds": THRESHOLDS_FILE},
    })
    with atomic_output_dir(out, cmd.overwrite) as work:
        write_json(work / THRESHOLDS_FILE, json_safe(thresholds_record(fitted, cmd.budgets)))
        write_json(work / RECORD_FILE, record)
    if evaluation is not None:
        m = evaluation.metrics
        logger.info("guard %s: FRR %.3f, CACC %.4f, ASR %s (unguarded %s) -> %s", cmd.method, m.frr, m.cacc,
                    f"{m.asr:.4f}" if m.asr is not None else "n/a", evaluation.unguarded["asr"], out)
    return record
