"""Expand a bench config into cells, claim them from the store, run them, spread them over workers.

Cells (ids ``DATASET/ATTACK/sSEED/DEFENCE``):

* ``DATASET/sSEED/floor-model``: the never-poisoned model (trained on the clean rows);
* ``.../none`` (the *victim*): poison (a data attack through ``unbackdoor attack``, a published
  variant, or a weight attack) and train as ``unbackdoor train`` does;
* ``.../floor``: the never-poisoned model evaluated on this attack's triggered test set;
* ``.../NAME``: a defence of the victim: train-time (training on the poisoned rows through it, as
  ``train --defense``), purify (``purify`` with a clean set) or unlearn (``detect`` then
  ``unlearn`` of the flagged rows; never the oracle flags). Once an unlearn cell has run, its
  metrics also get ``detection``: how well ``detect`` found the poisoned rows (true flags).

Every step is the command function the CLI runs; intermediate models live under RUN_DIR/models/
(atomic outputs: a folder that exists is finished and is reused by a rerun), results only in the
store. Only this module and the evaluation read poison flags or triggered sets.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from unbackdoor import __version__
from unbackdoor.bench.config import (
    AttackSpec,
    BenchConfig,
    DatasetSpec,
    GuardDefenseSpec,
    PurifyDefenseSpec,
    TrainDefenseSpec,
    UnlearnDefenseSpec,
    attack_kind,
    load_bench_config,
    variant_spec,
)
from unbackdoor.bench.store import EVERY_CELL, CellSpec, Claimed, Slice, Store, export_json
from unbackdoor.errors import ConfigError, UnbackdoorError
from unbackdoor.data.io import load_task, read_meta, write_clean_task
from unbackdoor.data.sampling import EVAL_CAP_SEED, cap_eval_splits
from unbackdoor.outputs import atomic_output_dir, write_json

logger = logging.getLogger(__name__)

MODELS_DIR = "models"
RESULTS_JSON = "results.json"
CONFIG_COPY = "bench.json"


# ----------------------------------------------------------------------------- expansion
def cell_id(dataset: str, attack: str, seed: int, defence: str) -> str:
    return f"{dataset}/{attack}/s{seed}/{defence}"


def floor_model_id(dataset: str, seed: int) -> str:
    return f"{dataset}/s{seed}/floor-model"


def _common(config: BenchConfig, dataset: str, spec: str, seed: int) -> dict[str, Any]:
    return {"dataset": {"name": dataset, "spec": spec}, "model": config.model, "max_train": config.max_train,
            "max_length": config.max_length, "train": config.train, "seed": seed, "precision": config.precision}


def _attack_config(dataset: DatasetSpec, attack: AttackSpec) -> dict[str, Any]:
    kind = attack_kind(attack)
    out: dict[str, Any] = {"name": attack.name, "kind": kind, "attack": attack.attack, "params": attack.params}
    if kind == "variant":
        out["data"] = variant_spec(dataset, attack)
    return out


def expand(config: BenchConfig, specs: dict[str, str] | None = None) -> list[CellSpec]:
    """Every cell of the grid, in run order (seed by seed, so an interrupted grid covers every attack).
    ``specs`` maps a dataset name to the data spec its cells read (default: the dataset's own)."""
    specs = specs or {}
    cells: list[CellSpec] = []
    for seed in config.seeds:
        for ds in config.datasets:
            common = _common(config, ds.name, specs.get(ds.name, ds.spec), seed)
            floor_model = floor_model_id(ds.name, seed)
            cells.append(CellSpec(floor_model, "floor-model", ds.name, "", "floor-model", seed, common))
            for attack in config.attacks:
                if attack.applies_to(ds):
                    cells.extend(_attack_cells(config, common, ds, attack, seed, floor_model))
    return cells


def _attack_cells(config: BenchConfig, common: dict[str, Any], ds: DatasetSpec, attack: AttackSpec, seed: int,
                  floor_model: str) -> list[CellSpec]:
    """The victim, its floor row and every defence that applies to this attack."""
    a = _attack_config(ds, attack)
    victim = cell_id(ds.name, attack.name, seed, "none")
    base = {**common, "attack": a, "victim": victim}
    cells = [CellSpec(victim, "victim", ds.name, attack.name, "none", seed, base),
             CellSpec(cell_id(ds.name, attack.name, seed, "floor"), "floor", ds.name, attack.name, "floor", seed,
                      {**base, "floor_model": floor_model}, after=(floor_model, victim))]
    for d in config.defenses:
        if a["kind"] == "weight" and not isinstance(d, (PurifyDefenseSpec, GuardDefenseSpec)):
            continue  # a weight attack has no poisoned training rows to train through or detect in
        cells.append(CellSpec(cell_id(ds.name, attack.name, seed, d.name), d.kind, ds.name, attack.name, d.name, seed,
                              {**base, "defence": d.model_dump()}, after=(victim,)))
    return cells


# ----------------------------------------------------------------------------- cell steps
PRUNED_KINDS = ("train", "purify", "unlearn")  # defence cells whose models no later cell reads


def model_dir(run_dir: Path, cid: str) -> Path:
    return run_dir / MODELS_DIR / cid


def victim_data(run_dir: Path, config: dict[str, Any]) -> str:
    """The victim's poisoned data: the published variant, or the folder the victim cell wrote."""
    attack = config["attack"]
    return attack["data"] if attack["kind"] == "variant" else str(model_dir(run_dir, config["victim"]) / "data")


def _train_config(config: dict[str, Any], victim: bool) -> Any:
    from unbackdoor.training.config import TrainConfig

    given = dict(config["train"]) if victim else {}  # defences keep their own training defaults
    return TrainConfig(**{**given, "seed": config["seed"], "progress": False})


def _train(run_dir: Path, config: dict[str, Any], data: str, out: Path, defence: str = "none",
           params: dict[str, Any] | None = None) -> dict[str, Any]:
    """``unbackdoor train`` into ``out`` (reused when finished); the model's metrics."""
    from unbackdoor.commands import TrainCommand, run_train

    if out.exists():  # finished by an earlier attempt
        return _evaluate(config, out, data)
    cmd = TrainCommand(data=data, model=config["model"], out=str(out), defense=defence, defense_params=params or {},
                       train=_train_config(config, victim=defence == "none"), max_train=config["max_train"],
                       max_length=config["max_length"], precision=_precision(config))
    return run_train(cmd)["metrics"]


def _precision(config: dict[str, Any]) -> str:
    return config.get("precision", "auto")


def _evaluate(config: dict[str, Any], folder: Path, data: str) -> dict[str, Any]:
    """CACC (and ASR, robust accuracy on poisoned ``data``) of a model folder."""
    from unbackdoor.commands import evaluate_model, metric_summary

    return metric_summary(evaluate_model(folder, data, precision=_precision(config))[1])


def run_victim(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Poison (unless a published variant) and train the victim."""
    attack = config["attack"]
    out = model_dir(run_dir, config["victim"])
    if attack["kind"] == "weight":
        return _weight_victim(config, out)
    data = victim_data(run_dir, config)
    if attack["kind"] == "data" and not Path(data).exists():
        from unbackdoor.commands import AttackCommand, run_attack

        params = {"seed": config["seed"], **attack["params"]}
        run_attack(AttackCommand(data=config["dataset"]["spec"], attack=attack["attack"], params=params, out=data,
                                 precision=_precision(config)))
    return _train(run_dir, config, data, out / "model")


def _weight_victim(config: dict[str, Any], out: Path) -> dict[str, Any]:
    """A weight attack through ``unbackdoor attack --victim-out``: the poisoned data and the victim,
    both written under ``out``; the victim's metrics. For an attack that releases weights the victim is
    the user's clean fine-tune of the release (``--user-finetune``)."""
    from unbackdoor.attacks import WEIGHT_ATTACKS
    from unbackdoor.attacks.pretrained import PretrainedAttack
    from unbackdoor.commands import AttackCommand, run_attack

    data, model = out / "data", out / "model"
    if data.exists() and model.exists():
        return _evaluate(config, model, str(data))
    for folder in (data, model):
        if folder.exists():  # one of the two written by an attempt killed in between
            shutil.rmtree(folder)
    attack, seed = config["attack"], config["seed"]
    releases = issubclass(WEIGHT_ATTACKS.get(attack["attack"]), PretrainedAttack)  # the victim: the user's fine-tune
    run_attack(AttackCommand(data=config["dataset"]["spec"], attack=attack["attack"],
                             params={"seed": seed, **attack["params"]}, out=str(data), victim_out=str(model),
                             model=_base(config), seed=seed, max_length=config["max_length"],
                             max_train=config["max_train"], precision=_precision(config), user_finetune=releases))
    return json.loads((model / "unbackdoor.json").read_text(encoding="utf-8"))["metrics"]


def run_floor_model(run_dir: Path, config: dict[str, Any], cid: str) -> dict[str, Any]:
    """The never-poisoned model: the victim's recipe on the clean rows."""
    return _train(run_dir, config, config["dataset"]["spec"], model_dir(run_dir, cid) / "model")


def run_floor(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The never-poisoned model on this attack's triggered test set; its clean-test metrics are the
    floor-model cell's (the store knows them: the same model is never evaluated on a set twice)."""
    from unbackdoor.commands import metric_summary
    from unbackdoor.data import load_poisoned_task
    from unbackdoor.evaluate import add_triggered, result_from_record
    from unbackdoor.inference import predict
    from unbackdoor.models.loading import load_classifier

    folder, data = model_dir(run_dir, config["floor_model"]) / "model", victim_data(run_dir, config)
    recorded = next((c["metrics"] for c in Store(run_dir).cells("done") if c["id"] == config["floor_model"]), None)
    if not recorded or recorded.get("confusion") is None:  # a store written before confusion counts were kept
        return _evaluate(config, folder, data)
    task = load_poisoned_task(data)
    clf = load_classifier(folder, num_labels=task.clean.num_labels, precision=_precision(config))
    result = add_triggered(result_from_record(recorded, str(folder)), task.triggered_test,
                           predict(clf, task.triggered_test.examples))
    return metric_summary(result)


def run_train_defense(run_dir: Path, config: dict[str, Any], cid: str) -> dict[str, Any]:
    spec = TrainDefenseSpec.model_validate(config["defence"])
    return _train(run_dir, config, victim_data(run_dir, config), model_dir(run_dir, cid) / "model",
                  defence=spec.method, params=spec.params)


def _base(config: dict[str, Any]) -> str:
    return config["model"] or "default"


def gives_base(spec: PurifyDefenseSpec) -> bool:
    """Whether a purify cell hands the clean base to its method: when the method needs it or can use it
    (``auto``), or E-PUR runs first. The bench's defender holds the base; methods that ignore it do not
    get it, so their cells stay what they were."""
    from unbackdoor.purify.base import PURIFY_DEFENSES

    method = PURIFY_DEFENSES.get(spec.method)
    return method.needs_base or method.uses_base or spec.epur


def run_purify_defense(run_dir: Path, config: dict[str, Any], cid: str) -> dict[str, Any]:
    """``unbackdoor purify`` of the victim with a seeded clean set, then evaluation."""
    from unbackdoor.commands import PurifyCommand, run_purify
    from unbackdoor.data.sampling import CleanSetConfig

    spec = PurifyDefenseSpec.model_validate(config["defence"])
    out = model_dir(run_dir, cid) / "model"
    data = victim_data(run_dir, config)
    if not out.exists():
        clean_set = CleanSetConfig(fraction=spec.clean_fraction, size=spec.clean_size, seed=config["seed"])
        run_purify(PurifyCommand(
            model=str(model_dir(run_dir, config["victim"]) / "model"), clean=config["dataset"]["spec"],
            clean_set=clean_set, base=_base(config) if gives_base(spec) else None, method=spec.method, params=spec.params,
            epur=spec.epur, out=str(out), precision=_precision(config)))
    return _evaluate(config, out, data)


def run_guard_defense(run_dir: Path, config: dict[str, Any], cid: str) -> dict[str, Any]:
    """``unbackdoor guard`` in front of the victim, fitted on a seeded clean set and measured on the
    attack's clean and triggered test sets: end-to-end CACC and ASR (the cell's), FRR and FAR."""
    from unbackdoor.commands import GuardCommand, run_guard

    spec = GuardDefenseSpec.model_validate(config["defence"])
    out = model_dir(run_dir, cid) / "guard"
    if out.exists():  # finished by an earlier attempt
        record = json.loads((out / "guard.json").read_text(encoding="utf-8"))
    else:
        from unbackdoor.data.sampling import CleanSetConfig

        record = run_guard(GuardCommand(
            model=str(model_dir(run_dir, config["victim"]) / "model"), clean=config["dataset"]["spec"],
            clean_set=CleanSetConfig(fraction=spec.clean_fraction, size=spec.clean_size, seed=config["seed"]),
            method=spec.method, params=spec.params, eval_data=victim_data(run_dir, config),
            max_length=config["max_length"], out=str(out), precision=_precision(config)))
    m = record["metrics"]
    return {"cacc": m["cacc"], "asr": m["asr"], "frr": m["frr"], "far": m["far"], "budget": m["budget"],
            "unguarded_cacc": m["unguarded_cacc"], "unguarded_asr": m["unguarded_asr"], "target_label": m["target_label"],
            "n_clean": m["n_clean"], "n_triggered": m["n_triggered"], "guard": record["guard"].get("lm") or record["method"]}


def run_unlearn_defense(run_dir: Path, config: dict[str, Any], cid: str) -> dict[str, Any]:
    """``unbackdoor detect`` on the poisoned rows, then ``unbackdoor unlearn`` of the flagged ones."""
    from unbackdoor.commands import UnlearnCommand, run_unlearn
    from unbackdoor.commands import DetectCommand, run_detect
    from unbackdoor.detect.output import FLAGGED_FILE
    from unbackdoor.data.sampling import CleanSetConfig

    spec = UnlearnDefenseSpec.model_validate(config["defence"])
    folder = model_dir(run_dir, cid)
    data = victim_data(run_dir, config)
    seed = config["seed"]
    if not (folder / "detect").exists():
        run_detect(DetectCommand(
            data=data, clean=config["dataset"]["spec"], method=spec.detector, params=spec.detector_params,
            clean_set=CleanSetConfig(fraction=spec.clean_fraction, size=spec.clean_size, seed=seed), model=config["model"],
            rate=spec.rate, max_train=config["max_train"], max_length=config["max_length"], out=str(folder / "detect"),
            precision=_precision(config)))
    if (folder / "model").exists():  # finished by an earlier attempt
        metrics = _evaluate(config, folder / "model", data)
    else:
        metrics = run_unlearn(UnlearnCommand(
            model=str(model_dir(run_dir, config["victim"]) / "model"), forget=str(folder / "detect" / FLAGGED_FILE),
            retain=config["dataset"]["spec"], clean_set=CleanSetConfig(fraction=spec.clean_fraction,
                                                                        size=spec.clean_size, seed=seed),
            method=spec.method, params=spec.params, base=_base(config), train_data=data,
            max_train=config["max_train"], train_seed=seed, eval_data=data, out=str(folder / "model"),
            precision=_precision(config)))["metrics"]
    return {**metrics, "detection": detection_quality(folder, data)}


def detection_quality(folder: Path, data: str) -> dict[str, Any]:
    """How well an unlearn cell's ``detect`` step found the poisoned rows: precision and recall of
    the flagged rows, AUROC of the scores, against the true flags. Evaluation, after the defence ran."""
    from unbackdoor.data import load_poisoned_task
    from unbackdoor.detect.output import SCORES_FILE
    from unbackdoor.detect.metrics import scores_file_metrics

    return scores_file_metrics(folder / "detect" / SCORES_FILE, load_poisoned_task(data).flags)


def run_cell(run_dir: Path, cell: Claimed) -> dict[str, Any]:
    """Run one claimed cell; its metrics."""
    config = cell.config
    if cell.kind == "victim":
        return run_victim(run_dir, config)
    if cell.kind == "floor-model":
        return run_floor_model(run_dir, config, cell.id)
    if cell.kind == "floor":
        return run_floor(run_dir, config)
    if cell.kind == "train":
        return run_train_defense(run_dir, config, cell.id)
    if cell.kind == "purify":
        return run_purify_defense(run_dir, config, cell.id)
    if cell.kind == "unlearn":
        return run_unlearn_defense(run_dir, config, cell.id)
    if cell.kind == "guard":
        return run_guard_defense(run_dir, config, cell.id)
    raise ConfigError(f"cell {cell.id}: unknown kind {cell.kind!r}")


# ----------------------------------------------------------------------------- measuring
def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the source checkout, or None (not a checkout, no git)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def reset_peak_memory() -> str:
    """Start a new peak-memory window; return its scope: ``cell`` or ``process`` (not resettable)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        return "cell"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM
    except OSError:
        return "process"
    return "cell"


def peak_memory(scope: str) -> float:
    """Peak memory (MiB) since :func:`reset_peak_memory` (GPU allocations when CUDA is in use)."""
    import torch

    from unbackdoor.utils.resources import peak_memory_mb

    if scope == "cell" and not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return peak_memory_mb()


def prune_model(run_dir: Path, cell: Claimed) -> None:
    """Remove a finished defence cell's model folder, moving its ``unbackdoor.json`` (the defence's
    report and choices) up into the cell folder. No later cell reads a defence's model (they read the
    victims and never-poisoned models), and at ~90 MB per MiniLM model a 645-cell grid kept 56 GB."""
    folder = model_dir(run_dir, cell.id)
    if cell.kind not in PRUNED_KINDS or not (folder / "model").is_dir():
        return
    if (folder / "model" / "unbackdoor.json").exists():
        os.replace(folder / "model" / "unbackdoor.json", folder / "unbackdoor.json")
    shutil.rmtree(folder / "model")


def execute(run_dir: Path, store: Store, cell: Claimed, commit: str | None, keep_models: bool = False) -> bool:
    """Run a claimed cell and record its outcome; a failure is recorded, never raised. A finished
    defence cell's model is then removed unless ``keep_models`` (:func:`prune_model`)."""
    scope = reset_peak_memory()
    start = time.perf_counter()
    metrics, error = None, None
    try:
        metrics = run_cell(run_dir, cell)
    except UnbackdoorError as exc:
        error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - one cell's crash must not stop the grid
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
    wall = time.perf_counter() - start
    if error is not None:
        logger.warning("cell %s failed: %s", cell.id, error.splitlines()[0])
    store.finish(cell, metrics=metrics, error=error, wall_s=wall, peak_memory_mb=peak_memory(scope),
                 peak_memory_scope=scope, version=__version__, git_commit=commit)
    if error is None and not keep_models:  # after finish: an interrupted cell never finds its model gone
        prune_model(run_dir, cell)
    return error is None


# ----------------------------------------------------------------------------- workers
def work(run_dir: str | Path, *, poll_s: float = 2.0, on_cell: Callable[[], None] | None = None,
         cells: Slice = EVERY_CELL, max_cells: int | None = None, keep_models: bool = False) -> int:
    """One worker: claim and run cells (of the slice ``cells``) until none is left to claim and none
    is running, or until it ran ``max_cells``. Returns the number of cells this worker ran;
    ``on_cell()`` is called after each."""
    run_dir = Path(run_dir)
    store = Store(run_dir)
    commit = git_commit()
    ran, warned = 0, False
    while True:
        cell = store.claim(cells=cells)
        if not warned:
            warned = warn_oversubscribed(store)
        if cell is None:
            if store.counts().get("running", 0) == 0:
                return ran
            time.sleep(poll_s)  # waiting for another worker's cell this grid depends on
            continue
        logger.info("cell %s (attempt %d)", cell.id, cell.attempt)
        execute(run_dir, store, cell, commit, keep_models)
        ran += 1
        if on_cell is not None:
            on_cell()
        if max_cells is not None and ran >= max_cells:
            return ran


def warn_oversubscribed(store: Store) -> bool:
    """Warn (and return True) when this process runs several torch threads while another process of this
    host works on the same store: each then takes a thread per core, and the cores, oversubscribed, ran
    cells 10-20 times slower here (two ``bench --workers 1`` processes on 2 cores). One ``bench
    --workers N`` gives each worker one thread."""
    import torch

    others = store.other_workers()
    if not others or torch.get_num_threads() == 1:
        return False
    logger.warning("another process (pid %s) runs cells of this store on this host while this one uses %d torch "
                   "threads: the cores are oversubscribed and every cell runs many times slower; run one "
                   "`unbackdoor bench --workers N` instead (one thread per worker), or set OMP_NUM_THREADS so the "
                   "threads add up to the cores", ", ".join(map(str, others)), torch.get_num_threads())
    return True


CELLS_PER_WORKER = 20  # [OURS] a worker process runs this many cells, then a fresh one takes over
RECYCLED = 3  # a worker's exit status when it stopped at CELLS_PER_WORKER (more cells may be left)


def worker_command(run_dir: Path, cells: Slice = EVERY_CELL, keep_models: bool = False) -> list[str]:
    """The command line of one worker process."""
    slice_args = [*(["--seeds", ",".join(map(str, cells.seeds))] if cells.seeds is not None else []),
                  *(["--attacks", ",".join(cells.attacks)] if cells.attacks is not None else [])]
    return [sys.executable, "-m", "unbackdoor.bench.runner", str(run_dir), *slice_args,
            *(["--keep-models"] if keep_models else []), "--max-cells", str(CELLS_PER_WORKER)]


def spawn_workers(run_dir: Path, n: int, cells: Slice = EVERY_CELL, keep_models: bool = False) -> list[subprocess.Popen]:
    """``n`` worker processes, one torch thread each; with several GPUs, worker i sees GPU i mod #GPUs."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    procs = []
    for i in range(n):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        procs.append(subprocess.Popen(worker_command(run_dir, cells, keep_models), env=env))
    return procs


def _progress(store: Store, cells: Slice) -> Any:
    from tqdm import tqdm

    counts = store.counts(cells)
    finished = counts.get("done", 0) + counts.get("failed", 0)
    return tqdm(total=sum(counts.values()), initial=finished, desc="cells", unit="cell", file=sys.stderr,
                dynamic_ncols=True)


def _refresh(bar: Any, store: Store, cells: Slice) -> None:
    counts = store.counts(cells)
    bar.n = counts.get("done", 0) + counts.get("failed", 0)
    bar.set_postfix(failed=counts.get("failed", 0), running=counts.get("running", 0), refresh=False)
    bar.refresh()


def prepare(config_path: str | Path, run_dir: str | Path | None, retry_failed: bool = False,
            cells: Slice = EVERY_CELL, rerun: Sequence[str] = ()) -> tuple[Path, Store]:
    """Validate the config (and the slice ``cells``), create or reopen the run dir's store, add the grid's
    cells, re-queue failed cells if asked, the finished cells of the ``rerun`` defences (of the slice;
    their outputs are removed first), dead workers' cells and finished cells whose models are gone."""
    config = load_bench_config(config_path)
    check_slice(config, cells)
    strays = sorted(set(rerun) - {d.name for d in config.defenses})
    if strays:
        raise ConfigError(f"--rerun {', '.join(strays)}: not among the config's defences (a victim or the floor "
                          "is rerun by removing its model folder)")
    run = resolve_run_dir(config, run_dir)
    store = Store(run)
    grid = expand(config, capped_datasets(config, run))
    changed = store.add_cells(grid)
    if changed:
        raise ConfigError(f"{run}: holds cells of another config ({', '.join(changed[:3])}"
                          f"{', ...' if len(changed) > 3 else ''} differ or are gone"
                          f"{_first_difference(store, grid, changed)}); "
                          "use another --run-dir (adding seeds, attacks or defences to a config is fine)")
    store.set_meta("config", config.model_dump(mode="json"))
    write_json(run / CONFIG_COPY, config.model_dump(mode="json"))
    if retry_failed:
        logger.info("re-queued %d failed cells", store.retry_failed())
    if rerun:
        again = [c["id"] for c in store.cells() if c["defence"] in set(rerun) and c["status"] in ("done", "failed")
                 and cells.holds(c)]
        for cid in again:
            shutil.rmtree(model_dir(run, cid), ignore_errors=True)  # the cell's own outputs, under the run dir
        store.requeue(again)
        logger.info("re-queued %d cells of %s", len(again), ", ".join(rerun))
    store.reset_dead_workers()
    lost = requeue_lost_models(run, store)
    if lost:
        logger.warning("%d finished cells whose model folder is gone are run again: %s", len(lost), ", ".join(lost))
    return run, store


def _first_difference(store: Store, grid: Sequence[CellSpec], changed: Sequence[str]) -> str:
    """Where the first of the ``changed`` cells (as ``Store.add_cells`` found them) that the grid still has
    differs from its stored config, e.g. ``; in X: dataset.spec 'a' -> 'b'`` (a run dir given once
    relative and once absolute changes every cell's data path); "" when only cells are gone."""
    given = {cell.id: cell.config for cell in grid}
    cell_id = next((cid for cid in changed if cid in given), None)
    if cell_id is None:
        return ""
    stored = next(c["config"] for c in store.cells() if c["id"] == cell_id)
    path, old, new = _dict_difference(stored, json.loads(json.dumps(given[cell_id])))  # compared as stored: JSON
    return f"; in {cell_id}: {path} {old!r} -> {new!r}"


def _dict_difference(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any]:
    """The first key path where two JSON values differ, and the two values there."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _dict_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
    return path, old, new


def check_slice(config: BenchConfig, cells: Slice) -> None:
    """A clear error when the slice names a seed or an attack the config does not have."""
    for flag, asked, known in (("--seed", cells.seeds, config.seeds),
                               ("--attack", cells.attacks, [a.name for a in config.attacks])):
        unknown = sorted(set(asked or ()) - set(known))
        if unknown:
            raise ConfigError(f"{flag} {', '.join(map(str, unknown))}: not among the config's "
                              f"{flag[2:]}s ({', '.join(map(str, known))})")


def capped_datasets(config: BenchConfig, run: Path) -> dict[str, str]:
    """Write each dataset with ``max_dev``/``max_test`` once into ``RUN_DIR/data/NAME`` (through a work
    dir renamed when complete); its spec for the cells, by dataset name."""
    specs: dict[str, str] = {}
    for ds in config.datasets:
        if not ds.capped:
            continue
        folder = run / "data" / ds.name
        meta = {"source": ds.spec, "max_dev": ds.max_dev, "max_test": ds.max_test, "seed": EVAL_CAP_SEED}
        if not (folder / "meta.json").exists():
            task = cap_eval_splits(load_task(ds.spec), ds.max_dev, ds.max_test)
            with atomic_output_dir(folder) as work:
                write_clean_task(task, work, meta)
        elif {k: read_meta(folder).get(k) for k in meta} != meta:
            raise ConfigError(f"{folder}: holds dataset {ds.name} capped otherwise ({read_meta(folder)}); "
                              "use another --run-dir")
        specs[ds.name] = str(folder)
    return specs


def resolve_run_dir(config: BenchConfig, run_dir: str | Path | None) -> Path:
    """The run folder: ``run_dir``, else ``runs/bench/NAME``."""
    return Path(run_dir) if run_dir is not None else Path("runs") / "bench" / config.name


def requeue_lost_models(run: Path, store: Store) -> list[str]:
    """Finished victim and floor-model cells whose model folder is gone while a pending cell reads it
    (a store carried to another machine without its models, say) go back to pending; their ids.
    Training is seeded, so the rerun rebuilds the same model on the same kind of machine."""
    cells = store.cells()
    needed = {dep for c in cells if c["status"] == "pending" for dep in c["after"]}
    lost = [c["id"] for c in cells if c["status"] == "done" and c["kind"] in ("victim", "floor-model")
            and c["id"] in needed and not (model_dir(run, c["id"]) / "model").exists()]
    store.requeue(lost)
    return lost


def run_bench(config_path: str | Path, run_dir: str | Path | None = None, workers: int = 1,
              retry_failed: bool = False, poll_s: float = 2.0, seeds: Sequence[int] | None = None,
              rerun: Sequence[str] = (), attacks: Sequence[str] | None = None,
              keep_models: bool = False) -> dict[str, int]:
    """Run (or resume) a grid, or only the cells of ``seeds`` and/or ``attacks`` (a slice: the other
    cells stay pending in the store, for a later run); return the slice's cell counts by status.
    Results: RUN_DIR/results.sqlite (+ results.json). Defence cells' models are removed once
    measured unless ``keep_models``."""
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    cells = Slice(None if seeds is None else tuple(seeds), None if attacks is None else tuple(attacks))
    run, store = prepare(config_path, run_dir, retry_failed, cells, rerun)
    bar = _progress(store, cells)
    try:
        if workers == 1:
            work(run, poll_s=poll_s, on_cell=lambda: _refresh(bar, store, cells), cells=cells, keep_models=keep_models)
        else:
            procs = spawn_workers(run, workers, cells, keep_models)
            while procs:
                _refresh(bar, store, cells)
                time.sleep(poll_s)
                recycled = [p for p in procs if p.poll() == RECYCLED]
                procs = [p for p in procs if p.poll() is None]
                if recycled:  # memory a process gathers over many cells is returned; the work goes on
                    procs += spawn_workers(run, len(recycled), cells, keep_models)
        _refresh(bar, store, cells)
    finally:
        bar.close()
    export_json(store, run / RESULTS_JSON)
    return store.counts(cells)


def main(argv: list[str] | None = None) -> None:
    """A worker process: ``python -m unbackdoor.bench.runner RUN_DIR [--seeds 0,1] [--attacks a,b]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="unbackdoor.bench.runner")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seeds", type=lambda text: tuple(int(s) for s in text.split(",")), default=None)
    parser.add_argument("--attacks", type=lambda text: tuple(text.split(",")), default=None)
    parser.add_argument("--max-cells", type=int, default=None, help="exit (status 3) after this many cells")
    parser.add_argument("--keep-models", action="store_true", help="keep defence cells' models")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if os.environ.get("OMP_NUM_THREADS") == "1":
        import torch

        torch.set_num_threads(1)
    ran = work(args.run_dir, cells=Slice(args.seeds, args.attacks), max_cells=args.max_cells,
               keep_models=args.keep_models)
    if args.max_cells is not None and ran >= args.max_cells:
        sys.exit(RECYCLED)


if __name__ == "__main__":  # pragma: no cover
    main()
