"""The ``unbackdoor`` command: parses flags and YAML, validates strictly, calls the library.

Every bad input ends in one line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

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
analyze_app = typer.Typer(help="Analyses of how models learn backdoors.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")
logger = logging.getLogger("unbackdoor")

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


# ----------------------------------------------------------------------------- options from the config models
@dataclass(frozen=True)
class Opt:
    """One command-line option and where its value goes in the command's config (``a.b`` nested).
    ``help`` and the type default to the config field's description and annotation; ``value``
    rewrites a given value (``None`` drops it)."""

    path: str
    flags: tuple[str, ...] = ()
    help: str | None = None
    type: Any = None
    value: Callable[[Any], Any] | None = None

    @property
    def param(self) -> str:
        return self.path.replace(".", "__").replace("-", "_")


@dataclass(frozen=True)
class Spec:
    """A command: its config class and run function in :mod:`unbackdoor.commands`, its options, where
    ``-p KEY=VALUE`` goes, and what it prints."""

    name: str
    config: str
    run: str
    doc: str
    opts: tuple[Opt, ...]
    echo: Callable[[Any, Any], None]
    params_into: str | None = "params"


def _field(model: type, path: str) -> Any:
    """The pydantic field at ``path`` of ``model`` (through nested config classes), or None inside a
    plain mapping (method parameters)."""
    from unbackdoor.config import _field_models  # noqa: PLC2701 - the CLI is config.py's own front end

    field = None
    for part in path.split("."):
        if model is None or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        models = _field_models(field)
        model = models[0] if models else None
    return field


def _option_type(annotation: Any) -> Any:
    """The CLI type of a config annotation: Optional[...] of str, int, float, bool, Path or a list."""
    args = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) in (Union, UnionType) \
        else [annotation]
    base = args[0] if args else str
    if get_origin(base) is Literal:
        return Optional[str]
    if get_origin(base) in (tuple, list):
        return Optional[list[get_args(base)[0]]]  # type: ignore[misc]
    return Optional[base] if base in (str, int, float, bool, Path) else Optional[str]


def _parameter(spec: Spec, opt: Opt, model: type) -> inspect.Parameter:
    field = _field(model, opt.path)
    help_text = opt.help if opt.help is not None else (field.description if field is not None else None)
    if help_text is None:
        raise TypeError(f"{spec.name} --{opt.path}: no help text and no config field to take it from")
    kind = opt.type if opt.type is not None else _option_type(field.annotation if field is not None else str)
    flags = opt.flags or (f"--{opt.path.split('.')[-1].replace('_', '-')}",)
    return inspect.Parameter(opt.param, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind, typer.Option(*flags, help=help_text)])


PARAM_OPT = Opt("-p", ("--param", "-p"), "method parameter KEY=VALUE (VALUE is YAML); repeatable", Optional[list[str]])
CONFIG_OPT = Opt("--config", ("--config", "-c"), "YAML file with this command's keys (flags override it)",
                 Optional[Path])
COMMON = (Opt("allow_pickle"), Opt("precision"), Opt("overwrite"))


def register(spec: Spec) -> None:
    """Add the command to the app: options generated from its config class, values gathered into
    that config (YAML < flags; ``-p`` over the typed method options), the run function, the echo."""
    from unbackdoor import commands

    model = getattr(commands, spec.config)
    opts = (*spec.opts, *((PARAM_OPT,) if spec.params_into else ()), CONFIG_OPT, *COMMON)
    parameters = [_parameter(spec, o, model) for o in opts]

    def handler(**given: Any) -> None:
        flags: dict[str, Any] = {}
        for opt in (*spec.opts, *COMMON):
            value = given.get(opt.param)
            value = opt.value(value) if opt.value is not None and value is not None else value
            if value is not None and value != [] and value != {}:
                _set_nested(flags, opt.path.split("."), value)
        if spec.params_into and given.get(PARAM_OPT.param):
            flags[spec.params_into] = _merge(flags.get(spec.params_into, {}), _parse_params(given[PARAM_OPT.param]))
        cmd = _command_config(model, given.get(CONFIG_OPT.param), flags)
        spec.echo(getattr(commands, spec.run)(cmd), cmd)

    handler.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    handler.__annotations__ = {p.name: p.annotation for p in parameters}
    handler.__doc__ = spec.doc
    handler.__name__ = f"{spec.name.replace(' ', '_')}_cmd"
    (analyze_app if spec.name.startswith("analyze ") else app).command(name=spec.name.split()[-1])(handler)


# ----------------------------------------------------------------------------- what each command prints
def _echo_attack(task: Any, cmd: Any) -> None:
    typer.echo(f"poisoned {task.flags.n_poisoned} of {len(task.train)} training rows "
               f"(target {task.target_label}); triggered test set: {len(task.triggered_test)} rows -> {cmd.out}")
    if cmd.victim_out is not None:
        typer.echo(f"victim model -> {cmd.victim_out}")


def _echo_train(record: Any, cmd: Any) -> None:
    typer.echo(_metrics_line(record["metrics"]) + f" -> {cmd.out}")


def _echo_purify(record: Any, cmd: Any) -> None:
    typer.echo(f"purified with {record['defense']['method']} on {record['n_clean']} clean rows "
               f"in {record['wall_time_s']:.0f} s -> {cmd.out}")


def _echo_unlearn(record: Any, cmd: Any) -> None:
    m = record.get("metrics") or {}
    ra = f", RA {100 * m['robust_accuracy']:.1f}%" if "robust_accuracy" in m else ""
    metrics = f"{_metrics_line(m)}{ra} " if m else ""
    typer.echo(f"unlearned {record['n_forget']} rows with {record['defense']['method']} "
               f"({record['n_retain']} retain rows) in {record['wall_time_s']:.0f} s: {metrics}-> {cmd.out}")


def _echo_scan(record: Any, cmd: Any) -> None:
    for row in record["top_tokens"]:
        mark = "  <- stands out" if row["stands_out"] else ""
        score = row["ratio"] if record["primary_score"] == "ratio" else row["residual_z"]
        typer.echo(f"{row['rank']:>4}  {row['token']:<20} {record['primary_score']} {score:.4g}  "
                   f"drift {row['drift']:.4g}  freq {'-' if row['freq'] is None else format(row['freq'], 'g')}{mark}")
    names = ", ".join(t["token"] for t in record["standing_out"]) or "nothing"
    typer.echo(f"stands out: {names} ({record['standing_out_rule']}) -> {cmd.out}")


def _echo_detect(record: Any, cmd: Any) -> None:
    counts = record["counts"]
    typer.echo(f"flagged {counts['flagged']} of {counts['rows']} rows ({record['method']}, {counts['clean']} clean "
               f"rows) in {record['wall_time_s']:.1f} s -> {cmd.out}")


def _echo_guard(record: Any, cmd: Any) -> None:
    m = record.get("metrics")
    if m:
        asr = "" if m["asr"] is None else f", ASR {100 * m['asr']:.1f}% (unguarded {100 * m['unguarded_asr']:.1f}%)"
        typer.echo(f"{record['method']} at FRR budget {m['budget']:g}: FRR {100 * m['frr']:.1f}%, CACC "
                   f"{100 * m['cacc']:.1f}% (unguarded {100 * m['unguarded_cacc']:.1f}%){asr}")
    typer.echo(f"-> {cmd.out}")


def _echo_frequency(record: Any, cmd: Any) -> None:
    for method, m in record["metrics"].items():
        typer.echo(f"{method}: {_metrics_line(m)}")
    typer.echo(f"-> {cmd.out}")


def _echo_eval(result: Any, cmd: Any) -> None:
    typer.echo(result[1], nl=False)


def _echo_demo(record: Any, cmd: Any) -> None:
    from unbackdoor.commands import scan_lines

    for note in record["notes"]:
        typer.echo(f"note: {note}")
    typer.echo(f"scan of the victim against its base (trigger planted: {record['trigger']}):")
    for line in scan_lines(record["scan"]):
        typer.echo(f"  {line}")
    typer.echo(record["table"], nl=False)
    typer.echo(f"total {record['timings']['total_s']:.0f} s; results in {cmd.out}")


# ----------------------------------------------------------------------------- the commands
MODEL = ("--model", "-m")
OUT = ("--out", "-o")
CLEAN_SET = (Opt("clean_set.fraction", ("--clean-fraction",), "share of the clean train split drawn as the clean set "
                 "(default 0.01)"),
             Opt("clean_set.size", ("--clean-size",), "rows of clean data (instead of a fraction)"),
             Opt("clean_set.per_class", ("--clean-per-class",), "rows per label (instead of a fraction)"),
             Opt("clean_set.seed", ("--seed",), "seed of the clean-set draw"))
METHOD_TRAIN = (Opt("params.train.learning_rate", ("--lr",), "learning rate of the method's training (sets "
                    "-p train.learning_rate)", Optional[float]),
                Opt("params.train.epochs", ("--epochs",), "epochs of the method's training (sets -p train.epochs)",
                    Optional[int]))

SPECS = (
    Spec("attack", "AttackCommand", "run_attack",
         "Poison a clean dataset: training set with flags + triggered test set (non-target rows only). "
         "Weight attacks (ep, lwp, sos, lws) also write the poisoned victim model to --victim-out; attacks that "
         "release pre-trained weights (ripples, por, neuba) write the release there, which the user fine-tunes "
         "cleanly (train --model) before ASR means anything.",
         (Opt("data"), Opt("attack", ("--attack", "-a"), "data attacks: badnets, addsent, deadcode (source code), "
              "synbkd, stylebkd (published paraphrase sets, loaded as released: -p source=...); weight attacks (need "
              "--victim-out): ep (embedding poisoning), lwp (layer-wise poisoning), sos (trigger-word set), lws "
              "(learnable word substitution); released weights: ripples (a poisoned classifier), por, neuba "
              "(a poisoned pre-trained base)"),
          Opt("out", OUT), Opt("victim_out"), Opt("model", MODEL), Opt("max_length"), Opt("max_train"),
          Opt("user_finetune"),
          Opt("params.poison_rate", ("--poison-rate",), "share of training rows poisoned, in (0, 1]", Optional[float]),
          Opt("params.target_label", ("--target-label",), "label the trigger forces", Optional[int]),
          Opt("params.mode", ("--mode",), "dirty | mix | clean (clean-label)", Optional[str]),
          Opt("params.seed", ("--seed",), "seed", Optional[int])),
         _echo_attack),
    Spec("train", "TrainCommand", "run_train",
         "Fine-tune a model on a (possibly poisoned) dataset, optionally through a training-time defence "
         "(--defense musclelora, auto, ...; -p sets its options); epochs chosen on clean dev accuracy.",
         (Opt("data"), Opt("model", MODEL), Opt("out", OUT),
          Opt("defense", ("--defense", "--defence")),
          Opt("train.epochs", ("--epochs",)), Opt("train.learning_rate", ("--lr",)),
          Opt("train.batch_size", ("--batch-size",)), Opt("train.seed", ("--seed",)), Opt("max_train"),
          Opt("max_length"), Opt("train.checkpoint_every", ("--checkpoint-every",))),
         _echo_train, "defense_params"),
    Spec("purify", "PurifyCommand", "run_purify",
         "Purify a suspect model with a small clean set (and its clean base, for methods that use it).",
         (Opt("model", MODEL), Opt("clean"), Opt("base"), Opt("method"), Opt("out", OUT), *CLEAN_SET, *METHOD_TRAIN,
          Opt("epur", ("--epur",), "reset E-PUR's suspicious embedding rows first (with fine-mixing, "
              "fine-purifying, ...; needs --base)", Optional[bool]),
          Opt("epur_params", ("--epur-param",), "E-PUR option KEY=VALUE for --epur; repeatable",
              Optional[list[str]], _parse_params)),
         _echo_purify),
    Spec("unlearn", "UnlearnCommand", "run_unlearn",
         "Unlearn identified trojaned rows (the forget set) from a suspect model, keeping a clean retain set.",
         (Opt("model", MODEL), Opt("forget"), Opt("retain"), Opt("method"), Opt("base"), Opt("train_data"),
          Opt("max_train"), Opt("eval_data"), Opt("out", OUT),
          Opt("clean_set.fraction", ("--clean-fraction", "--retain-fraction"), "share of the clean train split "
              "drawn as the retain set (default 0.01)"),
          Opt("clean_set.size", ("--clean-size", "--retain-size"), "retain rows (instead of a fraction)"),
          Opt("clean_set.per_class", ("--clean-per-class", "--retain-per-class"), "retain rows per label"),
          Opt("clean_set.seed", ("--seed",), "seed of the retain-set draw"), *METHOD_TRAIN),
         _echo_unlearn),
    Spec("scan", "ScanCommand", "run_scan",
         "Suspected trigger tokens (E-PUR-style scores) and the most-moved weights of a suspect vs its base.",
         (Opt("model", MODEL), Opt("base"), Opt("clean"), Opt("top"), Opt("out", OUT),
          Opt("params.freq_table", ("--freq-table",), "token -> count table made with the model's tokenizer",
              Optional[str]), *CLEAN_SET),
         _echo_scan),
    Spec("detect", "DetectCommand", "run_detect",
         "Score every training row's suspicion (-p sets the method's options) and write the flagged rows as a "
         "dataset file (flagged.tsv, e.g. for unlearn --forget).",
         (Opt("data"), Opt("clean"), Opt("method"), Opt("model", MODEL), Opt("rate"), Opt("threshold"),
          Opt("out", OUT), *CLEAN_SET, Opt("max_train"), Opt("max_length")),
         _echo_detect),
    Spec("guard", "GuardCommand", "run_guard",
         "Put an inference-time guard in front of a fixed suspect model: thresholds from clean data only "
         "(a false-rejection budget on held-out clean rows); with --eval-data, FRR, FAR and CACC/ASR with the guard.",
         (Opt("model", MODEL), Opt("clean"), Opt("method"), Opt("eval_data"),
          Opt("budgets", ("--budget",), "FRR budgets reported besides the guard's own (repeatable; default 0.01 and "
              "0.05)", Optional[list[float]]),
          Opt("max_eval"), Opt("max_length"), Opt("out", OUT), *CLEAN_SET),
         _echo_guard),
    Spec("analyze frequency", "FrequencyCommand", "run_frequency",
         "Record how fast plain fine-tuning, LoRA and MuScleLoRA fit the clean and the backdoor mapping in "
         "low- and high-frequency bands (frequency.json, frequency.csv, frequency.png).",
         (Opt("data"), Opt("model", MODEL), Opt("out", OUT),
          Opt("params.methods", ("--methods",), "training defences compared, comma-separated (default "
              "none,lora,musclelora)", Optional[str], lambda v: [m.strip() for m in v.split(",") if m.strip()]),
          Opt("params.every", ("--every",), "record every N optimizer steps (default 5)", Optional[int]),
          Opt("params.max_rows", ("--max-rows",), "rows per probe set (default 256)", Optional[int]),
          Opt("params.train.epochs", ("--epochs",), "epochs (every method)", Optional[int]),
          Opt("params.train.learning_rate", ("--lr",), "learning rate (every method)", Optional[float]),
          Opt("params.train.batch_size", ("--batch-size",), "batch size (every method)", Optional[int]),
          Opt("params.train.seed", ("--seed",), "training seed (every method)", Optional[int]),
          Opt("max_train"), Opt("max_length")),
         _echo_frequency),
    Spec("eval", "EvalCommand", "run_eval",
         "Evaluate a model: CACC, macro-F1 and per-class accuracy; ASR and robust accuracy on poisoned data.",
         (Opt("model", MODEL), Opt("data"), Opt("out", OUT), Opt("max_length")),
         _echo_eval, None),
    Spec("demo", "DemoCommand", "run_demo",
         "SST-2 -> BadNets 10% -> MiniLM victim -> scan -> plain fine-tuning and auto (purify, and training "
         "through the poison) -> the table next to the never-poisoned floor.",
         (Opt("out", OUT), Opt("max_train"),
          Opt("floor", ("--no-floor",), "skip the never-poisoned reference model", Optional[bool],
              lambda v: False if v else None)),
         _echo_demo, None),
)


def build_commands() -> None:
    """Register every generated command (the bench and report commands are written out below)."""
    for spec in SPECS:
        register(spec)


build_commands()


@app.command(name="bench")
def bench_cmd(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="the grid: datasets, attacks, defences, seeds")],
    run_dir: Annotated[Optional[str], typer.Option(help="run folder (default runs/bench/NAME); a rerun resumes it")] = None,
    workers: Annotated[int, typer.Option(help="worker processes (one torch thread each when more than one)")] = 1,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="run failed cells again")] = False,
    rerun: Annotated[Optional[list[str]], typer.Option(
        "--rerun", metavar="DEFENCE", help="run this defence's finished cells again, e.g. after a change to its code "
        "(repeatable; with --seed, that seed's only)")] = None,
    seed: Annotated[Optional[list[int]], typer.Option(
        "--seed", help="run only this seed's cells (repeatable); the other seeds stay pending for a later run")] = None,
    attack: Annotated[Optional[list[str]], typer.Option(
        "--attack", metavar="ATTACK", help="run only this attack's cells (its name in the config; repeatable; with the "
        "never-poisoned models its floor rows read), e.g. an attack just added to a grid")] = None,
    keep_models: Annotated[bool, typer.Option(
        "--keep-models", help="keep every defence cell's model (default: removed once measured, its unbackdoor.json "
        "kept in the cell folder; victims and never-poisoned models are always kept)")] = False,
) -> None:
    """Run a benchmark grid as independent cells into RUN_DIR/results.sqlite; finished cells are skipped,
    interrupted ones resumed, failed ones recorded (exit status 1 when any failed)."""
    from unbackdoor.bench.config import load_bench_config
    from unbackdoor.bench.report import summary_text
    from unbackdoor.bench.runner import resolve_run_dir, run_bench

    counts = run_bench(config_file, run_dir, workers=workers, retry_failed=retry_failed, seeds=seed or None,
                       rerun=rerun or (), attacks=attack or None, keep_models=keep_models)
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
