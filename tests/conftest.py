from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from synthetic import make_task, save_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def synthetic_task():
    return make_task()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    from unbackdoor.data.io import data_root

    root = data_root()
    if not (root / "sst2" / "clean").is_dir():
        pytest.skip(f"shared data root not found at {root}")
    return root
