"""Prediction throughput over the SST-2 clean test split (1,821 rows) with the packaged MiniLM: a cold
pass (a fresh process: tokenising and oneDNN's first kernels included) and a warm pass (the same rows
again), examples/s and peak memory. Prints one JSON line.

Runs against this checkout or an older one, to compare with the code before a change:

    python benchmarks/predict_throughput.py --precision bf16
    git worktree add /tmp/old 5abb78e && PYTHONPATH=/tmp/old/src python benchmarks/predict_throughput.py
"""

from __future__ import annotations

import argparse
import inspect
import json
import time


def measure(precision: str, max_length: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from unbackdoor.data import load_task
    from unbackdoor.inference import predict
    from unbackdoor.models import load_classifier
    from unbackdoor.utils.resources import peak_memory_mb

    rows = load_task("sst2").test.examples
    options = {"precision": precision} if "precision" in inspect.signature(load_classifier).parameters else {}
    clf = load_classifier(None, num_labels=2, max_length=max_length, **options)
    walls = []
    for _ in range(2):  # cold, then warm
        start = time.perf_counter()
        predict(clf, rows)
        walls.append(time.perf_counter() - start)
    return {"impl": f"predict {getattr(clf, 'precision', 'fp32')}", "precision": getattr(clf, "precision", "fp32"),
            "rows": len(rows), "wall_s": walls[0], "examples_per_s": len(rows) / walls[0],
            "warm_examples_per_s": len(rows) / walls[1], "peak_memory_mb": peak_memory_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="auto", help="auto | bf16 | fp32 (ignored by code without precision)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(measure(args.precision, args.max_length, args.threads)))


if __name__ == "__main__":
    main()
