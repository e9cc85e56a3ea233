"""Published paraphrase attacks (synbkd, stylebkd): the released rows are loaded with their meta, the
variant is a named option, and a rate/target/mode no published variant has is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from synthetic import make_task, run_cli, write_task

from unbackdoor.attacks import BadNets, BadNetsConfig
from unbackdoor.data.io import load_task, write_poisoned_task
from unbackdoor.errors import ConfigError
from unbackdoor.attacks.base import attack_task


@pytest.fixture()
def syn_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data root with ``syn/clean`` and two stand-in published SynBkd sets (10 % and 20 %)."""
    task = make_task(100, 20, 40)
    write_task(task, tmp_path / "syn" / "clean")
    for source, rate in (("hiddenkiller", 0.2), ("openbackdoor", 0.1)):
        poisoned = BadNets(BadNetsConfig(poison_rate=rate, mode="mix")).poison(task)
        write_poisoned_task(poisoned, tmp_path / "syn" / f"synbkd_{source}_p{round(rate * 100)}",
                            {"clean": "../clean", "mode": "mix"})
    monkeypatch.setenv("UNBACKDOOR_DATA", str(tmp_path))
    return tmp_path


def test_published_variant_is_loaded_with_its_meta(syn_root: Path) -> None:
    task = load_task("syn")
    default = attack_task(task, "synbkd", {})
    assert default.attack.params["source"] == "hiddenkiller" and default.flags.n_poisoned == 20
    assert default.clean is task and default.target_label == 1
    other = attack_task(task, "synbkd", {"source": "openbackdoor", "poison_rate": 0.1, "mode": "mix"})
    assert other.flags.n_poisoned == 10 and other.attack.params["variant"] == "synbkd_openbackdoor_p10"


@pytest.mark.parametrize("params", [{"poison_rate": 0.05}, {"target_label": 0}, {"mode": "clean"},
                                    {"source": "nosuch"}])
def test_unpublished_settings_are_one_clear_error(syn_root: Path, params: dict) -> None:
    with pytest.raises(ConfigError, match="cannot be recomputed offline.*published: source=hiddenkiller"):
        attack_task(load_task("syn"), "synbkd", params)


def test_other_clean_data_is_refused(syn_root: Path, tmp_path: Path) -> None:
    other = write_task(make_task(100, 20, 40, seed=5), tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="not the clean data of the published set"):
        attack_task(load_task(other), "synbkd", {"dataset": "syn"})


def test_cli_writes_the_published_set(syn_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, err = run_cli(["attack", "--data", "syn", "--attack", "synbkd", "-p", "source=openbackdoor",
                                 "--out", str(out)], capsys)
    assert code == 0, err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["attack_name"] == "synbkd" and meta["n_poisoned_train"] == 10
    code, _, err = run_cli(["attack", "--data", "syn", "--attack", "synbkd", "--poison-rate", "0.3",
                            "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot be recomputed offline" in err


def test_shared_sst2_variants(shared_data: Path) -> None:
    sst2 = load_task("sst2")
    hk = attack_task(sst2, "synbkd", {})
    assert (hk.flags.n_poisoned, hk.target_label, hk.attack.params["mode"]) == (1383, 1, "mix")
    assert attack_task(sst2, "synbkd", {"source": "openbackdoor"}).flags.n_poisoned == 692
    style = attack_task(sst2, "stylebkd", {"poison_rate": 0.2})
    assert (style.flags.n_poisoned, style.attack.params["mode"]) == (1384, "dirty")
    with pytest.raises(ConfigError, match="stylebkd cannot be recomputed offline"):
        attack_task(sst2, "stylebkd", {"mode": "clean"})
