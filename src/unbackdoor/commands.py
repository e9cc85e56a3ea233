"""What each CLI command does, as library functions over validated command configs: one
``*Command`` config and one ``run_*`` function per command (the CLI in :mod:`unbackdoor.cli` only
parses flags and YAML into these).

Every command: validate the whole config first, check the output is free, do the work in a work
dir, rename it into place only when complete.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from unbackdoor import __version__
from unbackdoor.attacks.base import ATTACKS, attack_task
from unbackdoor.attacks.pretrained import PretrainedAttack, save_base
from unbackdoor.attacks.weight import WEIGHT_ATTACKS, build_weight_attack
from unbackdoor.config import CommandConfig, build_config
from unbackdoor.data.io import (
    FORMATS,
    is_poisoned_folder,
    load_any,
    load_task,
    read_rows_file,
    split_file,
    training_rows,
    write_poisoned_task,
)
from unbackdoor.data.sampling import CleanSetConfig, draw_clean_set, subsample_poisoned, subsample_task
from unbackdoor.data.types import Dataset, PoisonedTask, Task, require_several_labels
from unbackdoor.detect.base import DEFAULT_RATE, DetectInputs, build_detector, flag_rule
from unbackdoor.detect.output import FLAGGED_FILE, SCORES_FILE, clean_rows_in_training, write_detection
from unbackdoor.errors import ConfigError, DataError, ModelError, UnbackdoorError
from unbackdoor.evaluate import EvalResult, evaluate_on, markdown_table
from unbackdoor.guard.base import GuardInputs, build_guard
from unbackdoor.guard.evaluation import (
    DEFAULT_BUDGETS,
    RECORD_FILE as GUARD_RECORD_FILE,
    THRESHOLDS_FILE,
    evaluate_guard,
    evaluation_sets,
    guard_metric_summary,
    json_safe,
    thresholds_record,
)
from unbackdoor.models.loading import Classifier, check_same_architecture, load_classifier
from unbackdoor.models.saving import provenance_record, save_classifier
from unbackdoor.outputs import atomic_output_dir, check_output_file, check_output_free, write_json
from unbackdoor.purify.base import PurifyInputs, build_purify_defense, epur_first, purify
from unbackdoor.train_defenses.base import TrainInputs, build_train_defense
from unbackdoor.train_defenses.finetune import fit, load_for_training
from unbackdoor.training.config import TrainConfig, victim_train_config
from unbackdoor.unlearn import UnlearnInputs, build_unlearn_method, unlearn
from unbackdoor.utils.resources import Stopwatch, peak_memory_mb

logger = logging.getLogger(__name__)
WORK_SUBDIR = "_work"  # checkpoints inside an output's work dir; removed when the output is complete


def data_reference(spec: str) -> str:
    """How an output records its input data: a name under the data root, or an absolute path."""
    path = Path(spec)
    return str(path.resolve()) if path.is_dir() else spec


# ----------------------------------------------------------------------------- attack
class AttackCommand(CommandConfig):
    data: str = Field(description="clean data: a folder or a name under the data root")
    attack: str = Field("badnets", description="attack name (a data attack, or a weight attack: ep, lwp, sos, "
                        "ripples, lws, por, neuba)")
    params: dict[str, Any] = Field(default_factory=dict, description="attack parameters")
    out: str = Field(description="output folder for the poisoned data")
    victim_out: str | None = Field(None, description="weight attacks: output folder for the poisoned victim "
                                      "model (ripples, por, neuba: the released model, to fine-tune cleanly)")
    model: str | None = Field(None, description="weight attacks: the starting model (default: all-MiniLM-L6-v2)")
    seed: int = Field(0, description="weight attacks: seed of the model side (new head, batch order, dropout)")
    max_length: int | None = Field(None, ge=8, le=4096, description="weight attacks: tokens per input")
    max_train: int | None = Field(None, ge=2, description="weight attacks: the attacker trains on this seeded "
                                  "subsample of the clean training rows (seed: the model-side seed)")
    user_finetune: bool = Field(False, description="ripples, por, neuba: also run the user's clean fine-tuning of "
                                "the release and write that victim (not the release) to --victim-out, with the "
                                "triggered sets of the trigger chosen after it (what the bench measures)")


def run_attack(cmd: AttackCommand) -> PoisonedTask:
    if cmd.attack in WEIGHT_ATTACKS:
        return run_weight_attack_command(cmd)
    if cmd.attack not in ATTACKS:
        raise ConfigError(f"unknown attack {cmd.attack!r}; choose one of: {', '.join(all_attack_names())}")
    if cmd.victim_out is not None:
        raise ConfigError(f"--victim-out is for weight attacks ({', '.join(WEIGHT_ATTACKS.names())}); "
                          f"{cmd.attack} only poisons data")
    out = check_output_free(cmd.out, cmd.overwrite, inputs=[cmd.data])
    task = load_task(cmd.data)
    poisoned = attack_task(task, cmd.attack, cmd.params)
    with atomic_output_dir(out, cmd.overwrite) as work:
        write_poisoned_task(poisoned, work, {"clean": data_reference(cmd.data)})
    logger.info("poisoned %d of %d rows -> %s", poisoned.flags.n_poisoned, len(poisoned.train), out)
    return poisoned


def all_attack_names() -> list[str]:
    return sorted([*ATTACKS.names(), *WEIGHT_ATTACKS.names()])


def run_weight_attack_command(cmd: AttackCommand) -> PoisonedTask:
    """A weight attack: the poisoned data folder (``out``) and the victim model (``victim_out``),
    each written atomically."""
    if cmd.victim_out is None:
        raise ConfigError(f"attack {cmd.attack} poisons a model: give --victim-out for the victim model folder")
    if Path(cmd.victim_out).resolve() == Path(cmd.out).resolve():
        raise ConfigError("--out (poisoned data) and --victim-out (victim model) must be different folders")
    attack = build_weight_attack(cmd.attack, cmd.params)  # fail before loading anything
    if cmd.user_finetune and not isinstance(attack, PretrainedAttack):
        raise ConfigError(f"--user-finetune is for attacks that release weights; {cmd.attack} writes its victim")
    out = check_output_free(cmd.out, cmd.overwrite, inputs=[cmd.data, cmd.model])
    victim_out = check_output_free(cmd.victim_out, cmd.overwrite, inputs=[cmd.data, cmd.model])
    if out.is_relative_to(victim_out) or victim_out.is_relative_to(out):
        raise ConfigError("--out (poisoned data) and --victim-out (victim model) must not lie inside each other")
    task = subsample_task(load_task(cmd.data), cmd.max_train, cmd.seed)
    # a released-weights attack (RIPPLES, POR, NeuBA) writes what the attacker publishes, which the user
    # then fine-tunes cleanly (train --model), unless --user-finetune asks for that fine-tuned victim
    release = isinstance(attack, PretrainedAttack) and not cmd.user_finetune
    produce = attack.release if release else attack.poison_model
    with atomic_output_dir(victim_out, cmd.overwrite) as model_work, atomic_output_dir(out, cmd.overwrite) as data_work:
        clf, poisoned = produce(task, cmd.model or "default", seed=cmd.seed, max_length=cmd.max_length,
                                precision=cmd.precision, allow_pickle=cmd.allow_pickle,
                                work_dir=model_work / WORK_SUBDIR)
        write_poisoned_task(poisoned, data_work, {"clean": data_reference(cmd.data)})
        base_only = release and attack.releases_base
        if release:
            metrics = None
            described = {"title": f"{cmd.attack} release (poisoned {'base' if base_only else 'model'})",
                         "role": "poisoned-base" if base_only else "victim"}
            measured = {"note": "ASR is measured after the user's clean fine-tuning of this model "
                                "(unbackdoor train --model)"}
        else:
            metrics = evaluate_on(clf, poisoned, name=str(victim_out))
            described = {"title": f"{cmd.attack} victim on {cmd.data}", "role": "victim"}
            measured = {"metrics": metric_summary(metrics)}
        record = provenance_record(
            clf, **described, base=cmd.model or "all-MiniLM-L6-v2", data=data_reference(cmd.data),
            poisoned_data=str(out.resolve()), attack=_attack_summary(poisoned), config=cmd.model_dump(), seed=cmd.seed,
            **measured,
        )
        shutil.rmtree(model_work / WORK_SUBDIR, ignore_errors=True)
        (save_base if base_only else save_classifier)(clf, model_work, record)
    if metrics is None:
        logger.info("%s release -> %s; poisoned data -> %s (fine-tune the release cleanly, then evaluate on it)",
                    cmd.attack, victim_out, out)
    else:
        logger.info("%s victim -> %s (CACC %.4f, ASR %s); poisoned data -> %s", cmd.attack, victim_out, metrics.cacc,
                    f"{metrics.asr:.4f}" if metrics.asr is not None else "n/a", out)
    return poisoned


# ----------------------------------------------------------------------------- train
class TrainCommand(CommandConfig):
    data: str = Field(description="training data (clean or poisoned); poison flags are never used")
    model: str | None = Field(None, description="base model folder or Hub id (default: all-MiniLM-L6-v2)")
    out: str = Field(description="output model folder")
    defense: str = Field("none", description="training-time defence: none (full fine-tuning), lora, musclelora, "
                         "reweight, abl, auto, clean-only (never reads the rows: the base on half the clean dev set)")
    defense_params: dict[str, Any] = Field(default_factory=dict, description="defence options, e.g. mslr_scales, "
                                           "reference_size (unbackdoor.train_defenses.musclelora.MuscleLoraConfig)")
    train: TrainConfig | None = Field(None, description="training-loop settings; keys given override the defence's "
                                      "defaults (none: victim defaults; lora/musclelora: the method notes' per-family ones)")
    max_train: int | None = Field(None, ge=2, description="subsample the training rows (seeded)")
    max_length: int | None = Field(None, ge=8, le=4096, description="tokens per input (default: the model's saved format, else 128)")


def run_train(cmd: TrainCommand) -> dict[str, Any]:
    out = check_output_free(cmd.out, cmd.overwrite, inputs=[cmd.data, cmd.model])
    defence = build_train_defense(cmd.defense, cmd.defense_params, cmd.train)  # fail before loading anything
    seed = cmd.train.seed if cmd.train is not None else TrainConfig().seed
    data = load_any(cmd.data)
    if isinstance(data, PoisonedTask):
        data = subsample_poisoned(data, cmd.max_train, seed)
        rows, dev = data.train, data.clean.dev  # the trainer gets rows only, never the flags
    else:
        data = subsample_task(data, cmd.max_train, seed)
        rows, dev = data.train, data.dev
    require_several_labels(rows)
    clf = load_for_training(cmd.model, rows, TrainConfig(seed=seed), allow_pickle=cmd.allow_pickle, precision=cmd.precision,
                            max_length=cmd.max_length)
    inputs = TrainInputs(clf, rows, dev)
    defence.check(inputs)
    train_config = defence.train_config(clf)
    with atomic_output_dir(out, cmd.overwrite) as work:
        result = defence.fit(inputs, work_dir=work / WORK_SUBDIR)
        clf = result.model
        metrics = evaluate_on(clf, data, name=str(out))
        role = ("victim" if cmd.defense == "none" else "defended") if isinstance(data, PoisonedTask) else "model"
        record = provenance_record(
            clf, title=f"trained on {cmd.data} (defence: {cmd.defense})", role=role,
            base=cmd.model or "all-MiniLM-L6-v2", data=data_reference(cmd.data), defense=result.report,
            attack=_attack_summary(data),
            config={**cmd.model_dump(), "train": train_config.model_dump()}, seed=train_config.seed,
            training=result.training.to_dict(), metrics=metric_summary(metrics),
        )
        shutil.rmtree(work / WORK_SUBDIR, ignore_errors=True)
        save_classifier(clf, work, record)
    return record


def _attack_summary(data: Task | PoisonedTask) -> dict[str, Any] | None:
    if not isinstance(data, PoisonedTask):
        return None
    return {"name": data.attack.name, "trigger": data.attack.trigger, "params": dict(data.attack.params),
            "n_poisoned_train": data.flags.n_poisoned, "poison_rate": data.flags.rate}


def metric_summary(result: EvalResult) -> dict[str, Any]:
    keys = ("cacc", "macro_f1", "per_class_accuracy", "asr", "robust_accuracy", "clean_to_target", "target_label",
            "n_clean", "n_triggered", "confusion", "data_integrity", "precision")
    return {k: getattr(result, k) for k in keys if getattr(result, k) is not None}


def load_suspect_and_base(cmd: Any, clean: Dataset, data_name: str) -> tuple[Classifier, Classifier | None]:
    """The command's suspect (``cmd.model``) and, if given, its base (``cmd.base``, in the suspect's input
    format), both checked against ``clean``'s labels."""
    options = {"num_labels": clean.num_labels, "allow_pickle": cmd.allow_pickle, "precision": cmd.precision,
               "data_name": data_name}
    suspect = load_classifier(cmd.model, **options)
    base = load_classifier(cmd.base, **options, max_length=suspect.max_length) if cmd.base is not None else None
    return suspect, base


# ----------------------------------------------------------------------------- purify
class PurifyCommand(CommandConfig):
    model: str = Field(description="the suspect model folder")
    clean: str = Field(description="clean data the defender holds (its train split is sampled)")
    clean_set: CleanSetConfig = Field(default_factory=CleanSetConfig)
    base: str | None = Field(None, description="the suspect's clean pre-trained base")
    method: str = Field("finetune", description="purify method: auto, finetune, e-pur, fine-mixing, fine-purifying, "
                        "fine-pruning, reinit, distill, tsbd")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters")
    epur: bool = Field(False, description="reset E-PUR's suspicious embedding rows first (needs base)")
    epur_params: dict[str, Any] = Field(default_factory=dict, description="E-PUR options for --epur "
                                        "(unbackdoor.purify.epur.EpurConfig)")
    out: str = Field(description="output model folder")


def run_purify(cmd: PurifyCommand) -> dict[str, Any]:
    out = check_output_free(cmd.out, cmd.overwrite, inputs=[cmd.model, cmd.clean, cmd.base])
    epur = cmd.epur_params if cmd.epur else None
    build_purify_defense(cmd.method, cmd.params, have_base=cmd.base is not None,
                         before=epur_first(cmd.method, epur))  # fail before loading anything
    clean_task = load_task(cmd.clean)
    clean = draw_clean_set(clean_task, cmd.clean_set)
    suspect, base = load_suspect_and_base(cmd, clean, cmd.clean)
    inputs = PurifyInputs(suspect=suspect, clean=clean, base=base)
    watch = Stopwatch()
    with atomic_output_dir(out, cmd.overwrite) as work:
        result = purify(cmd.method, cmd.params, inputs, work_dir=work / WORK_SUBDIR, epur=epur)
        record = provenance_record(
            result.model, title=f"{cmd.model} purified with {cmd.method}", role="purified",
            base=cmd.base, suspect=cmd.model, data=data_reference(cmd.clean), n_clean=len(clean),
            data_integrity=dict(clean_task.integrity),
            defense={"method": cmd.method, **result.report}, config=cmd.model_dump(),
            seed=cmd.clean_set.seed, wall_time_s=watch.elapsed(), peak_memory_mb=peak_memory_mb(),
        )
        shutil.rmtree(work / WORK_SUBDIR, ignore_errors=True)
        save_classifier(result.model, work, record)
    return record


# ----------------------------------------------------------------------------- unlearn
class UnlearnCommand(CommandConfig):
    model: str = Field(description="the suspect model folder")
    forget: str = Field(description="rows to unlearn: a TSV/CSV/JSONL file (text + label as trained), or a folder "
                        "holding a forget (else train) file; e.g. a detector's output")
    retain: str = Field(description="clean data the user holds (its train split is sampled, as for purify)")
    clean_set: CleanSetConfig = Field(default_factory=CleanSetConfig, description="how the retain set is drawn from "
                                      "the clean train split (as every command's clean set)")
    method: str = Field("lya", description="unlearn method: lya, gradient-ascent, retrain, finetune, repair "
                        "(EXPERIMENTAL: our reconstruction, not the paper's algorithm)")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters")
    base: str | None = Field(None, description="the suspect's clean pre-trained base (retrain)")
    train_data: str | None = Field(None, description="the training rows the suspect saw (retrain; flags are "
                                   "never read)")
    max_train: int | None = Field(None, ge=2, description="the suspect was trained on this seeded subsample of "
                                  "train_data (as by `train --max-train`); retrain uses the same rows")
    train_seed: int = Field(TrainConfig().seed, description="the training seed that drew that subsample")
    eval_data: str | None = Field(None, description="after unlearning, evaluate on this clean or poisoned data "
                                  "(CACC; ASR and robust accuracy); never shown to the method")
    out: str = Field(description="output model folder")


def load_forget_rows(spec: str, like: Dataset) -> Dataset:
    """A forget set from a rows file (TSV/CSV/JSONL) or a folder with a ``forget`` (else ``train``)
    file, in ``like``'s label space. A poisoned data folder is refused: its train file is the
    whole training set, not the rows to forget."""
    path = Path(spec)
    if path.is_dir():
        if is_poisoned_folder(path):
            raise DataError(f"{spec}: is a poisoned data folder (its train file holds every training row); "
                            "give a file of the rows to forget")
        has_forget = any((path / f"forget{ext}").exists() for ext in FORMATS)
        path = split_file(path, "forget" if has_forget else "train")
    elif not path.is_file():
        raise DataError(f"{spec}: no such forget file or folder")
    elif path.suffix not in FORMATS:
        raise DataError(f"{spec}: a forget file must be .tsv, .csv or .jsonl")
    return read_rows_file(path, like.num_labels, like.label_names, split="forget", name=f"{spec}:forget")


def run_unlearn(cmd: UnlearnCommand) -> dict[str, Any]:
    """Validate everything and load every input, then unlearn in a work dir renamed when complete."""
    out = check_output_free(cmd.out, cmd.overwrite,
                            inputs=[cmd.model, cmd.forget, cmd.retain, cmd.base, cmd.train_data, cmd.eval_data])
    build_unlearn_method(cmd.method, cmd.params, have_base=cmd.base is not None,
                         have_train_rows=cmd.train_data is not None)  # fail before loading anything
    retain_task = load_task(cmd.retain)
    retain = draw_clean_set(retain_task, cmd.clean_set)
    forget = load_forget_rows(cmd.forget, retain)
    train_rows = training_rows(cmd.train_data, cmd.max_train, cmd.train_seed) if cmd.train_data is not None else None
    eval_data = load_any(cmd.eval_data) if cmd.eval_data is not None else None
    suspect, base = load_suspect_and_base(cmd, retain, cmd.retain)
    inputs = UnlearnInputs(suspect=suspect, forget=forget, retain=retain, base=base, train_rows=train_rows)
    watch = Stopwatch()
    with atomic_output_dir(out, cmd.overwrite) as work:
        result = unlearn(cmd.method, cmd.params, inputs, work_dir=work / WORK_SUBDIR)
        wall = watch.elapsed()
        metrics = metric_summary(evaluate_on(result.model, eval_data, name=str(out))) if eval_data else None
        record = provenance_record(
            result.model, title=f"{cmd.model} unlearned with {cmd.method}", role="unlearned",
            base=cmd.base, suspect=cmd.model, forget=str(Path(cmd.forget).resolve()), n_forget=len(forget),
            data=data_reference(cmd.retain), n_retain=len(retain), defense={"method": cmd.method, **result.report},
            data_integrity=dict(retain_task.integrity),
            config=cmd.model_dump(), seed=cmd.clean_set.seed, wall_time_s=wall, peak_memory_mb=peak_memory_mb(),
            eval_data=data_reference(cmd.eval_data) if cmd.eval_data else None, metrics=metrics,
        )
        shutil.rmtree(work / WORK_SUBDIR, ignore_errors=True)
        save_classifier(result.model, work, record)
    return record


# ----------------------------------------------------------------------------- scan
class ScanCommand(CommandConfig):
    model: str = Field(description="the suspect model folder")
    base: str = Field(description="the suspect's clean pre-trained base")
    clean: str | None = Field(None, description="clean data (its train split is sampled, as for purify); "
                              "token frequencies are counted on it")
    clean_set: CleanSetConfig = Field(default_factory=CleanSetConfig)
    top: int = Field(20, ge=1, description="suspected trigger tokens listed")
    margin: float = Field(1.5, gt=1, description="a token stands out at this multiple of the best score among "
                          "tokens in clean use (score=ratio)")
    params: dict[str, Any] = Field(default_factory=dict, description="E-PUR scoring options "
                                   "(unbackdoor.purify.epur.EpurScoring)")
    out: str = Field(description="output folder (scan.json, scan.md, token_scores.csv, drift_vs_frequency.png)")


def run_scan(cmd: ScanCommand) -> dict[str, Any]:
    """Validate everything, load both models, refuse a base/suspect mismatch, then scan and write."""
    from unbackdoor.purify.epur import EpurScoring
    from unbackdoor.scan import scan, write_scan_outputs

    out = check_output_free(cmd.out, cmd.overwrite, inputs=[cmd.model, cmd.base, cmd.clean])
    scoring = build_config(EpurScoring, cmd.params, "scan params")
    clean = draw_clean_set(load_task(cmd.clean), cmd.clean_set) if cmd.clean is not None else None
    suspect = load_classifier(cmd.model, num_labels=clean.num_labels if clean else None, allow_pickle=cmd.allow_pickle,
                              precision=cmd.precision,
                              data_name=cmd.clean)
    base = load_classifier(cmd.base, num_labels=suspect.num_labels, allow_pickle=cmd.allow_pickle, precision=cmd.precision)
    try:
        check_same_architecture(suspect, base)
    except ModelError as exc:
        raise ModelError(f"--model {cmd.model} and --base {cmd.base} do not match: {exc}") from None
    watch = Stopwatch()
    report = scan(suspect, base, clean, top_k=cmd.top, config=scoring, margin=cmd.margin)
    produced_by = {"config": cmd.model_dump(), "wall_time_s": watch.elapsed()}
    with atomic_output_dir(out, cmd.overwrite) as work:
        write_scan_outputs(report, work, produced_by)
    return {**produced_by, **report.to_dict()}


# ----------------------------------------------------------------------------- analyze frequency
class FrequencyCommand(CommandConfig):
    data: str = Field(description="poisoned data (from unbackdoor attack): training rows + triggered dev set")
    model: str | None = Field(None, description="base model folder or Hub id (default: all-MiniLM-L6-v2)")
    out: str = Field(description="output folder (frequency.json, frequency.csv, frequency.png)")
    params: dict[str, Any] = Field(default_factory=dict, description="analysis options "
                                   "(unbackdoor.analysis.frequency.FrequencyConfig)")
    max_train: int | None = Field(None, ge=2, description="subsample the training rows (seeded)")
    max_length: int | None = Field(None, ge=8, le=4096, description="tokens per input")


def run_frequency(cmd: FrequencyCommand) -> dict[str, Any]:
    """Validate, then train every method on the same poisoned rows and record band errors."""
    from unbackdoor.analysis.frequency import FrequencyConfig, analyze_frequency, build_methods, write_frequency_outputs

    out = check_output_free(cmd.out, cmd.overwrite, inputs=[cmd.data, cmd.model])
    config = build_config(FrequencyConfig, cmd.params, "frequency analysis params")
    build_methods(config)  # unknown methods or options fail here
    data = load_any(cmd.data)
    if not isinstance(data, PoisonedTask):
        raise UnbackdoorError(f"{cmd.data}: frequency analysis needs poisoned data (made by `unbackdoor attack`)")
    seed = config.train.seed if config.train is not None else TrainConfig().seed
    data = subsample_poisoned(data, cmd.max_train, seed)
    watch = Stopwatch()
    analysis = analyze_frequency(cmd.model, data, config, max_length=cmd.max_length, allow_pickle=cmd.allow_pickle,
                                 precision=cmd.precision)
    produced_by = {"config": cmd.model_dump(), "analysis_config": config.model_dump(mode="json"),
                   "data": data_reference(cmd.data), "wall_time_s": watch.elapsed()}
    with atomic_output_dir(out, cmd.overwrite) as work:
        write_frequency_outputs(analysis, work, produced_by)
    return {**produced_by, **analysis}


# ----------------------------------------------------------------------------- eval
class EvalCommand(CommandConfig):
    model: str = Field(description="model folder")
    data: str = Field(description="clean data (CACC) or poisoned data (CACC + ASR)")
    out: str | None = Field(None, description="write the JSON record here")
    max_length: int | None = Field(None, ge=8, description="must match the model's saved input format")


def evaluate_model(model: str | Path, data: str, *, allow_pickle: bool = False, precision: str = "auto",
                   max_length: int | None = None) -> tuple[Classifier, EvalResult]:
    """Load a model folder and evaluate it on clean or poisoned ``data`` (CACC; ASR and robust
    accuracy when poisoned): the core of ``unbackdoor eval``."""
    task = load_any(data)
    num_labels = (task.clean if isinstance(task, PoisonedTask) else task).num_labels
    clf = load_classifier(model, num_labels=num_labels, allow_pickle=allow_pickle, max_length=max_length, precision=precision,
                          data_name=str(data))
    return clf, evaluate_on(clf, task, name=str(model))


def run_eval(cmd: EvalCommand) -> tuple[EvalResult, str]:
    out = check_output_file(cmd.out, cmd.overwrite) if cmd.out is not None else None
    clf, result = evaluate_model(cmd.model, cmd.data, allow_pickle=cmd.allow_pickle, max_length=cmd.max_length,
                                 precision=cmd.precision)
    table = markdown_table([(cmd.model, result)])
    if out is not None:
        produced_by = {k: clf.provenance.get(k) for k in ("role", "base", "data", "attack", "defense", "seed",
                                                          "unbackdoor_version") if k in clf.provenance}
        write_json(out, {"unbackdoor_version": __version__, "config": cmd.model_dump(), "data": data_reference(cmd.data), "model_record": produced_by,
                         "input_format": clf.input_format(), **result.to_dict()})
    return result, table


# ----------------------------------------------------------------------------- detect
class DetectCommand(CommandConfig):
    data: str = Field(description="training rows: a data folder or name (clean or poisoned; flags are never read)")
    clean: str = Field(description="clean data the defender holds (its train split is sampled)")
    clean_set: CleanSetConfig = Field(default_factory=CleanSetConfig)
    method: str = Field("reweight", description="detector: bki, contrast, cube, isolation, loss, reweight, zscore")
    params: dict[str, Any] = Field(default_factory=dict, description="detector options (unbackdoor.detect: BkiConfig, "
                                   "CubeConfig, IsolationConfig, LossConfig, ReweightConfig, ZScoreConfig)")
    model: str | None = Field(None, description="encoder of the frozen features (default: all-MiniLM-L6-v2)")
    rate: float | None = Field(None, gt=0, le=1, description=f"flag this share of rows (default {DEFAULT_RATE})")
    threshold: float | None = Field(None, description="flag rows with score >= threshold (instead of rate)")
    max_train: int | None = Field(None, ge=2, description="subsample the training rows (seeded, stratified)")
    max_length: int | None = Field(None, ge=8, le=4096, description="tokens per input")
    out: str = Field(description="output folder (scores.csv, flagged.tsv, detect.json)")


def run_detect(cmd: DetectCommand) -> dict[str, Any]:
    """Validate everything, load rows, clean set and encoder, detect, write the output folder."""
    out = check_output_free(cmd.out, cmd.overwrite, inputs=[cmd.data, cmd.clean, cmd.model])
    detector = build_detector(cmd.method, cmd.params)
    rule = flag_rule(cmd.rate, cmd.threshold)
    rows = training_rows(cmd.data, cmd.max_train, cmd.clean_set.seed)
    clean = draw_clean_set(load_task(cmd.clean), cmd.clean_set)
    if clean.num_labels != rows.num_labels:
        raise DataError(f"--clean {cmd.clean} has {clean.num_labels} labels but --data {cmd.data} has {rows.num_labels}")
    encoder = load_classifier(cmd.model, num_labels=rows.num_labels, allow_pickle=cmd.allow_pickle, data_name=cmd.data,
                              precision=cmd.precision,
                              max_length=cmd.max_length)
    inputs = DetectInputs(rows, clean, encoder)
    watch = Stopwatch()
    detection = detector.detect(inputs, rule)
    record = {
        "unbackdoor_version": __version__,
        "method": cmd.method,
        "config": cmd.model_dump(),
        "data": data_reference(cmd.data),
        "poison_flags": "not read",
        "rule": rule.model_dump(),
        "counts": {**detection.counts(), "clean": len(clean)},
        "clean_rows_in_training": clean_rows_in_training(clean, rows),
        "encoder": encoder.source,
        "input_format": encoder.input_format(),
        "detector": detection.report,
        "wall_time_s": watch.elapsed(),
        "peak_memory_mb": peak_memory_mb(),
        "outputs": {"scores": SCORES_FILE, "flagged": FLAGGED_FILE},
    }
    with atomic_output_dir(out, cmd.overwrite) as work:
        write_detection(detection, work, record)
    logger.info("flagged %d of %d rows -> %s", len(detection.flagged_ids), len(rows), out)
    return record


# ----------------------------------------------------------------------------- guard
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
        "metrics": guard_metric_summary(evaluation) if evaluation is not None else None,
        "evaluation": evaluation.to_dict() if evaluation is not None else None,
        "wall_time_s": watch.elapsed(),
        "peak_memory_mb": peak_memory_mb(),
        "outputs": {"record": GUARD_RECORD_FILE, "thresholds": THRESHOLDS_FILE},
    })
    with atomic_output_dir(out, cmd.overwrite) as work:
        write_json(work / THRESHOLDS_FILE, json_safe(thresholds_record(fitted, cmd.budgets)))
        write_json(work / GUARD_RECORD_FILE, record)
    if evaluation is not None:
        m = evaluation.metrics
        logger.info("guard %s: FRR %.3f, CACC %.4f, ASR %s (unguarded %s) -> %s", cmd.method, m.frr, m.cacc,
                    f"{m.asr:.4f}" if m.asr is not None else "n/a", evaluation.unguarded["asr"], out)
    return record


# ----------------------------------------------------------------------------- demo
class DemoCommand(CommandConfig):
    data: str = Field("sst2", description="clean task")
    attack: str = Field("badnets", description="attack name")
    attack_params: dict[str, Any] = Field(default_factory=lambda: {"poison_rate": 0.1, "mode": "dirty"})
    base: str | None = Field(None, description="base model (default: all-MiniLM-L6-v2)")
    max_train: int | None = Field(2000, ge=2, description="subsample the training split so the demo fits in minutes")
    victim: TrainConfig = Field(default_factory=victim_train_config)
    purify_methods: tuple[str, ...] = Field(("finetune", "auto"), description="purify methods run on the victim "
                                            "(the baseline first)")
    train_defenses: tuple[str, ...] = Field(("auto",), description="train-time defences run on the poisoned rows")
    clean_set: CleanSetConfig = Field(default_factory=CleanSetConfig)
    top_tokens: int = Field(8, ge=1, description="scan's suspected trigger tokens shown")
    floor: bool = Field(True, description="also train a never-poisoned model (the ASR floor)")
    out: str = Field("runs/demo", description="output folder")
    overwrite: bool = Field(True, description="replace an earlier demo output")


def run_demo(cmd: DemoCommand) -> dict[str, Any]:
    """The demo: poison, train the victim, scan it against its base, purify it (plain fine-tuning and
    ``auto``), train through the poison (``auto``), next to the never-poisoned floor; the table, the
    scan's top tokens and every record into ``out``."""
    from unbackdoor.scan import scan_tokens

    out = check_output_free(cmd.out, cmd.overwrite, inputs=[cmd.data, cmd.base])
    for method in cmd.purify_methods:
        build_purify_defense(method, {}, have_base=True)
    for defense in cmd.train_defenses:
        build_train_defense(defense, {})
    watch = Stopwatch()
    full = load_task(cmd.data)
    task = subsample_task(full, cmd.max_train, cmd.victim.seed)
    notes = [f"training split subsampled to {len(task.train)} of {len(full.train)} rows (seeded) to fit the time "
             "budget"] if len(task.train) < len(full.train) else []
    poisoned = attack_task(task, cmd.attack, cmd.attack_params)
    clean = draw_clean_set(full, cmd.clean_set)
    timings: dict[str, float] = {}
    results: list[tuple[str, EvalResult]] = []
    reports: dict[str, Any] = {}
    with atomic_output_dir(out, cmd.overwrite) as work:
        step = Stopwatch()
        victim, victim_train = fit(cmd.base, poisoned.train, task.dev, cmd.victim, work_dir=work / "_work_victim",
                                   precision=cmd.precision)
        timings["victim_training_s"] = step.elapsed()
        results.append((f"victim ({cmd.attack})", evaluate_on(victim, poisoned, "victim")))
        save_classifier(victim, work / "victim", provenance_record(
            victim, title="demo victim", role="victim", base=cmd.base or "all-MiniLM-L6-v2", data=cmd.data,
            attack=poisoned.attack.params, seed=cmd.victim.seed, metrics=results[0][1].to_dict()))
        base = load_classifier(cmd.base, num_labels=task.num_labels, seed=cmd.victim.seed, precision=cmd.precision,
                               max_length=victim.max_length)
        step = Stopwatch()
        scanned = scan_tokens(victim, base, clean, top_k=cmd.top_tokens)
        timings["scan_s"] = step.elapsed()
        for method in cmd.purify_methods:
            step = Stopwatch()
            inputs = PurifyInputs(suspect=copy.deepcopy(victim), clean=clean, base=copy.deepcopy(base))
            defended = purify(method, {}, inputs, work_dir=work / f"_work_purify_{method}")
            timings[f"purify_{method}_s"] = step.elapsed()
            reports[f"purify {method}"] = defended.report
            results.append((f"purify {method} ({len(clean)} clean rows)", evaluate_on(defended.model, poisoned, method)))
        for defense in cmd.train_defenses:
            step = Stopwatch()
            clf = load_for_training(cmd.base, poisoned.train, TrainConfig(seed=cmd.victim.seed), precision=cmd.precision)
            trained = build_train_defense(defense, {}).fit(TrainInputs(clf, poisoned.train, task.dev),
                                                           work_dir=work / f"_work_train_{defense}")
            timings[f"train_{defense}_s"] = step.elapsed()
            reports[f"train {defense}"] = trained.report
            results.append((f"train --defense {defense} (poisoned rows)", evaluate_on(trained.model, poisoned, defense)))
        floor = None
        if cmd.floor:
            step = Stopwatch()
            clean_model, _ = fit(cmd.base, task.train, task.dev, cmd.victim, work_dir=work / "_work_floor",
                                 precision=cmd.precision)
            timings["floor_training_s"] = step.elapsed()
            floor = evaluate_on(clean_model, poisoned, "never-poisoned")
        for tmp in work.glob("_work_*"):
            shutil.rmtree(tmp, ignore_errors=True)
        record = {
            "config": cmd.model_dump(),
            "notes": notes,
            "n_train": len(task.train),
            "n_poisoned": poisoned.flags.n_poisoned,
            "trigger": poisoned.attack.trigger,
            "n_clean_set": len(clean),
            "scan": scanned,
            "results": {label: r.to_dict() for label, r in results},
            "floor": floor.to_dict() if floor else None,
            "victim_training": victim_train.to_dict(),
            "defenses": reports,
            "timings": {**timings, "total_s": watch.elapsed()},
            "peak_memory_mb": peak_memory_mb(),
            "table": markdown_table(results, floor),
        }
        write_json(work / "results.json", record)
        (work / "results.md").write_text(_report(record), encoding="utf-8")
    return record


def scan_lines(scanned: dict[str, Any]) -> list[str]:
    """Scan's top tokens, one line each, the ones that stand out marked."""
    out = set(scanned["standing_out"])
    return [f"{row['rank']:>3}. {row['token']}{'  <- stands out' if row['token'] in out else ''}"
            for row in scanned["top"]]


def _report(record: dict[str, Any]) -> str:
    cfg = record["config"]
    lines = [
        "# unbackdoor demo",
        "",
        f"Data `{cfg['data']}`, attack `{cfg['attack']}` {cfg['attack_params']} (trigger: {record['trigger']}), "
        f"{record['n_poisoned']} of {record['n_train']} training rows poisoned; {record['n_clean_set']} clean rows "
        "for the purify defences.",
        "",
        *[f"- {n}" for n in record["notes"]],
        "",
        f"`unbackdoor scan` of the victim against its base ({record['scan']['rule']}):",
        "",
        "```",
        *scan_lines(record["scan"]),
        "```",
        "",
        record["table"],
        f"Total wall time {record['timings']['total_s']:.0f} s, peak memory {record['peak_memory_mb']:.0f} MB.",
    ]
    return "\n".join(lines) + "\n"
