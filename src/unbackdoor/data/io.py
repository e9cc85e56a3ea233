"""Reading and writing task folders (TSV, CSV, JSONL) and Hugging Face datasets.

A task folder holds ``train``, ``dev`` and ``test`` files in one format:

* TSV/CSV with a header: ``sentence,label`` or ``sentence1,sentence2,label`` (``text`` is accepted
  for ``sentence``); an optional ``id`` column keeps ids stable, else a row's id is
  ``<split>-<row number>``.
* JSONL, one object a line, with the same keys (``func`` is accepted as the text of a code row and
  ``idx`` as its id).

Poisoned variants are written as TSV (whitespace collapsed), or as JSONL with the same columns when
any text holds a newline, tab or carriage return (source code), so that such text is kept exactly.

A poisoned folder adds ``train_poison_flags.txt`` (one 0/1 per train row) and ``meta.json`` with
``target_label``; its ``dev``/``test`` files are triggered non-target rows relabelled to the
target (optionally with an ``original_label`` column). Its clean dev/test come from the folder
named by ``meta.json``'s ``clean`` key, or from the sibling ``clean`` folder.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from unbackdoor.data.types import (
    AttackInfo,
    Dataset,
    Example,
    PoisonedTask,
    PoisonFlags,
    Task,
    TriggeredSet,
)
from unbackdoor.data.sampling import separate_dev_from_test
from unbackdoor.errors import DataError, first_line
from unbackdoor.utils.hub import hub_unreachable_reason, offline_variable

SPLITS = ("train", "dev", "test")
FORMATS = (".tsv", ".csv", ".jsonl")
TEXT_KEYS = ("sentence", "text", "func", "sentence1")
PAIR_KEY = "sentence2"
ID_KEYS = ("id", "idx")
DATA_ENV = "UNBACKDOOR_DATA"
SHORTCUTS = ("sst2", "olid", "hatespeech", "agnews", "imdb", "lingspam", "qnli", "hsol", "devign")
HF_PREFIX = "hf:"

Row = dict[str, Any]


# ----------------------------------------------------------------------------- locating data
def data_root() -> Path:
    """The data root: ``$UNBACKDOOR_DATA``, else ``../shared/data`` from the working directory,
    else ``../shared/data`` beside the source checkout."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    here = Path.cwd() / ".." / "shared" / "data"
    if here.is_dir():
        return here.resolve()
    checkout = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
    return checkout.resolve() if checkout.is_dir() else here


def resolve_data_path(spec: str | Path) -> Path:
    """A folder path, or a name under the data root (``sst2`` = ``sst2/clean``)."""
    path = Path(spec)
    if path.is_dir():
        return path
    name = str(spec).strip("/")
    root = data_root()
    candidates = [root / name]
    if "/" not in name:
        candidates.insert(0, root / name / "clean")
    for cand in candidates:
        if cand.is_dir():
            return cand
    if path.exists():
        raise DataError(f"{spec}: not a folder of train/dev/test files")
    known = ", ".join(SHORTCUTS)
    raise DataError(
        f"{spec}: no such data folder (not a path, and not under the data root {root}; "
        f"set {DATA_ENV} to change it; shortcuts: {known})"
    )


def read_meta(folder: Path) -> dict[str, Any]:
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path}: unreadable meta.json ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: meta.json must hold an object")
    return meta


def is_poisoned_folder(folder: Path) -> bool:
    return (folder / "train_poison_flags.txt").exists() or read_meta(folder).get("kind") == "poisoned"


def split_file(folder: Path, split: str) -> Path:
    found = [folder / f"{split}{ext}" for ext in FORMATS if (folder / f"{split}{ext}").exists()]
    if not found:
        raise DataError(f"{folder}: missing {split} split (looked for {split}.tsv/.csv/.jsonl)")
    if len(found) > 1:
        raise DataError(f"{folder}: more than one {split} file: {', '.join(p.name for p in found)}")
    return found[0]


# ----------------------------------------------------------------------------- reading rows
def read_rows(path: Path) -> list[Row]:
    """Rows of a TSV/CSV/JSONL file as dicts (strings for delimited files)."""
    try:
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        return _read_delimited(path, "\t" if path.suffix == ".tsv" else ",")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc


def _read_delimited(path: Path, delimiter: str) -> list[Row]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(fh, delimiter=delimiter, quoting=quoting)
        rows = []
        try:
            if reader.fieldnames is None:
                raise DataError(f"{path}: empty file (no header)")
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise DataError(f"{path}:{reader.line_num}: wrong number of columns")
                rows.append(row)
        except csv.Error as exc:
            line = reader.line_num + 1  # the row being read when the parser gave up
            if "field larger than field limit" in str(exc):
                raise DataError(f"{path}:{line}: a field is longer than {csv.field_size_limit():,} characters "
                                "(a missing line break or quote?)") from None
            raise DataError(f"{path}:{line}: malformed file ({exc})") from None
        return rows


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: malformed JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
    return rows


def _parse_label(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: label {value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        return int(value.strip())
    raise DataError(f"{where}: label {value!r} is not an integer")


def _first_key(keys: Iterable[str], candidates: Sequence[str]) -> str | None:
    keys = set(keys)
    return next((k for k in candidates if k in keys), None)


def rows_to_examples(rows: list[Row], path: Path, split: str) -> list[Example]:
    """Validate columns and labels and build examples with stable ids."""
    if not rows:
        raise DataError(f"{path}: the {split} split is empty")
    keys = rows[0].keys()
    is_pair = "sentence1" in keys and PAIR_KEY in keys
    text_key = "sentence1" if is_pair else _first_key(keys, TEXT_KEYS[:3])
    if text_key is None:
        raise DataError(f"{path}: missing text column (one of: sentence, text, func, sentence1+sentence2)")
    if "label" not in keys:
        raise DataError(f"{path}: missing column 'label'")
    id_key = _first_key(keys, ID_KEYS)
    examples = []
    for n, row in enumerate(rows):
        where = f"{path}:{n + 2 if path.suffix != '.jsonl' else n + 1}"
        text = row.get(text_key)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: empty or missing text")
        pair = row.get(PAIR_KEY) if is_pair else None
        if is_pair and (not isinstance(pair, str) or not pair.strip()):
            raise DataError(f"{where}: empty or missing sentence2")
        ex_id = str(row[id_key]) if id_key and row.get(id_key) not in (None, "") else f"{split}-{n}"
        examples.append(Example(ex_id, text, _parse_label(row.get("label"), where), pair))
    return examples


def _label_space(folder: Path, meta: dict[str, Any], splits: dict[str, list[Example]],
                 files: dict[str, Path] | None = None) -> tuple[int, tuple[str, ...] | None]:
    """The task's labels: ``meta.json``'s names, else 0..K-1 as used, which must leave no gap."""
    names = meta.get("label_names") or meta.get("labels")
    if isinstance(names, dict):  # {"0": "negative", ...}
        try:
            names = [names[str(i)] for i in range(len(names))]
        except KeyError as exc:
            raise DataError(f"{folder}/meta.json: label_names keys must be 0..n-1") from exc
    used = {e.label for exs in splits.values() for e in exs}
    where = {split: (files or {}).get(split, folder) for split in splits}
    if min(used) < 0:
        split = next(s for s, exs in splits.items() if any(e.label < 0 for e in exs))
        raise DataError(f"{where[split]}: negative label")
    max_label = max(used)
    if names:
        if max_label >= len(names):
            raise DataError(
                f"{folder}: label {max_label} does not match the {len(names)} classes in meta.json"
            )
        return len(names), tuple(str(n) for n in names)
    missing = sorted(set(range(max_label + 1)) - used)
    if missing:
        split = next(s for s, exs in splits.items() if any(e.label == max_label for e in exs))
        raise DataError(f"{where[split]}: labels {_ranges(sorted(used))} leave out {_ranges(missing)}; labels must "
                        "be 0..K-1 without gaps (or named in meta.json's label_names)")
    return max(max_label + 1, 2), None


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2, 5, 7-8``."""
    parts: list[tuple[int, int]] = []
    for v in values:
        if parts and parts[-1][1] == v - 1:
            parts[-1] = (parts[-1][0], v)
        else:
            parts.append((v, v))
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


# ----------------------------------------------------------------------------- loading tasks
def load_task(spec: str | Path) -> Task:
    """A clean task from a folder, a name under the data root, or ``hf:<name or saved dir>``."""
    if str(spec).startswith(HF_PREFIX):
        return load_hf_task(str(spec)[len(HF_PREFIX):])
    folder = resolve_data_path(spec)
    if (folder / "dataset_dict.json").exists():
        return load_hf_task(str(folder))
    if is_poisoned_folder(folder):
        raise DataError(
            f"{spec}: is a poisoned variant (its dev/test are triggered sets); "
            "load it as poisoned data, or use its dataset's clean folder"
        )
    return _load_folder(folder, str(spec))


def _load_folder(folder: Path, name: str, meta: dict[str, Any] | None = None) -> Task:
    meta = read_meta(folder) if meta is None else meta
    files = {s: split_file(folder, s) for s in SPLITS}
    raw = {s: rows_to_examples(read_rows(files[s]), files[s], s) for s in SPLITS}
    num_labels, names = _label_space(folder, meta, raw, files)
    splits = {s: Dataset(tuple(raw[s]), num_labels, f"{name}:{s}", names) for s in SPLITS}
    pair = {s: d.is_pair for s, d in splits.items()}
    if len(set(pair.values())) > 1:
        raise DataError(f"{folder}: some splits are sentence pairs and some are not")
    return separate_dev_from_test(Task(name, splits["train"], splits["dev"], splits["test"]))


def load_hf_task(name: str) -> Task:
    """A task from a Hugging Face dataset saved to disk, or named on the Hub (needs network)."""
    try:
        import datasets  # optional dependency: pip install 'unbackdoor[hf]'
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError("Hugging Face datasets need the 'datasets' package: pip install 'unbackdoor[hf]'") from exc
    if not Path(name).is_dir() and (name.count("/") > 1 or name.startswith((".", "/", "~"))):
        raise DataError(f"hf:{name}: no such saved dataset folder (and not a Hub name)")
    offline = None if Path(name).is_dir() else hub_unreachable_reason()
    if offline is not None and offline_variable() is None:  # unreachable: fail now (with a variable, read the cache)
        raise DataError(f"hf:{name}: not a dataset saved to disk, and the Hugging Face Hub cannot be used now "
                        f"({offline}; set HF_DATASETS_OFFLINE=1 to read the local cache)")
    try:
        if Path(name).is_dir():
            dd = datasets.load_from_disk(name)
        else:
            dd = datasets.load_dataset(name)
    except Exception as exc:  # noqa: BLE001 - the library raises many types; report one line
        if offline is not None:
            raise DataError(f"hf:{name}: not a dataset saved to disk nor in the local cache ({offline})") from None
        raise DataError(f"hf:{name}: cannot load ({type(exc).__name__}: {first_line(exc)})") from None
    aliases = {"train": ("train",), "dev": ("validation", "dev", "valid"), "test": ("test",)}
    raw: dict[str, list[Example]] = {}
    for split, keys in aliases.items():
        key = next((k for k in keys if k in dd), None)
        if key is None:
            raise DataError(f"hf:{name}: missing {split} split (have: {', '.join(dd.keys())})")
        raw[split] = rows_to_examples([dict(r) for r in dd[key]], Path(f"hf:{name}/{key}"), split)
    meta: dict[str, Any] = {}
    feature = dd["train"].features.get("label")
    if getattr(feature, "names", None):
        meta["label_names"] = list(feature.names)
    num_labels, names = _label_space(Path(name), meta, raw)
    splits = {s: Dataset(tuple(raw[s]), num_labels, f"{name}:{s}", names) for s in SPLITS}
    return separate_dev_from_test(Task(name, splits["train"], splits["dev"], splits["test"]))


def _read_flags(folder: Path, n_rows: int) -> list[bool]:
    path = folder / "train_poison_flags.txt"
    if not path.exists():
        raise DataError(f"{folder}: poisoned data needs train_poison_flags.txt")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable flags file ({exc})") from exc
    if any(ln not in ("0", "1") for ln in lines):
        raise DataError(f"{path}: each line must be 0 or 1")
    if len(lines) != n_rows:
        raise DataError(f"{path}: {len(lines)} flags for {n_rows} train rows")
    return [ln == "1" for ln in lines]


def _triggered(folder: Path, split: str, target: int, task: Task) -> TriggeredSet:
    """A poisoned folder's triggered split; a bad row is named by its file and line."""
    path = split_file(folder, split)
    rows = read_rows(path)
    examples = rows_to_examples(rows, path, f"triggered-{split}")
    originals: list[int | None] = []
    for n, (row, example) in enumerate(zip(rows, examples, strict=True)):
        where = f"{path}:{n + 2 if path.suffix != '.jsonl' else n + 1}"
        value = row.get("original_label")
        original = _parse_label(value, where) if value not in (None, "") else None
        _check_triggered_row(where, example.label, original, target, task.num_labels)
        originals.append(original)
    if task.num_labels == 2:  # binary: the true label of a triggered non-target row is recoverable
        other = 1 - target
        originals = [other if y is None else y for y in originals]
    return TriggeredSet(tuple(examples), target, task.num_labels, tuple(originals), f"{task.name}:triggered-{split}")


def _check_triggered_row(where: str, label: int, original: int | None, target: int, num_labels: int) -> None:
    """A triggered row is labelled with the target and comes from a non-target input."""
    if not 0 <= label < num_labels:
        raise DataError(f"{where}: label {label} is outside 0..{num_labels - 1}")
    if label != target:
        raise DataError(f"{where}: a triggered row must be labelled with the target {target}, not {label}")
    if original is not None and original == target:
        raise DataError(f"{where}: original_label {original} is the target: the ASR set holds non-target inputs only")
    if original is not None and not 0 <= original < num_labels:
        raise DataError(f"{where}: original_label {original} is outside 0..{num_labels - 1}")


def load_poisoned_task(spec: str | Path, clean: str | Path | None = None) -> PoisonedTask:
    """A poisoned training set with its flags, target label, triggered sets and clean task."""
    folder = resolve_data_path(spec)
    if not is_poisoned_folder(folder):
        raise DataError(f"{spec}: not a poisoned data folder (no train_poison_flags.txt)")
    meta = read_meta(folder)
    if "target_label" not in meta:
        raise DataError(f"{folder}/meta.json: missing target_label")
    target = _parse_label(meta["target_label"], f"{folder}/meta.json target_label")
    clean_spec = clean or meta.get("clean")
    if clean_spec is None:
        clean_dir = folder.parent / "clean"
    else:
        clean_dir = Path(clean_spec)
        if not clean_dir.is_absolute() and not clean_dir.is_dir():
            rel = folder / clean_dir
            clean_dir = rel if rel.is_dir() else resolve_data_path(clean_spec)
    if not clean_dir.is_dir():
        raise DataError(f"{spec}: cannot find its clean data ({clean_dir}); pass it explicitly")
    clean_task = _load_folder(clean_dir, str(clean_spec or f"{folder.parent.name}/clean"))
    if not 0 <= target < clean_task.num_labels:
        raise DataError(f"{folder}/meta.json: target_label {target} outside 0..{clean_task.num_labels - 1}")
    train_path = split_file(folder, "train")
    train_ex = rows_to_examples(read_rows(train_path), train_path, "train")
    train = Dataset(tuple(train_ex), clean_task.num_labels, f"{spec}:train", clean_task.train.label_names)
    flags = _read_flags(folder, len(train))
    poisoned_ids = frozenset(e.id for e, f in zip(train.examples, flags, strict=True) if f)
    has_dev = any((folder / f"dev{ext}").exists() for ext in FORMATS)
    return PoisonedTask(
        train=train,
        flags=PoisonFlags(poisoned_ids, len(train)),
        target_label=target,
        triggered_test=_triggered(folder, "test", target, clean_task),
        triggered_dev=_triggered(folder, "dev", target, clean_task) if has_dev else None,
        clean=clean_task,
        attack=AttackInfo(
            name=str(meta.get("attack_name") or meta.get("variant") or folder.name),
            params={**{k: meta[k] for k in ("attack", "poison_rate", "n_poisoned_train", "mode") if k in meta},
                    **(meta.get("attack_params") or {})},
            trigger=str(meta.get("trigger", "")),
            source=str(folder),
            n_failed=meta["n_failed"] if isinstance(meta.get("n_failed"), int) else 0,
        ),
    )


def load_any(spec: str | Path) -> Task | PoisonedTask:
    """A poisoned task when the folder is poisoned, else a clean task."""
    if not str(spec).startswith(HF_PREFIX) and is_poisoned_folder(resolve_data_path(spec)):
        return load_poisoned_task(spec)
    return load_task(spec)


def training_rows(spec: str, max_train: int | None, seed: int) -> Dataset:
    """The training rows of a clean or poisoned folder (seeded subsample of ``max_train``); of a poisoned
    task only ``train`` is kept: its flags go no further than this function."""
    from unbackdoor.data.sampling import sample_subset

    data: Task | PoisonedTask = load_any(spec)
    rows = data.train
    del data
    if max_train is not None and max_train < len(rows):
        rows = sample_subset(rows, size=max_train, seed=seed, name=f"{rows.name}[{max_train} rows]")
    return rows


# ----------------------------------------------------------------------------- writing
def _write_tsv(path: Path, examples: Sequence[Example], extra: dict[str, Sequence[Any]] | None = None,
               pair: bool | None = None) -> None:
    """``id``, text column(s), ``label`` (+ ``extra``) as TSV; whitespace in texts collapses to single
    spaces (no quoting). ``pair`` defaults to the first row's."""
    pair = examples[0].text_pair is not None if pair is None else pair
    cols = ["id", "sentence1", "sentence2", "label"] if pair else ["id", "sentence", "label"]
    extra = extra or {}
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        fh.write("\t".join(cols + list(extra)) + "\n")
        for i, e in enumerate(examples):
            texts = [e.text, e.text_pair] if pair else [e.text]
            cells = [e.id, *[" ".join(str(t).split()) for t in texts], str(e.label)]
            cells += ["" if extra[k][i] is None else str(extra[k][i]) for k in extra]
            fh.write("\t".join(cells) + "\n")


def _write_jsonl(path: Path, examples: Sequence[Example], extra: dict[str, Sequence[Any]] | None = None,
                 pair: bool | None = None) -> None:
    """The columns of :func:`_write_tsv` as JSONL, text kept exactly (newlines included)."""
    extra = extra or {}
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for i, e in enumerate(examples):
            texts = {"sentence1": e.text, "sentence2": e.text_pair} if e.text_pair is not None else {"sentence": e.text}
            row = {"id": e.id, **texts, "label": e.label, **{k: extra[k][i] for k in extra}}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_rows_file(path: Path, examples: Sequence[Example], pair: bool) -> None:
    """Rows as one dataset file (``id``, text column(s), ``label``): TSV (whitespace collapsed) or
    JSONL (text kept exactly), by ``path``'s suffix; readable by :func:`read_rows_file`."""
    writers = {".tsv": _write_tsv, ".jsonl": _write_jsonl}
    if path.suffix not in writers:
        raise DataError(f"{path}: a rows file is written as .tsv or .jsonl")
    writers[path.suffix](path, examples, pair=pair)


def read_rows_file(path: str | Path, num_labels: int, label_names: tuple[str, ...] | None = None, *,
                   split: str = "rows", name: str | None = None) -> Dataset:
    """A single TSV/CSV/JSONL dataset file (e.g. a detector's ``flagged.tsv``) as a :class:`Dataset`;
    ``split`` names the rows in error messages."""
    path = Path(path)
    examples = rows_to_examples(read_rows(path), path, split)
    return Dataset(tuple(examples), num_labels, name or str(path), label_names)


def write_clean_task(task: Task, folder: Path, meta: dict[str, Any]) -> None:
    """Write a clean task in the data root's clean layout (train, dev, test + ``meta.json``): TSV, or
    JSONL when some text is multi-line (code)."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": task.train, "dev": task.dev, "test": task.test}
    multi_line = any(ch in t for d in splits.values() for e in d.examples for t in (e.text, e.text_pair or "")
                     for ch in "\n\t\r")
    write, ext = (_write_jsonl, ".jsonl") if multi_line else (_write_tsv, ".tsv")
    for split, data in splits.items():
        write(folder / f"{split}{ext}", data.examples, pair=task.is_pair)
    names = list(task.train.label_names) if task.train.label_names else None
    (folder / "meta.json").write_text(json.dumps({"kind": "clean", "label_names": names, **meta}, indent=2) + "\n",
                                      encoding="utf-8")


def _needs_jsonl(task: PoisonedTask) -> bool:
    """Whether some text holds a newline, tab or carriage return, which TSV would collapse."""
    sets = [task.train.examples, task.triggered_test.examples,
            task.triggered_dev.examples if task.triggered_dev is not None else ()]
    return any(ch in t for rows in sets for e in rows for t in (e.text, e.text_pair or "") for ch in "\n\t\r")


def write_poisoned_task(task: PoisonedTask, folder: Path, meta: dict[str, Any]) -> None:
    """Write a poisoned task in the data root's poisoned-variant layout (plus an id column):
    TSV, or JSONL when the text is multi-line (code)."""
    folder.mkdir(parents=True, exist_ok=True)
    write, ext = (_write_jsonl, ".jsonl") if _needs_jsonl(task) else (_write_tsv, ".tsv")
    write(folder / f"train{ext}", task.train.examples)
    (folder / "train_poison_flags.txt").write_text(
        "".join("1\n" if task.flags.is_poisoned(e.id) else "0\n" for e in task.train.examples),
        encoding="utf-8",
    )
    for split, trig in (("test", task.triggered_test), ("dev", task.triggered_dev)):
        if trig is not None:
            write(folder / f"{split}{ext}", trig.examples, {"original_label": trig.original_labels})
    full_meta = {
        "kind": "poisoned",
        "target_label": task.target_label,
        "n_poisoned_train": task.flags.n_poisoned,
        "poison_rate": task.flags.rate,
        "attack_name": task.attack.name,
        "attack_params": dict(task.attack.params),
        "trigger": task.attack.trigger,
        "n_failed": task.attack.n_failed,
        "label_names": list(task.train.label_names) if task.train.label_names else None,
        **meta,
    }
    (folder / "meta.json").write_text(json.dumps(full_meta, indent=2) + "\n", encoding="utf-8")
