"""Data loading (TSV/CSV/JSONL/HF folders, the shared data root, poisoned variants), bad input,
and seeded clean subsets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from synthetic import make_task, write_task

from unbackdoor.attacks import BadNets, BadNetsConfig
from unbackdoor.data.io import (
    DATA_ENV,
    data_root,
    load_any,
    load_poisoned_task,
    load_task,
    resolve_data_path,
    write_poisoned_task,
)
from unbackdoor.data.sampling import holdout_split, normalise_text, sample_subset
from unbackdoor.data.types import Dataset, Example, PoisonedTask, Task
from unbackdoor.errors import ConfigError, DataError

SPLITS = ("train", "dev", "test")


def write_files(folder: Path, files: dict[str, str | bytes]) -> Path:
    """Write ``{file name: content}`` into ``folder`` (bytes are written as they are)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return folder


def tsv(*rows: str, header: str = "sentence\tlabel") -> str:
    return "\n".join([header, *rows]) + "\n"


def jsonl(*objs: object) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    """A valid single-sentence TSV task folder (8/4/4 rows) to break in one place."""
    return write_task(make_task(8, 4, 4), tmp_path / "small")


# ============================================================================ loading: formats
def test_tsv_single_sentence_folder(tmp_path: Path) -> None:
    task = make_task(20, 6, 8)
    loaded = load_task(write_task(task, tmp_path / "syn"))
    assert isinstance(loaded, Task)
    assert not loaded.is_pair and loaded.num_labels == 2
    for split in SPLITS:
        got, want = getattr(loaded, split), getattr(task, split)
        assert [e.text for e in got] == [e.text for e in want]
        assert got.labels == want.labels
        assert all(e.text_pair is None for e in got)
        # no id column: ids are <split>-<row number>, which here equal the synthetic ids
        assert got.ids == [f"{split}-{n}" for n in range(len(want))]
    assert loaded.train.label_names is None  # no meta.json


def test_tsv_sentence_pair_folder(tmp_path: Path) -> None:
    task = make_task(12, 4, 4, pair=True)
    loaded = load_task(write_task(task, tmp_path / "pair"))
    assert loaded.is_pair
    for split in SPLITS:
        got, want = getattr(loaded, split), getattr(task, split)
        assert [(e.text, e.text_pair, e.label) for e in got] == [(e.text, e.text_pair, e.label) for e in want]


def test_csv_folder_with_quoting_and_id_column(tmp_path: Path) -> None:
    files = {
        f"{s}.csv": f'id,text,label\n{s}-a,"hello, {s}",0\n{s}-b,"she said ""{s}""",1\n{s}-c,plain {s},1\n'
        for s in SPLITS
    }
    loaded = load_task(write_files(tmp_path / "csv", files))
    assert loaded.train.ids == ["train-a", "train-b", "train-c"]  # the id column is kept
    assert [e.text for e in loaded.test] == ["hello, test", 'she said "test"', "plain test"]
    assert loaded.dev.labels == [0, 1, 1]


def test_tsv_id_column_kept(tmp_path: Path) -> None:
    files = {f"{s}.tsv": tsv(f"r7\tgood {s} film\t1", f"x-2\tbad {s} film\t0", header="id\tsentence\tlabel")
             for s in SPLITS}
    loaded = load_task(write_files(tmp_path / "ids", files))
    assert loaded.train.ids == ["r7", "x-2"]
    assert loaded.train.labels == [1, 0]


def test_jsonl_folder_default_ids(tmp_path: Path) -> None:
    files = {f"{s}.jsonl": jsonl({"sentence": f"{s} one", "label": 0}, {"sentence": f"{s} two", "label": "1"})
             for s in SPLITS}
    loaded = load_task(write_files(tmp_path / "jsonl", files))
    for split in SPLITS:
        data = getattr(loaded, split)
        assert data.ids == [f"{split}-0", f"{split}-1"]
        assert data.labels == [0, 1]  # "1" as a string is accepted as an integer label


def test_jsonl_code_rows_with_func_and_idx(tmp_path: Path) -> None:
    func = "int f(int x)\n{\n\n  return x;\n}"
    files = {f"{s}.jsonl": jsonl({"func": func.replace("f(", f"f{i}("), "label": 1, "idx": 10 + i},
                                 {"func": f"void g{i}() {{}}", "label": 0, "idx": 20 + i})
             for i, s in enumerate(SPLITS)}
    loaded = load_task(write_files(tmp_path / "code", files))
    assert loaded.train.ids == ["10", "20"]
    assert loaded.test.ids == ["12", "22"]
    assert loaded.train.examples[0].text == func.replace("f(", "f0(")  # code text kept exactly, newlines included


def test_meta_label_names(tmp_path: Path) -> None:
    folder = write_task(make_task(8, 4, 4), tmp_path / "named")
    (folder / "meta.json").write_text(json.dumps({"labels": {"0": "neg", "1": "pos"}}), encoding="utf-8")
    loaded = load_task(folder)
    assert loaded.train.label_names == ("neg", "pos")
    assert loaded.num_labels == 2


def test_num_labels_from_data(tmp_path: Path) -> None:
    files = {f"{s}.tsv": tsv(f"a {s}\t0", f"b {s}\t2", f"c {s}\t1") for s in SPLITS}
    assert load_task(write_files(tmp_path / "three", files)).num_labels == 3


def test_huggingface_saved_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "sentence": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["neg", "pos"]),
        "idx": datasets.Value("int64"),
    })

    def split(n: int, offset: int) -> object:
        return datasets.Dataset.from_dict(
            {"sentence": [f"row {offset + i}" for i in range(n)], "label": [i % 2 for i in range(n)],
             "idx": [offset + i for i in range(n)]},
            features=features,
        )

    path = tmp_path / "hf_saved"
    datasets.DatasetDict({"train": split(6, 0), "validation": split(4, 100), "test": split(4, 200)}).save_to_disk(
        str(path)
    )
    by_path = load_task(path)
    by_prefix = load_task("hf:" + str(path))
    for loaded in (by_path, by_prefix):
        assert (len(loaded.train), len(loaded.dev), len(loaded.test)) == (6, 4, 4)
        assert loaded.train.label_names == ("neg", "pos")
        assert loaded.dev.ids == ["100", "101", "102", "103"]  # "validation" is the dev split; idx kept
        assert loaded.test.labels == [0, 1, 0, 1]
    assert [e.text for e in by_path.train] == [e.text for e in by_prefix.train]


def test_huggingface_missing_path_is_a_data_error(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="no such saved dataset folder"):
        load_task("hf:" + str(tmp_path / "no-such-dataset"))


# ============================================================================ the data root
def test_sst2_shortcut(shared_data: Path) -> None:
    task = load_task("sst2")
    assert (len(task.train), len(task.dev), len(task.test)) == (6920, 872, 1821)
    assert task.train.label_names == ("negative", "positive")
    assert task.num_labels == 2 and not task.is_pair
    assert task.test.label_counts() == {0: 912, 1: 909}
    assert resolve_data_path("sst2") == shared_data / "sst2" / "clean"


def test_load_poisoned_sst2_variant(shared_data: Path) -> None:
    folder = shared_data / "sst2" / "synbkd_hiddenkiller_p20"
    task = load_poisoned_task("sst2/synbkd_hiddenkiller_p20")
    assert isinstance(task, PoisonedTask)
    assert task.target_label == 1
    assert len(task.train) == 6920 and task.flags.n_rows == 6920
    assert task.flags.n_poisoned == 1383

    lines = (folder / "train_poison_flags.txt").read_text(encoding="utf-8").split()
    assert lines.count("1") == task.flags.n_poisoned
    # flags are attached by id: row n of train.tsv (id train-n) is poisoned iff line n is 1
    expected = {f"train-{n}" for n, flag in enumerate(lines) if flag == "1"}
    assert task.flags.poisoned_ids == expected
    assert all(task.flags.is_poisoned(e.id) == (lines[n] == "1") for n, e in enumerate(task.train))
    assert all(e.label == 1 for e in task.train if task.flags.is_poisoned(e.id))  # poisoned rows carry the target

    trig = task.triggered_test
    assert len(trig) == 912
    assert {e.label for e in trig.examples} == {1}
    assert set(trig.original_labels) == {0}
    assert task.triggered_dev is not None and len(task.triggered_dev) == 427
    clean = task.clean
    assert (len(clean.train), len(clean.dev), len(clean.test)) == (6920, 872, 1821)
    assert isinstance(load_any("sst2/synbkd_hiddenkiller_p20"), PoisonedTask)


def test_load_task_refuses_poisoned_variant(shared_data: Path) -> None:
    with pytest.raises(DataError, match="poisoned variant"):
        load_task("sst2/synbkd_hiddenkiller_p20")


def test_data_env_overrides_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    write_task(make_task(8, 4, 4), root / "syn" / "clean")
    write_task(make_task(10, 4, 4), root / "syn" / "other")
    monkeypatch.setenv(DATA_ENV, str(root))
    monkeypatch.chdir(tmp_path)
    assert data_root() == root
    assert len(load_task("syn").train) == 8  # a bare name means <name>/clean
    assert len(load_task("syn/other").train) == 10
    with pytest.raises(DataError, match="no such data folder") as info:
        load_task("sst2-not-here")
    assert str(root) in str(info.value)  # the message says which root was searched


# ============================================================================ bad input
def _break(folder: Path, name: str, content: str | bytes) -> None:
    write_files(folder, {name: content})


BAD_FOLDERS = [
    # (case id, file to (re)write or delete (content None), content, expected message fragment,
    #  whether the message names that file)
    ("missing-split-file", "dev.tsv", None, "missing dev split", False),
    ("invalid-utf8", "train.tsv", b"sentence\tlabel\ngood \xff\xfe film\t1\n", "not UTF-8", True),
    ("too-many-columns", "train.tsv", tsv("good film\t1", "bad film\t0\textra"), "wrong number of columns", True),
    ("too-few-columns", "test.tsv", tsv("good film\t1", "bad film"), "wrong number of columns", True),
    ("empty-file", "train.tsv", "", "empty file", True),
    ("missing-text-column", "train.tsv", tsv("good film\t1", header="review\tlabel"), "missing text column", True),
    ("missing-label-column", "train.tsv", tsv("good film\t1", header="sentence\tstars"), "missing column 'label'", True),
    ("non-integer-label", "train.tsv", tsv("good film\t1", "bad film\tnegative"), "'negative' is not an integer", True),
    ("float-label", "dev.tsv", tsv("good film\t1.5"), "is not an integer", True),
    ("negative-label", "dev.tsv", tsv("good film\t-1"), "negative label", False),
    ("empty-split", "test.tsv", tsv(), "test split is empty", True),
    ("empty-text", "train.tsv", tsv("good film\t1", " \t0"), "empty or missing text", True),
    ("duplicate-ids", "train.tsv", tsv("a1\tgood\t1", "a1\tbad\t0", header="id\tsentence\tlabel"),
     "duplicate example ids, e.g. 'a1'", False),
    ("two-formats-one-split", "train.csv", "sentence,label\ngood,1\n", "more than one train file", True),
    ("bad-meta-json", "meta.json", "{not json", "unreadable meta.json", True),
    ("mixed-pair-and-single", "test.tsv", tsv("a\tb\t1", header="sentence1\tsentence2\tlabel"),
     "some splits are sentence pairs", False),
]


@pytest.mark.parametrize(("name", "content", "message", "names_file"), [c[1:] for c in BAD_FOLDERS],
                         ids=[c[0] for c in BAD_FOLDERS])
def test_bad_folder_raises_data_error(
    small_folder: Path, name: str, content: str | bytes | None, message: str, names_file: bool
) -> None:
    if content is None:
        (small_folder / name).unlink()
    else:
        _break(small_folder, name, content)
    with pytest.raises(DataError) as info:
        load_task(small_folder)
    assert message in str(info.value)
    assert str(small_folder) in str(info.value)  # the message says where
    if names_file:
        assert name in str(info.value)  # ... down to the bad file


@pytest.mark.parametrize(
    "label",
    ["--1", "\u00b2", "1e3", "0x1", ""],
    ids=["double-minus", "superscript-two", "exponent", "hex", "empty"],
)
def test_odd_labels_are_data_errors(small_folder: Path, label: str) -> None:
    _break(small_folder, "train.tsv", tsv("good film\t1", f"odd film\t{label}"))
    with pytest.raises(DataError, match="not an integer"):
        load_task(small_folder)


def test_meta_json_not_utf8(small_folder: Path) -> None:
    _break(small_folder, "meta.json", b'{"labels": {"0": "\xff", "1": "b"}}')
    with pytest.raises(DataError, match="meta.json"):
        load_task(small_folder)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data folder"):
        load_task(tmp_path / "nope")


def test_path_to_a_file_is_not_a_folder(small_folder: Path) -> None:
    with pytest.raises(DataError, match="not a folder"):
        load_task(small_folder / "train.tsv")


@pytest.mark.parametrize(
    ("line", "message"),
    [('{"sentence": "a", "label": 0', "malformed JSON"), ('["a", 0]', "must be a JSON object"),
     ('{"sentence": "a", "label": true}', "not an integer")],
    ids=["truncated-object", "not-an-object", "boolean-label"],
)
def test_malformed_jsonl(tmp_path: Path, line: str, message: str) -> None:
    good = jsonl({"sentence": "fine", "label": 1}, {"sentence": "poor", "label": 0})
    folder = write_files(tmp_path / "bad_jsonl", {"train.jsonl": good + line + "\n", "dev.jsonl": good,
                                                  "test.jsonl": good})
    with pytest.raises(DataError) as info:
        load_task(folder)
    assert message in str(info.value)
    if "JSON" in message:
        assert "train.jsonl:3" in str(info.value)  # file and line number


def test_label_outside_meta_classes(small_folder: Path) -> None:
    _break(small_folder, "meta.json", json.dumps({"labels": {"0": "a", "1": "b"}}))
    _break(small_folder, "train.tsv", tsv("good film\t1", "odd film\t2"))
    with pytest.raises(DataError, match=r"label 2 .*2 classes in meta\.json"):
        load_task(small_folder)


# ----------------------------------------------------------------------------- poisoned folders
@pytest.fixture
def poisoned_folder(tmp_path: Path) -> Path:
    task = make_task(20, 6, 8)
    write_task(task, tmp_path / "syn" / "clean")
    poisoned = BadNets(BadNetsConfig(poison_rate=0.2)).poison(task)
    folder = tmp_path / "syn" / "badnets"
    write_poisoned_task(poisoned, folder, {})
    return folder


def test_poisoned_folder_loads_with_sibling_clean(poisoned_folder: Path) -> None:
    task = load_poisoned_task(poisoned_folder)
    assert task.flags.n_poisoned == 4 and len(task.clean.train) == 20


def test_flags_wrong_row_count(poisoned_folder: Path) -> None:
    flags = poisoned_folder / "train_poison_flags.txt"
    flags.write_text("".join(flags.read_text().splitlines(keepends=True)[:-1]), encoding="utf-8")
    with pytest.raises(DataError, match="19 flags for 20 train rows"):
        load_poisoned_task(poisoned_folder)


def test_flags_not_zero_or_one(poisoned_folder: Path) -> None:
    flags = poisoned_folder / "train_poison_flags.txt"
    flags.write_text(flags.read_text().replace("0", "2", 1), encoding="utf-8")
    with pytest.raises(DataError, match="0 or 1"):
        load_poisoned_task(poisoned_folder)


def test_flags_not_utf8(poisoned_folder: Path) -> None:
    (poisoned_folder / "train_poison_flags.txt").write_bytes(b"\xff\n" * 20)
    with pytest.raises(DataError, match="train_poison_flags.txt"):
        load_poisoned_task(poisoned_folder)


def test_poisoned_meta_without_target(poisoned_folder: Path) -> None:
    meta = json.loads((poisoned_folder / "meta.json").read_text())
    del meta["target_label"]
    (poisoned_folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(DataError, match="missing target_label"):
        load_poisoned_task(poisoned_folder)


def test_poisoned_loader_refuses_clean_folder(small_folder: Path) -> None:
    with pytest.raises(DataError, match="not a poisoned data folder"):
        load_poisoned_task(small_folder)


# ============================================================================ sampling
def _dataset(labels: list[int], texts: list[str] | None = None, name: str = "d") -> Dataset:
    texts = texts or [f"text number {i}" for i in range(len(labels))]
    return Dataset(tuple(Example(f"r{i}", t, y) for i, (t, y) in enumerate(zip(texts, labels, strict=True))),
                   max(2, max(labels) + 1), name)


def test_sample_subset_is_seeded(synthetic_task: Task) -> None:
    a = sample_subset(synthetic_task.train, size=40, seed=1)
    b = sample_subset(synthetic_task.train, size=40, seed=1)
    c = sample_subset(synthetic_task.train, size=40, seed=2)
    assert a.ids == b.ids
    assert set(a.ids) != set(c.ids)
    assert len(a) == len(c) == 40
    assert set(a.ids) <= set(synthetic_task.train.ids)


def test_sample_subset_is_stratified() -> None:
    data = _dataset([0] * 300 + [1] * 100)
    for seed in range(3):
        sub = sample_subset(data, size=40, seed=seed)
        assert sub.label_counts() == {0: 30, 1: 10}
    assert sample_subset(data, fraction=0.05).label_counts() == {0: 15, 1: 5}
    odd = sample_subset(_dataset([0] * 5 + [1] * 3 + [2] * 2), size=5)  # largest remainder: 2.5, 1.5, 1.0
    assert sum(odd.label_counts().values()) == 5 and all(v >= 1 for v in odd.label_counts().values())


def test_sample_subset_per_class() -> None:
    data = _dataset([0] * 30 + [1] * 10 + [2] * 8)
    assert sample_subset(data, per_class=5, seed=3).label_counts() == {0: 5, 1: 5, 2: 5}
    with pytest.raises(DataError, match="only 8"):
        sample_subset(data, per_class=9)


def test_sample_subset_disjoint_from_exclude_modulo_case_and_spacing() -> None:
    texts = [f"Sentence number {i} is here" for i in range(60)]
    data = _dataset([i % 2 for i in range(60)], texts)
    banned = list(range(0, 60, 3))  # 20 rows, 10 per label
    # the same texts, upper-cased and re-spaced, under other ids
    exclude = Dataset(tuple(Example(f"t{i}", "  " + texts[i].upper().replace(" ", " \t "), 0) for i in banned), 2, "test")
    banned_ids = {f"r{i}" for i in banned}
    banned_keys = {normalise_text(e) for e in exclude.examples}
    everything_left = sample_subset(data, size=40, exclude=[exclude])
    assert set(everything_left.ids) == set(data.ids) - banned_ids
    for seed in range(5):
        sub = sample_subset(data, size=10, seed=seed, exclude=[exclude])
        assert not set(sub.ids) & banned_ids
        assert not {normalise_text(e) for e in sub.examples} & banned_keys
    sub = sample_subset(data, per_class=20, exclude=[exclude])
    assert not set(sub.ids) & banned_ids
    with pytest.raises(DataError, match="only 40 available"):
        sample_subset(data, size=41, exclude=[exclude])


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"size": 5, "fraction": 0.1}, {"fraction": 0.0}, {"fraction": 1.5}, {"size": 0}, {"per_class": 0}],
    ids=["none", "two", "fraction-0", "fraction-1.5", "size-0", "per-class-0"],
)
def test_sample_subset_bad_arguments(synthetic_task: Task, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        sample_subset(synthetic_task.train, **kwargs)


def test_holdout_split_disjoint_and_covering(synthetic_task: Task) -> None:
    data = synthetic_task.train
    fit, held = holdout_split(data, fraction=0.25, seed=4)
    assert not set(fit.ids) & set(held.ids)
    assert set(fit.ids) | set(held.ids) == set(data.ids)
    assert len(held) == 100 and held.label_counts() == {0: 50, 1: 50}
    again = holdout_split(data, fraction=0.25, seed=4)
    assert again[1].ids == held.ids
    assert holdout_split(data, fraction=0.25, seed=5)[1].ids != held.ids


def test_holdout_split_bad_input() -> None:
    with pytest.raises(ConfigError):
        holdout_split(_dataset([0, 1, 0, 1]), fraction=1.0)
    with pytest.raises(ConfigError):
        holdout_split(_dataset([0, 1, 0, 1]), fraction=0.0)
    with pytest.raises(DataError, match="at least 2 rows"):
        holdout_split(Dataset((Example("a", "x", 0),), 2, "one"))


def test_holdout_split_tiny_keeps_every_label_on_fit_side() -> None:
    data = _dataset([0, 1, 0])  # round(0.1 * n) == 0 for both labels: the one-row fallback kicks in
    for seed in range(4):
        fit, held = holdout_split(data, fraction=0.1, seed=seed)
        assert len(held) == 1
        assert Counter(fit.ids + held.ids) == Counter(data.ids)
        assert all(fit.label_counts().values()), f"seed {seed}: a label has no row left to fit on"
