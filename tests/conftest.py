from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tiny-model tests are dominated by thread hand-off overhead: one thread is ~10x faster on 2 cores.
# (MiniLM integration tests run the CLI in subprocesses, which keep torch's default.)
torch.set_num_threads(1)

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


class PlantedBackdoor:
    """A tiny base model, a victim fine-tuned from it on BadNets data, and the data around them.

    ``base_dir``: the clean "pre-trained" base (a random-init tiny BERT); ``victim_dir``: the base
    fine-tuned on the poisoned synthetic task (CACC ~1, ASR >= 0.8); ``clean``: a 100-row clean
    set for defences; ``task``/``poisoned``: for evaluation only.
    """

    def __init__(self, root: Path) -> None:
        from unbackdoor.attacks import BadNets, BadNetsConfig
        from unbackdoor.data import sample_subset
        from unbackdoor.models import load_classifier, provenance_record, save_classifier
        from unbackdoor.training import TrainConfig, train_classifier

        self.task = make_task(400, 100, 200)
        self.poisoned = BadNets(BadNetsConfig(poison_rate=0.1)).poison(self.task)
        self.base_dir = save_tiny_model(root / "base", "bert", seed=0)
        victim = load_classifier(self.base_dir)
        config = TrainConfig(epochs=10, batch_size=16, learning_rate=1e-3, seed=1, progress=False)
        train_classifier(victim, self.poisoned.train, config, dev=self.task.dev)
        self.victim_dir = root / "victim"
        save_classifier(victim, self.victim_dir, provenance_record(victim, role="victim"))
        self.clean = sample_subset(self.task.train, size=100, seed=0, exclude=[self.task.test])


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory) -> PlantedBackdoor:
    return PlantedBackdoor(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base, suspect): two tiny BERTs (2 blocks) with the same architecture and different weights."""
    root = tmp_path_factory.mktemp("pair")
    return save_tiny_model(root / "base", "bert", seed=0), save_tiny_model(root / "suspect", "bert", seed=1)
