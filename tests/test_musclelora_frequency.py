"""Frequency analysis: the low-pass filter and band errors, the probe sets, and a tiny end-to-end run
that writes the JSON, CSV and PNG."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from synthetic import make_task, save_tiny_model, write_task

from unbackdoor.attacks import BadNets
from unbackdoor.commands import FrequencyCommand, run_frequency
from unbackdoor.config import build_config
from unbackdoor.errors import ConfigError, UnbackdoorError
from unbackdoor.models import load_classifier
from unbackdoor.analysis.frequency import (
    BANDS,
    FrequencyConfig,
    analyze_frequency,
    band_errors,
    build_probes,
    low_pass_kernels,
    write_frequency_outputs,
)
from unbackdoor.training import TrainConfig

FAST = TrainConfig(epochs=1, batch_size=16, learning_rate=1e-3, progress=False)


def test_filter_splits_outputs_into_low_and_high_bands() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 10)
    wide, narrow = low_pass_kernels(x, [1e6, 1e-6])
    assert torch.allclose(wide.sum(dim=1), torch.ones(6, dtype=torch.float64))
    assert torch.allclose(wide, torch.full((6, 6), 1 / 6, dtype=torch.float64), atol=1e-5)  # δ → ∞: the mean
    assert torch.allclose(narrow, torch.eye(6, dtype=torch.float64))  # δ → 0: the identity
    # the official kernel uses the unsquared distance; the squared one is a different filter
    assert not torch.allclose(low_pass_kernels(x, [2.0]), low_pass_kernels(x, [2.0], squared=True))
    d = torch.cdist(x.double(), x.double())
    g = torch.exp(-d / 4)
    assert torch.allclose(low_pass_kernels(x, [2.0])[0], g / g.sum(dim=1, keepdim=True))
    median = low_pass_kernels(x, [1.0], unit="median")[0]
    g = torch.exp(-d / (2 * d[~torch.eye(6, dtype=torch.bool)].median()))
    assert torch.allclose(median, g / g.sum(dim=1, keepdim=True))

    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 1, 1, 0]), 2)
    kernels = low_pass_kernels(x, [0.5, 2.0])
    low, high = band_errors(y.float(), y, kernels)
    assert torch.all(low == 0) and torch.all(high == 0)  # a perfect fit has no error in either band
    f = torch.full((6, 2), 0.5)  # a constant output fits the low band better than the high band
    low, high = band_errors(f, y, kernels)
    assert torch.all(high > low)
    mask = torch.tensor([True, False, True, False, False, False])
    low_m, _ = band_errors(f, y, kernels, mask)
    assert not torch.allclose(low_m, low)


def test_backdoor_probe_pairs_triggered_rows_with_their_clean_sources(tiny_bert: Path) -> None:
    task = make_task(40, 30, 10)
    poisoned = BadNets().poison(task)
    clean, backdoor = build_probes(load_classifier(tiny_bert), poisoned, FrequencyConfig(max_rows=8, deltas=(2.0,)))
    assert len(clean.examples) == 8 and bool(clean.measured.all())
    n = int(backdoor.measured.sum())
    assert n == 8 and len(backdoor.examples) == 16
    trig, src = backdoor.examples[:n], backdoor.examples[n:]
    assert [e.id for e in trig] == [e.id for e in src] and all(e.label == 1 for e in trig)
    assert all(e.label == 0 for e in src) and all(t.text != s.text for t, s in zip(trig, src, strict=True))
    # so the backdoor's targets have a high-frequency part (on the triggered rows alone they would not)
    y = backdoor.targets.double()
    high = (y - backdoor.kernels[0] @ y)[backdoor.measured]
    assert float(high.norm()) > 0.1


def test_analysis_records_curves_and_writes_outputs(tmp_path: Path) -> None:
    base = save_tiny_model(tmp_path / "base", "bert")
    task = make_task(64, 48, 20)
    poisoned = BadNets().poison(task)
    config = FrequencyConfig(methods=("none", "musclelora"), every=2, max_rows=12, deltas=(0.1, 0.3),
                             delta_unit="median", method_params={"musclelora": {"reference_size": 16}},
                             train=FAST)
    analysis = analyze_frequency(base, poisoned, config)
    assert set(analysis["curves"]) == {"none", "musclelora"}
    for records in analysis["curves"].values():
        assert [r["step"] for r in records] == [0, 2, 4]  # before training, then every 2 of the 4 steps
        assert all(math.isfinite(r[b]) and r[b] >= 0 for r in records for b in BANDS)
        assert all(len(r["clean_low_by_delta"]) == 2 for r in records)
    none = analysis["curves"]["none"]
    assert none[-1]["clean_high"] != none[0]["clean_high"]  # the curves move with training
    write_frequency_outputs(analysis, tmp_path / "out", {"config": "test"})
    assert (tmp_path / "out" / "frequency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "out" / "frequency.csv").read_text().splitlines()) == 1 + 2 * 3


def test_frequency_command_refuses_bad_input_before_any_output(tmp_path: Path) -> None:
    write_task(make_task(20, 10, 10), tmp_path / "clean")
    cases = [({"data": str(tmp_path / "clean")}, UnbackdoorError, "needs poisoned data"),
             ({"data": str(tmp_path / "clean"), "params": {"methods": ["nope"]}}, ConfigError, "unknown training defence"),
             ({"data": str(tmp_path / "clean"), "params": {"every": 0}}, ConfigError, "every")]
    for i, (values, err, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        cmd = build_config(FrequencyCommand, {**values, "out": str(out)}, "test")
        with pytest.raises(err, match=message):
            run_frequency(cmd)
        assert not out.exists() and not list(tmp_path.glob(f".out{i}*"))
