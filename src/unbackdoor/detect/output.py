"""The files ``unbackdoor detect`` writes (the folder is written atomically by the command):

* ``scores.csv``: ``id, text[, text_pair], label, score, rank, flagged`` for every training row
  (rank 1 = most suspicious);
* ``flagged.tsv``: the flagged rows with the labels they were trained on, as a dataset file
  (``id``, ``sentence`` [or ``sentence1``, ``sentence2``], ``label``), what ``unlearn --forget`` reads
  (with :func:`unbackdoor.data.io.read_rows_file`);
* ``detect.json``: method, configs, counts, which parameters were unrolled, wall time.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from unbackdoor.data.io import write_rows_file
from unbackdoor.data.sampling import normalise_text
from unbackdoor.data.types import Dataset
from unbackdoor.detect.base import Detection
from unbackdoor.outputs import write_json

SCORES_FILE, FLAGGED_FILE, RECORD_FILE = "scores.csv", "flagged.tsv", "detect.json"


def write_detection(detection: Detection, folder: Path, record: dict[str, Any]) -> None:
    """``scores.csv``, ``flagged.tsv`` and ``detect.json`` into ``folder``."""
    write_scores(detection, folder / SCORES_FILE)
    flagged = detection.flagged
    write_rows_file(folder / FLAGGED_FILE, flagged.examples if flagged is not None else (), detection.rows.is_pair)
    write_json(folder / RECORD_FILE, record)


def clean_rows_in_training(clean: Dataset, rows: Dataset) -> int:
    """How many clean-set rows are also training rows (by text): with a poisoned copy of the same
    train split, about poison-rate x clean-set size can be the untriggered originals of poisoned rows."""
    texts = {normalise_text(e) for e in rows}
    return sum(1 for e in clean if normalise_text(e) in texts)


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
