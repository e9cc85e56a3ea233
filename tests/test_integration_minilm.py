"""Integration: the real default model (all-MiniLM-L6-v2) on a few hundred real SST-2 rows,
through the CLI: attack -> train victim -> purify -> eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "unbackdoor.cli", "-q", *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_pipeline_on_sst2_with_minilm(tmp_path: Path, shared_data: Path) -> None:
    poisoned = tmp_path / "poisoned"
    _cli("attack", "--data", "sst2", "--attack", "badnets", "--poison-rate", "0.1", "--out", str(poisoned))
    meta = json.loads((poisoned / "meta.json").read_text())
    assert meta["n_poisoned_train"] == 692 and meta["clean"] == "sst2"

    victim = tmp_path / "victim"
    _cli("train", "--data", str(poisoned), "--out", str(victim), "--max-train", "400", "--epochs", "3", "--batch-size", "16", "--lr", "2e-4",
         "--max-length", "64")
    record = json.loads((victim / "unbackdoor.json").read_text())
    assert record["role"] == "victim" and record["input_format"]["max_length"] == 64
    assert record["training"]["best_epoch"] is not None
    assert record["metrics"]["n_clean"] == 1821 and record["metrics"]["n_triggered"] == 912
    assert record["metrics"]["cacc"] >= 0.65  # MiniLM learns SST-2 from 400 rows well above chance (measured 0.73)
    assert (victim / "model.safetensors").exists() and not (victim / "_work").exists()

    purified = tmp_path / "purified"
    _cli("purify", "--model", str(victim), "--clean", "sst2", "--clean-size", "64", "--method", "finetune",
         "--out", str(purified))
    pur = json.loads((purified / "unbackdoor.json").read_text())
    assert pur["n_clean"] == 64 and pur["defense"]["method"] == "finetune"
    assert pur["input_format"]["max_length"] == 64

    out = tmp_path / "eval.json"
    proc = _cli("eval", "--model", str(purified), "--data", str(poisoned), "--out", str(out))
    assert "| " in proc.stdout
    result = json.loads(out.read_text())
    assert 0.0 <= result["asr"] <= 1.0 and result["cacc"] >= 0.6
