"""E-PUR-style embedding purification (shared docs/methods/e-pur.md §8.1-8.2, §12)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from unbackdoor.purify import PURIFY_DEFENSES, PurifyInputs
from unbackdoor.purify.epur import (  # importing registers "e-pur"
    Epur,
    EpurConfig,
    EpurScoring,
    choose_rows,
    input_embeddings,
    reset_rows,
    score_tokens,
)
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.models import load_classifier

TRIGGERS = {"cf", "mn", "bb", "tq"}


def _state(clf) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {k: v.detach().clone() for k, v in clf.model.state_dict().items()}


def _embedding_key(clf) -> str:  # noqa: ANN001
    weight = input_embeddings(clf)
    return next(k for k, v in clf.model.state_dict().items() if v.data_ptr() == weight.data_ptr())


def _assert_only_rows_reset(clf, before, base, rows) -> None:  # noqa: ANN001
    """Exactly ``rows`` of the input embeddings equal the base's; every other value is bit-identical."""
    key = _embedding_key(clf)
    after = clf.model.state_dict()
    for name, tensor in before.items():
        if name != key:
            assert torch.equal(after[name], tensor), name
    emb, old, ref = after[key], before[key], input_embeddings(base).detach()
    mask = torch.zeros(emb.shape[0], dtype=torch.bool)
    mask[list(rows)] = True
    assert torch.equal(emb[mask], ref[mask])
    assert torch.equal(emb[~mask], old[~mask])


# ----------------------------------------------------------------------------- §8.1 synthetic embeddings
@pytest.fixture
def synthetic_pair(tiny_bert: Path, tmp_path: Path):  # noqa: ANN201
    """θ_pre = tiny BERT; θ_B = θ_pre + noise whose row norm grows with a Zipf frequency; a rare row
    (absent from the table) and the most frequent row get the same large drift; [CLS] drifts most."""
    base, suspect = load_classifier(tiny_bert), load_classifier(tiny_bert)
    tok = suspect.tokenizer
    specials = set(tok.all_special_ids)
    ordinary = [i for i in range(len(tok)) if i not in specials]
    rare, frequent = tok.convert_tokens_to_ids("cf"), tok.convert_tokens_to_ids("the")
    counts = {i: 10_000 // (r + 1) for r, i in enumerate([frequent] + [i for i in ordinary if i not in (rare, frequent)])}
    gen = torch.Generator().manual_seed(0)
    weight = input_embeddings(suspect)
    with torch.no_grad():
        for i, f in counts.items():
            noise = torch.randn(weight.shape[1], generator=gen)
            weight[i] += noise / noise.norm() * 0.01 * np.log1p(f) * (1 + 0.1 * torch.rand(1, generator=gen).item())
        for i, size in ((rare, 0.5), (frequent, 0.5), (tok.cls_token_id, 5.0)):
            noise = torch.randn(weight.shape[1], generator=gen)
            weight[i] = input_embeddings(base)[i] + noise / noise.norm() * size
    table = tmp_path / "freq.tsv"
    table.write_text("token\tcount\n" + "".join(f"{tok.convert_ids_to_tokens(i)}\t{f}\n" for i, f in counts.items()),
                     encoding="utf-8")
    return suspect, base, table, rare, frequent


@pytest.mark.parametrize("score", ["ratio", "residual"])
def test_synthetic_rare_drifted_row_ranks_first(synthetic_pair, score: str) -> None:  # noqa: ANN001
    suspect, base, table, rare, frequent = synthetic_pair
    scores = score_tokens(suspect, base, None, EpurScoring(score=score, freq_table=str(table), f_min=20))
    ranking = list(scores.ranking(score))
    assert ranking[0] == rare
    assert ranking.index(frequent) > 0
    assert suspect.tokenizer.cls_token_id not in ranking  # special tokens are never scored
    assert scores.special[suspect.tokenizer.cls_token_id]
    assert not scores.scored[scores.drift == 0].any()  # Δ = 0 rows never either
    if score == "ratio":
        assert scores.ratio[frequent] < scores.ratio[rare] / 2
    else:
        assert scores.z[rare] > 3.5


def test_reset_changes_exactly_the_chosen_rows(synthetic_pair) -> None:  # noqa: ANN001
    suspect, base, table, rare, frequent = synthetic_pair
    scores = score_tokens(suspect, base, None, EpurScoring(freq_table=str(table), f_min=20))
    rows = choose_rows(scores, "ratio", 2, 3.5)
    assert rows == [rare, frequent]
    before = _state(suspect)
    reset_rows(suspect, base, rows)
    _assert_only_rows_reset(suspect, before, base, rows)


def test_weight_decay_only_rows_are_untouched(tiny_bert: Path) -> None:
    base, suspect = load_classifier(tiny_bert), load_classifier(tiny_bert)
    with torch.no_grad():
        input_embeddings(suspect).mul_(0.999)  # AdamW's shrink on rows that never got a gradient
        input_embeddings(suspect)[10] += 0.05  # one row that did
    clean_text = [suspect.tokenizer.convert_ids_to_tokens(10), "the movie"]
    from unbackdoor.data import Dataset, Example

    clean = Dataset(tuple(Example(str(i), t, i % 2) for i, t in enumerate(clean_text)), 2)
    scores = score_tokens(suspect, base, clean)
    assert list(np.flatnonzero(scores.scored)) == [10]
    assert scores.decay_factor == pytest.approx(0.999, abs=1e-6)
    literal = score_tokens(suspect, base, clean, EpurScoring(decay_tol=0))  # the spec's literal Δ = 0 rule
    assert literal.scored.sum() > 40


# ----------------------------------------------------------------------------- frequency sources
def test_table_from_another_tokenizer_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    clf = load_classifier(tiny_bert)
    table = tmp_path / "foreign.json"
    table.write_text(json.dumps({"The": 50, "Movie": 20, "good": 5}), encoding="utf-8")
    with pytest.raises(DataError, match="not in the model's vocabulary"):
        score_tokens(clf, load_classifier(tiny_bert), None, EpurScoring(freq_table=str(table)))


def test_small_source_and_casing_warn(tiny_bert: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clf = load_classifier(tiny_bert)
    table = tmp_path / "freq.json"
    table.write_text(json.dumps({"the": 50, "movie": 20, "Good": 1}), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="unbackdoor.purify.epur"):
        scores = score_tokens(clf, load_classifier(tiny_bert), None, EpurScoring(freq_table=str(table), table_max_unknown=0.5))
    assert any("casing" in w for w in scores.warnings)
    assert any("only 70 tokens" in w for w in scores.warnings)
    assert scores.freq.f_min == 2  # auto floor for a tiny source


def test_vocab_rank_needs_residual_and_self_checks(tiny_bert: Path) -> None:
    with pytest.raises(ValueError, match="score=residual"):
        EpurScoring(freq_source="vocab_rank")
    clf = load_classifier(tiny_bert)
    with pytest.raises(ConfigError, match="not frequency-ordered"):
        score_tokens(clf, load_classifier(tiny_bert), None,
                     EpurScoring(freq_source="vocab_rank", score="residual", vocab_rank_check_rank=5))


# ----------------------------------------------------------------------------- §8.2 the planted victim
def test_defence_is_registered_and_needs_the_base(planted) -> None:  # noqa: ANN001
    assert PURIFY_DEFENSES.get("e-pur") is Epur and Epur.needs_base
    with pytest.raises(TypeError, match="needs the clean base"):
        Epur().purify(PurifyInputs(suspect=load_classifier(planted.victim_dir), clean=planted.clean))


def test_bare_reset_on_victim_touches_only_the_reset_rows(planted) -> None:  # noqa: ANN001
    victim, base = load_classifier(planted.victim_dir), load_classifier(planted.base_dir)
    before = _state(victim)
    result = Epur(EpurConfig(n_reset=6, finetune=False)).purify(PurifyInputs(suspect=victim, clean=planted.clean, base=base))
    rows = [t["id"] for t in result.report["reset_tokens"]]
    assert len(rows) == 6 and {t["token"] for t in result.report["reset_tokens"][:4]} == TRIGGERS
    _assert_only_rows_reset(victim, before, base, rows)


def test_epur_removes_the_planted_backdoor(planted) -> None:  # noqa: ANN001
    """n_reset chosen on held-out clean data only; then clean fine-tuning (1 epoch to stay fast)."""
    victim, base = load_classifier(planted.victim_dir), load_classifier(planted.base_dir)
    before = evaluate_classifier(victim, planted.task.test, planted.poisoned.triggered_test)
    assert before.asr >= 0.8
    config = EpurConfig(n_reset_grid=(2, 4, 8, 16, 32), tolerance=0.0,
                        train={"epochs": 1, "batch_size": 32, "learning_rate": 2e-5, "progress": False})
    result = PURIFY_DEFENSES.get("e-pur")(config).purify(PurifyInputs(suspect=victim, clean=planted.clean, base=base))
    after = evaluate_classifier(result.model, planted.task.test, planted.poisoned.triggered_test)
    report = result.report
    assert report["n_reset"] == 4  # resetting 8 already costs held-out clean accuracy
    assert {t["token"] for t in report["reset_tokens"]} == TRIGGERS
    assert all(t["ratio"] > 0 and t["drift"] > 0 and t["clean_freq"] == 0 for t in report["reset_tokens"])
    assert report["heldout"]["accuracy_after_reset"] == report["heldout"]["accuracy_before_reset"]
    assert "finetune" in report and report["finetune"]["n_selection"] == report["heldout"]["n_rows"]
    assert after.asr <= before.asr - 0.6, (before.asr, after.asr)
    assert after.cacc >= before.cacc - 0.02, (before.cacc, after.cacc)
