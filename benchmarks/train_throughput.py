"""Training and prediction throughput, peak memory: unbackdoor's loop (fp32 and bf16 autocast) vs. a
plain Hugging Face ``Trainer`` in its default fp32.

Same model (the default all-MiniLM-L6-v2 + new head), same SST-2 rows, same batch size, one epoch
each; every run in its own process so peak memory is its own. Prints the rows, the ratios and the
share of the two cores' peak the loop reaches.

    python benchmarks/train_throughput.py [--rows 1024] [--batch-size 32] [--max-length 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NON_EMBEDDING_PARAMS = 10.6e6  # all-MiniLM-L6-v2 without its word embeddings (the physical bound)


def cpu_peak() -> dict:
    """Per-core peak FLOP/cycle by precision and the clock, from /proc/cpuinfo (Linux x86):

    * Intel with AVX-512 (Xeon Scalable): 2 x 512-bit FMA units = 64 fp32 FLOP/cycle; with AMX-BF16
      the tile unit's 1,024 bf16 FLOP/cycle (else avx512_bf16's dot products, 2 x the fp32 rate);
    * AMD Zen 4: AVX-512 on 2 x 256-bit FMA pipes = 32 fp32 FLOP/cycle, 64 bf16 (avx512_bf16);
    * otherwise AVX2 with 2 FMA pipes: 32 fp32, no native bf16 (same as fp32).
    The clock is the nominal one the kernel reports ("cpu MHz"; a VM often shows the base clock)."""
    text = open("/proc/cpuinfo", encoding="utf-8").read() if os.path.exists("/proc/cpuinfo") else ""
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    mhz = next((float(line.split(":", 1)[1]) for line in text.splitlines() if line.startswith("cpu MHz")), 3000.0)
    intel = "GenuineIntel" in text
    fp32 = 64 if intel and "avx512f" in flags else 32
    bf16 = 1024 if "amx_bf16" in flags else 2 * fp32 if "avx512_bf16" in flags else fp32
    unit = "AMX" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "none"
    return {"model": model, "ghz": mhz / 1000, "flop_per_cycle": {"fp32": fp32, "bf16": bf16}, "bf16_unit": unit}


def _rows(n: int):  # noqa: ANN202
    from unbackdoor.data import load_task, sample_subset

    return sample_subset(load_task("sst2").train, size=n, seed=0)


def _tokens(clf, data) -> int:  # noqa: ANN001
    return sum(len(ids) for ids in clf.tokenizer([e.text for e in data], truncation=True,
                                                 max_length=clf.max_length)["input_ids"])


def run_ours(args: argparse.Namespace) -> dict:
    from unbackdoor.models import load_classifier
    from unbackdoor.training import TrainConfig, train_classifier
    from unbackdoor.utils.resources import peak_memory_mb

    data = _rows(args.rows)
    clf = load_classifier(None, num_labels=2, max_length=args.max_length, precision=args.precision)
    config = TrainConfig(epochs=1, batch_size=args.batch_size, learning_rate=1e-4, progress=False)
    start = time.perf_counter()
    train_classifier(clf, data, config)
    wall = time.perf_counter() - start
    return {"impl": f"unbackdoor {clf.precision}", "precision": clf.precision, "rows": len(data), "wall_s": wall,
            "examples_per_s": len(data) / wall, "tokens": _tokens(clf, data), "peak_memory_mb": peak_memory_mb()}


def run_hf(args: argparse.Namespace) -> dict:
    import tempfile

    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from unbackdoor.models import load_classifier
    from unbackdoor.utils.resources import peak_memory_mb

    data = _rows(args.rows)
    clf = load_classifier(None, num_labels=2, max_length=args.max_length, precision="fp32")
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
    return {"impl": "hf-trainer fp32", "precision": "fp32", "rows": len(data), "wall_s": wall,
            "examples_per_s": len(data) / wall, "tokens": _tokens(clf, data), "peak_memory_mb": peak_memory_mb()}


def run_predict(args: argparse.Namespace) -> dict:
    """Prediction over the SST-2 clean test split: ``predict_throughput.py``'s cold and warm passes."""
    sys.path.insert(0, str(Path(__file__).parent))
    from predict_throughput import measure

    return measure(args.precision, args.max_length, args.threads)


def _child(args: argparse.Namespace, impl: str, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--impl", impl, "--precision", precision, "--rows", str(args.rows),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def share_of_peak(row: dict, threads: int, peak: dict) -> float:
    """Achieved training FLOP/s (6 x non-embedding parameters x tokens) over the cores' peak."""
    flops = 6 * NON_EMBEDDING_PARAMS * row["tokens"] / row["wall_s"]
    return flops / (threads * peak["flop_per_cycle"][row["precision"]] * peak["ghz"] * 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--impl", choices=["ours", "hf", "predict"], help="run one side only (internal)")
    args = parser.parse_args()
    if args.impl:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps({"ours": run_ours, "hf": run_hf, "predict": run_predict}[args.impl](args)))
        return
    train = [_child(args, "hf", "fp32"), _child(args, "ours", "fp32"), _child(args, "ours", "bf16")]
    pred = [_child(args, "predict", "fp32"), _child(args, "predict", "bf16")]
    peak = cpu_peak()
    print(f"model all-MiniLM-L6-v2, {args.rows} SST-2 rows, batch {args.batch_size}, max_length {args.max_length}, "
          f"1 epoch, {args.threads} torch thread(s) per process, {os.cpu_count()} CPU cores: {peak['model']}, "
          f"{peak['ghz']:.2f} GHz nominal, peak FLOP/cycle/core fp32 {peak['flop_per_cycle']['fp32']}, "
          f"bf16 {peak['flop_per_cycle']['bf16']} ({peak['bf16_unit']})")
    print("| run | examples/s | wall s | peak memory MB | training GFLOP/s | share of the cores' peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in train:
        gflops = 6 * NON_EMBEDDING_PARAMS * r["tokens"] / r["wall_s"] / 1e9
        print(f"| train: {r['impl']} | {r['examples_per_s']:.1f} | {r['wall_s']:.1f} | {r['peak_memory_mb']:.0f} | "
              f"{gflops:.0f} | {100 * share_of_peak(r, args.threads, peak):.1f} % |")
    for r in pred:
        print(f"| {r['impl']} (SST-2 test), cold / warm | {r['examples_per_s']:.1f} / {r['warm_examples_per_s']:.1f} | "
              f"{r['wall_s']:.1f} | {r['peak_memory_mb']:.0f} | | |")
    hf, fp32, bf16 = (r["examples_per_s"] for r in train)
    print(f"training: unbackdoor bf16 / Trainer fp32 = {bf16 / hf:.2f}x (target >= 2.0x); "
          f"unbackdoor fp32 / Trainer fp32 = {fp32 / hf:.2f}x; bf16 / fp32 = {bf16 / fp32:.2f}x")
    print(f"prediction: bf16 / fp32 = {pred[1]['examples_per_s'] / pred[0]['examples_per_s']:.2f}x cold, "
          f"{pred[1]['warm_examples_per_s'] / pred[0]['warm_examples_per_s']:.2f}x warm")


if __name__ == "__main__":
    main()
