"""The ``unbackdoor`` command: parses flags and YAML, validates strictly, calls the library.

Every bad input ends in one line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

from unbackdoor import __version__
from unbackdoor.config import DuplicateKeyError, build_config, parse_yaml, read_yaml
from unbackdoor.errors import ConfigError, UnbackdoorError

app = typer.Typer(
    name="unbackdoor",
    help="Attack, defend and evaluate backdoored language classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
logger = logging.getLogger("unbackdoor")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file with this command's keys (flags override it)")]
OverwriteOpt = Annotated[Optional[bool], typer.Option("--overwrite", help="replace an existing output")]
PickleOpt = Annotated[Optional[bool], typer.Option("--allow-pickle", help="allow pickle (.bin) weights: only for files you trust")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="learning rate of the method's training (sets "
                                                     "-p train.learning_rate)")]
EpochsOpt = Annotated[Optional[int], typer.Option(help="epochs of the method's training (sets -p train.epochs)")]
PrecisionOpt = Annotated[Optional[str], typer.Option(help="compute precision: auto (default: bf16 where the processor "
                                                         "runs it natively, else fp32), bf16, fp32")]
ParamOpt = Annotated[Optional[list[str]], typer.Option("--param", "-p", help="method parameter KEY=VALUE (VALUE is YAML); repeatable")]
# the defender's clean set (purify, scan, detect; unlearn's retain set), drawn from a clean train split
FractionOpt = Annotated[Optional[float], typer.Option(help="share of the clean train split to use (default 0.01)")]
SizeOpt = Annotated[Optional[int], typer.Option(help="rows of clean data to use (instead of a fraction)")]
PerClassOpt = Annotated[Optional[int], typer.Option(help="rows per label (instead of a fraction)")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"unbackdoor {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="more log output (-vv: debug)")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="warnings and errors only")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="print the version")] = None,
) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ----------------------------------------------------------------------------- config merging
def _parse_params(items: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
        try:
            parsed = parse_yaml(value) if value else ""
        except DuplicateKeyError as exc:
            raise ConfigError(f"--param {key.strip()}: {exc}") from None
        except yaml.YAMLError:
            parsed = value
        _set_nested(params, key.strip().split("."), parsed)
    return params


def _training_params(items: list[str] | None, lr: float | None, epochs: int | None) -> dict[str, Any]:
    """``-p`` parameters with ``--lr``/``--epochs`` as the method's ``train.learning_rate``/``train.epochs``."""
    return _merge(_parse_params(items), _flags(train__learning_rate=lr, train__epochs=epochs))


def _set_nested(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--param {'.'.join(keys)}: {key} is not a mapping")
    target[keys[-1]] = value


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _flags(**values: Any) -> dict[str, Any]:
    """Flags the user gave (None = not given); ``a__b`` keys become nested ``{a: {b: ...}}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None or value == {} or value == []:
            continue
        _set_nested(out, key.split("__"), value)
    return out


def _command_config(cls: type, config: Path | None, flags: dict[str, Any]) -> Any:
    values = read_yaml(config) if config is not None else {}
    return build_config(cls, _merge(values, flags), f"{config}" if config else "options")


# ----------------------------------------------------------------------------- commands
@app.command()
def attack(
    data: Annotated[Optional[str], typer.Option(help="clean data folder or name under the data root (e.g. sst2)")] = None,
    attack: Annotated[Optional[str], typer.Option(
        "--attack", "-a", help="data attacks: badnets, addsent, deadcode (source code), synbkd, stylebkd (published "
        "paraphrase sets, loaded as released: -p source=...); weight attacks (need --victim-out): ep (embedding "
        "poisoning), lwp (layer-wise poisoning)")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="output folder for the poisoned data")] = None,
    victim_out: Annotated[Optional[str], typer.Option(help="weight attacks: output folder for the victim model")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="weight attacks: starting model (default "
                                                 "all-MiniLM-L6-v2; ep fine-tunes a base cleanly first; data-free "
                                                 "ep, -p data=corpus, needs a fine-tuned classifier)")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="weight attacks: tokens per input (default 128)")] = None,
    allow_pickle: PickleOpt = None,
    precision: PrecisionOpt = None,
    poison_rate: Annotated[Optional[float], typer.Option(help="share of training rows poisoned, in (0, 1]")] = None,
    target_label: Annotated[Optional[int], typer.Option(help="label the trigger forces")] = None,
    mode: Annotated[Optional[str], typer.Option(help="dirty | mix | clean (clean-label)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed")] = None,
    param: ParamOpt = None,
    config: ConfigOpt = None,
    overwrite: OverwriteOpt = None,
) -> None:
    """Poison a clean dataset: training set with flags + triggered test set (non-target rows only).
    Weight attacks (ep, lwp) also write the poisoned victim model to --victim-out."""
    from unbackdoor.commands import AttackCommand, run_attack

    params = _merge(_flags(poison_rate=poison_rate, target_label=target_label, mode=mode, seed=seed), _parse_params(param))
    cmd = _command_config(AttackCommand, config, _flags(data=data, attack=attack, out=out, params=params, overwrite=overwrite,
                                                        victim_out=victim_out, model=model, max_length=max_length,
                                                        allow_pickle=allow_pickle, precision=precision))
    task = run_attack(cmd)
    typer.echo(f"poisoned {task.flags.n_poisoned} of {len(task.train)} training rows "
               f"(target {task.target_label}); triggered test set: {len(task.triggered_test)} rows -> {cmd.out}")
    if cmd.victim_out is not None:
        typer.echo(f"victim model -> {cmd.victim_out}")


@app.command()
def train(
    data: Annotated[Optional[str], typer.Option(help="training data: folder or name (clean or poisoned)")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="base model folder or Hub id (default all-MiniLM-L6-v2)")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="output model folder")] = None,
    defense: Annotated[Optional[str], typer.Option("--defense", "--defence", help="training-time defence: none "
                                                   "(full fine-tuning), lora, musclelora, reweight, abl")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="epochs")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="learning rate")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="batch size")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed")] = None,
    max_train: Annotated[Optional[int], typer.Option(help="subsample the training rows (seeded)")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="tokens per input")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="checkpoint every N steps (a rerun resumes)")] = None,
    param: ParamOpt = None,
    config: ConfigOpt = None,
    allow_pickle: PickleOpt = None,
    precision: PrecisionOpt = None,
    overwrite: OverwriteOpt = None,
) -> None:
    """Fine-tune a model on a (possibly poisoned) dataset, optionally through a training-time defence
    (--defense musclelora; -p sets its options, e.g. -p reference_size=64); epochs chosen on clean dev accuracy."""
    from unbackdoor.commands import TrainCommand, run_train

    flags = _flags(data=data, model=model, out=out, defense=defense, train__epochs=epochs, train__learning_rate=lr,
                   train__batch_size=batch_size, train__seed=seed, train__checkpoint_every=checkpoint_every,
                   defense_params=_parse_params(param), max_train=max_train, max_length=max_length,
                   allow_pickle=allow_pickle, precision=precision, overwrite=overwrite)
    record = run_train(_command_config(TrainCommand, config, flags))
    typer.echo(_metrics_line(record["metrics"]) + f" -> {out or record['config']['out']}")


@app.command(name="purify")
def purify_cmd(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="suspect model folder")] = None,
    clean: Annotated[Optional[str], typer.Option(help="clean data (its train split is sampled for the clean set)")] = None,
    base: Annotated[Optional[str], typer.Option(help="the suspect's clean pre-trained base model")] = None,
    method: Annotated[Optional[str], typer.Option(help="purify method: finetune, e-pur, fine-mixing, fine-purifying, fine-pruning, reinit, tsbd")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="output model folder")] = None,
    clean_fraction: FractionOpt = None,
    clean_size: SizeOpt = None,
    clean_per_class: PerClassOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of the clean-set draw")] = None,
    epur: Annotated[Optional[bool], typer.Option("--epur", help="reset E-PUR's suspicious embedding rows first "
                                                 "(with fine-mixing, fine-purifying, ...; needs --base)")] = None,
    lr: LrOpt = None,
    epochs: EpochsOpt = None,
    epur_param: Annotated[Optional[list[str]], typer.Option("--epur-param", help="E-PUR option KEY=VALUE for --epur; "
                                                            "repeatable")] = None,
    param: ParamOpt = None,
    config: ConfigOpt = None,
    allow_pickle: PickleOpt = None,
    precision: PrecisionOpt = None,
    overwrite: OverwriteOpt = None,
) -> None:
    """Purify a suspect model with a small clean set (and its clean base, for methods that use it)."""
    from unbackdoor.commands import PurifyCommand, run_purify

    flags = _flags(model=model, clean=clean, base=base, method=method, out=out, params=_training_params(param, lr, epochs),
                   epur=epur, epur_params=_parse_params(epur_param), clean_set__fraction=clean_fraction, clean_set__size=clean_size,
                   clean_set__per_class=clean_per_class, clean_set__seed=seed,
                   allow_pickle=allow_pickle, precision=precision, overwrite=overwrite)
    record = run_purify(_command_config(PurifyCommand, config, flags))
    typer.echo(f"purified with {record['defense']['method']} on {record['n_clean']} clean rows "
               f"in {record['wall_time_s']:.0f} s -> {record['config']['out']}")


@app.command(name="unlearn")
def unlearn_cmd(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="suspect model folder")] = None,
    forget: Annotated[Optional[str], typer.Option(help="rows to unlearn (TSV/CSV/JSONL file with text and the label "
                                                  "they were trained on, or a folder with a forget file)")] = None,
    retain: Annotated[Optional[str], typer.Option(help="clean data (its train split is sampled for the retain set)")] = None,
    method: Annotated[Optional[str], typer.Option(help="unlearn method: lya, gradient-ascent, retrain, finetune, "
                                                  "repair (EXPERIMENTAL: our reconstruction, not the paper's "
                                                  "algorithm; -p separation=relabel|gradient_projection; relabel's "
                                                  "default reference needs --base)")] = None,
    base: Annotated[Optional[str], typer.Option(help="the suspect's clean pre-trained base (retrain)")] = None,
    train_data: Annotated[Optional[str], typer.Option(help="the suspect's training data (retrain)")] = None,
    max_train: Annotated[Optional[int], typer.Option(help="the suspect was trained on this seeded subsample of "
                                                     "--train-data (as train --max-train); retrain uses the same rows")] = None,
    eval_data: Annotated[Optional[str], typer.Option(help="evaluate the result on this data (CACC; ASR and robust "
                                                     "accuracy if poisoned)")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="output model folder")] = None,
    clean_fraction: Annotated[Optional[float], typer.Option("--clean-fraction", "--retain-fraction", help="share of the "
                                                            "clean train split drawn as the retain set (default 0.01)")] = None,
    clean_size: Annotated[Optional[int], typer.Option("--clean-size", "--retain-size", help="retain rows (instead of "
                                                      "a fraction)")] = None,
    clean_per_class: Annotated[Optional[int], typer.Option("--clean-per-class", "--retain-per-class", help="retain rows "
                                                           "per label (instead of a fraction)")] = None,
    lr: LrOpt = None,
    epochs: EpochsOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of the retain-set draw")] = None,
    param: ParamOpt = None,
    config: ConfigOpt = None,
    allow_pickle: PickleOpt = None,
    precision: PrecisionOpt = None,
    overwrite: OverwriteOpt = None,
) -> None:
    """Unlearn identified trojaned rows (the forget set) from a suspect model, keeping a clean retain set."""
    from unbackdoor.commands import UnlearnCommand, run_unlearn

    flags = _flags(model=model, forget=forget, retain=retain, method=method, base=base, train_data=train_data,
                   max_train=max_train, eval_data=eval_data, out=out, params=_training_params(param, lr, epochs), clean_set__fraction=clean_fraction,
                   clean_set__size=clean_size, clean_set__per_class=clean_per_class, clean_set__seed=seed,
                   allow_pickle=allow_pickle, precision=precision, overwrite=overwrite)
    record = run_unlearn(_command_config(UnlearnCommand, config, flags))
    m = record.get("metrics") or {}
    ra = f", RA {100 * m['robust_accuracy']:.1f}%" if "robust_accuracy" in m else ""
    metrics = f"{_metrics_line(m)}{ra} " if m else ""
    typer.echo(f"unlearned {record['n_forget']} rows with {record['defense']['method']} "
               f"({record['n_retain']} retain rows) in {record['wall_time_s']:.0f} s: {metrics}-> {record['config']['out']}")


@app.command(name="scan")
def scan_cmd(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="suspect model folder")] = None,
    base: Annotated[Optional[str], typer.Option(help="the suspect's clean pre-trained base model")] = None,
    clean: Annotated[Optional[str], typer.Option(help="clean data for token frequencies (its train split is sampled)")] = None,
    top: Annotated[Optional[int], typer.Option(help="suspected trigger tokens listed (default 20)")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="output folder for JSON, Markdown, CSV and PNG")] = None,
    freq_table: Annotated[Optional[str], typer.Option(help="token -> count table made with the model's tokenizer")] = None,
    clean_fraction: FractionOpt = None,
    clean_size: SizeOpt = None,
    clean_per_class: PerClassOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of the clean-set draw")] = None,
    param: ParamOpt = None,
    config: ConfigOpt = None,
    allow_pickle: PickleOpt = None,
    precision: PrecisionOpt = None,
    overwrite: OverwriteOpt = None,
) -> None:
    """Suspected trigger tokens (E-PUR-style scores) and the most-moved weights of a suspect vs its base."""
    from unbackdoor.commands import ScanCommand, run_scan

    params = _merge(_flags(freq_table=freq_table), _parse_params(param))
    flags = _flags(model=model, base=base, clean=clean, top=top, out=out, params=params,
                   clean_set__fraction=clean_fraction, clean_set__size=clean_size,
                   clean_set__per_class=clean_per_class, clean_set__seed=seed,
                   allow_pickle=allow_pickle, precision=precision, overwrite=overwrite)
    record = run_scan(_command_config(ScanCommand, config, flags))
    for row in record["top_tokens"]:
        mark = "  <- stands out" if row["stands_out"] else ""
        score = row["ratio"] if record["primary_score"] == "ratio" else row["residual_z"]
        typer.echo(f"{row['rank']:>4}  {row['token']:<20} {record['primary_score']} {score:.4g}  "
                   f"drift {row['drift']:.4g}  freq {'-' if row['freq'] is None else format(row['freq'], 'g')}{mark}")
    names = ", ".join(t["token"] for t in record["standing_out"]) or "nothing"
    typer.echo(f"stands out: {names} ({record['standing_out_rule']}) -> {record['config']['out']}")


@app.command(name="detect")
def detect_cmd(
    data: Annotated[Optional[str], typer.Option(help="training rows: data folder or name, clean or poisoned "
                                                "(poison flags are never read)")] = None,
    clean: Annotated[Optional[str], typer.Option(help="clean data the defender holds (its train split is sampled)")] = None,
    method: Annotated[Optional[str], typer.Option(help="detector: reweight (multilevel), loss")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="encoder of the frozen features "
                                                 "(default all-MiniLM-L6-v2)")] = None,
    rate: Annotated[Optional[float], typer.Option(help="flag this share of rows (default 0.1)")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="flag rows with score >= threshold (instead of --rate)")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="output folder: scores.csv, flagged.tsv, detect.json")] = None,
    clean_fraction: FractionOpt = None,
    clean_size: SizeOpt = None,
    clean_per_class: PerClassOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of the clean-set draw and of --max-train")] = None,
    max_train: Annotated[Optional[int], typer.Option(help="subsample the training rows (seeded)")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="tokens per input")] = None,
    param: ParamOpt = None,
    config: ConfigOpt = None,
    allow_pickle: PickleOpt = None,
    precision: PrecisionOpt = None,
    overwrite: OverwriteOpt = None,
) -> None:
    """Score every training row's suspicion (-p sets the method's options, e.g. -p levels=3) and write the
    flagged rows as a dataset file (flagged.tsv, e.g. for unlearn --forget)."""
    from unbackdoor.commands import DetectCommand, run_detect

    flags = _flags(data=data, clean=clean, method=method, model=model, rate=rate, threshold=threshold, out=out,
                   params=_parse_params(param), clean_set__fraction=clean_fraction, clean_set__size=clean_size,
                   clean_set__per_class=clean_per_class, clean_set__seed=seed, max_train=max_train,
                   max_length=max_length, allow_pickle=allow_pickle, precision=precision, overwrite=overwrite)
    record = run_detect(_command_config(DetectCommand, config, flags))
    counts = record["counts"]
    typer.echo(f"flagged {counts['flagged']} of {counts['rows']} rows ({record['method']}, {counts['clean']} clean "
               f"rows) in {record['wall_time_s']:.1f} s -> {record['config']['out']}")


@app.command(name="guard")
def guard_cmd(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="the suspect model folder (never changed)")] = None,
    clean: Annotated[Optional[str], typer.Option(help="clean data the defender holds (its train split is sampled)")] = None,
    method: Annotated[Optional[str], typer.Option(help="guard: onion (rewrites inputs), strip, rap (reject inputs)")] = None,
    eval_data: Annotated[Optional[str], typer.Option(help="measure the guard on this clean or poisoned data (FRR, "
                                                     "CACC; FAR and ASR when poisoned); never shown to the guard")] = None,
    budget: Annotated[Optional[list[float]], typer.Option(help="FRR budgets reported besides the guard's own "
                                                          "(repeatable; default 0.01 and 0.05)")] = None,
    max_eval: Annotated[Optional[int], typer.Option(help="evaluate on a seeded subsample of this many rows")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="tokens per input")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="output folder (guard.json, thresholds.json)")] = None,
    clean_fraction: FractionOpt = None,
    clean_size: SizeOpt = None,
    clean_per_class: PerClassOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of the clean-set draw")] = None,
    param: ParamOpt = None,
    config: ConfigOpt = None,
    allow_pickle: PickleOpt = None,
    precision: PrecisionOpt = None,
    overwrite: OverwriteOpt = None,
) -> None:
    """Put an inference-time guard in front of a fixed suspect model: thresholds from clean data only
    (a false-rejection budget on held-out clean rows); with --eval-data, FRR, FAR and CACC/ASR with the guard."""
    from unbackdoor.commands import GuardCommand, run_guard

    flags = _flags(model=model, clean=clean, method=method, eval_data=eval_data, budgets=budget, max_eval=max_eval,
                   max_length=max_length, out=out, params=_parse_params(param), clean_set__fraction=clean_fraction,
                   clean_set__size=clean_size, clean_set__per_class=clean_per_class, clean_set__seed=seed,
                   allow_pickle=allow_pickle, precision=precision, overwrite=overwrite)
    record = run_guard(_command_config(GuardCommand, config, flags))
    m = record.get("metrics")
    if m:
        asr = "" if m["asr"] is None else f", ASR {100 * m['asr']:.1f}% (unguarded {100 * m['unguarded_asr']:.1f}%)"
        typer.echo(f"{record['method']} at FRR budget {m['budget']:g}: FRR {100 * m['frr']:.1f}%, CACC "
                   f"{100 * m['cacc']:.1f}% (unguarded {100 * m['unguarded_cacc']:.1f}%){asr}")
    typer.echo(f"-> {record['config']['out']}")


analyze_app = typer.Typer(help="Analyses of how models learn backdoors.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")


@analyze_app.command(name="frequency")
def frequency_cmd(
    data: Annotated[Optional[str], typer.Option(help="poisoned data folder (from unbackdoor attack)")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="base model folder or Hub id (default all-MiniLM-L6-v2)")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="output folder for JSON, CSV and PNG")] = None,
    methods: Annotated[Optional[str], typer.Option(help="training defences compared, comma-separated "
                                                   "(default none,lora,musclelora)")] = None,
    every: Annotated[Optional[int], typer.Option(help="record every N optimizer steps (default 5)")] = None,
    max_rows: Annotated[Optional[int], typer.Option(help="rows per probe set (default 256)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="epochs (every method)")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="learning rate (every method)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="batch size (every method)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="training seed (every method)")] = None,
    max_train: Annotated[Optional[int], typer.Option(help="subsample the training rows (seeded)")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="tokens per input")] = None,
    param: ParamOpt = None,
    config: ConfigOpt = None,
    allow_pickle: PickleOpt = None,
    precision: PrecisionOpt = None,
    overwrite: OverwriteOpt = None,
) -> None:
    """Record how fast plain fine-tuning, LoRA and MuScleLoRA fit the clean and the backdoor mapping in
    low- and high-frequency bands (frequency.json, frequency.csv, frequency.png)."""
    from unbackdoor.commands import FrequencyCommand, run_frequency

    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    params = _merge(_flags(methods=method_list, every=every, max_rows=max_rows, train__epochs=epochs,
                           train__learning_rate=lr, train__batch_size=batch_size, train__seed=seed),
                    _parse_params(param))
    flags = _flags(data=data, model=model, out=out, params=params, max_train=max_train, max_length=max_length,
                   allow_pickle=allow_pickle, precision=precision, overwrite=overwrite)
    record = run_frequency(_command_config(FrequencyCommand, config, flags))
    for method, m in record["metrics"].items():
        typer.echo(f"{method}: {_metrics_line(m)}")
    typer.echo(f"-> {record['config']['out']}")


@app.command(name="eval")
def eval_cmd(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model folder")] = None,
    data: Annotated[Optional[str], typer.Option(help="clean data (CACC) or poisoned data (CACC and ASR)")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="write the JSON record to this file")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="must match the model's saved input format")] = None,
    config: ConfigOpt = None,
    allow_pickle: PickleOpt = None,
    precision: PrecisionOpt = None,
    overwrite: OverwriteOpt = None,
) -> None:
    """Evaluate a model: CACC, macro-F1 and per-class accuracy; ASR and robust accuracy on poisoned data."""
    from unbackdoor.commands import EvalCommand, run_eval

    flags = _flags(model=model, data=data, out=out, max_length=max_length, allow_pickle=allow_pickle, precision=precision, overwrite=overwrite)
    _, table = run_eval(_command_config(EvalCommand, config, flags))
    typer.echo(table, nl=False)


@app.command()
def demo(
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="output folder (default runs/demo)")] = None,
    max_train: Annotated[Optional[int], typer.Option(help="training rows used (default 2000, seeded)")] = None,
    no_floor: Annotated[bool, typer.Option("--no-floor", help="skip the never-poisoned reference model")] = False,
    precision: PrecisionOpt = None,
    config: ConfigOpt = None,
) -> None:
    """SST-2 -> BadNets 10% -> MiniLM victim -> clean fine-tuning on 1% clean data -> before/after table."""
    from unbackdoor.commands import DemoCommand, run_demo

    flags = _flags(out=out, max_train=max_train, floor=False if no_floor else None, precision=precision)
    record = run_demo(_command_config(DemoCommand, config, flags))
    for note in record["notes"]:
        typer.echo(f"note: {note}")
    typer.echo(record["table"], nl=False)
    typer.echo(f"total {record['timings']['total_s']:.0f} s; results in {record['config']['out']}")


@app.command(name="bench")
def bench_cmd(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="the grid: datasets, attacks, defences, seeds")],
    run_dir: Annotated[Optional[str], typer.Option(help="run folder (default runs/bench/NAME); a rerun resumes it")] = None,
    workers: Annotated[int, typer.Option(help="worker processes (one torch thread each when more than one)")] = 1,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="run failed cells again")] = False,
    seed: Annotated[Optional[list[int]], typer.Option(
        "--seed", help="run only this seed's cells (repeatable); the other seeds stay pending for a later run")] = None,
) -> None:
    """Run a benchmark grid as independent cells into RUN_DIR/results.sqlite; finished cells are skipped,
    interrupted ones resumed, failed ones recorded (exit status 1 when any failed)."""
    from unbackdoor.bench.config import load_bench_config
    from unbackdoor.bench.report import summary_text
    from unbackdoor.bench.runner import resolve_run_dir, run_bench

    counts = run_bench(config_file, run_dir, workers=workers, retry_failed=retry_failed, seeds=seed or None)
    run = resolve_run_dir(load_bench_config(config_file), run_dir)
    typer.echo(summary_text(run), nl=False)
    typer.echo(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) +
               f". Store: {run / 'results.sqlite'}; full report: unbackdoor report {run}")
    if counts.get("failed"):
        sys.exit(1)


@app.command(name="report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a bench run folder")],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="output folder (default RUN_DIR/report)")] = None,
) -> None:
    """Markdown/CSV tables, PNG plots and one self-contained HTML page from a bench run's store."""
    from unbackdoor.bench.report import write_report

    record = write_report(run_dir, out)
    typer.echo(f"{record['rows']} table rows from {record['cells']} cells ({record['failed']} failed) -> {record['out']}")


def _metrics_line(metrics: dict[str, Any]) -> str:
    parts = [f"CACC {100 * metrics['cacc']:.1f}%"]
    if "asr" in metrics:
        parts.append(f"ASR {100 * metrics['asr']:.1f}%")
    return ", ".join(parts)


def _one_line(message: str) -> str:
    """An error message as the single line the CLI promises."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def main() -> None:
    """Entry point: run the app; bad input -> one ``error:`` line and exit 2."""
    try:
        app(standalone_mode=False)
    except UnbackdoorError as exc:
        typer.echo(f"error: {_one_line(str(exc))}", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", None)
        sys.exit(code if code is not None else getattr(exc, "code", 0))
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
    except Exception as exc:
        # usage errors of the (vendored) click parser: unknown option, missing value, ...
        if callable(getattr(exc, "format_message", None)) and hasattr(exc, "exit_code"):
            typer.echo(f"error: {_one_line(exc.format_message())}", err=True)
            sys.exit(2)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
