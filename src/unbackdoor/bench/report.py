"""``unbackdoor report RUN_DIR``: tables, plots and one self-contained HTML page from the store.

Per dataset, rows are attack x defence with CACC, ASR and each model's clean → target lean as mean
± std over seeds and n; each attack has its ``floor`` row (the never-poisoned model on that attack's
triggered test set) and its victim row (defence ``none``). Unlearn cells add a table of how well
their detect step found the poisoned rows; the header says how long the grid took. Files: ``report.md``, ``summary.csv`` (the aggregated rows),
``cells.csv`` (one row per cell), ``asr_vs_cacc_<dataset>.png``, ``asr_bars_<dataset>.png`` and
``report.html`` (everything inline, images as base64).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unbackdoor.bench.store import METRICS, STORE_FILE, Store
from unbackdoor.errors import UnbackdoorError
from unbackdoor.evaluate import recorded_clean_to_target
from unbackdoor.outputs import atomic_output_dir, check_output_free, write_json

VICTIM, FLOOR = "none", "floor"
#: the train-time baseline that never reads the training rows: a defence whose CACC is not above it gains
#: nothing from the training data, whatever its ASR (marked in the summary; a line in the plots)
BASELINE = "clean-only"
NOT_ABOVE_BASELINE = "†"
DETECTION_METRICS = ("precision", "recall", "auroc")
GUARD_METRICS = ("frr", "far", "unguarded_cacc", "unguarded_asr")
TABLE_HEAD = ("attack", "defence", "CACC %", "ASR %", "clean → target %", "floor ASR %", "RA %", "n")
CELL_COLUMNS = ("id", "kind", "dataset", "attack", "defence", "seed", "status", "attempts", "cacc", "asr",
                "robust_accuracy", "macro_f1", "wall_s", "peak_memory_mb", "version", "git_commit", "error")


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (``None`` for one value: no spread was measured) and count of one
    metric over seeds."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        vals = [v for v in values if v is not None]
        if not vals:
            return cls(None, None, 0)
        return cls(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))

    def text(self) -> str:
        """``91.2 ± 0.4`` in percent (``91.2`` from one value), or ``—``."""
        if self.mean is None:
            return "—"
        return f"{100 * self.mean:.1f}" + ("" if self.std is None else f" ± {100 * self.std:.1f}")


@dataclass(frozen=True)
class Row:
    """One (dataset, attack, defence) line of the tables."""

    dataset: str
    attack: str
    defence: str
    stats: dict[str, Stat]
    wall_s: Stat
    floor_asr: Stat
    lean: Stat  # clean → target: the share of clean non-target test rows predicted as the target
    detection: dict[str, Stat]  # unlearn cells: precision, recall, AUROC of their detect step
    guard: dict[str, Stat] = field(default_factory=dict)  # guard cells: FRR, FAR, the unguarded model's CACC/ASR
    kind: str = ""  # the cells' kind: train, purify, unlearn, guard, victim, floor

    @property
    def n(self) -> int:
        return self.stats["cacc"].n


def defense_label(defence: str) -> str:
    return {VICTIM: "none (victim)", FLOOR: "floor (never poisoned)"}.get(defence, defence)


def summarise(cells: Sequence[dict[str, Any]]) -> list[Row]:
    """Finished cells aggregated over seeds, per (dataset, attack, defence), in grid order: per
    attack the floor row, then the victim, then the defences."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for cell in cells:
        if cell["status"] == "done" and cell["kind"] != "floor-model":
            groups.setdefault((cell["dataset"], cell["attack"], cell["defence"]), []).append(cell)
    rank = {FLOOR: 0, VICTIM: 1}
    order = sorted(groups, key=lambda k: (_first(cells, k[0], "dataset"), _first(cells, k[1], "attack"),
                                          rank.get(k[2], 2), _first(cells, k[2], "defence")))
    targets = attack_targets(cells)
    rows = []
    for key in order:
        group = groups[key]
        floor = groups.get((key[0], key[1], FLOOR), [])
        target = targets.get(key[:2])
        rows.append(Row(*key, stats={m: Stat.of([c[m] for c in group]) for m in METRICS},
                        wall_s=Stat.of([c["wall_s"] for c in group]), floor_asr=Stat.of([c["asr"] for c in floor]),
                        lean=Stat.of([recorded_clean_to_target(c["metrics"] or {}, target) for c in group]),
                        detection={m: Stat.of([((c["metrics"] or {}).get("detection") or {}).get(m) for c in group])
                                   for m in DETECTION_METRICS},
                        guard={m: Stat.of([(c["metrics"] or {}).get(m) for c in group]) for m in GUARD_METRICS},
                        kind=group[0]["kind"]))
    return rows


def attack_targets(cells: Sequence[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """Each (dataset, attack)'s target label, as any of its cells' metrics recorded it (cells finished
    before the target was kept borrow it from a sibling; it is the attack's, the same in every cell)."""
    targets: dict[tuple[str, str], int] = {}
    for c in cells:
        target = (c.get("metrics") or {}).get("target_label")
        if target is not None:
            targets.setdefault((c["dataset"], c["attack"]), int(target))
    return targets


def _first(cells: Sequence[dict[str, Any]], value: str, column: str) -> int:
    return next(i for i, c in enumerate(cells) if c[column] == value)


# ----------------------------------------------------------------------------- time
@dataclass(frozen=True)
class GridTime:
    """How long a grid took, from the store's attempts: the seconds in finished cells, the seconds in
    every attempt (lost and failed ones too), and the busy wall-clock, i.e. the union of the attempts'
    spans (time with at least one cell running; gaps between runs or slices are not counted)."""

    cells_done: int
    done_s: float
    attempts_s: float
    busy_wall_s: float

    def text(self) -> str:
        return (f"{self.cells_done} cells finished in {self.done_s:,.0f} worker-seconds ({self.attempts_s:,.0f} with "
                f"lost and failed attempts); busy wall-clock {self.busy_wall_s / 3600:.2f} h (time with at least "
                "one cell running, summed over runs)")


def grid_time(cells: Sequence[dict[str, Any]], attempts: Sequence[dict[str, Any]]) -> GridTime:
    """:class:`GridTime` of a store's cells and attempts (attempts still running are left out)."""
    done = [c for c in cells if c["status"] == "done"]
    spans = sorted((a["started_at"], a["finished_at"]) for a in attempts
                   if a["started_at"] is not None and a["finished_at"] is not None)
    busy, end = 0.0, float("-inf")
    for start, finish in spans:  # the union of the spans
        if finish > end:
            busy += finish - max(start, end)
            end = finish
    return GridTime(len(done), sum(c["wall_s"] or 0.0 for c in done), sum(f - s for s, f in spans), busy)


# ----------------------------------------------------------------------------- tables
def markdown_table(rows: Sequence[Row]) -> str:
    """attack | defence | CACC | ASR | clean → target | floor ASR | RA | n (percent, mean ± std over seeds)."""
    lines = [f"| {' | '.join(TABLE_HEAD)} |", "|---|---|" + "---:|" * (len(TABLE_HEAD) - 2)]
    for r in rows:
        lines.append(f"| {r.attack} | {defense_label(r.defence)} | {' | '.join(_table_numbers(r))} |")
    return "\n".join(lines) + "\n"


def _table_numbers(r: Row) -> list[str]:
    return [r.stats["cacc"].text(), r.stats["asr"].text(), r.lean.text(), r.floor_asr.text(),
            r.stats["robust_accuracy"].text(), str(r.n)]


DETECTION_HEAD = ("attack", "unlearn cells", "precision %", "recall %", "AUROC", "n")


def detection_lines(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    """Per attack, how well the unlearn cells' ``detect`` step found the poisoned rows; defences whose
    detection is the same (one detector, rate and clean set) share a line."""
    lines = []
    for attack in dict.fromkeys(r.attack for r in rows):
        shared: dict[tuple[str, ...], list[Row]] = {}
        for r in rows:
            if r.attack == attack and r.detection["precision"].n:
                key = (r.detection["precision"].text(), r.detection["recall"].text(), _auroc_text(r.detection["auroc"]),
                       str(r.detection["precision"].n))
                shared.setdefault(key, []).append(r)
        lines += [(attack, ", ".join(r.defence for r in group), *key) for key, group in shared.items()]
    return lines


def detection_table(rows: Sequence[Row]) -> str:
    """:func:`detection_lines` as Markdown (empty without unlearn cells)."""
    lines = detection_lines(rows)
    if not lines:
        return ""
    return "\n".join([f"| {' | '.join(DETECTION_HEAD)} |", "|---|---|---:|---:|---:|---:|",
                      *[f"| {' | '.join(line)} |" for line in lines]]) + "\n"


GUARD_HEAD = ("attack", "guard", "FRR %", "FAR %", "CACC % (guarded)", "ASR % (guarded)", "ASR % (unguarded)", "n")


def guard_table(rows: Sequence[Row]) -> str:
    """The guard cells: FRR (clean test rows rejected; for a rewriting guard, the CACC it costs), FAR
    (triggered rows let through), end-to-end CACC and ASR, and the same model's ASR without the guard."""
    guarded = [r for r in rows if r.guard and r.guard["frr"].n]
    if not guarded:
        return ""
    lines = [f"| {' | '.join(GUARD_HEAD)} |", "|---|---|" + "---:|" * (len(GUARD_HEAD) - 2)]
    for r in guarded:
        cells = [r.guard["frr"].text(), r.guard["far"].text(), r.stats["cacc"].text(), r.stats["asr"].text(),
                 r.guard["unguarded_asr"].text(), str(r.n)]
        lines.append(f"| {r.attack} | {r.defence} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _auroc_text(stat: Stat) -> str:
    if stat.mean is None:
        return "—"
    return f"{stat.mean:.3f}" + ("" if stat.std is None else f" ± {stat.std:.3f}")


def failed_lines(cells: Sequence[dict[str, Any]]) -> list[str]:
    failed = [c for c in cells if c["status"] == "failed"]
    if not failed:
        return []
    lines = ["## Failed cells", "", "| cell | error |", "|---|---|"]
    lines += [f"| {c['id']} | {_one_line(c['error'])} |" for c in failed]
    return lines + [""]


def _one_line(text: str | None) -> str:
    return (text or "").splitlines()[0].replace("|", "\\|")[:300] if text else ""


def write_summary_csv(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["dataset", "attack", "defence", "n", *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")],
                         "clean_to_target_mean", "clean_to_target_std", "floor_asr_mean", "wall_s_mean"])
        for r in rows:
            values = [v for m in METRICS for v in (r.stats[m].mean, r.stats[m].std)]
            writer.writerow([r.dataset, r.attack, r.defence, r.n, *map(_num, values), _num(r.lean.mean),
                             _num(r.lean.std), _num(r.floor_asr.mean), _num(r.wall_s.mean)])


def write_cells_csv(cells: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CELL_COLUMNS)
        for c in cells:
            writer.writerow([_num(c[k]) if isinstance(c[k], float) else ("" if c[k] is None else c[k])
                             for k in CELL_COLUMNS])


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


# ----------------------------------------------------------------------------- held: a defence at the floor
HELD_ASR_MARGIN = 0.05  # ASR at most 5 points above the floor ...
HELD_CACC_COST = 0.02  # ... and clean accuracy at most 2 points below the victim's (means over seeds)


@dataclass(frozen=True)
class Verdict:
    """How a defence row stands against its attack's floor and victim (means over seeds)."""

    row: Row
    above_floor: float | None  # ASR − floor ASR
    cacc_cost: float | None  # victim CACC − CACC
    held: bool
    over_baseline: float | None = None  # CACC − clean-only's (None: not train-time, no clean-only row, or it)


def verdicts(rows: Sequence[Row]) -> list[Verdict]:
    """Every defence row's distance from the floor and CACC cost; *held* when ASR ≤ floor + 5 points
    and CACC ≥ the victim's − 2 points."""
    out = []
    for r in rows:
        if r.defence in (FLOOR, VICTIM):
            continue
        floor = next((x for x in rows if (x.dataset, x.attack, x.defence) == (r.dataset, r.attack, FLOOR)), None)
        victim = next((x for x in rows if (x.dataset, x.attack, x.defence) == (r.dataset, r.attack, VICTIM)), None)
        asr, cacc = r.stats["asr"].mean, r.stats["cacc"].mean
        above = None if asr is None or floor is None or floor.stats["asr"].mean is None else asr - floor.stats["asr"].mean
        cost = None if cacc is None or victim is None or victim.stats["cacc"].mean is None else \
            victim.stats["cacc"].mean - cacc
        held = above is not None and cost is not None and above <= HELD_ASR_MARGIN + 1e-9 and cost <= HELD_CACC_COST + 1e-9
        out.append(Verdict(r, above, cost, held, _over_baseline(rows, r)))
    return out


def _over_baseline(rows: Sequence[Row], r: Row) -> float | None:
    """``r``'s CACC minus that of its attack's clean-only row, for train-time defences (the same situation: the
    training rows and the clean dev set; a purify or unlearn defence gets a suspect model and fewer clean rows);
    None otherwise, without a clean-only row, or for that row itself."""
    base = next((x for x in rows if (x.dataset, x.attack, x.defence) == (r.dataset, r.attack, BASELINE)), None)
    if r.kind != "train" or r.defence == BASELINE or base is None:
        return None
    if base.stats["cacc"].mean is None or r.stats["cacc"].mean is None:
        return None
    return r.stats["cacc"].mean - base.stats["cacc"].mean


def best_per_attack(rows: Sequence[Row]) -> list[Verdict]:
    """Per (dataset, attack) the best defence: a held one with the least ASR above the floor (then the
    least CACC cost), clean-only and the train-time defences not above its CACC (†) only when no other is
    held (clean-only never reads the training rows); else the one nearest the floor among those within the
    CACC budget; else nearest."""
    best = []
    found = verdicts(rows)
    for key in dict.fromkeys((r.dataset, r.attack) for r in rows):
        mine = [v for v in found if (v.row.dataset, v.row.attack) == key and v.above_floor is not None]
        if not mine:
            continue
        within = [v for v in mine if v.cacc_cost is not None and v.cacc_cost <= HELD_CACC_COST + 1e-9]
        held = [v for v in mine if v.held]
        pool = [v for v in held if v.row.defence != BASELINE and not _not_above_baseline(v)] or held or within or mine
        best.append(min(pool, key=lambda v: (v.above_floor, v.cacc_cost if v.cacc_cost is not None else 1.0)))
    return best


def summary_table(rows: Sequence[Row]) -> str:
    """Per attack the best defence, its ASR against the floor and its CACC against the victim, held or not,
    and every defence that holds it."""
    best = best_per_attack(rows)
    if not best:
        return ""
    found = verdicts(rows)
    lines = ["| attack | best defence | ASR % | floor ASR % | ASR − floor | CACC % | victim CACC % | CACC cost | held | "
             "held by |",
             "|---|---|---:|---:|---:|---:|---:|---:|:---:|---|"]
    for v in best:
        r = v.row
        floor = next(x for x in rows if (x.dataset, x.attack, x.defence) == (r.dataset, r.attack, FLOOR))
        victim = next(x for x in rows if (x.dataset, x.attack, x.defence) == (r.dataset, r.attack, VICTIM))
        lines.append(f"| {r.attack} | {r.defence}{_baseline_mark(v)} | {r.stats['asr'].text()} | "
                     f"{floor.stats['asr'].text()} | "
                     f"{_points(v.above_floor)} | {r.stats['cacc'].text()} | {victim.stats['cacc'].text()} | "
                     f"{_points(v.cacc_cost)} | {'✓' if v.held else '✗'} | {held_by(found, r.dataset, r.attack)} |")
    held = sum(v.held for v in best)
    lines.append("")
    lines.append(f"Held: {held} of {len(best)} attacks{_baseline_only(best)} (some defence with ASR ≤ floor + "
                 f"{100 * HELD_ASR_MARGIN:.0f} points and CACC ≥ the victim's − {100 * HELD_CACC_COST:.0f} points, "
                 "means over seeds).")
    if any(v.over_baseline is not None for v in found):
        lines.append(f"{NOT_ABOVE_BASELINE} marks a train-time defence whose CACC is not above {BASELINE}'s, the "
                     "baseline that never reads the training rows: held or not, the training data gave it nothing.")
    return "\n".join(lines) + "\n"


def _baseline_only(best: Sequence[Verdict]) -> str:
    """``", N of them by clean-only alone ..."`` when the best defence of N held attacks is clean-only or †."""
    n = sum(v.held and (v.row.defence == BASELINE or _not_above_baseline(v)) for v in best)
    return f", {n} of them by {BASELINE} alone or at no more CACC" if n else ""


def held_by(found: Sequence[Verdict], dataset: str, attack: str) -> str:
    """The defences that hold this attack, nearest the floor first ("—" for none)."""
    mine = sorted((v for v in found if (v.row.dataset, v.row.attack) == (dataset, attack) and v.held),
                  key=lambda v: (v.above_floor, v.cacc_cost))
    return ", ".join(v.row.defence + _baseline_mark(v) for v in mine) or "—"


def _not_above_baseline(v: Verdict) -> bool:
    """A train-time defence whose CACC is not above clean-only's."""
    return v.over_baseline is not None and v.over_baseline <= 1e-9


def _baseline_mark(v: Verdict) -> str:
    return NOT_ABOVE_BASELINE if _not_above_baseline(v) else ""


def _points(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.1f}"


# ----------------------------------------------------------------------------- plots
def scatter_png(rows: Sequence[Row]) -> bytes:
    """ASR vs CACC, one panel per attack: every defence a labelled point (mean over seeds, std as
    error bars), the floor's ASR as a line with the held band (≤ floor + 5 points, CACC ≥ victim − 2)
    shaded, the victim and the never-poisoned model as reference points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r.attack for r in rows))
    cols = min(3, len(attacks))
    nrows = -(-len(attacks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.4 * nrows), squeeze=False)
    held = {(v.row.attack, v.row.defence) for v in verdicts(rows) if v.held}
    for ax, attack in zip(axes.flat, attacks, strict=False):
        _attack_panel(ax, [r for r in rows if r.attack == attack], attack, held)
    for ax in list(axes.flat)[len(attacks):]:
        ax.axis("off")
    return _png(fig)


def _attack_panel(ax: Any, rows: Sequence[Row], attack: str, held: set[tuple[str, str]]) -> None:
    floor = next((r for r in rows if r.defence == FLOOR), None)
    victim = next((r for r in rows if r.defence == VICTIM), None)
    if floor is not None and floor.stats["asr"].mean is not None:
        f = 100 * floor.stats["asr"].mean
        ax.axhline(f, color="green", linestyle="--", linewidth=1, label="floor ASR")
        if victim is not None and victim.stats["cacc"].mean is not None:
            left = 100 * (victim.stats["cacc"].mean - HELD_CACC_COST)
            ax.axvspan(left, 100, ymin=0, ymax=(f + 100 * HELD_ASR_MARGIN + 5) / 110, color="green", alpha=0.08)
        ax.plot(100 * floor.stats["cacc"].mean, f, marker="*", markersize=13, color="green", linestyle="none",
                label="never poisoned")
    base = next((r for r in rows if r.defence == BASELINE), None)
    if base is not None and base.stats["cacc"].mean is not None:
        ax.axvline(100 * base.stats["cacc"].mean, color="grey", linestyle=":", linewidth=1,
                   label=f"{BASELINE} CACC")
    if victim is not None and victim.stats["asr"].mean is not None:
        ax.plot(100 * victim.stats["cacc"].mean, 100 * victim.stats["asr"].mean, marker="X", markersize=11,
                color="red", linestyle="none", label="victim")
    for r in rows:
        if r.defence in (FLOOR, VICTIM) or r.stats["asr"].mean is None:
            continue
        c, a = r.stats["cacc"], r.stats["asr"]
        colour = "green" if (attack, r.defence) in held else "C0"
        ax.errorbar(100 * c.mean, 100 * a.mean, xerr=100 * (c.std or 0), yerr=100 * (a.std or 0), fmt="o",
                    capsize=2, color=colour, markersize=4, elinewidth=0.7)
        ax.annotate(r.defence, (100 * c.mean, 100 * a.mean), fontsize=6.5, xytext=(3, 2), textcoords="offset points")
    ax.set(title=attack, xlabel="CACC %", ylabel="ASR %", ylim=(-5, 105))
    ax.legend(fontsize=6.5, loc="upper left")


def bars_png(rows: Sequence[Row]) -> bytes:
    """ASR per attack: one bar per defence (floor and victim included), std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r.attack for r in rows))
    defences = list(dict.fromkeys(r.defence for r in rows))
    width = 0.8 / max(1, len(defences))
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours: one per defence of a full grid
    fig, ax = plt.subplots(figsize=(min(14.0, 3 + 1.8 * len(attacks)), 4.2))
    for j, defence in enumerate(defences):
        xs, ys, es = [], [], []
        for i, attack in enumerate(attacks):
            row = next((r for r in rows if r.attack == attack and r.defence == defence), None)
            if row is not None and row.stats["asr"].mean is not None:
                xs.append(i + (j - (len(defences) - 1) / 2) * width)
                ys.append(100 * row.stats["asr"].mean)
                es.append(100 * (row.stats["asr"].std or 0))
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=defense_label(defence), color=palette[j % len(palette)])
    ax.set_xticks(range(len(attacks)), attacks, rotation=20)
    ax.set(ylabel="ASR %", ylim=(0, 105), title="ASR per attack")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------- HTML
CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.floor{color:#666}tr.victim{background:#fdecea}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}code{background:#f4f4f4}"""


def html_table(rows: Sequence[Row]) -> str:
    """The long table, every defence's ASR cell shaded by its distance from the floor and its CACC cell
    by its cost against the victim (green: within the held margins), held rows marked ✓."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in (*TABLE_HEAD, "held"))
    verdict = {(v.row.attack, v.row.defence): v for v in verdicts(rows)}
    body = []
    for r in rows:
        cls = {FLOOR: ' class="floor"', VICTIM: ' class="victim"'}.get(r.defence, "")
        v = verdict.get((r.attack, r.defence))
        numbers = _table_numbers(r)
        shades = [_shade(v.cacc_cost, HELD_CACC_COST) if v else "", _shade(v.above_floor, HELD_ASR_MARGIN) if v else ""]
        cells = "".join(f'<td class="num"{f" style={chr(34)}background:{shades[i]}{chr(34)}" if i < 2 and shades[i] else ""}>'
                        f"{html.escape(value)}</td>" for i, value in enumerate(numbers))
        mark = "✓" if v is not None and v.held else ""
        body.append(f"<tr{cls}><td>{html.escape(r.attack)}</td><td>{html.escape(defense_label(r.defence))}</td>"
                    f"{cells}<td>{mark}</td></tr>")
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _shade(distance: float | None, margin: float) -> str:
    """Green within the margin, then yellow to red as the distance grows past it (30 points: red)."""
    if distance is None:
        return ""
    if distance <= margin + 1e-9:
        return "#d8f0d8"
    t = min(1.0, (distance - margin) / 0.3)
    return f"hsl({int(50 - 50 * t)}, 85%, {int(88 - 10 * t)}%)"


def html_summary(rows: Sequence[Row]) -> str:
    best = best_per_attack(rows)
    if not best:
        return ""
    held = sum(v.held for v in best)
    items = "".join(
        f"<tr><td>{html.escape(v.row.attack)}</td><td>{html.escape(v.row.defence + _baseline_mark(v))}</td>"
        f'<td class="num" style="background:{_shade(v.above_floor, HELD_ASR_MARGIN)}">{html.escape(_points(v.above_floor))}</td>'
        f'<td class="num" style="background:{_shade(v.cacc_cost, HELD_CACC_COST)}">{html.escape(_points(v.cacc_cost))}</td>'
        f"<td>{'✓' if v.held else '✗'}</td></tr>" for v in best)
    return (f"<h3>Best defence per attack: held {held} of {len(best)}{html.escape(_baseline_only(best))}</h3>"
            "<p>Held: ASR ≤ floor + "
            f"{100 * HELD_ASR_MARGIN:.0f} points and CACC ≥ the victim's − {100 * HELD_CACC_COST:.0f} points "
            "(means over seeds).</p><table class='summary'><thead><tr><th>attack</th><th>best defence</th>"
            "<th>ASR − floor (pts)</th><th>CACC cost (pts)</th><th>held</th></tr></thead>"
            f"<tbody>{items}</tbody></table>")


def html_page(title: str, sections: Sequence[tuple[str, list[Row], dict[str, bytes]]],
              failed: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """One self-contained page: per dataset its table and plots (base64 PNG), then failed cells."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>CACC and ASR in percent, mean ± std over seeds (n = seeds). unbackdoor "
             f"{html.escape(str(meta.get('versions', '')))}, commit <code>{html.escape(str(meta.get('commits', '')))}"
             f"</code>.</p><p>Time: {html.escape(str(meta.get('time', '')))}.</p>"]
    for dataset, rows, images in sections:
        parts.append(f"<h2>{html.escape(dataset)}</h2>{html_summary(rows)}{html_table(rows)}")
        if detection := detection_lines(rows):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in DETECTION_HEAD)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in line) + "</tr>" for line in detection)
            parts.append(f"<h3>Finding the poisoned rows (unlearn cells' detect step vs the true flags)</h3>"
                         f'<table class="detection"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
        for name, png in images.items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{html.escape(name)}</figcaption></figure>")
    if failed:
        items = "".join(f"<tr><td>{html.escape(c['id'])}</td><td>{html.escape(_one_line(c['error']))}</td></tr>"
                        for c in failed)
        parts.append(f'<h2>Failed cells</h2><table class="failed"><tr><th>cell</th><th>error</th></tr>{items}</table>')
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the report
def summary_text(run_dir: str | Path) -> str:
    """The per-dataset tables of a run's finished cells (what ``bench`` prints when it ends)."""
    rows = summarise(Store(Path(run_dir)).cells())
    parts = []
    for dataset in dict.fromkeys(r.dataset for r in rows):
        parts += [f"{dataset}:", markdown_table([r for r in rows if r.dataset == dataset])]
    return "\n".join(parts)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write every report file of ``run_dir``'s store into ``out`` (default RUN_DIR/report), replacing
    an earlier report there only once the new one is complete."""
    run = Path(run_dir)
    if not (run / STORE_FILE).is_file():
        raise UnbackdoorError(f"{run}: no {STORE_FILE} (not a bench run dir)")
    final = Path(out) if out is not None else run / "report"
    check_output_free(final, overwrite=True, inputs=[run / STORE_FILE])
    with atomic_output_dir(final, overwrite=True) as target:
        return _write_report_files(run, target, final)


def _write_report_files(run: Path, target: Path, final: Path) -> dict[str, Any]:
    store = Store(run)
    cells = store.cells()
    rows = summarise(cells)
    attempts = store.attempts()
    took = grid_time(cells, attempts)
    meta = {"versions": ", ".join(sorted({c["version"] for c in cells if c["version"]})) or "?",
            "commits": ", ".join(sorted({(c["git_commit"] or "")[:10] for c in cells if c["git_commit"]})) or "?",
            "time": took.text()}
    md = [f"# Benchmark: {run.name}", "", "CACC, ASR, clean → target (the share of *clean* non-target test rows the "
          "same model already labels as the target: its own lean, which its ASR includes), floor ASR (never-poisoned "
          "model on the same triggered set) and robust accuracy in percent, mean ± std over seeds; n = seeds "
          "finished.", "", f"Time: {took.text()}.", ""]
    sections = []
    for dataset in dict.fromkeys(r.dataset for r in rows):
        ds_rows = [r for r in rows if r.dataset == dataset]
        images = {f"asr_vs_cacc_{dataset}.png": scatter_png(ds_rows), f"asr_bars_{dataset}.png": bars_png(ds_rows)}
        for name, png in images.items():
            (target / name).write_bytes(png)
        md += [f"## {dataset}", ""]
        if summary := summary_table(ds_rows):
            md += ["Best defence per attack:", "", summary]
        md += [markdown_table(ds_rows), *[f"![{n}]({n})" for n in images], ""]
        if detection := detection_table(ds_rows):
            md += [f"### {dataset}: finding the poisoned rows", "", "The unlearn cells' `detect` step against the "
                   "true flags (evaluation only; the defence never saw them): precision and recall of the flagged "
                   "rows, AUROC of the suspicion scores.", "", detection]
        if guards := guard_table(ds_rows):
            md += [f"### {dataset}: inference-time guards", "", "Thresholds set on clean rows only, at the guard's "
                   "false-rejection budget; CACC and ASR end to end (a rejected clean row is an error, a rejected "
                   "triggered row a failed attack).", "", guards]
        sections.append((dataset, ds_rows, images))
    failed = [c for c in cells if c["status"] == "failed"]
    md += failed_lines(cells)
    (target / "report.md").write_text("\n".join(md), encoding="utf-8")
    write_summary_csv(rows, target / "summary.csv")
    write_cells_csv(cells, target / "cells.csv")
    (target / "report.html").write_text(html_page(f"Benchmark: {run.name}", sections, failed, meta), encoding="utf-8")
    write_json(target / "results.json", {"cells": cells, "attempts": attempts})
    return {"out": str(final), "rows": len(rows), "cells": len(cells), "failed": len(failed),
            "counts": store.counts()}
