"""The epoch plan: which shards each (rank, worker) slot reads, and how many samples it yields.

The shards are permuted by a generator of (seed, epoch) alone (``seeds.shard_order_rng``), the same on
every rank and worker, and dealt round-robin to the slots; slot = worker * world_size + rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..seeds import shard_order_rng
from .options import LoaderError


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each (rank, worker) slot reads in one epoch, and how many samples it yields."""

    slots: tuple[tuple[int, ...], ...]  # shard indices per slot; slot = worker * world_size + rank
    quotas: tuple[int, ...] | None  # resampled mode: exact samples per slot; None otherwise


def feedable_workers(n_shards: int, world_size: int, workers: int, strict: bool) -> int:
    """The workers per rank that whole shards can feed (each stream reads whole shards).

    With strict, fewer shards than streams is a LoaderError; otherwise the count drops to what the
    shards can feed (at least 1), and a rank may get no shard at all when there are fewer shards than ranks.
    """
    if n_shards >= world_size * workers:
        return workers
    if strict:
        raise LoaderError(
            f"{n_shards} shard(s) cannot feed {world_size} rank(s) x {workers} worker(s) = {world_size * workers} "
            "streams (each stream reads whole shards); use fewer workers, or rebuild with a smaller rows_per_shard")
    return max(1, n_shards // world_size)


def plan_epoch(
    n_shards: int, counts: Sequence[int] | None, *, seed: int, epoch: int, shuffle: bool,
    world_size: int, workers: int, resampled: bool,
) -> EpochPlan:
    """Permute the shards with an rng from (seed, epoch) and deal them round-robin to the slots."""
    slots_n = world_size * workers
    order = list(range(n_shards))
    if shuffle:
        order = [int(i) for i in shard_order_rng(seed, epoch).permutation(n_shards)]
    slots = tuple(tuple(order[s::slots_n]) for s in range(slots_n))
    quotas = None
    if resampled:
        if counts is None:
            raise LoaderError("resampled=True needs the per-shard sample counts: give the loader a manifest")
        per_rank = math.ceil(sum(counts) / world_size)
        # Every rank yields per_rank samples, split over its workers (the first ones take the remainder).
        quotas = tuple(per_rank // workers + (1 if s // world_size < per_rank % workers else 0) for s in range(slots_n))
    return EpochPlan(slots, quotas)


def slot_samples(plan: EpochPlan, counts: Sequence[int] | None, slot: int) -> int | None:
    """Samples slot ``slot`` yields in the plan's epoch (None when the shards' counts are unknown)."""
    if plan.quotas is not None:
        return plan.quotas[slot]
    if counts is None:
        return None
    return sum(counts[i] for i in plan.slots[slot])


def batch_count(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches that ``n`` samples make (the last one partial unless dropped)."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)
