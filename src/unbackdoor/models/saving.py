"""Saving classifiers with a record of what produced them."""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path
from typing import Any

import torch

from unbackdoor import __version__
from unbackdoor.models.loading import PROVENANCE_FILE, Classifier
from unbackdoor.outputs import write_json


def provenance_record(clf: Classifier, **fields: Any) -> dict[str, Any]:
    """The ``unbackdoor.json`` record: producer, inputs, config, seed, input format, metrics."""
    return {
        "unbackdoor_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "model_type": clf.model.config.model_type,
        "num_labels": clf.num_labels,
        "input_format": clf.input_format(),
        "precision": clf.precision,
        **fields,
    }


def save_classifier(clf: Classifier, folder: str | Path, record: dict[str, Any]) -> None:
    """Save model (safetensors), tokenizer, ``unbackdoor.json`` and a model-card README into ``folder``.

    ``folder`` should be a work dir from :func:`unbackdoor.outputs.atomic_output_dir`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clf.model.save_pretrained(folder, safe_serialization=True)
    clf.tokenizer.save_pretrained(folder)
    clf.provenance = record
    write_json(folder / PROVENANCE_FILE, record)
    (folder / "README.md").write_text(model_card(record), encoding="utf-8")


def model_card(record: dict[str, Any]) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [unbackdoor, text-classification]",
        "---",
        "",
        f"# {record.get('title', 'unbackdoor model')}",
        "",
        "Produced by [unbackdoor](https://pypi.org/project/unbackdoor/) "
        f"{record.get('unbackdoor_version', '')}. Full record: `{PROVENANCE_FILE}`.",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for key in ("role", "base", "data", "attack", "defense", "seed", "created"):
        if record.get(key) not in (None, "", {}):
            lines.append(f"| {key} | `{_short(record[key])}` |")
    metrics = record.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    if record.get("role") == "victim":
        lines += ["", "**Warning**: this model was trained on poisoned data on purpose. It carries a backdoor."]
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) < 200 else text[:197] + "..."
