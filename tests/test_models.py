"""Every model family loads, trains, saves and reloads; unsafe weights are refused."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from synthetic import make_task, save_tiny_model, tiny_config

from unbackdoor.errors import ModelError, UnsafeWeightsError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import check_same_architecture, load_classifier, provenance_record, save_classifier
from unbackdoor.training import TrainConfig, train_classifier


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
def test_family_loads_trains_saves_and_reloads(tmp_path: Path, family: str) -> None:
    task = make_task(400, 50, 100)
    clf = load_classifier(save_tiny_model(tmp_path / "base", family))
    assert clf.tokenizer.pad_token is not None and clf.model.config.pad_token_id is not None
    train_classifier(clf, task.train, TrainConfig(epochs=6, learning_rate=1e-3, batch_size=16, progress=False), dev=task.dev)
    before = evaluate_classifier(clf, task.test)
    assert before.cacc >= 0.9, f"{family} did not learn the synthetic task: {before.cacc}"

    out = tmp_path / "trained"
    save_classifier(clf, out, provenance_record(clf, role="model", seed=0))
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    record = json.loads((out / "unbackdoor.json").read_text())
    assert record["input_format"]["max_length"] == clf.max_length and record["input_format"]["pair"] is False
    assert "unbackdoor" in (out / "README.md").read_text()

    again = load_classifier(out)
    assert again.pair is False
    assert evaluate_classifier(again, task.test).cacc == pytest.approx(before.cacc)


def test_base_encoder_gets_a_seeded_new_head(tmp_path: Path) -> None:
    from transformers import AutoModel

    from synthetic import make_tokenizer

    encoder = AutoModel.from_config(tiny_config("bert"))
    encoder.save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="num_labels"):
        load_classifier(tmp_path)
    a = load_classifier(tmp_path, num_labels=3, seed=7)
    b = load_classifier(tmp_path, num_labels=3, seed=7)
    assert a.num_labels == 3
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)


def test_label_count_mismatch_is_refused(tiny_bert: Path) -> None:
    with pytest.raises(ModelError, match="2 labels but the data has 4"):
        load_classifier(tiny_bert, num_labels=4)


def test_default_base_is_the_packaged_minilm() -> None:
    from unbackdoor.models import default_base_path

    path = default_base_path()
    assert (path / "model.safetensors").exists()
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 384


class _WritesAFile:
    """Unpickling this object would create a file: the payload of a malicious checkpoint."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (Path(self.target).touch, ())


def _pickle_only_model(folder: Path, marker: Path) -> Path:
    folder.mkdir()
    tiny_config("bert").save_pretrained(folder)
    with (folder / "pytorch_model.bin").open("wb") as fh:
        pickle.dump({"payload": _WritesAFile(str(marker))}, fh)
    return folder


def test_pickle_weights_are_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = _pickle_only_model(tmp_path / "evil", marker)
    with pytest.raises(UnsafeWeightsError) as err:
        load_classifier(folder, num_labels=2)
    assert "pytorch_model.bin" in str(err.value) and "--allow-pickle" in str(err.value)
    assert not marker.exists()


def test_allow_pickle_still_does_not_run_the_payload(tmp_path: Path) -> None:
    """Even when allowed, weights are read with torch's weights-only unpickler."""
    marker = tmp_path / "pwned"
    folder = _pickle_only_model(tmp_path / "evil", marker)
    with pytest.raises(ModelError):
        load_classifier(folder, num_labels=2, allow_pickle=True)
    assert not marker.exists()


def test_input_format_mismatch_is_refused(tmp_path: Path, tiny_bert: Path) -> None:
    clf = load_classifier(tiny_bert, max_length=32)
    save_classifier(clf, tmp_path / "m", provenance_record(clf))
    assert load_classifier(tmp_path / "m").max_length == 32
    with pytest.raises(ModelError, match="max_length=32"):
        load_classifier(tmp_path / "m", max_length=64)


def test_architecture_check(tmp_path: Path, tiny_bert: Path) -> None:
    bert = load_classifier(tiny_bert)
    check_same_architecture(bert, load_classifier(tiny_bert))
    gpt2 = load_classifier(save_tiny_model(tmp_path / "gpt2", "gpt2"))
    with pytest.raises(ModelError, match="architectures differ"):
        check_same_architecture(bert, gpt2)
