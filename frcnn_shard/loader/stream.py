"""One (rank, worker) stream: its shards' encoded samples (raw reading), the shuffle buffer over them, then
decode and collate, batch by batch. ``StreamConfig`` is what a stream needs, pickled into each worker.

Everything random is derived from (seed, epoch, ...) only (``frcnn_shard.seeds``): the shuffle buffer
and the resampled top-up from (seed, epoch, rank, worker), a sample's draws from (seed, epoch, key).
"""
from __future__ import annotations

import itertools
import math
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..format.members import RawSample, ShardFormatError, group_by_key
from ..seeds import buffer_rng, resample_rng
from ..shards import store_of, tar_members
from ..storage import StoreOutage
from .cache import ShardCache
from .collate import Batch, Norm, batch_rows, collate, stats_only
from .decode import DecodeOptions, Decoded, decode_sample
from .options import DatasetFacts, LoaderError
from .plan import EpochPlan
from .repeat import RepeatTable
from .replay import resumed_input, shuffle_buffer, simulate_buffer, stream_sequence
from .resume import StreamPosition
from .sources import PASSTHROUGH_SCHEMES, split_url, url_scheme

_READ_BUFSIZE = 1 << 20
Cached = tuple[ShardCache, str, int]  # the cache, a shard's sha256 and size

# ---------------------------------------------------------------------------------- raw reading


def _open_url(url: str, storage_options: dict | None = None, cached: Cached | None = None):
    """A streaming reader of one shard: a local file, an object (retried reads; through the shard cache
    when there is one), or a pipe:/http URL."""
    if url_scheme(url) in PASSTHROUGH_SCHEMES:
        from webdataset.gopen import gopen

        return gopen(url, "rb", bufsize=_READ_BUFSIZE)
    folder, name = split_url(url)
    if cached is not None and url_scheme(url) not in ("", "file"):
        # A cached shard costs no store at all (making an object-store client is not free, and the
        # store may be unreachable): the store is made only to fetch.
        cache, sha256, size = cached
        f = cache.open(sha256, size, lambda: store_of(folder, storage_options).open_read(name, _READ_BUFSIZE))
        if f is not None:
            return f
    return store_of(folder, storage_options).open_read(name, _READ_BUFSIZE)


def iter_raw_samples(url: str, on_error: str = "raise", skips: list | None = None, expected: int | None = None,
                     storage_options: dict | None = None, store_down: StoreOutage | None = None,
                     cached: Cached | None = None) -> Iterator[tuple[str, RawSample]]:
    """Yield (url, encoded sample) for one shard URL; never unpickles, never uses a member name as a path.

    A sample breaking a member rule (pickle-type extension, traversal name, non-file, oversized,
    duplicate) raises ShardFormatError naming the URL and key, or with on_error="skip" is yielded
    with its problems (decode_sample then refuses it). A broken stream raises, or is skipped from
    that point on: ``skips`` gets (samples lost, message), the samples lost being what the manifest's
    count (``expected``) says never arrived, or 1 when the count is unknown. A shard that ends with
    fewer samples than ``expected`` is the same loss; one with more is an error too (with "skip", the
    samples beyond the count are not delivered, and counted). ``store_down``: the stream's record of a
    store that failed for good (see StoreOutage): while it says so, a remote shard gets one attempt.
    ``cached``: (the shard cache, the shard's sha256 and size) for a remote shard read through the cache.
    """
    key, got = None, 0
    try:
        stream = _open_url(url, storage_options, cached)
    except OSError as e:
        _fail(on_error, skips, f"{url}: cannot open shard: {e}", expected if expected else 1)
        return
    if store_down is not None:
        store_down.arm(stream)
    finished = False
    try:
        samples = group_by_key(tar_members(stream), where=url if on_error == "raise" else None)
        for raw in samples:
            key = raw.key or key
            got += 1
            if expected is not None and got > expected:
                _too_many(url, expected, samples, on_error, skips)
                break
            yield url, raw
        finished = True
    except (tarfile.TarError, OSError, EOFError) as e:
        after = f" after key {key!r}" if key is not None else ""
        lost = max(expected - got, 1) if expected is not None else 1
        _fail(on_error, skips, f"{url}: unreadable shard{after}, {lost} sample(s) lost: {type(e).__name__}: {e}", lost)
        if store_down is not None:
            store_down.failed(e)
    finally:
        try:
            stream.close()  # a pipe: stream raises here when its command failed
        except Exception as e:  # noqa: BLE001 - any failure of the producer means a broken shard
            # Only a stream read to its end can be blamed; one closed early may see SIGPIPE.
            if finished:
                _fail(on_error, skips, f"{url}: shard stream failed on close: {e}", 1)
    if finished and store_down is not None:
        store_down.succeeded()
    if finished and expected is not None and got < expected:
        after = f" after key {key!r}" if key is not None else ""
        _fail(on_error, skips, f"{url}: the shard ends{after} with {got} sample(s) where the manifest says "
                               f"{expected}: {expected - got} sample(s) lost", expected - got)


def _too_many(url: str, expected: int, rest: Iterator, on_error: str, skips: list | None) -> None:
    """A shard holding more samples than its manifest entry: an error, or with "skip" the extra ones counted."""
    where = f"{url}: more samples than the manifest's {expected}"
    if on_error == "raise":
        _fail(on_error, skips, f"{where}; the shard does not match its manifest (rebuild it, or run frcnn-shard "
                               "check on the folder)", 1)
    extra = 1
    try:
        for _ in rest:  # counted only (one encoded sample in memory at a time), never delivered
            extra += 1
    except (tarfile.TarError, OSError, EOFError, ShardFormatError):
        pass  # the shard is already refused beyond its count; its tail's damage changes nothing
    _fail(on_error, skips, f"{where} ({expected + extra}): the {extra} sample(s) beyond it are not delivered", extra)


def _fail(on_error: str, skips: list | None, message: str, lost: int) -> None:
    """Raise ShardFormatError(message), or with on_error="skip" record (lost, message) in ``skips``."""
    if on_error == "raise":
        raise ShardFormatError(message)
    if skips is not None:
        skips.append((lost, message))


# -------------------------------------------------------------------------------------- streams


@dataclass(frozen=True)
class StreamConfig:
    """Everything one (rank, worker) stream needs; pickled into each DataLoader worker."""

    urls: tuple[str, ...]
    counts: tuple[int, ...] | None  # samples per shard, when the manifest says
    plan: EpochPlan
    epoch: int
    rank: int
    world_size: int
    workers: int  # streams per rank (DataLoader workers, or 1 in the calling process)
    seed: int
    shuffle_buffer: int  # 0 or 1: no sample-level shuffle
    on_error: str
    batch_size: int
    drop_last: bool
    decode_threads: int
    dataset: DatasetFacts
    decode: DecodeOptions
    norm: Norm | None  # (mean, std) for float32 batches; None: uint8 batches
    storage_options: dict | None = None  # for shards on object storage (not recorded anywhere)
    streams: int = 0  # streams per rank, which the order depends on (0: one per worker)
    starts: tuple[StreamPosition, ...] | None = None  # a resumed epoch: where each stream of this rank stands
    first: int = 0  # a resumed epoch: the stream whose item comes first
    repeat: RepeatTable | None = None  # repeat-factor sampling: the images that appear more than once
    cache: ShardCache | None = None  # the local cache of remote shards
    digests: tuple[tuple[str, int], ...] | None = None  # (sha256, bytes) per shard, from the manifest

    @property
    def stream_count(self) -> int:
        """Streams per rank (the order's), run by ``workers`` processes."""
        return self.streams or self.workers

    def items_of(self, i: int) -> int:
        """The items shard i yields this epoch: its manifest count, with the repeat-factor copies."""
        assert self.counts is not None
        return self.counts[i] if self.repeat is None else self.repeat.items(i, self.counts[i], self.epoch)

    def shard(self, i: int, skips: list, outage: StoreOutage | None = None, track: "Track | None" = None
              ) -> Iterator[tuple[str, RawSample]]:
        """The encoded samples of shard i, repeated as the epoch's repeat factors say (``outage``: the
        stream's, shared by its shards; ``track``: told when the shard does not yield its count)."""
        cached = (self.cache, *self.digests[i]) if self.cache is not None and self.digests is not None else None
        items = iter_raw_samples(self.urls[i], self.on_error, skips, self.counts[i] if self.counts else None,
                                 self.storage_options, outage, cached)
        if self.repeat is not None:
            items = self.repeat.expand(i, items, self.epoch)
        if track is None:
            return items
        return _counted(items, self.items_of(i) if self.counts is not None else -1, track)


@dataclass
class Track:
    """A stream's position as its batches report it: encoded samples handed to decoding, counts held so far."""

    raw: int = 0
    exact: bool = True


def _counted(items: Iterator, expected: int, track: Track) -> Iterator:
    """The items of one shard; a shard read to its end with another count than ``expected`` clears ``exact``."""
    got = 0
    for item in items:
        got += 1
        yield item
    if got != expected:
        track.exact = False


def raw_stream(cfg: StreamConfig, slot: int, worker: int, skips: list, outage: StoreOutage, track: Track
               ) -> Iterator[tuple[str, RawSample]]:
    """Encoded samples of one slot: its own shards; in resampled mode topped up to the slot's quota (a
    resampled keep-ratio stream, whose quota is in batches, draws until its reader stops)."""
    own = cfg.plan.slots[slot]
    if cfg.plan.quotas is None and cfg.plan.batches is None:
        for i in own:
            yield from cfg.shard(i, skips, outage, track)
        return
    # Resampled: own shards first, then shards drawn with replacement, until the quota is met.
    rng = resample_rng(cfg.seed, cfg.epoch, cfg.rank, worker)
    quota, n, empty_in_a_row = cfg.plan.quotas[slot] if cfg.plan.quotas is not None else math.inf, 0, 0
    sequence = iter(own)
    while n < quota:
        i = next(sequence, None)
        if i is None:
            i = int(rng.integers(len(cfg.urls)))
        got = 0
        for item in cfg.shard(i, skips, outage, track):
            yield item
            got += 1
            n += 1
            if n >= quota:
                return
        empty_in_a_row = 0 if got else empty_in_a_row + 1
        if empty_in_a_row > 2 * len(cfg.urls) + 8:  # every shard empty or unreadable: never loop forever
            last = f": {skips[-1][1]}" if skips else ""
            raise ShardFormatError(f"resampled stream found no readable samples in {empty_in_a_row} shard draws{last}")


def _positioned(cfg: StreamConfig, slot: int, stream: int, skips: list, track: Track,
                start: StreamPosition | None) -> Iterator[tuple[str, RawSample]]:
    """The slot's encoded samples after the shuffle buffer, from ``start`` on (None: the epoch's start)."""
    outage = StoreOutage()  # a store found down costs one attempt per later shard, until one is read whole
    size = cfg.shuffle_buffer
    rng = buffer_rng(cfg.seed, cfg.epoch, cfg.rank, stream) if size > 1 else None
    if start is not None and start.raw > 0 and start.exact and cfg.counts is not None:
        fast = _fast_forward(cfg, slot, stream, skips, outage, track, start.raw, rng)
        if fast is not None:
            return fast
    raws: Iterator = raw_stream(cfg, slot, stream, skips, outage, track)
    if rng is not None:
        raws = shuffle_buffer(raws, size, rng)
    if start is not None and start.raw > 0:
        # Without the counts, the stream is replayed raw (read, never decoded), and what that reading
        # logged was reported before the state was saved.
        for _ in itertools.islice(raws, start.raw):
            pass
        del skips[:]
    return raws


def _fast_forward(cfg: StreamConfig, slot: int, stream: int, skips: list, outage: StoreOutage, track: Track,
                  emitted: int, rng: np.random.Generator | None) -> Iterator | None:
    """The slot's shuffled samples after the first ``emitted``, reading only the shards that hold what the
    buffer held then (replay.simulate_buffer); None when the counts cannot say (the caller replays raw)."""
    quota = cfg.plan.quotas[slot] if cfg.plan.quotas is not None else None
    draws = resample_rng(cfg.seed, cfg.epoch, cfg.rank, stream)
    seq = stream_sequence(cfg.plan.slots[slot], cfg.items_of, quota, lambda: int(draws.integers(len(cfg.urls))),
                          len(cfg.urls))
    if seq is None:
        return None
    total = sum(n for _, n in seq)
    if emitted > total:
        raise LoaderError(f"the loader state says stream {stream} delivered {emitted} sample(s), but it holds "
                          f"{total} in epoch {cfg.epoch}")
    held, cursor = simulate_buffer(total, cfg.shuffle_buffer, rng, emitted) if rng is not None else ([], emitted)
    got, rest = resumed_input(seq, cursor, held, lambda k: cfg.shard(seq[k][0], skips, outage, track),
                              lambda: skips.clear())
    if rng is None:
        return rest
    return shuffle_buffer(rest, cfg.shuffle_buffer, rng, [got[i] for i in held])


def counting(raws: Iterator, track: Track) -> Iterator:
    """The stream's encoded samples, each counted in ``track.raw`` as decoding takes it."""
    for item in raws:
        track.raw += 1
        yield item


def run_stream(cfg: StreamConfig, stream: int, start: StreamPosition | None = None) -> Iterator[Batch]:
    """Read, shuffle, decode, sample and batch the samples of one stream of this rank, from ``start`` on.

    Every item says which stream it is of and where that stream stands after it; the last item (no
    images) marks the stream's end and carries the skips not yet reported.
    """
    slot = stream * cfg.world_size + cfg.rank
    shared = torch.utils.data.get_worker_info() is not None  # batches cross a process boundary
    skips: list[tuple[int, str]] = []  # (samples lost, why)
    track = Track(start.raw if start else 0, start.exact if start else True)
    raws = counting(_positioned(cfg, slot, stream, skips, track, start), track)
    reported = 0
    sampled = cfg.decode.rpn_batch_size is not None

    def emit(samples: list[Decoded] | None, rows: torch.Tensor | None = None) -> Batch:
        # Each item carries the skips since the previous one; None makes a stats-only item.
        nonlocal reported
        batch = (stats_only(cfg.dataset.num_anchors) if samples is None
                 else collate(samples, cfg.dataset.num_anchors, sampled, cfg.norm, shared, rows))
        new = skips[reported:]
        batch.skipped, batch.skip_log, reported = sum(n for n, _ in new), [m for _, m in new], len(skips)
        batch.stream, batch.raw, batch.exact, batch.end = stream, track.raw, track.exact, samples is None
        return batch

    threads = cfg.decode_threads
    with ThreadPoolExecutor(threads) if threads > 1 else NoPool() as pool:
        for pending, rows in _decoded_batches(raws, cfg, shared, skips, pool):
            if len(pending) == cfg.batch_size or (pending and not cfg.drop_last):
                yield emit(pending, rows)
    yield emit(None)


class NoPool:
    """ThreadPoolExecutor's ``map`` in the calling thread (decode_threads 0 or 1)."""

    def __enter__(self) -> "NoPool":
        return self

    def __exit__(self, *exc) -> None:
        return None

    map = staticmethod(map)


def _decoded_batches(raws: Iterator, cfg: StreamConfig, shared: bool, skips: list, pool
                     ) -> Iterator[tuple[list[Decoded], torch.Tensor | None]]:
    """Batches of decoded samples and the uint8 rows they were decoded into: full ones, then the last.

    The samples of a batch are decoded side by side on ``pool``'s threads (libjpeg-turbo lets go of
    the GIL), each into its own row, and collected in stream order, so every batch is the one a
    single thread makes. A sample that fails (on_error="skip") leaves its row to the next one.
    """
    size = cfg.batch_size
    step = 1 if isinstance(pool, NoPool) else size  # samples handed out at once
    # uint8 batches of a known canvas are decoded straight into their batch rows; else collate copies.
    direct = cfg.norm is None and cfg.dataset.image_hw is not None

    def decode(job: tuple[str, RawSample, np.ndarray | None]) -> Decoded | ShardFormatError:
        try:
            return decode_sample(*job[:2], cfg.dataset, cfg.decode, cfg.epoch, job[2])
        except ShardFormatError as e:
            return e

    while True:
        rows = view = None  # allocated when the batch's first sample arrives
        pending: list[Decoded] = []
        while len(pending) < size:
            items = list(itertools.islice(raws, min(step, size - len(pending))))
            if not items:
                yield pending, rows
                return
            if rows is None and direct:
                rows = batch_rows(size, cfg.dataset.image_hw, shared)
                view = rows.numpy()
            first = len(pending)
            jobs = [(url, raw, None if view is None else view[first + i]) for i, (url, raw) in enumerate(items)]
            for i, got in enumerate(pool.map(decode, jobs)):
                if isinstance(got, ShardFormatError):
                    if cfg.on_error == "raise":
                        raise got
                    skips.append((1, str(got)))
                    continue
                if view is not None and first + i != len(pending):  # a sample before it failed: close the gap
                    view[len(pending)] = view[first + i]
                    got.image = view[len(pending)]
                pending.append(got)
        yield pending, rows
