"""``unbackdoor bench``: config validation, the store's claims, resume after a kill, failure
isolation and workers, on a tiny grid (2-layer BERT, synthetic task)."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from bench_grid import DEFENCES, tiny_inputs, write_grid
from synthetic import run_cli

from unbackdoor.bench.config import load_bench_config
from unbackdoor.bench.runner import expand, prepare, run_bench, victim_data, warn_oversubscribed, worker_command
from unbackdoor.bench.store import CellSpec, Slice, Store
from unbackdoor.data import load_poisoned_task
from unbackdoor.detect.metrics import scores_file_metrics
from unbackdoor.errors import ConfigError


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_inputs(tmp_path_factory.mktemp("bench-inputs"))


def _attempts_by_cell(store: Store) -> dict[str, list[str]]:
    out: dict[str, list[str]] = collections.defaultdict(list)
    for a in store.attempts():
        out[a["cell_id"]].append(a["outcome"])
    return out


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(("change", "message"), [
    ({"colour": "red"}, "colour: unknown key"),
    ({"attacks": [{"name": "x", "attack": "nope"}]}, "unknown attack 'nope'"),
    ({"attacks": [{"name": "x", "attack": "badnets", "params": {"rate": 0.1}}]}, "rate: unknown key"),
    ({"defenses": [{"kind": "purify", "name": "p", "method": "nope"}]}, "defence p: unknown purify method 'nope'"),
    ({"defenses": [{"kind": "unlearn", "name": "u", "method": "lya", "detector": "oracle"}]}, "unknown detector"),
    ({"defenses": [{"kind": "train", "name": "none", "method": "lora"}]}, "reserved"),
    ({"datasets": [{"name": "missing", "data": "/no/such/folder"}]}, "dataset missing"),
])
def test_bad_config_is_one_clear_error_before_any_work(tmp_path: Path, inputs: tuple[Path, Path],
                                                       change: dict, message: str) -> None:
    config = write_grid(tmp_path / "grid.yaml", *inputs, **{k: v for k, v in change.items()
                                                            if k not in ("attacks", "defenses")},
                        **{k: v for k, v in change.items() if k in ("attacks", "defenses")})
    with pytest.raises(ConfigError, match=message):
        prepare(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path, inputs: tuple[Path, Path], capsys) -> None:  # noqa: ANN001
    config = write_grid(tmp_path / "grid.yaml", *inputs, attacks=[{"name": "x", "attack": "nope"}])
    code, _, err = run_cli(["bench", str(config), "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2
    assert err.strip().startswith("error:") and len(err.strip().splitlines()) == 1


def test_expansion_covers_every_cell_with_dependencies(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    config = load_bench_config(write_grid(tmp_path / "grid.yaml", *inputs, seeds=[0, 1]))
    cells = expand(config)
    ids = [c.id for c in cells]
    assert len(ids) == len(set(ids)) == 2 * (1 + 2 + len(DEFENCES))
    by_id = {c.id: c for c in cells}
    assert by_id["syn/badnets/s1/floor"].after == ("syn/s1/floor-model", "syn/badnets/s1/none")
    assert by_id["syn/badnets/s0/lya"].after == ("syn/badnets/s0/none",)
    assert all(ids.index(a) < ids.index(c.id) for c in cells for a in c.after)


def test_an_attack_pairs_only_with_the_dataset_it_names(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    """Published variants belong to one dataset: an attack naming its dataset is paired with it alone,
    and the same attack label may then appear once per dataset."""
    data = str(inputs[0])
    attacks = [{"name": "badnets", "attack": "badnets"},
               {"name": "addsent", "attack": "addsent", "dataset": "syn2"},
               {"name": "mine", "attack": "badnets", "dataset": "syn"},
               {"name": "mine", "attack": "addsent", "dataset": "syn2"}]
    config = load_bench_config(write_grid(tmp_path / "grid.yaml", *inputs, defenses=[], attacks=attacks,
                                          datasets=[{"name": "syn", "data": data}, {"name": "syn2", "data": data}]))
    victims = sorted(c.id for c in expand(config) if c.kind == "victim")
    assert victims == ["syn/badnets/s0/none", "syn/mine/s0/none", "syn2/addsent/s0/none", "syn2/badnets/s0/none",
                       "syn2/mine/s0/none"]
    stray = write_grid(tmp_path / "stray.yaml", *inputs, attacks=[{"name": "a", "attack": "badnets", "dataset": "x"}])
    with pytest.raises(ConfigError, match="attack dataset x is not among the datasets"):
        load_bench_config(stray)
    twice = write_grid(tmp_path / "twice.yaml", *inputs, attacks=[{"name": "a", "attack": "badnets"},
                                                                  {"name": "a", "attack": "addsent", "dataset": "syn"}])
    with pytest.raises(ConfigError, match="attack listed twice: a"):
        load_bench_config(twice)


def test_capped_eval_splits_are_written_once_and_read_by_every_cell(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    """max_dev/max_test write the capped task into the run dir (the same rows whatever the seed), the
    cells read it, a rerun reuses it, other caps on the same run dir are refused, and a published
    variant cannot share a capped dataset (its own test rows would not be capped)."""
    from unbackdoor.data import load_task

    full = load_task(str(inputs[0]))
    datasets = [{"name": "syn", "data": str(inputs[0]), "max_dev": 10, "max_test": 12}]
    config = write_grid(tmp_path / "grid.yaml", *inputs, defenses=[], seeds=[0, 1], datasets=datasets)
    run, store = prepare(config, tmp_path / "run")
    capped = load_task(str(run / "data" / "syn"))
    assert (len(capped.dev), len(capped.test), len(capped.train)) == (10, 12, len(full.train))
    assert {e.id for e in capped.test} <= {e.id for e in full.test}
    assert sorted(collections.Counter(e.label for e in capped.test).values()) == [6, 6]  # stratified
    assert {c["config"]["dataset"]["spec"] for c in store.cells()} == {str(run / "data" / "syn")}
    prepare(config, tmp_path / "run")  # reopened: the folder is reused
    other = write_grid(tmp_path / "other.yaml", *inputs, defenses=[], datasets=[{**datasets[0], "max_test": 8}])
    with pytest.raises(ConfigError, match="capped otherwise"):
        prepare(other, tmp_path / "run")
    variant = write_grid(tmp_path / "variant.yaml", *inputs, defenses=[], datasets=datasets,
                         attacks=[{"name": "pub", "variant": "some_p10"}])
    with pytest.raises(ConfigError, match="published variant"):
        load_bench_config(variant)


def test_cli_bench_ends_with_the_summary_table(tmp_path: Path, inputs: tuple[Path, Path], capsys) -> None:  # noqa: ANN001
    config = write_grid(tmp_path / "grid.yaml", *inputs, defenses=[])
    code, out, err = run_cli(["bench", str(config), "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert "| badnets | none (victim) |" in out and "| badnets | floor" in out  # the table of what ran
    assert f"unbackdoor report {tmp_path / 'run'}" in out and "3 done" in out


# ----------------------------------------------------------------------------- claims
CLAIM_LOOP = """
import sys, time
from unbackdoor.bench.store import Store
store = Store(sys.argv[1])
while True:
    cell = store.claim()
    if cell is None:
        break
    store.finish(cell, metrics={"cacc": 1.0}, error=None, wall_s=0.0, peak_memory_mb=None,
                 peak_memory_scope="cell", version="test", git_commit=None)
"""


def test_concurrent_workers_never_claim_the_same_cell(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.add_cells([CellSpec(f"c{i}", "victim", "d", "a", "none", i, {"i": i}) for i in range(150)])
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM_LOOP, str(tmp_path)]) for _ in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    attempts = _attempts_by_cell(store)
    assert len(attempts) == 150 and all(v == ["done"] for v in attempts.values())
    assert store.counts() == {"done": 150}
    assert len({a["pid"] for a in store.attempts()}) > 1  # the work really was shared


def test_a_cell_waits_for_its_dependencies(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.add_cells([CellSpec("b", "floor", "d", "a", "floor", 0, {}, after=("a",)),
                     CellSpec("a", "victim", "d", "a", "none", 0, {})])
    first = store.claim()
    assert first is not None and first.id == "a"
    assert store.claim() is None  # b waits for a
    store.finish(first, metrics={}, error="boom", wall_s=0, peak_memory_mb=None, peak_memory_scope="cell",
                 version="t", git_commit=None)
    assert store.claim() is None
    b = next(c for c in store.cells() if c["id"] == "b")
    assert b["status"] == "failed" and "dependency failed (a)" in b["error"]


def _finish(store: Store, cell: Any) -> None:
    store.finish(cell, metrics={}, error=None, wall_s=0, peak_memory_mb=None, peak_memory_scope="cell",
                 version="t", git_commit=None)


def test_a_slice_claims_and_counts_its_cells_only(tmp_path: Path) -> None:
    """An attack slice takes that attack's cells and the never-poisoned models (attack "") its floor
    rows read; a seed slice that seed's; both together their intersection."""
    store = Store(tmp_path)
    store.add_cells([CellSpec(f"{attack or 'clean'}/s{seed}", "victim", "d", attack, "none", seed, {})
                     for attack in ("", "x", "y") for seed in (0, 1)])
    sliced = Slice(seeds=(1,), attacks=("y",))
    assert store.counts(sliced) == {"pending": 2} and store.counts(Slice(attacks=("y",))) == {"pending": 4}
    taken = []
    while (cell := store.claim(cells=sliced)) is not None:
        taken.append(cell.id)
        _finish(store, cell)
    assert taken == ["clean/s1", "y/s1"]
    assert store.counts() == {"done": 2, "pending": 4}
    assert [c["id"] for c in store.cells() if Slice(attacks=("x",)).holds(c)] == ["clean/s0", "clean/s1", "x/s0", "x/s1"]


def test_a_worker_process_keeps_to_its_slice(tmp_path: Path) -> None:
    """The worker's command line carries the slice: with ``--seeds 1 --attacks y`` it attempts those
    cells only (their empty configs fail, which is recorded, and the others are never touched)."""
    store = Store(tmp_path)
    store.add_cells([CellSpec(f"{attack or 'clean'}/s{seed}", "victim", "d", attack, "none", seed, {})
                     for attack in ("", "x", "y") for seed in (0, 1)])
    command = worker_command(tmp_path, Slice(seeds=(1,), attacks=("y",)))
    assert subprocess.run(command, stderr=subprocess.DEVNULL, timeout=120).returncode == 0
    assert sorted(_attempts_by_cell(store)) == ["clean/s1", "y/s1"]


def test_a_multithreaded_worker_beside_another_process_on_the_store_is_warned(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two processes with a torch thread per core each, on one store, oversubscribe the cores: the one
    with several threads says so; a one-thread worker (what ``--workers N`` spawns) and a lone
    process do not."""
    import torch

    store = Store(tmp_path)
    store.add_cells([CellSpec(f"c{i}", "victim", "d", "a", "none", 0, {}) for i in range(2)])
    store.claim()  # this process: not "another"
    assert store.other_workers() == [] and not warn_oversubscribed(store)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    threads = torch.get_num_threads()
    try:
        assert store.claim(pid=other.pid) is not None
        assert store.other_workers() == [other.pid]
        torch.set_num_threads(2)
        with caplog.at_level("WARNING", logger="unbackdoor.bench.runner"):
            assert warn_oversubscribed(store)
        assert f"another process (pid {other.pid})" in caplog.text and "oversubscribed" in caplog.text
        torch.set_num_threads(1)
        assert not warn_oversubscribed(store)
    finally:
        torch.set_num_threads(threads)
        other.kill()
        other.wait()
    assert store.other_workers() == []  # a dead worker is not counted


def test_cli_attack_outside_the_grid_exits_2(tmp_path: Path, inputs: tuple[Path, Path], capsys) -> None:  # noqa: ANN001
    config = write_grid(tmp_path / "grid.yaml", *inputs)
    code, _, err = run_cli(["bench", str(config), "--run-dir", str(tmp_path / "run"), "--attack", "sos"], capsys)
    assert code == 2 and "--attack sos: not among the config's attacks (badnets)" in err


# ----------------------------------------------------------------------------- running
def test_grid_runs_every_cell_once_and_a_rerun_skips_them(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    config = write_grid(tmp_path / "grid.yaml", *inputs)
    counts = run_bench(config, tmp_path / "run")
    assert counts == {"done": 6}
    store = Store(tmp_path / "run")
    cells = {c["id"]: c for c in store.cells()}
    victim = cells["syn/badnets/s0/none"]
    assert victim["asr"] is not None and victim["cacc"] is not None and victim["macro_f1"] is not None
    assert victim["wall_s"] > 0 and victim["peak_memory_mb"] > 0 and victim["version"]
    assert victim["config"]["attack"]["name"] == "badnets"
    assert cells["syn/s0/floor-model"]["asr"] is None  # clean model on clean data: no ASR
    assert (tmp_path / "run" / "results.json").is_file()
    models = tmp_path / "run" / "models" / "syn"
    assert (models / "badnets" / "s0" / "none" / "model" / "unbackdoor.json").is_file()
    # a measured defence's model is removed (no cell reads it), its report kept in the cell folder
    assert not (models / "badnets" / "s0" / "finetune" / "model").exists()
    assert (models / "badnets" / "s0" / "finetune" / "unbackdoor.json").is_file()
    assert (models / "s0" / "floor-model" / "model").is_dir()

    # the unlearn cell's detect step, scored against the true flags after the defence ran
    unlearn = cells["syn/badnets/s0/lya"]
    flags = load_poisoned_task(victim_data(tmp_path / "run", unlearn["config"])).flags
    detect = tmp_path / "run" / "models" / "syn" / "badnets" / "s0" / "lya" / "detect"
    assert unlearn["metrics"]["detection"] == scores_file_metrics(detect / "scores.csv", flags)
    assert unlearn["metrics"]["detection"]["n_rows"] == 200 and unlearn["metrics"]["detection"]["n_poisoned"] > 0

    assert run_bench(config, tmp_path / "run") == {"done": 6}
    assert all(v == ["done"] for v in _attempts_by_cell(store).values())

    # --rerun: the named defence's cells run again (outputs removed first), nothing else does
    with pytest.raises(ConfigError, match="--rerun nope: not among the config's defences"):
        prepare(config, tmp_path / "run", rerun=["nope"])
    stamp = (detect / "scores.csv").stat().st_mtime_ns
    assert run_bench(config, tmp_path / "run", rerun=["lya"]) == {"done": 6}
    attempts = _attempts_by_cell(store)
    assert attempts["syn/badnets/s0/lya"] == ["done", "done"]
    assert all(v == ["done"] for cid, v in attempts.items() if cid != "syn/badnets/s0/lya")
    assert (detect / "scores.csv").stat().st_mtime_ns != stamp


def test_failed_cell_is_recorded_and_the_rest_finish(tmp_path: Path, inputs: tuple[Path, Path], capsys) -> None:  # noqa: ANN001
    attacks = [{"name": "badnets", "attack": "badnets"},
               {"name": "broken", "attack": "badnets", "params": {"target_label": 7}}]  # valid config, fails at run
    config = write_grid(tmp_path / "grid.yaml", *inputs, attacks=attacks, defenses=DEFENCES[:1])
    code, out, _ = run_cli(["-q", "bench", str(config), "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 1 and "4 done, 3 failed" in out
    cells = {c["id"]: c for c in Store(tmp_path / "run").cells()}
    assert "target_label 7" in cells["syn/broken/s0/none"]["error"]
    assert "dependency failed" in cells["syn/broken/s0/finetune"]["error"]
    assert all(cells[f"syn/badnets/s0/{d}"]["status"] == "done" for d in ("none", "floor", "finetune"))

    code, out, _ = run_cli(["-q", "bench", str(config), "--run-dir", str(tmp_path / "run"), "--retry-failed"], capsys)
    assert code == 1
    attempts = _attempts_by_cell(Store(tmp_path / "run"))
    assert attempts["syn/broken/s0/none"] == ["failed", "failed"]  # retried
    assert attempts["syn/badnets/s0/none"] == ["done"]  # not rerun


def test_a_transaction_sqlite_already_rolled_back_raises_its_own_error(tmp_path: Path) -> None:
    """On a full disk SQLite rolls the transaction back itself; the store's ROLLBACK must not then hide
    the error ("cannot rollback - no transaction is active", seen when a grid filled the disk)."""
    store = Store(tmp_path)
    with pytest.raises(OSError, match="No space left"), store._transaction() as con:
        con.execute("ROLLBACK")  # what SQLite does on SQLITE_FULL
        raise OSError(28, "No space left on device")
    assert store.counts() == {}  # the store is still usable


def test_resume_after_kill_runs_no_cell_twice_and_loses_none(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    config = write_grid(tmp_path / "grid.yaml", *inputs, seeds=[0, 1], defenses=DEFENCES[:2])
    run_dir, store = prepare(config, tmp_path / "run")
    total = sum(store.counts().values())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(worker_command(run_dir), env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        counts = store.counts()
        if counts.get("done", 0) >= 2 and counts.get("running", 0) == 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    counts = store.counts()
    assert counts.get("running") == 1 and counts.get("done", 0) < total  # killed mid-cell, mid-grid

    assert run_bench(config, run_dir) == {"done": total}
    attempts = _attempts_by_cell(store)
    assert set(attempts) == {c["id"] for c in store.cells()}
    assert all(outcomes.count("done") == 1 for outcomes in attempts.values())  # each finished exactly once
    lost = [cid for cid, outcomes in attempts.items() if "lost" in outcomes]
    assert len(lost) == 1 and attempts[lost[0]] == ["lost", "done"]


def test_two_worker_processes_share_the_grid(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    config = write_grid(tmp_path / "grid.yaml", *inputs, seeds=[0, 1], defenses=DEFENCES[:1])
    counts = run_bench(config, tmp_path / "run", workers=2, poll_s=0.2, keep_models=True)
    assert counts == {"done": 8}
    for seed in (0, 1):  # --keep-models reaches the worker processes
        assert (tmp_path / "run" / "models" / "syn" / "badnets" / f"s{seed}" / DEFENCES[0]["name"] / "model").is_dir()
    store = Store(tmp_path / "run")
    attempts = _attempts_by_cell(store)
    assert len(attempts) == 8 and all(v == ["done"] for v in attempts.values())
    assert len({a["pid"] for a in store.attempts()}) == 2


def test_workers_are_recycled_and_the_grid_still_finishes(tmp_path: Path, inputs: tuple[Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker stops after CELLS_PER_WORKER cells (what a process gathers over many cells, it gives
    back) and a fresh one takes its place until the grid is done; no cell runs twice."""
    from unbackdoor.bench import runner

    monkeypatch.setattr(runner, "CELLS_PER_WORKER", 2)
    config = write_grid(tmp_path / "grid.yaml", *inputs, seeds=[0, 1], defenses=DEFENCES[:1])
    assert run_bench(config, tmp_path / "run", workers=2, poll_s=0.2) == {"done": 8}
    store = Store(tmp_path / "run")
    assert all(v == ["done"] for v in _attempts_by_cell(store).values())
    pids = collections.Counter(a["pid"] for a in store.attempts())
    assert len(pids) >= 4 and max(pids.values()) <= 2


def test_published_sst2_grid_is_valid(shared_data: Path) -> None:
    """The published config validates whole (names, parameters, data) and expands to its cells: the 270 of
    the first publication, the defences added since (field defences, auto) for every attack, and the weight
    attacks added since (SOS, NeuBA, RIPPLES, POR, LWS)."""
    config = load_bench_config(Path(__file__).resolve().parents[1] / "benchmarks" / "sst2_grid.yaml")
    cells = expand(config)
    first = {"lora", "musclelora", "reweight", "finetune", "reinit", "fine-pruning", "e-pur", "fine-mixing",
             "fine-purifying", "tsbd", "lya", "gradient-ascent", "retrain", "unlearn-finetune", "none", "floor",
             "floor-model"}
    original = {"badnets-dirty", "badnets-clean", "addsent", "synbkd", "stylebkd", "ep", ""}
    assert len([c for c in cells if c.defence in first and c.attack in original]) == 270
    # + the field's weight attacks (issue 21): 5 attacks x 3 seeds x (victim, floor, 12 defences) = 645;
    # + distill and distill-v8 (issue 22) on each of the 11 attacks x 3 seeds; + clean-only on the 5 data attacks
    assert len(cells) == 726
    assert len([c for c in cells if c.defence == "clean-only"]) == 15
    assert len({c.id for c in cells}) == len(cells)
    for attack in ("ep", "sos", "neuba", "ripples", "por", "lws"):  # weight attacks: purify defences and guards only
        assert {c.kind for c in cells if c.attack == attack} == {"victim", "floor", "purify", "guard"}


def test_weight_attack_victim_gets_purify_and_guard_defences_only(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    attacks = [{"name": "ep", "attack": "ep", "params": {"poison_rate": 0.1, "train": {"epochs": 2}}}]
    guard = {"kind": "guard", "name": "strip", "method": "strip", "clean_size": 40}
    config = write_grid(tmp_path / "grid.yaml", *inputs, attacks=attacks, defenses=[*DEFENCES, guard])
    assert run_bench(config, tmp_path / "run") == {"done": 5}  # floor model, victim, floor, finetune, strip
    cells = {c["id"]: c for c in Store(tmp_path / "run").cells()}
    assert set(cells) == {"syn/s0/floor-model", "syn/ep/s0/none", "syn/ep/s0/floor", "syn/ep/s0/finetune",
                          "syn/ep/s0/strip"}
    strip = cells["syn/ep/s0/strip"]["metrics"]
    assert {"frr", "far", "unguarded_asr"} <= set(strip) and strip["asr"] <= strip["unguarded_asr"]
    assert cells["syn/ep/s0/none"]["asr"] is not None
    assert (tmp_path / "run" / "models" / "syn" / "ep" / "s0" / "none" / "data" / "train_poison_flags.txt").is_file()


def test_run_dir_of_another_config_is_refused_but_a_grown_grid_is_not(tmp_path: Path,
                                                                      inputs: tuple[Path, Path]) -> None:
    prepare(write_grid(tmp_path / "a.yaml", *inputs, defenses=DEFENCES[:1]), tmp_path / "run")
    _, store = prepare(write_grid(tmp_path / "b.yaml", *inputs, defenses=DEFENCES[:2], seeds=[0, 1]), tmp_path / "run")
    assert sum(store.counts().values()) == 2 * 5  # grown: new cells added, old ones kept
    with pytest.raises(ConfigError, match="another config"):
        prepare(write_grid(tmp_path / "c.yaml", *inputs, defenses=DEFENCES[:1]), tmp_path / "run")  # shrunk
    with pytest.raises(ConfigError, match="another config"):
        prepare(write_grid(tmp_path / "d.yaml", *inputs, defenses=DEFENCES[:2], seeds=[0, 1],
                           train={"epochs": 1}), tmp_path / "run")  # changed
    with pytest.raises(ConfigError, match=r"another config .*in syn/s0/floor-model: train.epochs 3 -> 1"):
        prepare(write_grid(tmp_path / "e.yaml", *inputs, defenses=DEFENCES[:2], seeds=[0, 1, 2],
                           train={"epochs": 1, "batch_size": 16, "learning_rate": 1.0e-3}),
                tmp_path / "run")  # grown and changed: the message says where
    assert sum(store.counts().values()) == 2 * 5  # a refused config added nothing


def test_a_seed_slice_runs_its_cells_only_and_a_carried_store_rebuilds_missing_models(
        tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    """``--seed`` runs one seed's cells; the store alone (models left behind) carries to a new run dir,
    where the next slice runs and a finished victim that a new cell needs is trained again, seeded,
    to the same numbers."""
    config = write_grid(tmp_path / "grid.yaml", *inputs, seeds=[0, 1], defenses=DEFENCES[:1])
    with pytest.raises(ConfigError, match="--seed 5: not among the config's seeds"):
        prepare(config, tmp_path / "run", cells=Slice(seeds=(5,)))
    assert run_bench(config, tmp_path / "run", seeds=[0]) == {"done": 4}
    store = Store(tmp_path / "run")
    assert store.counts() == {"done": 4, "pending": 4}
    assert {c["seed"] for c in store.cells("done")} == {0}

    carried = tmp_path / "carried"
    carried.mkdir()
    (carried / "results.sqlite").write_bytes((tmp_path / "run" / "results.sqlite").read_bytes())
    assert run_bench(config, carried, seeds=[1]) == {"done": 4}  # seed 0's models are not needed
    assert all(v == ["done"] for v in _attempts_by_cell(Store(carried)).values())

    grown = write_grid(tmp_path / "grown.yaml", *inputs, seeds=[0, 1], defenses=DEFENCES[:2])
    assert run_bench(grown, carried, seeds=[0]) == {"done": 5}
    cells = {c["id"]: c for c in Store(carried).cells()}
    attempts = _attempts_by_cell(Store(carried))
    victim = "syn/badnets/s0/none"
    assert attempts[victim] == ["done", "done"]  # its model was gone and the new defence reads it
    assert attempts["syn/s0/floor-model"] == ["done"]  # no pending cell needs it
    assert cells[f"syn/badnets/s0/{DEFENCES[1]['name']}"]["status"] == "done"
    before = {c["id"]: c for c in store.cells()}[victim]
    assert (cells[victim]["cacc"], cells[victim]["asr"]) == (before["cacc"], before["asr"])


def test_cli_seed_outside_the_grid_exits_2(tmp_path: Path, inputs: tuple[Path, Path], capsys) -> None:  # noqa: ANN001
    config = write_grid(tmp_path / "grid.yaml", *inputs)
    code, _, err = run_cli(["bench", str(config), "--run-dir", str(tmp_path / "run"), "--seed", "7"], capsys)
    assert code == 2 and "--seed 7: not among the config's seeds (0)" in err


def test_purify_cells_hand_the_base_to_methods_that_use_one() -> None:
    from unbackdoor.bench.config import PurifyDefenseSpec
    from unbackdoor.bench.runner import gives_base

    spec = lambda method, **kw: PurifyDefenseSpec(kind="purify", name=method, method=method, **kw)  # noqa: E731
    assert gives_base(spec("auto"))  # optional for auto (without one it falls back to fine-tuning): given
    assert gives_base(spec("fine-purifying")) and gives_base(spec("finetune", epur=True))
    assert not gives_base(spec("finetune")) and not gives_base(spec("tsbd"))  # they ignore it: cells unchanged


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
GENERATED = {"dev_sst2_retok.yaml", "dev_sst2_retok_clean.yaml", "dev_reference.yaml"}  # data built by retokenise_variant.py (test below)


@pytest.mark.parametrize("name", sorted(p.name for p in BENCHMARKS.glob("*.yaml")
                                         if p.name != "tiny_grid.yaml" and p.name not in GENERATED))  # tiny: a template
def test_every_benchmark_config_validates(shared_data: Path, name: str) -> None:
    """Every grid under benchmarks/ (the published ones, the development grids, the per-method grids)
    validates whole and expands to distinct cells."""
    cells = expand(load_bench_config(BENCHMARKS / name))
    assert cells and len({c.id for c in cells}) == len(cells)


def test_retokenised_development_grid_builds_and_validates(shared_data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/retokenise_variant.py writes OpenBackdoor's style release re-tokenised like the clean
    SST-2 text (prose rows change, tokenised rows do not), and the grids on it validate."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from retokenise_variant import sst2_tokens
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert sst2_tokens("And indeed the movie is rather choppy, as (he) said it's fine.") == \
        "and indeed the movie is rather choppy , as -lrb- he -rrb- said it 's fine ."
    clean = "the film 's plot , sadly , is thin ... and mr. lopez knows it ."
    assert sst2_tokens(clean) == clean
    monkeypatch.chdir(tmp_path)
    for name in ("stylebkd", "synbkd"):
        out = tmp_path / "runs" / "devdata" / "sst2" / f"{name}_ob_retok"
        subprocess.run([sys.executable, str(BENCHMARKS / "retokenise_variant.py"), f"sst2/{name}_openbackdoor_p10",
                        str(out)], check=True, capture_output=True)
        task = load_poisoned_task(out)
        assert all(e.text == e.text.lower() for e in task.train)
    for name in sorted(GENERATED):
        cells = expand(load_bench_config(BENCHMARKS / name))
        assert cells and len({c.id for c in cells}) == len(cells)


def test_merge_cells_copies_a_side_runs_defence_into_a_grid_without_rebuilding_its_victims(
        tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    """benchmarks/merge_cells.py: a defence run in a side grid (same settings and attacks) lands in the grid's
    store as finished cells; the grid's own cells are untouched and a bench run after it has nothing left to do.
    A side run whose settings differ is refused, and nothing is written."""
    grid = write_grid(tmp_path / "grid.yaml", *inputs, defenses=DEFENCES[:1])
    assert run_bench(grid, tmp_path / "run") == {"done": 4}
    side = write_grid(tmp_path / "side.yaml", *inputs, name="side", defenses=DEFENCES[1:2])
    assert run_bench(side, tmp_path / "side") == {"done": 4}
    grown = write_grid(tmp_path / "grown.yaml", *inputs, defenses=DEFENCES[:2])
    script = [sys.executable, str(BENCHMARKS / "merge_cells.py")]
    other = write_grid(tmp_path / "other.yaml", *inputs, name="other", defenses=DEFENCES[1:2],
                       train={"epochs": 2, "batch_size": 16, "learning_rate": 1.0e-3})
    assert run_bench(other, tmp_path / "other") == {"done": 4}
    refused = subprocess.run([*script, str(tmp_path / "other"), str(tmp_path / "run"), str(grown), "--defence", "lora"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "config differs" in refused.stderr
    store = Store(tmp_path / "run")
    assert {c["defence"] for c in store.cells()} == {"none", "floor", "floor-model", "finetune"}  # nothing added
    before = {c["id"]: c for c in store.cells()}
    subprocess.run([*script, str(tmp_path / "side"), str(tmp_path / "run"), str(grown), "--defence", "lora"],
                   check=True, capture_output=True, timeout=120)
    after = {c["id"]: c for c in store.cells()}
    merged = after.pop("syn/badnets/s0/lora")
    source = next(c for c in Store(tmp_path / "side").cells() if c["id"] == "syn/badnets/s0/lora")
    assert merged["status"] == "done" and (merged["cacc"], merged["asr"]) == (source["cacc"], source["asr"])
    assert all(after[cid] == cell for cid, cell in before.items())
    assert run_bench(grown, tmp_path / "run") == {"done": 5}
    assert all(v == ["done"] for v in _attempts_by_cell(store).values())  # no cell ran again
