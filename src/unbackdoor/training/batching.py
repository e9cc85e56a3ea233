"""Seeded batch orders: shuffled, optionally grouped by length, sharded across processes."""

from __future__ import annotations

import random
from collections.abc import Sequence

MEGABATCH_FACTOR = 50  # rows of similar length are grouped within windows of 50 batches


def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """Row indices of each batch of one epoch. Same (seed, epoch) -> same batches."""
    rng = random.Random(f"batches-{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * MEGABATCH_FACTOR
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def shard(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This process's batches; every process gets the same count (the list wraps around)."""
    if world == 1:
        return batches
    per_rank = -(-len(batches) // world)
    padded = [batches[i % len(batches)] for i in range(per_rank * world)]
    return padded[rank::world]
