"""Training throughput and peak memory: unbackdoor's loop vs. a plain Hugging Face ``Trainer``.

Same model (the default all-MiniLM-L6-v2 + new head), same SST-2 rows, same batch size, one
epoch each; each side runs in its own process so peak memory is its own. Prints both rows and
the ratio.

    python benchmarks/train_throughput.py [--rows 1024] [--batch-size 32] [--max-length 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rows(n: int):  # noqa: ANN202
    from unbackdoor.data import load_task, sample_subset

    return sample_subset(load_task("sst2").train, size=n, seed=0)


def run_ours(args: argparse.Namespace) -> dict:
    from unbackdoor.models import load_classifier
    from unbackdoor.training import TrainConfig, train_classifier
    from unbackdoor.utils.resources import peak_memory_mb

    data = _rows(args.rows)
    clf = load_classifier(None, num_labels=2, max_length=args.max_length)
    config = TrainConfig(epochs=1, batch_size=args.batch_size, learning_rate=1e-4, progress=False)
    start = time.perf_counter()
    train_classifier(clf, data, config)
    wall = time.perf_counter() - start
    return {"impl": "unbackdoor", "rows": len(data), "wall_s": wall, "examples_per_s": len(data) / wall,
            "peak_memory_mb": peak_memory_mb()}


def run_hf(args: argparse.Namespace) -> dict:
    import tempfile

    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from unbackdoor.models import load_classifier
    from unbackdoor.utils.resources import peak_memory_mb

    data = _rows(args.rows)
    clf = load_classifier(None, num_labels=2, max_length=args.max_length)
    enc = clf.tokenizer([e.text for e in data], truncation=True, max_length=args.max_length)
    features = [{**{k: enc[k][i] for k in enc}, "labels": e.label} for i, e in enumerate(data)]

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(features)

        def __getitem__(self, i: int) -> dict:
            return features[i]

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size, num_train_epochs=1,
                                  learning_rate=1e-4, report_to=[], save_strategy="no", eval_strategy="no",
                                  logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
        trainer = Trainer(model=clf.model, args=targs, train_dataset=Rows(),
                          data_collator=DataCollatorWithPadding(clf.tokenizer))
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    return {"impl": "hf-trainer", "rows": len(data), "wall_s": wall, "examples_per_s": len(data) / wall,
            "peak_memory_mb": peak_memory_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--impl", choices=["ours", "hf"], help="run one side only (internal)")
    args = parser.parse_args()
    if args.impl:
        result = run_ours(args) if args.impl == "ours" else run_hf(args)
        print(json.dumps(result))
        return
    results = {}
    for impl in ("hf", "ours"):
        cmd = [sys.executable, __file__, "--impl", impl, "--rows", str(args.rows), "--batch-size",
               str(args.batch_size), "--max-length", str(args.max_length)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"model all-MiniLM-L6-v2, {args.rows} SST-2 rows, batch {args.batch_size}, max_length {args.max_length}, "
          f"1 epoch, {os.cpu_count()} CPU cores")
    print("| loop | examples/s | wall s | peak memory MB |")
    print("|---|---:|---:|---:|")
    for r in results.values():
        print(f"| {r['impl']} | {r['examples_per_s']:.1f} | {r['wall_s']:.1f} | {r['peak_memory_mb']:.0f} |")
    ratio = results["ours"]["examples_per_s"] / results["hf"]["examples_per_s"]
    print(f"throughput ratio unbackdoor / Trainer: {ratio:.2f}x (target >= 1.3x)")


if __name__ == "__main__":
    main()
