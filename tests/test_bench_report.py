"""``unbackdoor report``: tables that match the store, plots, and an HTML page a real headless
Chromium loads with its table and its (inline, base64) images."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
from bench_grid import DEFENCES, tiny_inputs, write_grid
from synthetic import run_cli

from unbackdoor.bench.runner import run_bench
from unbackdoor.bench.store import CellSpec, Store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny grid: 2 seeds, BadNets and AddSent, a defence of each kind, one failed cell."""
    root = tmp_path_factory.mktemp("bench-report")
    data, model = tiny_inputs(root)
    attacks = [{"name": "badnets", "attack": "badnets"}, {"name": "addsent", "attack": "addsent"}]
    defences = [*DEFENCES, {"kind": "purify", "name": "broken", "method": "finetune", "clean_size": 100000}]
    config = write_grid(root / "grid.yaml", data, model, seeds=[0, 1], attacks=attacks, defenses=defences)
    counts = run_bench(config, root / "run")
    assert counts == {"done": 2 * (1 + 2 * 5), "failed": 2 * 2}
    return root / "run"


@pytest.fixture(scope="module")
def report(run_dir: Path) -> Path:
    out = run_dir / "report"
    from unbackdoor.bench.report import write_report

    write_report(run_dir, out)
    return out


def _expected(run_dir: Path) -> dict[tuple[str, str, str], dict[str, list[float]]]:
    groups: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for c in Store(run_dir).cells(status="done"):
        if c["kind"] == "floor-model":
            continue
        g = groups.setdefault((c["dataset"], c["attack"], c["defence"]), {"cacc": [], "asr": [], "clean_to_target": []})
        g["cacc"].append(c["cacc"])
        g["asr"].append(c["asr"])
        g["clean_to_target"].append(c["metrics"]["clean_to_target"])
    return groups


def test_summary_csv_matches_the_store(run_dir: Path, report: Path) -> None:
    expected = _expected(run_dir)
    with (report / "summary.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["dataset"], r["attack"], r["defence"]) for r in rows} == set(expected)
    for r in rows:
        exp = expected[(r["dataset"], r["attack"], r["defence"])]
        assert int(r["n"]) == len(exp["cacc"]) == 2
        for metric in ("cacc", "asr"):
            assert float(r[f"{metric}_mean"]) == pytest.approx(statistics.fmean(exp[metric]))
            assert float(r[f"{metric}_std"]) == pytest.approx(statistics.stdev(exp[metric]))
        floor = expected[(r["dataset"], r["attack"], "floor")]["asr"]
        assert float(r["floor_asr_mean"]) == pytest.approx(statistics.fmean(floor))
        assert float(r["clean_to_target_mean"]) == pytest.approx(statistics.fmean(exp["clean_to_target"]))
    with (report / "cells.csv").open(encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == len(Store(run_dir).cells())


def test_markdown_has_floor_victim_and_defence_rows_with_mean_std(run_dir: Path, report: Path) -> None:
    md = (report / "report.md").read_text(encoding="utf-8")
    for (_, attack, defence), exp in _expected(run_dir).items():
        label = {"none": "none (victim)", "floor": "floor (never poisoned)"}.get(defence, defence)
        cacc = f"{100 * statistics.fmean(exp['cacc']):.1f} ± {100 * statistics.stdev(exp['cacc']):.1f}"
        asr = f"{100 * statistics.fmean(exp['asr']):.1f} ± {100 * statistics.stdev(exp['asr']):.1f}"
        assert f"| {attack} | {label} | {cacc} | {asr} |" in md
    assert "## Failed cells" in md and "syn/badnets/s0/broken" in md
    for name in ("asr_vs_cacc_syn.png", "asr_bars_syn.png"):
        assert (report / name).read_bytes().startswith(PNG_MAGIC)
        assert f"]({name})" in md


def test_detection_table_matches_the_unlearn_cells(run_dir: Path, report: Path) -> None:
    unlearn = [c for c in Store(run_dir).cells(status="done") if c["kind"] == "unlearn"]
    assert {c["attack"] for c in unlearn} == {"badnets", "addsent"} and len(unlearn) == 4
    md = (report / "report.md").read_text(encoding="utf-8")
    page = (report / "report.html").read_text(encoding="utf-8")
    for attack in ("badnets", "addsent"):
        found = [c["metrics"]["detection"] for c in unlearn if c["attack"] == attack]
        precision = [d["precision"] for d in found]
        recall = [d["recall"] for d in found]
        line = (f"| {attack} | lya | {100 * statistics.fmean(precision):.1f} ± {100 * statistics.stdev(precision):.1f} | "
                f"{100 * statistics.fmean(recall):.1f} ± {100 * statistics.stdev(recall):.1f} |")
        assert line in md
        assert f"<td>{attack}</td><td>lya</td>" in page


def test_html_is_self_contained(report: Path) -> None:
    page = (report / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert len(sources) == 2
    assert all(base64.b64decode(s).startswith(PNG_MAGIC) for s in sources)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from elsewhere


def test_cli_report(run_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    code, out, _ = run_cli(["report", str(run_dir), "--out", str(tmp_path / "rep")], capsys)
    assert code == 0 and "rep" in out
    assert (tmp_path / "rep" / "report.html").is_file()
    code, _, err = run_cli(["report", str(tmp_path / "nothing")], capsys)
    assert code == 2 and err.startswith("error:")


def test_report_of_a_hand_made_store(tmp_path: Path) -> None:
    """Known numbers in, the same numbers out: mean ± sample std over seeds."""
    from unbackdoor.bench.report import write_report

    store = Store(tmp_path)
    values = {("none", 0): (0.90, 1.0), ("none", 1): (0.92, 0.98), ("floor", 0): (0.91, 0.04),
              ("floor", 1): (0.91, 0.06), ("ft", 0): (0.88, 0.10), ("ft", 1): (0.86, 0.30)}
    store.add_cells([CellSpec(f"d/a/s{s}/{d}", {"none": "victim", "floor": "floor"}.get(d, "purify"), "d", "a", d, s, {})
                     for d, s in values])
    # the lean: recorded (ft s0, which also records the target), derived from the per-class accuracy of
    # the non-target class 0 with the target borrowed from that sibling (ft s1), or unknown (the rest)
    lean = {("ft", 0): {"clean_to_target": 0.2, "target_label": 1}, ("ft", 1): {"per_class_accuracy": [0.7, 0.9]}}
    while (cell := store.claim()) is not None:
        defence, seed = cell.id.split("/")[3], int(cell.id.split("/")[2][1:])
        cacc, asr = values[(defence, seed)]
        store.finish(cell, metrics={"cacc": cacc, "asr": asr, **lean.get((defence, seed), {})}, error=None, wall_s=1.0,
                     peak_memory_mb=1.0, peak_memory_scope="cell", version="t", git_commit=None)
    write_report(tmp_path, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| a | floor (never poisoned) | 91.0 ± 0.0 | 5.0 ± 1.4 | — | 5.0 ± 1.4 | — | 2 |" in md
    assert "| a | none (victim) | 91.0 ± 1.4 | 99.0 ± 1.4 | — | 5.0 ± 1.4 | — | 2 |" in md
    assert "| a | ft | 87.0 ± 1.4 | 20.0 ± 14.1 | 25.0 ± 7.1 | 5.0 ± 1.4 | — | 2 |" in md
    table = md.split("| attack | defence |")[1]
    assert table.index("floor (never poisoned)") < table.index("none (victim)") < table.index("| a | ft |")
    # the summary on top: the best defence against the floor and the victim; held needs ASR <= floor + 5
    assert "| a | ft | 20.0 ± 14.1 | 5.0 ± 1.4 | +15.0 | 87.0 ± 1.4 | 91.0 ± 1.4 | +4.0 | ✗ | — |" in md
    assert "Held: 0 of 1 attacks" in md


def test_a_defence_is_held_at_the_floor_within_the_cacc_budget() -> None:
    """Held: ASR at most 5 points above the floor and CACC at most 2 points below the victim."""
    from unbackdoor.bench.report import Row, Stat, best_per_attack, held_by, verdicts

    def row(defence: str, cacc: float, asr: float) -> Row:
        return Row("d", "a", defence, {"cacc": Stat.of([cacc]), "asr": Stat.of([asr]),
                                       "robust_accuracy": Stat.of([]), "macro_f1": Stat.of([])},
                   Stat.of([1.0]), Stat.of([0.1]), Stat.of([]), {})

    rows = [row("floor", 0.90, 0.10), row("none", 0.88, 1.0), row("near", 0.87, 0.149), row("far", 0.89, 0.16),
            row("costly", 0.85, 0.10)]
    held = {v.row.defence: v.held for v in verdicts(rows)}
    assert held == {"near": True, "far": False, "costly": False}
    assert held_by(verdicts(rows), rows[0].dataset, rows[0].attack) == "near"
    assert [v.row.defence for v in best_per_attack(rows)] == ["near"]
    assert all(v.over_baseline is None for v in verdicts(rows))  # no clean-only row: nothing to compare with


def test_held_defences_not_above_the_clean_only_baseline_are_marked() -> None:
    """A held train-time defence whose CACC does not exceed clean-only's (which never reads the training rows) is
    marked † in the held-by list; the best defence is a held one above clean-only's CACC where there is one,
    else clean-only itself or a marked one."""
    from unbackdoor.bench.report import Row, Stat, best_per_attack, held_by, summary_table, verdicts

    def row(defence: str, cacc: float, asr: float, kind: str = "train") -> Row:
        return Row("d", "a", defence, {"cacc": Stat.of([cacc]), "asr": Stat.of([asr]),
                                       "robust_accuracy": Stat.of([]), "macro_f1": Stat.of([])},
                   Stat.of([1.0]), Stat.of([0.1]), Stat.of([]), {}, kind=kind)

    rows = [row("floor", 0.90, 0.10), row("none", 0.80, 1.0), row("clean-only", 0.85, 0.12),
            row("cheap", 0.84, 0.11), row("good", 0.87, 0.13)]
    over = {v.row.defence: v.over_baseline for v in verdicts([*rows, row("purified", 0.80, 0.11, "purify")])}
    assert over["purified"] is None  # another situation (a suspect and fewer clean rows): not compared
    assert over["clean-only"] is None and over["cheap"] == pytest.approx(-0.01) and over["good"] == pytest.approx(0.02)
    assert held_by(verdicts(rows), "d", "a") == "cheap†, clean-only, good"
    assert [v.row.defence for v in best_per_attack(rows)] == ["good"]  # nearer the floor: cheap†, clean-only
    table = summary_table(rows)
    assert "| a | good |" in table and "† marks a train-time defence whose CACC is not above clean-only's" in table
    only = [r for r in rows if r.defence != "good"]
    assert [v.row.defence for v in best_per_attack(only)] == ["cheap"]  # no held defence above it: nearest the floor
    assert "| a | cheap† |" in summary_table(only) and "1 of them by clean-only alone" in summary_table(only)
    assert "by clean-only alone" not in table


def test_one_seed_shows_no_spread(tmp_path: Path) -> None:
    """With one seed there is no measured spread: the tables show the value alone, never "± 0.0"."""
    from unbackdoor.bench.report import Stat, write_report

    assert Stat.of([0.5]).text() == "50.0" and Stat.of([0.5]).std is None
    assert Stat.of([0.5, 0.5]).text() == "50.0 ± 0.0"  # two equal seeds: a measured zero
    store = Store(tmp_path)
    store.add_cells([CellSpec(f"d/a/s0/{d}", kind, "d", "a", d, 0, {})
                     for d, kind in (("none", "victim"), ("floor", "floor"))])
    while (cell := store.claim()) is not None:
        store.finish(cell, metrics={"cacc": 0.9, "asr": 0.5}, error=None, wall_s=1.0, peak_memory_mb=1.0,
                     peak_memory_scope="cell", version="t", git_commit=None)
    write_report(tmp_path, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| a | none (victim) | 90.0 | 50.0 | — | 50.0 | — | 1 |" in md and "±" not in md.split("## d")[1]
    with (tmp_path / "out" / "summary.csv").open(encoding="utf-8") as fh:
        assert all(row["cacc_std"] == "" for row in csv.DictReader(fh))


def test_grid_time_sums_cells_and_takes_the_union_of_attempt_spans() -> None:
    from unbackdoor.bench.report import grid_time

    cells = [{"status": "done", "wall_s": 10.0}, {"status": "done", "wall_s": 5.0}, {"status": "failed", "wall_s": 2.0},
             {"status": "pending", "wall_s": None}]
    # two workers overlapping 100-115 and 105-130, a lost attempt 130-140, then a gap, a second run 1000-1005
    attempts = [{"started_at": 100.0, "finished_at": 115.0}, {"started_at": 105.0, "finished_at": 130.0},
                {"started_at": 130.0, "finished_at": 140.0}, {"started_at": 1000.0, "finished_at": 1005.0},
                {"started_at": 1006.0, "finished_at": None}]  # still running: not counted
    took = grid_time(cells, attempts)
    assert (took.cells_done, took.done_s, took.attempts_s, took.busy_wall_s) == (2, 15.0, 55.0, 45.0)


def test_report_records_how_long_the_grid_took(run_dir: Path, report: Path) -> None:
    from unbackdoor.bench.report import grid_time

    store = Store(run_dir)
    took = grid_time(store.cells(), store.attempts())
    assert took.cells_done == 2 * (1 + 2 * 5) and 0 < took.busy_wall_s <= took.attempts_s
    assert took.done_s == pytest.approx(sum(c["wall_s"] for c in store.cells(status="done")))
    assert f"Time: {took.text()}." in (report / "report.md").read_text(encoding="utf-8")
    assert took.text() in (report / "report.html").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- a real browser
CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => ({w: i.naturalWidth, h: i.naturalHeight, ok: i.complete}));
  const rows = document.querySelectorAll("table.results tbody tr").length;
  const pre = document.createElement("pre");
  pre.id = "browser-check";
  pre.textContent = JSON.stringify({imgs, rows});
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium binary on PATH (CI installs Debian's chromium in .ci/run)")


def test_html_loads_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    browser = _chromium()
    page = (report / "report.html").read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"  # the report plus a script that reports what the browser rendered
    probe.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r'<pre id="browser-check">(.*?)</pre>', dom.stdout, re.S)
    assert match, dom.stdout[:2000]
    check = json.loads(match.group(1).replace("&quot;", '"'))
    summary_rows = len((report / "summary.csv").read_text(encoding="utf-8").splitlines()) - 1
    assert check["rows"] == summary_rows
    assert len(check["imgs"]) == 2 and all(i["ok"] and i["w"] > 100 and i["h"] > 100 for i in check["imgs"])
    assert "<td>none (victim)</td>" in dom.stdout

    shot = tmp_path / "page.png"
    proc = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,2000", (report / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 10_000
