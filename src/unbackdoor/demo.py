"""The demo: one honest experiment end to end on real data and the real default model.

clean SST-2 -> BadNets (10%, dirty-label) -> MiniLM victim -> clean fine-tuning on 1% clean data
-> CACC and ASR before and after, next to a never-poisoned model trained the same way (the floor).
"""

from __future__ import annotations

import copy
import logging
import shutil
from typing import Any

from pydantic import Field

from unbackdoor.config import CommandConfig, StrictConfig
from unbackdoor.data.io import load_task
from unbackdoor.defenses.base import PurifyInputs
from unbackdoor.evaluate import EvalResult, markdown_table
from unbackdoor.models.loading import load_classifier
from unbackdoor.models.saving import provenance_record, save_classifier
from unbackdoor.outputs import atomic_output_dir, check_output_free, write_json
from unbackdoor.pipeline import (
    CleanSetConfig,
    attack_task,
    draw_clean_set,
    evaluate_on,
    fit,
    purify,
    subsample_task,
    victim_train_config,
)
from unbackdoor.training.config import TrainConfig
from unbackdoor.utils.resources import Stopwatch, peak_memory_mb

logger = logging.getLogger(__name__)


class DemoCommand(CommandConfig):
    data: str = Field("sst2", description="clean task")
    attack: str = Field("badnets", description="attack name")
    attack_params: dict[str, Any] = Field(default_factory=lambda: {"poison_rate": 0.1, "mode": "dirty"})
    base: str | None = Field(None, description="base model (default: all-MiniLM-L6-v2)")
    max_train: int | None = Field(2000, ge=2, description="subsample the training split so the demo fits in minutes")
    victim: TrainConfig = Field(default_factory=victim_train_config)
    method: str = Field("finetune", description="purify method")
    method_params: dict[str, Any] = Field(default_factory=dict)
    clean_set: CleanSetConfig = Field(default_factory=CleanSetConfig)
    floor: bool = Field(True, description="also train a never-poisoned model (the ASR floor)")
    out: str = Field("runs/demo", description="output folder")
    overwrite: bool = Field(True, description="replace an earlier demo output")


def run_demo(cmd: DemoCommand) -> dict[str, Any]:
    """Run the demo; return its record (table, metrics, timings)."""
    out = check_output_free(cmd.out, cmd.overwrite, inputs=[cmd.data, cmd.base])
    watch = Stopwatch()
    full = load_task(cmd.data)
    task = subsample_task(full, cmd.max_train, cmd.victim.seed)
    notes = []
    if len(task.train) < len(full.train):
        notes.append(f"training split subsampled to {len(task.train)} of {len(full.train)} rows (seeded) to fit the time budget")
    poisoned = attack_task(task, cmd.attack, cmd.attack_params)
    clean = draw_clean_set(full, cmd.clean_set)
    timings: dict[str, float] = {}
    results: list[tuple[str, EvalResult]] = []
    with atomic_output_dir(out, cmd.overwrite) as work:
        step = Stopwatch()
        victim, victim_train = fit(cmd.base, poisoned.train, task.dev, cmd.victim, work_dir=work / "_work_victim",
                                   precision=cmd.precision)
        timings["victim_training_s"] = step.elapsed()
        before = evaluate_on(victim, poisoned, "victim")
        results.append((f"victim ({cmd.attack})", before))
        save_classifier(victim, work / "victim", provenance_record(
            victim, title="demo victim", role="victim", base=cmd.base or "all-MiniLM-L6-v2",
            data=cmd.data, attack=poisoned.attack.params, seed=cmd.victim.seed, metrics=before.to_dict()))

        step = Stopwatch()
        base = (load_classifier(cmd.base, num_labels=task.num_labels, seed=cmd.victim.seed, precision=cmd.precision)
                if cmd.method != "finetune" else None)
        inputs = PurifyInputs(suspect=copy.deepcopy(victim), clean=clean, base=base)
        defended = purify(cmd.method, cmd.method_params, inputs, work_dir=work / "_work_defense")
        timings["defense_s"] = step.elapsed()
        after = evaluate_on(defended.model, poisoned, "defended")
        results.append((f"after {cmd.method} ({len(clean)} clean rows)", after))
        save_classifier(defended.model, work / "defended", provenance_record(
            defended.model, title=f"demo victim purified with {cmd.method}", role="purified",
            defense=defended.report, seed=cmd.clean_set.seed, metrics=after.to_dict()))

        floor = None
        if cmd.floor:
            step = Stopwatch()
            clean_model, _ = fit(cmd.base, task.train, task.dev, cmd.victim, work_dir=work / "_work_floor",
                                 precision=cmd.precision)
            timings["floor_training_s"] = step.elapsed()
            floor = evaluate_on(clean_model, poisoned, "never-poisoned")
        table = markdown_table(results, floor)
        for tmp in work.glob("_work_*"):
            shutil.rmtree(tmp, ignore_errors=True)
        record = {
            "config": cmd.model_dump(),
            "notes": notes,
            "n_train": len(task.train),
            "n_poisoned": poisoned.flags.n_poisoned,
            "n_clean_set": len(clean),
            "results": {label: r.to_dict() for label, r in results},
            "floor": floor.to_dict() if floor else None,
            "victim_training": victim_train.to_dict(),
            "defense": defended.report,
            "timings": {**timings, "total_s": watch.elapsed()},
            "peak_memory_mb": peak_memory_mb(),
            "table": table,
        }
        write_json(work / "results.json", record)
        (work / "results.md").write_text(_report(record), encoding="utf-8")
    return record


def _report(record: dict[str, Any]) -> str:
    cfg = record["config"]
    lines = [
        "# unbackdoor demo",
        "",
        f"Data `{cfg['data']}`, attack `{cfg['attack']}` {cfg['attack_params']}, "
        f"{record['n_poisoned']} of {record['n_train']} training rows poisoned; "
        f"defence `{cfg['method']}` with {record['n_clean_set']} clean rows.",
        "",
        *[f"- {n}" for n in record["notes"]],
        "",
        record["table"],
        f"Total wall time {record['timings']['total_s']:.0f} s, peak memory {record['peak_memory_mb']:.0f} MB.",
    ]
    return "\n".join(lines) + "\n"
