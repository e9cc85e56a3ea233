"""The tiny bench grid of the tests: ``benchmarks/tiny_grid.yaml`` over a 2-layer BERT of hidden
size 32 and a synthetic task written to disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from synthetic import make_task, save_tiny_model, write_task

TINY_GRID = Path(__file__).resolve().parents[1] / "benchmarks" / "tiny_grid.yaml"
DEFENCES: list[dict[str, Any]] = yaml.safe_load(TINY_GRID.read_text(encoding="utf-8"))["defenses"]


def tiny_inputs(root: Path) -> tuple[Path, Path]:
    """(data folder, model folder) for a tiny grid."""
    data = write_task(make_task(200, 60, 100), root / "data")
    model = save_tiny_model(root / "model", "bert")
    return data, model


def write_grid(path: Path, data: Path, model: Path, **overrides: Any) -> Path:
    """``benchmarks/tiny_grid.yaml`` with the tiny model and data filled in and top-level keys replaced."""
    config = yaml.safe_load(TINY_GRID.read_text(encoding="utf-8"))
    config["model"] = str(model)
    config["datasets"][0]["data"] = str(data)
    config.update(overrides)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path
