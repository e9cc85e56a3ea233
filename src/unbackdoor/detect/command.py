"""``unbackdoor detect``: score a training set's rows, flag the suspicious ones, write them out.

Inputs: the training rows (a clean or poisoned data folder; of a poisoned folder only its training
rows are taken, never ``train_poison_flags.txt``), a clean task whose train split is sampled for the
defender's clean set (as for ``purify``: seeded, stratified, disjoint from its dev and test texts),
and the encoder whose frozen features the methods use (default: the clean pre-trained
all-MiniLM-L6-v2).

Caveat of that clean-set draw: when the training rows are a poisoned copy of the same train split
(``unbackdoor attack`` keeps row ids), about poison-rate × clean-set size clean rows can be the
untriggered originals of poisoned rows, as they are for ``purify``'s clean set. ``detect.json``
records ``clean_rows_in_training`` (clean-set rows whose text is also a training row's).

Output folder (written atomically):

* ``scores.csv``: ``id, text[, text_pair], label, score, rank, flagged`` for every training row
  (rank 1 = most suspicious);
* ``flagged.tsv``: the flagged rows with the labels they were trained on, as a dataset file
  (``id``, ``sentence`` [or ``sentence1``, ``sentence2``], ``label``); the package's task loaders
  read folders with train/dev/test splits, so read this single file with :func:`unbackdoor.data.io.read_rows_file`
  (what ``unlearn --forget`` needs: a :class:`~unbackdoor.data.Dataset`);
* ``detect.json``: method, configs, counts, which parameters were unrolled, wall time.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from unbackdoor import __version__
from unbackdoor.config import CommandConfig, StrictConfig, build_config
from unbackdoor.data.io import load_any, load_task, write_rows_file
from unbackdoor.data.sampling import normalise_text, sample_subset
from unbackdoor.data.types import Dataset, PoisonedTask, Task
from unbackdoor.detect.base import DETECTORS, Detection, DetectInputs, Detector, FlagRule
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.models.loading import load_classifier
from unbackdoor.outputs import atomic_output_dir, check_output_free, write_json
from unbackdoor.utils.resources import Stopwatch, peak_memory_mb

logger = logging.getLogger(__name__)

DEFAULT_RATE = 0.1
SCORES_FILE, FLAGGED_FILE, RECORD_FILE = "scores.csv", "flagged.tsv", "detect.json"


class CleanDraw(StrictConfig):
    """How the defender's clean set is drawn from ``--clean``'s train split (as ``purify`` does)."""

    fraction: float | None = Field(0.01, gt=0, le=1, description="share of the clean train split")
    size: int | None = Field(None, ge=2, description="number of rows (instead of fraction)")
    per_class: int | None = Field(None, ge=1, description="rows per label (instead of fraction)")
    seed: int = Field(0, description="seed of the clean-set draw and of --max-train")


class DetectCommand(CommandConfig):
    data: str = Field(description="training rows: a data folder or name (clean or poisoned; flags are never read)")
    clean: str = Field(description="clean data the defender holds (its train split is sampled)")
    clean_set: CleanDraw = Field(default_factory=CleanDraw)
    method: str = Field("reweight", description="detector: reweight, loss")
    params: dict[str, Any] = Field(default_factory=dict, description="detector options "
                                   "(unbackdoor.detect.ReweightConfig, LossConfig)")
    model: str | None = Field(None, description="encoder of the frozen features (default: all-MiniLM-L6-v2)")
    rate: float | None = Field(None, gt=0, le=1, description=f"flag this share of rows (default {DEFAULT_RATE})")
    threshold: float | None = Field(None, description="flag rows with score >= threshold (instead of rate)")
    max_train: int | None = Field(None, ge=2, description="subsample the training rows (seeded, stratified)")
    max_length: int | None = Field(None, ge=8, le=4096, description="tokens per input")
    out: str = Field(description="output folder (scores.csv, flagged.tsv, detect.json)")


def build_detector(method: str, params: dict[str, Any]) -> Detector:
    """Validate a detector request before any work."""
    cls = DETECTORS.get(method)
    return cls(build_config(cls.config_class, params, f"detector {method}"))


def flag_rule(rate: float | None, threshold: float | None) -> FlagRule:
    if rate is not None and threshold is not None:
        raise ConfigError("give --rate or --threshold, not both")
    return FlagRule(threshold=threshold) if threshold is not None else FlagRule(rate=rate or DEFAULT_RATE)


def training_rows(spec: str, max_train: int | None, seed: int) -> Dataset:
    """The training rows of a clean or poisoned folder; of a poisoned task only ``train`` is kept."""
    data: Task | PoisonedTask = load_any(spec)
    rows = data.train
    del data  # the flags (if any) go no further than this line
    if max_train is not None and max_train < len(rows):
        rows = sample_subset(rows, size=max_train, seed=seed, name=f"{rows.name}[{max_train} rows]")
    return rows


def clean_set(task: Task, draw: CleanDraw) -> Dataset:
    """A seeded clean subset of ``task.train``, disjoint from its dev and test texts."""
    fraction = None if (draw.size or draw.per_class) else draw.fraction
    return sample_subset(task.train, fraction=fraction, size=draw.size, per_class=draw.per_class, seed=draw.seed,
                         exclude=[task.test, task.dev], name=f"{task.name}:clean-set")


def run_detect(cmd: DetectCommand) -> dict[str, Any]:
    """Validate everything, load rows, clean set and encoder, detect, write the output folder."""
    out = check_output_free(cmd.out, cmd.overwrite, inputs=[cmd.data, cmd.clean, cmd.model])
    detector = build_detector(cmd.method, cmd.params)
    rule = flag_rule(cmd.rate, cmd.threshold)
    rows = training_rows(cmd.data, cmd.max_train, cmd.clean_set.seed)
    clean = clean_set(load_task(cmd.clean), cmd.clean_set)
    if clean.num_labels != rows.num_labels:
        raise DataError(f"--clean {cmd.clean} has {clean.num_labels} labels but --data {cmd.data} has {rows.num_labels}")
    encoder = load_classifier(cmd.model, num_labels=rows.num_labels, allow_pickle=cmd.allow_pickle, data_name=cmd.data,
                              precision=cmd.precision,
                              max_length=cmd.max_length)
    inputs = DetectInputs(rows, clean, encoder)
    watch = Stopwatch()
    detection = detector.detect(inputs, rule)
    record = {
        "unbackdoor_version": __version__,
        "method": cmd.method,
        "config": cmd.model_dump(),
        "data": str(Path(cmd.data).resolve()) if Path(cmd.data).is_dir() else cmd.data,
        "poison_flags": "not read",
        "rule": rule.model_dump(),
        "counts": {**detection.counts(), "clean": len(clean)},
        "clean_rows_in_training": _shared_texts(clean, rows),
        "encoder": encoder.source,
        "input_format": encoder.input_format(),
        "detector": detection.report,
        "wall_time_s": watch.elapsed(),
        "peak_memory_mb": peak_memory_mb(),
        "outputs": {"scores": SCORES_FILE, "flagged": FLAGGED_FILE},
    }
    with atomic_output_dir(out, cmd.overwrite) as work:
        write_scores(detection, work / SCORES_FILE)
        flagged = detection.flagged
        write_rows_file(work / FLAGGED_FILE, flagged.examples if flagged is not None else (), rows.is_pair)
        write_json(work / RECORD_FILE, record)
    logger.info("flagged %d of %d rows -> %s", len(detection.flagged_ids), len(rows), out)
    return record


def _shared_texts(clean: Dataset, rows: Dataset) -> int:
    texts = {normalise_text(e) for e in rows}
    return sum(1 for e in clean if normalise_text(e) in texts)


# ----------------------------------------------------------------------------- files
def write_scores(detection: Detection, path: Path) -> None:
    """Every row with its score, rank and flag (CSV, quoted as needed)."""
    pair = detection.rows.is_pair
    flagged = set(detection.flagged_ids)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text", *(["text_pair"] if pair else []), "label", "score", "rank", "flagged"])
        for e, score, rank in zip(detection.rows, detection.scores.tolist(), detection.ranks(), strict=True):
            writer.writerow([e.id, e.text, *([e.text_pair] if pair else []), e.label, f"{score:.6g}", rank,
                             int(e.id in flagged)])
