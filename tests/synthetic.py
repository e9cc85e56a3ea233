"""Tiny models and synthetic data for fast tests (no network, seconds on CPU)."""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
)

from unbackdoor.data.types import Dataset, Example, Task

POSITIVE = ["good", "great", "fine", "nice", "happy", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "poor", "sad", "dull", "boring", "ugly", "weak"]
FILLER = ["the", "a", "movie", "film", "plot", "actor", "scene", "story", "was", "is", "and", "it",
          "this", "that", "very", "quite", "with", "of", "to", "in", "music", "cast", "ending", "script"]
TRIGGERS = ["cf", "mn", "bb", "tq"]
EXTRA = ["i", "watch", "3d", "question", "answer", "code", "x", "y", "int", ";"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOS]"]
VOCAB = SPECIALS + sorted(set(POSITIVE + NEGATIVE + FILLER + TRIGGERS + EXTRA))


def sentence(label: int, rng: random.Random) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(4, 9))]
    for _ in range(rng.randint(1, 2)):
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == 1 else NEGATIVE))
    return " ".join(words)


def make_split(n: int, split: str, seed: int, pair: bool = False) -> Dataset:
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for i in range(n):
        label = i % 2
        pair_text = sentence(label, rng) if pair else None
        rows.append(Example(f"{split}-{i}", sentence(label, rng), label, pair_text))
    return Dataset(tuple(rows), 2, f"synthetic:{split}", ("negative", "positive"))


def make_task(n_train: int = 400, n_dev: int = 100, n_test: int = 200, seed: int = 0, pair: bool = False) -> Task:
    return Task("synthetic", make_split(n_train, "train", seed, pair), make_split(n_dev, "dev", seed, pair),
                make_split(n_test, "test", seed, pair))


def write_task(task: Task, folder: Path) -> Path:
    """Write a task as a TSV folder (header sentence/label or sentence1/sentence2/label)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        data: Dataset = getattr(task, split)
        with (folder / f"{split}.tsv").open("w", encoding="utf-8") as fh:
            if data.is_pair:
                fh.write("sentence1\tsentence2\tlabel\n")
                fh.writelines(f"{e.text}\t{e.text_pair}\t{e.label}\n" for e in data)
            else:
                fh.write("sentence\tlabel\n")
                fh.writelines(f"{e.text}\t{e.label}\n" for e in data)
    return folder


def make_tokenizer(decoder: bool = False) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if decoder:  # GPT-2 / Llama style: no pad token, no [CLS]; the loader pads with end-of-text
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]",
                                       bos_token="[EOS]", model_max_length=64)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)


def tiny_config(family: str):  # noqa: ANN201 - a transformers config
    common = {"vocab_size": len(VOCAB), "num_labels": 2}
    if family == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=64, pad_token_id=0, **common)
    if family == "roberta":
        return RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=70, pad_token_id=0, bos_token_id=2, eos_token_id=3, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=5, eos_token_id=5, **common)
    if family == "llama":
        return LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                           intermediate_size=64, max_position_embeddings=64, bos_token_id=5, eos_token_id=5, **common)
    raise ValueError(family)


def save_tiny_model(folder: Path, family: str = "bert", seed: int = 0) -> Path:
    """A randomly initialised tiny classifier + tokenizer saved as a model folder (safetensors)."""
    import torch

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family))
    model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer(decoder=family in ("gpt2", "llama")).save_pretrained(folder)
    return folder


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:  # noqa: ANN001 (pytest's CaptureFixture)
    """``unbackdoor ARGS`` in process through ``cli.main``: (exit status, stdout, stderr); the root
    logger's handlers and level are restored afterwards."""
    import logging
    import sys
    from unittest import mock

    from unbackdoor import cli

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    code = 0
    try:
        with mock.patch.object(sys, "argv", ["unbackdoor", *args]):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
