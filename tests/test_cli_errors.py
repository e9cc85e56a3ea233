"""The ``unbackdoor`` command on bad input: exit status 2, one ``error:`` line naming the problem,
no traceback, and no output that looks complete. Plus one successful ``attack`` run.

Every case is its own process running ``python -m unbackdoor.cli ARGS``. A fresh interpreter pays
about 5 CPU-seconds of imports (torch, transformers), too slow for ~20 cases, so:

* the cases in ``ALWAYS_REAL`` (and ``--version``) run as ``subprocess.run([sys.executable, "-m",
  "unbackdoor.cli", ...])``;
* the others run in processes forked from one warm interpreter that has imported the heavy
  dependencies (but not ``unbackdoor.cli``): each child points its stdout/stderr at files and runs
  ``runpy.run_module("unbackdoor.cli", run_name="__main__")``, which is what ``-m`` does, handling
  ``SystemExit`` and uncaught exceptions as the interpreter would. Its exit status is the child's own.

``UNBACKDOOR_TEST_REAL_CLI=1`` runs every case in a fresh interpreter (slow); so does a platform
without ``fork``. All cases run concurrently, once per module; each test checks its own result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from synthetic import make_task, save_tiny_model, tiny_config, write_task

from unbackdoor.data.io import DATA_ENV, data_root, load_poisoned_task
from unbackdoor.outputs import partial_dir

CLI = [sys.executable, "-m", "unbackdoor.cli"]
REAL_ROOT = data_root()
HAVE_REAL_ROOT = (REAL_ROOT / "sst2" / "clean").is_dir()


@dataclass
class Case:
    args: list[str]  # "{base}" (the module's tmp folder) and "{out}" (this case's output) are filled in
    message: str  # must appear in the last stderr line
    real_root: bool = False  # run against the shared data root instead of the synthetic one
    marks: list = field(default_factory=list)


# "syn/<name>" folders live under the synthetic data root built by ``world``
BAD_INPUT: dict[str, Case] = {
    "missing-data-path": Case(["attack", "--data", "{base}/no-such-folder", "--out", "{out}"],
                              "no-such-folder: no such data folder"),
    "malformed-tsv": Case(["attack", "--data", "syn/malformed", "--out", "{out}"], "wrong number of columns"),
    "missing-label-column": Case(["attack", "--data", "syn/nolabel", "--out", "{out}"], "missing column 'label'"),
    "non-integer-label": Case(["attack", "--data", "syn/badlabel", "--out", "{out}"], "'good' is not an integer"),
    "empty-split": Case(["attack", "--data", "syn/empty", "--out", "{out}"], "the test split is empty"),
    "poison-rate-1.5": Case(["attack", "--data", "syn", "--out", "{out}", "--poison-rate", "1.5"],
                            "poison_rate: Input should be less than or equal to 1"),
    "poison-rate-0": Case(["attack", "--data", "syn", "--out", "{out}", "--poison-rate", "0"],
                          "poison_rate: Input should be greater than 0"),
    "target-label-outside": Case(["attack", "--data", "sst2" if HAVE_REAL_ROOT else "syn", "--out", "{out}",
                                  "--target-label", "5"],
                                 "target_label 5 is outside the label set 0..1", real_root=HAVE_REAL_ROOT),
    "unknown-attack": Case(["attack", "--data", "syn", "--out", "{out}", "--attack", "nope"],
                           "unknown attack 'nope'"),
    "unknown-option": Case(["attack", "--data", "syn", "--out", "{out}", "--bogus", "1"], "No such option: --bogus"),
    "yaml-unknown-key": Case(["attack", "--config", "{base}/unknown_key.yaml", "--out", "{out}"],
                             "bogus: unknown key"),
    "malformed-yaml": Case(["attack", "--config", "{base}/malformed.yaml", "--out", "{out}"], "malformed YAML"),
    "yaml-not-utf8": Case(
        ["attack", "--config", "{base}/latin1.yaml", "--out", "{out}"], "latin1.yaml"),
    "eval-pickle-only-model": Case(["eval", "--model", "{base}/pickle_model", "--data", "syn", "--out", "{out}"],
                                   "--allow-pickle"),
    "purify-unknown-method": Case(["purify", "--model", "{base}/pickle_model", "--clean", "syn", "--method", "nope",
                                   "--out", "{out}"], "unknown purify method 'nope'"),
    "train-pair-model-on-single-sentences": Case(
        ["train", "--data", "syn", "--model", "{base}/pair_model", "--out", "{out}", "--epochs", "1",
         "--batch-size", "8", "--max-length", "32", "--checkpoint-every", "1"],  # (the model saved max_length=32)
        "sentence-pair model"),
    "output-exists": Case(["attack", "--data", "syn", "--out", "{base}/existing"], "already exists"),
    "purify-method-needs-base": Case(["purify", "--model", "{base}/bert_model", "--clean", "syn", "--method",
                                      "fine-mixing", "--out", "{out}"], "method 'fine-mixing' needs the suspect's clean"),
    "purify-epur-needs-base": Case(["purify", "--model", "{base}/bert_model", "--clean", "syn", "--epur",
                                    "--out", "{out}"], "--epur needs the suspect's clean pre-trained base"),
    "purify-epur-with-e-pur": Case(["purify", "--model", "{base}/bert_model", "--base", "{base}/bert_model",
                                    "--clean", "syn", "--method", "e-pur", "--epur", "--out", "{out}"],
                                   "method e-pur already is E-PUR"),
    "purify-base-architecture-mismatch": Case(["purify", "--model", "{base}/bert_model", "--base", "{base}/gpt2_model",
                                               "--clean", "syn", "--method", "fine-mixing", "--out", "{out}"],
                                              "architectures differ: bert vs gpt2"),
    "scan-base-architecture-mismatch": Case(["scan", "--model", "{base}/bert_model", "--base", "{base}/gpt2_model",
                                             "--out", "{out}"], "architectures differ: bert vs gpt2"),
}
GOOD_ATTACK = Case(["attack", "--data", "syn", "--out", "{out}", "--poison-rate", "0.25", "--seed", "3"], "")
ALL_CASES = {**BAD_INPUT, "good-attack": GOOD_ATTACK}

ALWAYS_REAL = {"missing-data-path", "unknown-option", "good-attack"}
ALL_REAL = os.environ.get("UNBACKDOOR_TEST_REAL_CLI") == "1" or not hasattr(os, "fork")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    out: Path
    root: Path
    launcher: str  # "subprocess" or "fork"


# ----------------------------------------------------------------------------- inputs
def _tsv(*rows: str, header: str = "sentence\tlabel") -> str:
    return "\n".join([header, *rows]) + "\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data root with good and broken tasks, YAML configs and model folders."""
    base = tmp_path_factory.mktemp("cli")
    task = make_task(40, 10, 20)
    root = base / "data"
    write_task(task, root / "syn" / "clean")
    broken = {
        "malformed": ("train.tsv", _tsv("good film\t1", "bad\tfilm\t0")),
        "nolabel": ("dev.tsv", _tsv("good film\t1", header="sentence\tstars")),
        "badlabel": ("train.tsv", _tsv("nice film\t1", "dull film\tgood")),
        "empty": ("test.tsv", _tsv()),
    }
    for name, (file, content) in broken.items():
        write_task(task, root / "syn" / name)
        (root / "syn" / name / file).write_text(content, encoding="utf-8")

    (base / "unknown_key.yaml").write_text("data: syn\nattack: badnets\nbogus: 1\n", encoding="utf-8")
    (base / "malformed.yaml").write_text("data: [syn\nattack: badnets\n", encoding="utf-8")
    (base / "latin1.yaml").write_bytes("data: syn\nattack: badnets\n# caf\u00e9\n".encode("latin-1"))

    pickle_model = base / "pickle_model"  # config + pickle weights only: must be refused unopened
    tiny_config("bert").save_pretrained(pickle_model)
    (pickle_model / "pytorch_model.bin").write_bytes(b"not really a pickle, never to be opened")

    pair_model = save_tiny_model(base / "pair_model")  # a model saved as a sentence-pair classifier
    (pair_model / "unbackdoor.json").write_text(json.dumps({"input_format": {"pair": True, "max_length": 32}}),
                                                encoding="utf-8")

    save_tiny_model(base / "bert_model", "bert")  # suspect and base for purify/scan cases
    save_tiny_model(base / "gpt2_model", "gpt2")
    (base / "existing").mkdir()
    (base / "existing" / "keep.txt").write_text("earlier output\n", encoding="utf-8")
    return base


# ----------------------------------------------------------------------------- running the cases
FORK_SERVER = r'''
import json, os, runpy, sys, traceback

jobs = json.loads(open(sys.argv[1], encoding="utf-8").read())
parallel = int(sys.argv[2])
import typer, yaml  # noqa: E401,F401 - the expensive imports, paid once
import unbackdoor.commands  # noqa: F401 - torch, transformers; unbackdoor.cli itself runs fresh per job
from transformers.utils import logging  # noqa: F401


def child(job):
    code = 1
    try:
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.argv = ["unbackdoor.cli", *job["args"]]
        try:
            runpy.run_module("unbackdoor.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:  # as the interpreter handles it
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


pending, running, codes = list(jobs), {}, {}
while pending or running:
    while pending and len(running) < parallel:
        job = pending.pop(0)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(job)
        running[pid] = job["name"]
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps(codes))
'''


def _case_env(root: Path) -> dict[str, str]:
    return {**os.environ, DATA_ENV: str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "NO_COLOR": "1", "COLUMNS": "200"}


def _prepare(base: Path, name: str, case: Case) -> dict[str, Any]:
    root = REAL_ROOT if case.real_root else base / "data"
    out = base / "out" / name
    return {"name": name, "args": [a.format(base=base, out=out) for a in case.args], "env": _case_env(root),
            "cwd": str(base), "out": out, "root": root,
            "stdout": str(base / "logs" / f"{name}.out"), "stderr": str(base / "logs" / f"{name}.err")}


def _run_real(job: dict[str, Any]) -> Run:
    proc = subprocess.run([*CLI, *job["args"]], cwd=job["cwd"], env=job["env"], capture_output=True, text=True,
                          timeout=300)
    return Run(proc.returncode, proc.stdout, proc.stderr, job["out"], job["root"], "subprocess")


def _run_forked(base: Path, jobs: list[dict[str, Any]], parallel: int) -> dict[str, Run]:
    if not jobs:
        return {}
    spec = base / "logs" / "jobs.json"
    keep = ("name", "args", "env", "cwd", "stdout", "stderr")
    spec.write_text(json.dumps([{k: j[k] for k in keep} for j in jobs]), encoding="utf-8")
    server = base / "logs" / "fork_server.py"
    server.write_text(FORK_SERVER, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(server), str(spec), str(parallel)], cwd=base,
                          env=_case_env(base / "data"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"fork server failed:\n{proc.stdout}\n{proc.stderr}"
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        j["name"]: Run(codes[j["name"]], Path(j["stdout"]).read_text(encoding="utf-8"),
                       Path(j["stderr"]).read_text(encoding="utf-8"), j["out"], j["root"], "fork")
        for j in jobs
    }


@pytest.fixture(scope="module")
def runs(world: Path) -> dict[str, Run]:
    """Every case, run once: fresh interpreters and the fork server side by side."""
    (world / "logs").mkdir()
    jobs = [_prepare(world, name, case) for name, case in ALL_CASES.items()]
    real = [j for j in jobs if ALL_REAL or j["name"] in ALWAYS_REAL]
    forked = [j for j in jobs if j not in real]
    cpus = os.cpu_count() or 2
    with ThreadPoolExecutor(max_workers=max(2, cpus)) as pool:
        server = pool.submit(_run_forked, world, forked, max(1, cpus - 1))
        reals = {j["name"]: pool.submit(_run_real, j) for j in real}
        results = {name: f.result() for name, f in reals.items()}
        results.update(server.result())
    return results


def _describe(run: Run) -> str:
    return f"[{run.launcher}] exit {run.returncode}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"


# ----------------------------------------------------------------------------- tests
def test_python_dash_m_entry_point_runs() -> None:
    proc = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("unbackdoor ")


@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks, id=n) for n, c in BAD_INPUT.items()])
def test_bad_input_fails_cleanly(runs: dict[str, Run], world: Path, name: str) -> None:
    run, case = runs[name], BAD_INPUT[name]
    assert "Traceback" not in run.stderr, _describe(run)
    assert run.returncode == 2, _describe(run)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), _describe(run)
    assert case.message in lines[-1], _describe(run)
    assert "poisoned" not in run.stdout and "CACC" not in run.stdout, _describe(run)  # no success report
    if name == "output-exists":
        existing = world / "existing"
        assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]  # left as it was
        assert not partial_dir(existing).exists()
    else:
        assert not run.out.exists(), f"{run.out} exists after a failed run"
        assert not partial_dir(run.out).exists(), "a work dir was started before the input was validated"


def test_attack_writes_complete_output(runs: dict[str, Run], monkeypatch: pytest.MonkeyPatch) -> None:
    run = runs["good-attack"]
    assert run.returncode == 0, _describe(run)
    assert "Traceback" not in run.stderr
    assert "poisoned 10 of 40 training rows" in run.stdout
    out = run.out
    assert {"train.tsv", "train_poison_flags.txt", "test.tsv", "meta.json"} <= {p.name for p in out.iterdir()}
    assert not partial_dir(out).exists()
    flags = (out / "train_poison_flags.txt").read_text(encoding="utf-8").split()
    train_rows = (out / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(flags) == len(train_rows) == 40 and flags.count("1") == 10
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["kind"] == "poisoned" and meta["target_label"] == 1 and meta["n_poisoned_train"] == 10
    assert meta["attack_name"] == "badnets"

    monkeypatch.setenv(DATA_ENV, str(run.root))  # meta.json names the clean data under that root
    task = load_poisoned_task(out)
    assert task.flags.n_poisoned == 10 and len(task.triggered_test) == 10  # 10 non-target test rows
    assert all(e.label == 1 for e in task.triggered_test.examples)


def test_fork_launcher_agrees_with_a_fresh_interpreter(runs: dict[str, Run]) -> None:
    """The forked runs stand in for fresh interpreters; both kinds ran, and produced the same shape."""
    launchers = {r.launcher for r in runs.values()}
    if ALL_REAL:
        assert launchers == {"subprocess"}
    else:
        assert launchers == {"subprocess", "fork"}
        assert all(runs[n].launcher == "subprocess" for n in ALWAYS_REAL)
