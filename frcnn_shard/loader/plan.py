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
    batches: tuple[int, ...] | None = None  # resampled keep-ratio: exact full batches per slot (quotas None)


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
    world_size: int, workers: int, resampled: bool, canvas_batch: int | None = None,
) -> EpochPlan:
    """Permute the shards with an rng from (seed, epoch) and deal them round-robin to the slots.

    ``canvas_batch``: the batch size of a keep-ratio loader, whose resampled quotas are full batches (a
    batch holds one canvas, so equal samples per rank would not give equal batches)."""
    slots_n = world_size * workers
    order = list(range(n_shards))
    if shuffle:
        order = [int(i) for i in shard_order_rng(seed, epoch).permutation(n_shards)]
    slots = tuple(tuple(order[s::slots_n]) for s in range(slots_n))
    if not resampled:
        return EpochPlan(slots, None)
    if counts is None:
        raise LoaderError("resampled=True needs the per-shard sample counts: give the loader a manifest")
    if canvas_batch is not None:  # every rank yields ceil(N / (world_size x B)) full batches
        return EpochPlan(slots, None, _split(math.ceil(sum(counts) / (world_size * canvas_batch)), world_size, workers))
    # Every rank yields per_rank samples, split over its workers (the first ones take the remainder).
    return EpochPlan(slots, _split(math.ceil(sum(counts) / world_size), world_size, workers))


def _split(per_rank: int, world_size: int, workers: int) -> tuple[int, ...]:
    """``per_rank`` split over each rank's streams, per slot (the first streams take the remainder)."""
    return tuple(per_rank // workers + (1 if s // world_size < per_rank % workers else 0)
                 for s in range(world_size * workers))


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


def canvas_batch_count(per_canvas: dict, batch_size: int, drop_last: bool) -> int:
    """Batches a keep-ratio stream makes from its samples per canvas: each canvas's own, its last one partial
    unless dropped."""
    return sum(batch_count(n, batch_size, drop_last) for n in per_canvas.values())
