"""One stream of a keep-ratio loader: the plain stream's reading and shuffle buffer, then a bucket per canvas
(``buckets``), each full bucket decoded straight into a batch of its canvas.

A batch is [B, Hc, Wc] for the canvas (Hc, Wc) of its samples: each image's content at the top-left, zeros
below and to the right (uint8 zeros; with ``normalize`` zeros after normalising, as torchvision's
``batch_images`` pads). At the stream's end its partial buckets become batches, oldest first (none with
``drop_last``). A resampled stream's quota is in full batches, so every rank yields the same number.

Samples are numbered in the stream's input order (before the shuffle buffer): a batch says which samples
wait in the buckets after it (``Batch.pending``), and a resumed stream fetches those (``canvas_input``).
"""
from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from ..format.members import RawSample, ShardFormatError
from ..seeds import buffer_rng
from ..storage import StoreOutage
from .buckets import Canvas, CanvasBuckets, Entry, sample_canvas
from .collate import Batch, collate, norm_coeffs, shared_empty, stats_only
from .decode import Decoded, checked_members, decode_sample
from .options import LoaderError
from .replay import resumed_input, shuffle_buffer, simulate_buffer, stream_sequence
from .resume import StreamPosition
from .stream import NoPool, StreamConfig, Track, counting, raw_stream

Tagged = tuple[int, tuple[str, RawSample]]  # (input number, (url, encoded sample))


def canvas_input(cfg: StreamConfig, slot: int, stream: int, skips: list, track: Track,
                 start: StreamPosition | None) -> tuple[Iterator[Tagged], list[Tagged], int]:
    """(the slot's numbered samples after the shuffle buffer from ``start`` on, the samples that waited in the
    buckets at ``start`` in ``start.pending``'s order, the full batches the stream had made by then: counted
    when the stream is replayed raw, 0 otherwise; a resampled stream's quota needs it)."""
    outage = StoreOutage()
    size = cfg.shuffle_buffer
    rng = buffer_rng(cfg.seed, cfg.epoch, cfg.rank, stream) if size > 1 else None
    pending = start.pending if start is not None else ()
    resumed = start is not None and start.raw > 0
    if resumed and start.exact and cfg.counts is not None and cfg.plan.batches is None:
        return (*_fast_forward(cfg, slot, stream, skips, outage, track, start, rng), 0)
    raws: Iterator = enumerate(raw_stream(cfg, slot, stream, skips, outage, track))
    if rng is not None:
        raws = shuffle_buffer(raws, size, rng)
    if not resumed:
        return raws, [], 0
    # Replayed raw from the stream's start (read, never decoded: each record routed to count the batches);
    # what that logged was reported before the state was saved.
    want, got, replay, made = set(pending), {}, CanvasBuckets(cfg.batch_size), 0
    for n, (url, raw) in itertools.islice(raws, start.raw):
        if n in want:
            got[n] = (url, raw)
        routed = _route(cfg, url, raw)
        if not isinstance(routed, ShardFormatError):
            made += replay.add(routed[0], (n, "", raw, routed[1])) is not None
    del skips[:]
    return raws, _restored(pending, got, stream), made


def _fast_forward(cfg: StreamConfig, slot: int, stream: int, skips: list, outage: StoreOutage, track: Track,
                  start: StreamPosition, rng: np.random.Generator | None) -> tuple[Iterator[Tagged], list[Tagged]]:
    """``canvas_input`` from the counts: the buffer replayed on numbers (``replay.simulate_buffer``), and only
    the shards holding what the buffer and the buckets held read (raw)."""
    seq = stream_sequence(cfg.plan.slots[slot], cfg.items_of, None, lambda: 0, len(cfg.urls))
    total = sum(n for _, n in seq)
    if start.raw > total:
        raise LoaderError(f"the loader state says stream {stream} delivered {start.raw} sample(s), but it holds "
                          f"{total} in epoch {cfg.epoch}")
    held, cursor = simulate_buffer(total, cfg.shuffle_buffer, rng, start.raw) if rng is not None else ([], start.raw)
    bad = [n for n in start.pending if n >= cursor or n in set(held)]
    if bad:
        raise LoaderError(f"the loader state names sample {bad[0]} of stream {stream} as waiting in a bucket, but "
                          "the stream had not delivered it then: the state is not this loader's")
    got, rest = resumed_input(seq, cursor, list(held) + list(start.pending),
                              lambda k: cfg.shard(seq[k][0], skips, outage, track), lambda: skips.clear())
    numbered: Iterator = zip(itertools.count(cursor), rest)
    if rng is not None:
        numbered = shuffle_buffer(numbered, cfg.shuffle_buffer, rng, _restored(held, got, stream))
    return numbered, _restored(start.pending, got, stream)


def _restored(numbers, got: dict, stream: int) -> list[Tagged]:
    """The numbered samples ``numbers`` from what was read back; LoaderError when one was not there (a shard
    that changed since the state was saved)."""
    missing = [n for n in numbers if n not in got]
    if missing:
        raise LoaderError(f"resuming stream {stream}: sample {missing[0]} of its input was not found again (its "
                          "shard changed since the state was saved?)")
    return [(n, got[n]) for n in numbers]


def _refusal(url: str, raw: RawSample, why: str) -> ShardFormatError:
    """The error of a sample whose record gives no usable canvas (a member-rule error first, as decoding's)."""
    checked_members(url, raw)  # raises the member rule it breaks, if any
    return ShardFormatError(f"{url}: key {raw.key!r}: {why}")


def _route(cfg: StreamConfig, url: str, raw: RawSample) -> tuple[Canvas, Canvas] | ShardFormatError:
    """(canvas, content) of a sample, or the error that refuses it (a canvas the manifest does not list, too)."""
    routed = sample_canvas(raw, cfg.dataset.keep_ratio)
    if isinstance(routed, str):
        try:
            return _refusal(url, raw, routed)
        except ShardFormatError as e:
            return e
    if cfg.dataset.anchors_at(routed[0]) is None:
        return ShardFormatError(f"{url}: key {raw.key!r}: image_size: canvas {routed[0][0]}x{routed[0][1]} is not "
                                "one of the manifest's canvases")
    return routed


def _full_buckets(raws: Iterator[Tagged], buckets: CanvasBuckets, cfg: StreamConfig, skips: list,
                  fail_limit: int | None) -> Iterator[tuple[Canvas, list[Entry]]]:
    """(canvas, samples) of each bucket as it fills; a sample without a usable canvas raises, or is skipped.

    ``fail_limit``: a resampled stream (which draws shards without end) gives up after this many refused
    samples in a row."""
    failures = 0
    for n, (url, raw) in raws:
        routed = _route(cfg, url, raw)
        if isinstance(routed, ShardFormatError):
            if cfg.on_error == "raise":
                raise routed
            skips.append((1, str(routed)))
            failures += 1
            if fail_limit is not None and failures > fail_limit:
                raise ShardFormatError(f"resampled stream found no readable samples in {failures} in a row: {routed}")
            continue
        failures = 0
        full = buckets.add(routed[0], (n, url, raw, routed[1]))
        if full is not None:
            yield routed[0], full


def _place(row: np.ndarray, image: np.ndarray, coeffs: tuple[np.ndarray, np.ndarray] | None) -> None:
    """Write one content image at the top-left of its batch row (uint8 HWC, or float32 CHW normalised when
    ``coeffs``) and zero the rest; an image already decoded into the row is not copied again."""
    h, w = image.shape[:2]
    if coeffs is None:
        region = row[:h, :w]
        if not np.shares_memory(region, image):
            region[...] = image
        row[h:] = 0
        row[:h, w:] = 0
        return
    region = row[:, :h, :w]
    np.multiply(image.transpose(2, 0, 1), coeffs[0], out=region, dtype=np.float32)
    region += coeffs[1]
    row[:, h:] = 0
    row[:, :h, w:] = 0


def decode_bucket(entries: list[Entry], canvas: Canvas, cfg: StreamConfig, shared: bool, pool, skips: list
                  ) -> tuple[list[Decoded], torch.Tensor]:
    """The samples of one bucket decoded (side by side on ``pool``'s threads) into a batch of their canvas.

    uint8 images are decoded straight into their row when the row's [:h] is contiguous (the content as wide
    as the canvas), else decoded and copied to [:h, :w]. A sample that fails (on_error="skip") leaves its row
    to the next one, so the batch is one smaller.
    """
    hc, wc = canvas
    anchors = cfg.dataset.anchors_at(canvas)
    shape = (len(entries), 3, hc, wc) if cfg.norm is not None else (len(entries), hc, wc, 3)
    images = shared_empty(shape, torch.float32 if cfg.norm is not None else torch.uint8, shared)
    view = images.numpy()
    coeffs = tuple(c[0] for c in norm_coeffs(*cfg.norm)) if cfg.norm is not None else None

    def decode(i: int) -> Decoded | ShardFormatError:
        _, url, raw, (h, w) = entries[i]
        out = view[i, :h] if coeffs is None and w == wc else None  # a full-width region is C-contiguous
        try:
            got = decode_sample(url, raw, cfg.dataset.at_sample((h, w), anchors), cfg.decode, cfg.epoch, out)
        except ShardFormatError as e:
            return e
        _place(view[i], got.image, coeffs)
        return got

    samples: list[Decoded] = []
    for i, got in enumerate(list(pool.map(decode, range(len(entries))))):
        if isinstance(got, ShardFormatError):
            if cfg.on_error == "raise":
                raise got
            skips.append((1, str(got)))
            continue
        if i != len(samples):  # a sample before it failed: close the gap
            view[len(samples)] = view[i]
        samples.append(got)
    return samples, images[:len(samples)]


def run_canvas_stream(cfg: StreamConfig, stream: int, start: StreamPosition | None = None) -> Iterator[Batch]:
    """Read, shuffle, bucket by canvas, decode, sample and batch the samples of one keep-ratio stream of this
    rank, from ``start`` on; items as ``stream.run_stream``'s, each also naming the samples left waiting."""
    slot = stream * cfg.world_size + cfg.rank
    shared = torch.utils.data.get_worker_info() is not None  # batches cross a process boundary
    skips: list[tuple[int, str]] = []
    track = Track(start.raw if start else 0, start.exact if start else True)
    quota = cfg.plan.batches[slot] if cfg.plan.batches is not None else None
    buckets = CanvasBuckets(cfg.batch_size)
    reported = 0

    def emit(canvas: Canvas | None, samples: list[Decoded] | None, images: torch.Tensor | None = None) -> Batch:
        nonlocal reported
        batch = (stats_only(0) if not samples else
                 collate(samples, cfg.dataset.anchors_at(canvas), cfg.decode.rpn_batch_size is not None, cfg.norm,
                         shared, images, keep_ratio=True))
        new = skips[reported:]
        batch.skipped, batch.skip_log, reported = sum(n for n, _ in new), [m for _, m in new], len(skips)
        batch.stream, batch.raw, batch.exact, batch.end = stream, track.raw, track.exact, samples is None
        batch.pending = buckets.pending()
        return batch

    yield from _batches(cfg, slot, stream, start, skips, track, buckets, quota, shared, emit)
    buckets.clear()  # a resampled stream's quota is met: what still waits is not delivered this epoch
    yield emit(None, None)


def _batches(cfg: StreamConfig, slot: int, stream: int, start: StreamPosition | None, skips: list, track: Track,
             buckets: CanvasBuckets, quota: int | None, shared: bool, emit) -> Iterator[Batch]:
    """The batches of ``run_canvas_stream`` (``emit`` makes the items): full buckets as they fill, then, unless
    resampled or ``drop_last``, the partial ones."""
    if quota == 0:
        return
    tagged, restored, made = canvas_input(cfg, slot, stream, skips, track, start)
    if quota is not None:
        quota -= made
        if quota <= 0:
            return
    for n, (url, raw) in restored:
        routed = _route(cfg, url, raw)
        if isinstance(routed, ShardFormatError):
            raise LoaderError(f"resuming stream {stream}: a sample that waited in a bucket is refused now: {routed}")
        buckets.add(routed[0], (n, url, raw, routed[1]))
    fail_limit = 2 * sum(cfg.counts) + 64 if quota is not None and cfg.counts is not None else None
    raws = counting(tagged, track)
    threads = cfg.decode_threads
    with ThreadPoolExecutor(threads) if threads > 1 else NoPool() as pool:
        for canvas, entries in _full_buckets(raws, buckets, cfg, skips, fail_limit):
            yield emit(canvas, *decode_bucket(entries, canvas, cfg, shared, pool, skips))
            if quota is not None:
                quota -= 1
                if quota == 0:
                    raws.close()  # closes the shard being read
                    return
        if quota is None and not cfg.drop_last:
            for canvas, entries in buckets.drain():
                yield emit(canvas, *decode_bucket(entries, canvas, cfg, shared, pool, skips))
