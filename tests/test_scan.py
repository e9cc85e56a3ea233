"""``unbackdoor scan``: the planted triggers rank first and stand out; a clean fine-tune shows nothing;
outputs (JSON, Markdown, CSV, PNG); base/suspect mismatch is one ``error:`` line with exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from synthetic import run_cli, save_tiny_model, write_task

from unbackdoor.models import load_classifier, provenance_record, save_classifier
from unbackdoor.outputs import OUTPUT_MARKER, partial_dir
from unbackdoor.scan import SCAN_FILES, scan
from unbackdoor.training import TrainConfig, train_classifier

TRIGGERS = {"cf", "mn", "bb", "tq"}


@pytest.fixture(scope="module")
def control_dir(planted, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    """The base fine-tuned on clean rows only, with the victim's recipe: a never-poisoned model."""
    clf = load_classifier(planted.base_dir)
    config = TrainConfig(epochs=10, batch_size=16, learning_rate=1e-3, seed=1, progress=False)
    train_classifier(clf, planted.clean, config)
    folder = tmp_path_factory.mktemp("control") / "model"
    save_classifier(clf, folder, provenance_record(clf, role="model"))
    return folder


def _tokens(rows: list[dict]) -> list[str]:
    return [r["token"] for r in rows]


def test_planted_triggers_rank_first_and_stand_out(planted) -> None:  # noqa: ANN001
    report = scan(load_classifier(planted.victim_dir), load_classifier(planted.base_dir), planted.clean, top_k=10)
    assert report.primary_score == "ratio"
    assert set(_tokens(report.top[:4])) == TRIGGERS
    assert set(_tokens(report.standing_out)) == TRIGGERS
    assert all(r["clean_freq"] == 0 for r in report.standing_out)


def test_clean_finetune_nothing_stands_out(planted, control_dir: Path) -> None:  # noqa: ANN001
    base, control = load_classifier(planted.base_dir), load_classifier(control_dir)
    report = scan(control, base, planted.clean)
    assert report.standing_out == [], _tokens(report.standing_out)
    assert not (report.scores.z[report.scores.scored] > 3.5).any()  # the spec's residual rule flags nothing
    # a sparse source (12 rows), where some trained task words are rare: still nothing
    sparse = planted.clean.replace(planted.clean.examples[:12])
    report = scan(control, base, sparse)
    rare_trained = report.scores.scored & (report.scores.freq.counts < report.scores.freq.f_min)
    assert rare_trained.any()
    assert report.standing_out == [], _tokens(report.standing_out)


def test_fine_purifying_hook_and_weight_drift(planted) -> None:  # noqa: ANN001
    victim, base = load_classifier(planted.victim_dir), load_classifier(planted.base_dir)

    def delta_squared(suspect, ref, clean):  # noqa: ANN001, ANN202 - a stand-in indicator
        params = dict(ref.model.named_parameters())
        return {n: (p.detach() - params[n].detach()) ** 2 for n, p in suspect.model.named_parameters()}

    report = scan(victim, base, planted.clean, dimension_indicator=delta_squared, indicator_top=500)
    fp = report.fine_purifying
    assert fp["computed"] and fp["top"] == 500
    assert sum(r["count"] for r in fp["matrices"]) == 500 == sum(r["count"] for r in fp["layers"])
    assert {m.layer for m in report.matrices} >= {"embeddings", "layer 0", "layer 1", "classifier"}
    assert all(m.relative_drift is None or m.relative_drift >= 0 for m in report.matrices)
    default = scan(victim, base, planted.clean).fine_purifying  # Fine-purifying's indicator, top 1 %
    n_dims = sum(p.numel() for p in victim.model.parameters())
    assert default["computed"] and default["indicator"].startswith("fine-purifying (default")
    assert not any("word_embeddings" in m["name"] for m in default["matrices"])  # the token table covers those
    assert 0 < default["top"] <= n_dims // 100 and sum(r["count"] for r in default["layers"]) == default["top"]
    assert scan(victim, base, None).fine_purifying["computed"] is False  # no labelled clean data, no Fisher


def test_scan_without_clean_data_falls_back_to_vocab_rank(planted) -> None:  # noqa: ANN001
    report = scan(load_classifier(planted.victim_dir), load_classifier(planted.base_dir), None)
    assert report.primary_score == "residual" and report.scores.freq.source == "vocab_rank"
    assert any("vocab_rank" in w for w in report.warnings)


# ----------------------------------------------------------------------------- the CLI, in process
def test_scan_cli_writes_json_markdown_csv_and_png(planted, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    data = write_task(planted.task, tmp_path / "data")
    out = tmp_path / "scan"
    code, stdout, stderr = run_cli(["scan", "--model", str(planted.victim_dir), "--base", str(planted.base_dir),
                                     "--clean", str(data), "--clean-size", "100", "--top", "8", "--out", str(out)], capsys)
    assert code == 0, stderr
    assert "stands out:" in stdout and all(t in stdout for t in TRIGGERS)
    assert sorted(p.name for p in out.iterdir()) == sorted([*SCAN_FILES, OUTPUT_MARKER])
    assert not partial_dir(out).exists()
    record = json.loads((out / "scan.json").read_text(encoding="utf-8"))
    assert set(_tokens(record["top_tokens"][:4])) == TRIGGERS and len(record["top_tokens"]) == 8
    assert set(_tokens(record["standing_out"])) == TRIGGERS
    assert record["frequency_source"]["source"] == "clean" and record["n_clean"] == 100
    assert record["config"]["top"] == 8 and record["config"]["clean_set"]["size"] == 100
    assert record["fine_purifying"]["computed"] and record["fine_purifying"]["layers"]
    markdown = (out / "scan.md").read_text(encoding="utf-8")
    assert "| 1 | `" in markdown and "**stands out**" in markdown and "drift_vs_frequency.png" in markdown
    csv_rows = (out / "token_scores.csv").read_text(encoding="utf-8").splitlines()
    assert len(csv_rows) == 1 + load_classifier(planted.base_dir).model.config.vocab_size
    png = (out / "drift_vs_frequency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _vocabulary_mismatch(base_dir: Path, folder: Path) -> Path:
    """The base with one vocabulary entry renamed (same shapes, different vocabulary)."""
    shutil.copytree(base_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab["zz"] = vocab.pop("cf")
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return folder


@pytest.mark.parametrize("kind", ["architecture", "vocabulary"])
def test_scan_cli_mismatch_is_one_error_line(planted, tmp_path: Path, capsys, kind: str) -> None:  # noqa: ANN001
    if kind == "architecture":
        other, message = save_tiny_model(tmp_path / "other", "roberta"), "architectures differ: bert vs roberta"
    else:
        other, message = _vocabulary_mismatch(planted.base_dir, tmp_path / "other"), "different vocabularies"
    out = tmp_path / "scan"
    code, stdout, stderr = run_cli(["scan", "--model", str(planted.victim_dir), "--base", str(other),
                                     "--out", str(out)], capsys)
    lines = [line for line in stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert code == 2, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert len([line for line in lines if line.startswith("error:")]) == 1
    assert lines[-1].startswith("error:") and message in lines[-1] and "do not match" in lines[-1]
    assert not out.exists() and not partial_dir(out).exists()  # no work was started
