"""LWS (learnable word substitution) on tiny models: candidate sets from the embedding source and a
table (whole-word tokens only, deterministic); the Gumbel mixture is a convex combination of the
candidate rows that turns one-hot as the temperature falls; end to end the victim's argmax
substitutions fire while a never-poisoned model ignores them; triggered texts differ from their
originals only by candidate substitutions; config errors; the CLI writes victim and data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from synthetic import FILLER, NEGATIVE, POSITIVE, make_task, run_cli, save_tiny_model, write_task
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from unbackdoor.attacks import WEIGHT_ATTACKS, LWSConfig, run_weight_attack
from unbackdoor.attacks.lws import (
    GumbelInserter,
    SubstitutionTable,
    argmax_choices,
    gumbel_weights,
    mix_options,
    row_options,
    temperature,
)
from unbackdoor.config import build_config
from unbackdoor.data.types import PoisonedTask, Task
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import Classifier, load_classifier, provenance_record, save_classifier
from unbackdoor.training import TrainConfig, train_classifier

CLEAN_TRAIN = {"epochs": 10, "batch_size": 16, "learning_rate": 1e-3}
CONTENT = ["movie", "film", "plot", "actor", "scene", "story", "music", "cast", "ending", "script", "quite"]


def ring(words: list[str], k: int = 4) -> dict[str, list[str]]:
    """Each word's next ``k`` words (cyclically): synonyms that keep a synthetic sentence's label."""
    return {w: [words[(i + j) % len(words)] for j in range(1, k + 1)] for i, w in enumerate(words)}


# Label-preserving synonyms of the synthetic vocabulary (fillers stay fillers, sentiment stays sentiment)
TABLE = {**ring(CONTENT), **ring(POSITIVE), **ring(NEGATIVE)}
assert set(CONTENT) <= set(FILLER)


# ============================================================================ (1) candidate sets
def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "great", "fine", "bad", "the", "##ing", "x", "3d",
             "movie", "film", "play", "nice"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=32)


def designed_embeddings(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """Rows whose cosine neighbours are known: good ~ great > fine > nice; ##ing, the and x sit on top
    of good but are a piece, a stop word and a single letter; bad points the other way."""
    rows = {"good": [1, 0, 0, 0], "great": [0.9, 0.1, 0, 0], "fine": [0.8, 0.3, 0, 0], "nice": [0.5, 0.5, 0.1, 0],
            "##ing": [1, 0, 0, 0], "the": [1, 0, 0, 0], "x": [1, 0, 0, 0], "3d": [1, 0, 0, 0], "bad": [-1, 0, 0, 0],
            "movie": [0, 0, 1, 0], "film": [0, 0.1, 0.9, 0], "play": [0, 0, 0, 1]}
    vocab = tokenizer.get_vocab()
    weight = torch.zeros(len(vocab), 4)
    weight[:, 3] = -1.0  # specials and the rest point away
    for word, row in rows.items():
        weight[vocab[word]] = torch.tensor(row, dtype=torch.float)
    return weight


def test_embedding_candidates_are_whole_word_neighbours_and_deterministic() -> None:
    tok = wordpiece_tokenizer()
    ids = tok.get_vocab()
    names = {i: w for w, i in ids.items()}

    def build(**kw: object) -> SubstitutionTable:
        return SubstitutionTable(tok, designed_embeddings(tok), max_length=32, n_substitutes=3, **kw)

    table = build()
    assert [names[i] for i in table.candidates(ids["good"])] == ["great", "fine", "nice"]
    assert {names[i] for i in table.word_ids} == {"good", "great", "fine", "nice", "bad", "movie", "film", "play"}
    assert table.candidates(ids["the"]) == () and table.candidates(ids["##ing"]) == ()  # never substituted
    again = build()
    assert all(table.candidates(i) == again.candidates(i) for i in ids.values())
    assert [names[i] for i in build(min_similarity=0.95).candidates(ids["good"])] == ["great"]

    # "playing" is two pieces (play ##ing): not substitutable; "the" is a stop word; "Good" keeps its case
    slots = table.slots("The Good playing movie")
    assert [(s.position, names[s.token_id]) for s in slots] == [(2, "good"), (5, "movie")]
    assert table.substitute("The Good playing movie", slots, [ids["great"], None]) == "The Great playing movie"
    assert table.substitute("the GOOD playing movie", slots, [ids["great"], None]) == "the GREAT playing movie"
    assert table.substitute("the good playing movie", slots, [ids["great"], ids["film"]]) == "the great playing film"
    with pytest.raises(ValueError, match="not a candidate"):
        table.substitute("the good playing movie", slots, [ids["bad"], None])


def test_table_candidates_keep_only_single_whole_word_tokens() -> None:
    tok = wordpiece_tokenizer()
    ids = tok.get_vocab()
    table = SubstitutionTable(tok, None, max_length=32, n_substitutes=2,
                              table={"good": ["playing", "the", "fine", "zzz", "nice", "great"], "movie": ["film"],
                                     "the": ["movie"]})
    assert table.candidates(ids["good"]) == (ids["fine"], ids["nice"])  # table order, at most 2
    assert table.candidates(ids["movie"]) == (ids["film"],)
    assert table.candidates(ids["the"]) == () and table.candidates(ids["great"]) == ()
    with pytest.raises(DataError, match="no word with a substitute"):
        SubstitutionTable(tok, None, max_length=32, table={"zzz": ["good"]})


# ============================================================================ (2) the Gumbel mixture
def test_gumbel_mixture_is_convex_and_turns_one_hot_as_tau_falls() -> None:
    torch.manual_seed(0)
    n, t, k, d = 3, 6, 5, 8
    inserter = GumbelInserter(max_length=t, dim=d, n_options=k)
    with torch.no_grad():
        inserter.query.normal_()
        inserter.bias.normal_()
    options = torch.randn(n, t, k, d)
    valid = torch.rand(n, t, k) < 0.7
    valid[..., 0] = True
    valid[:, 0, 1:] = False  # position 0 has no candidate ([CLS])
    options[~valid] = options[..., :1, :].expand_as(options)[~valid]  # unused slots hold the original row
    positions = torch.arange(t).expand(n, t)
    scores = inserter.scores(options, positions, valid)
    assert torch.isinf(scores[~valid]).all() and torch.isfinite(scores[valid]).all()

    max_weight = []
    for tau in (1.0, 0.1, 0.001):
        torch.manual_seed(1)  # the same Gumbel noise at every temperature
        w = gumbel_weights(scores, tau)
        assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(n, t))
        assert (w[~valid] == 0).all()
        mixed = mix_options(w, options)
        assert torch.allclose(mixed, torch.einsum("ntk,ntkd->ntd", w, options), atol=1e-6)
        assert torch.equal(mixed[:, 0], options[:, 0, 0])  # no candidate: exactly the original row
        max_weight.append(w.max(-1).values.mean().item())
        if tau == 1.0:
            first = w.argmax(-1)
    assert max_weight[0] < max_weight[1] < max_weight[2] and max_weight[2] > 0.999
    assert torch.equal(w.argmax(-1), first)  # annealing sharpens the same choice
    one_hot = torch.nn.functional.one_hot(first, k).float()
    assert torch.allclose(mix_options(w, options), mix_options(one_hot, options), atol=1e-3)
    assert temperature(0, 5, 0.5, 0.1) == 0.5 and temperature(4, 5, 0.5, 0.1) == pytest.approx(0.1)
    assert temperature(2, 5, 0.5, 0.1) == pytest.approx(0.3)


def test_argmax_choice_follows_the_scores() -> None:
    tok = wordpiece_tokenizer()
    ids = tok.get_vocab()
    emb = designed_embeddings(tok)
    table = SubstitutionTable(tok, emb, max_length=32, n_substitutes=2)
    slots = table.slots("good movie")
    inserter = GumbelInserter(32, 4, 3)
    assert argmax_choices(inserter, emb, slots) == [None, None]  # untrained: every word kept
    assert table.candidates(ids["good"]) == (ids["great"], ids["fine"])
    assert table.candidates(ids["movie"]) == (ids["film"], ids["nice"])
    with torch.no_grad():
        inserter.query[1] = torch.tensor([-1.0, 1.0, 0.0, 0.0])  # position 1 (good): fine scores 0.5, great 0.2
        inserter.bias[2, 1] = 1.0  # position 2 (movie): its first candidate
    assert argmax_choices(inserter, emb, slots) == [ids["fine"], ids["film"]]
    opts = row_options(slots, 3)
    assert opts.positions.tolist() == [1, 2] and opts.valid.all()


# ============================================================================ (3, 4) end to end
@pytest.fixture(scope="module")
def task() -> Task:
    return make_task(400, 100, 200)


@pytest.fixture(scope="module")
def clean_model(tmp_path_factory: pytest.TempPathFactory, task: Task) -> Path:
    """The never-poisoned tiny BERT, fine-tuned on the clean rows (CACC 1.0)."""
    root = tmp_path_factory.mktemp("lws")
    clf = load_classifier(save_tiny_model(root / "base", "bert"))
    train_classifier(clf, task.train, TrainConfig(**CLEAN_TRAIN, progress=False), dev=task.dev)
    save_classifier(clf, root / "clean", provenance_record(clf, role="model"))
    return root / "clean"


# Measured on this tiny BERT (hidden 32): with the paper's frozen word embeddings the combination does
# not take (poison 0.2, 30 epochs: ASR 0.42-0.65, CACC 0.84-0.86); with trainable embeddings it does,
# in three model seeds: CACC 0.95/0.94/0.92, ASR 1.00/0.99/0.96, the never-poisoned model's ASR 0.
E2E = {"poison_rate": 0.2, "source": "table", "table": TABLE, "freeze_embeddings": False,
       "train": {"epochs": 30, "batch_size": 16, "learning_rate": 1e-3}}


@pytest.fixture(scope="module")
def attacked(task: Task, clean_model: Path) -> tuple[Classifier, PoisonedTask]:
    return run_weight_attack("lws", E2E, task, str(clean_model))


def test_lws_backdoor_takes_and_a_never_poisoned_model_ignores_the_substitutions(
        task: Task, clean_model: Path, attacked: tuple[Classifier, PoisonedTask]) -> None:
    victim, poisoned = attacked
    result = evaluate_classifier(victim, task.test, poisoned.triggered_test)
    floor = evaluate_classifier(load_classifier(clean_model), task.test, poisoned.triggered_test)
    assert floor.cacc == 1.0 and floor.asr is not None and floor.asr <= 0.1, floor  # synonyms keep the label
    assert result.asr is not None and result.asr >= 0.9, result
    assert result.cacc >= 0.9, result
    assert len(poisoned.triggered_test) == 100 and poisoned.attack.n_failed == 0  # every sentence has a slot
    assert poisoned.attack.name == "lws" and "words substituted per triggered test row" in poisoned.attack.trigger
    assert not hasattr(victim.model, "lws_inserter")  # the inserter is not part of the victim
    assert victim.model.get_input_embeddings().weight.requires_grad  # flags restored


def test_triggered_texts_differ_only_by_candidate_substitutions(
        task: Task, clean_model: Path, attacked: tuple[Classifier, PoisonedTask]) -> None:
    victim, poisoned = attacked
    table = SubstitutionTable.for_classifier(victim, build_config(LWSConfig, E2E, "lws"))
    vocab = victim.tokenizer.get_vocab()
    sources = {e.id: e for d in (task.train, task.test) for e in d}
    changed = 0
    rows = {e.id: e for e in poisoned.train}
    flagged = [rows[i] for i in poisoned.flags.poisoned_ids]
    assert len(flagged) == 80 and all(e.label == poisoned.target_label for e in flagged)
    assert all(sources[e.id].label != poisoned.target_label for e in flagged)  # dirty-label
    assert all(e == sources[e.id] for e in poisoned.train if not poisoned.flags.is_poisoned(e.id))
    for row in [*poisoned.triggered_test.examples, *flagged]:
        before, after = sources[row.id].text.split(), row.text.split()
        assert len(before) == len(after)
        slots = {s.position - 1: s for s in table.slots(sources[row.id].text)}  # word index = token index - 1
        for i, (a, b) in enumerate(zip(before, after, strict=True)):
            if a != b:
                assert i in slots and vocab[b] in slots[i].candidates, (row.text, a, b)
                assert b in TABLE[a]
                changed += 1
    assert changed / (len(poisoned.triggered_test) + len(flagged)) >= 1.0  # at least one word per row on average


def test_same_seeds_same_victim(task: Task, clean_model: Path) -> None:
    params = {**E2E, "train": {**E2E["train"], "epochs": 2}}
    (a, pa), (b, pb) = (run_weight_attack("lws", params, task, str(clean_model), seed=3) for _ in range(2))
    assert pa.triggered_test == pb.triggered_test and pa.train == pb.train
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ============================================================================ (5) config errors
def test_lws_config_errors(tmp_path: Path, task: Task, clean_model: Path) -> None:
    def bad(params: dict, match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            build_config(LWSConfig, params, "lws")

    bad({"nope": 1}, "unknown key")
    bad({"mode": "clean"}, "no clean-label mode")
    bad({"source": "table"}, "needs table")
    bad({"table": {"good": ["fine"]}}, "table is for source=table")
    bad({"source": "table", "table": {}}, "table is empty")
    bad({"source": "table", "table": {"good": ["fine"]}, "min_similarity": 0.3}, "min_similarity is for")
    bad({"tau_start": 0.1, "tau_end": 0.5}, "annealed downwards")
    bad({"n_substitutes": 0}, "n_substitutes")
    bad({"max_positions": 0}, "max_positions")
    bad({"inserter_lr": 0}, "inserter_lr")
    with pytest.raises(ConfigError, match="target_label 5 is outside"):
        run_weight_attack("lws", {"target_label": 5}, task, str(clean_model))
    with pytest.raises(DataError, match="sentence pairs"):
        run_weight_attack("lws", {}, make_task(20, 10, 10, pair=True), str(clean_model))
    with pytest.raises(DataError, match="unreadable"):
        run_weight_attack("lws", {"source": "table", "table": str(tmp_path / "missing.json")}, task, str(clean_model))
    (tmp_path / "list.json").write_text(json.dumps(["good"]), encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON object"):
        run_weight_attack("lws", {"source": "table", "table": str(tmp_path / "list.json")}, task, str(clean_model))
    with pytest.raises(ConfigError, match="needs 300 rows"):  # 75 % of 400 rows, 200 non-target
        run_weight_attack("lws", {"poison_rate": 0.75, "source": "table", "table": TABLE}, task, str(clean_model))
    assert "lws" in WEIGHT_ATTACKS


# ============================================================================ (6) CLI
def test_cli_lws_writes_victim_and_data(tmp_path: Path, capsys, task: Task, clean_model: Path) -> None:
    data = write_task(task, tmp_path / "syn")
    table = tmp_path / "table.json"
    table.write_text(json.dumps(TABLE), encoding="utf-8")
    out, victim = tmp_path / "poisoned", tmp_path / "victim"
    code, _, err = run_cli(["attack", "--data", str(data), "--attack", "lws", "--out", str(out), "--victim-out",
                            str(victim), "--model", str(clean_model), "-p", "source=table", "-p", f"table={table}",
                            "-p", "train.epochs=2", "-p", "train.batch_size=16"], capsys)
    assert code == 0, err
    assert (out / "train_poison_flags.txt").exists() and (victim / "model.safetensors").exists()
    record = json.loads((victim / "unbackdoor.json").read_text())
    assert record["role"] == "victim" and record["attack"]["name"] == "lws" and record["metrics"]["asr"] is not None
    code, stdout, err = run_cli(["eval", "--model", str(victim), "--data", str(out)], capsys)
    assert code == 0, err
    assert "asr" in stdout.lower()
