"""make_loader: checks what it is asked for, resolves the defaults (ranks, workers, streams, decode threads),
says what it changed, and makes the ShardLoader."""
from __future__ import annotations

import numbers
import os
import warnings
from dataclasses import replace
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..format.members import ShardFormatError
from .cache import ShardCache
from .options import DEFAULT_CANVAS_STREAMS, DEFAULT_SHUFFLE_BUFFER, DatasetFacts, LoaderError, LoaderOptions, LoaderWarning
from .plan import feedable_workers
from .repeat import RepeatTable, record_facts, repeat_table
from .shard_loader import ShardLoader
from .sources import Source, dataset_facts, resolve_source, split_url
from .stream import iter_raw_samples


def _dist_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """rank/world_size as given, else from torch.distributed when initialised, else 0/1."""
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
    rank = 0 if rank is None else int(rank)
    world_size = 1 if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise LoaderError(f"need 0 <= rank < world_size (got rank={rank}, world_size={world_size})")
    return rank, world_size


def _workers(asked: int | None, n_shards: int, world_size: int, strict: bool) -> int:
    """The DataLoader workers per rank: as asked when the shards feed them all, else fewer (with a warning)."""
    if asked is None:
        workers = max(0, min(4, os.cpu_count() or 1, n_shards // world_size))
        return 0 if workers == 1 else workers  # one worker only adds IPC
    if asked > 0:
        fed = feedable_workers(n_shards, world_size, asked, strict)
        if fed != asked:
            warnings.warn(f"{n_shards} shard(s) feed {fed} worker(s) per rank, not the {asked} asked for "
                          f"(each stream reads whole shards); using {fed}. Pass strict=True to make this an error.",
                          LoaderWarning, stacklevel=4)
            return fed
    return asked


def _stream_count(opts: LoaderOptions, n_shards: int, keep_ratio: bool) -> int | None:
    """Streams per rank when the order is fixed whatever the workers: as asked, fed by the shards (fewer, with a
    warning, or an error when strict); for keep-ratio by default DEFAULT_CANVAS_STREAMS capped by the shards
    per rank. None: one stream per worker (a fixed-canvas loader's default, as before)."""
    per_rank = max(1, n_shards // opts.world_size)
    if opts.streams is None:
        return min(DEFAULT_CANVAS_STREAMS, per_rank) if keep_ratio else None
    if n_shards >= opts.world_size * opts.streams:
        return opts.streams
    if opts.strict:
        raise LoaderError(f"{n_shards} shard(s) cannot feed {opts.world_size} rank(s) x {opts.streams} stream(s) "
                          "(each stream reads whole shards); ask for fewer streams, or rebuild with a smaller "
                          "rows_per_shard")
    warnings.warn(f"{n_shards} shard(s) feed {per_rank} stream(s) per rank, not the {opts.streams} asked for (each "
                  f"stream reads whole shards); using {per_rank}. Pass strict=True to make this an error.",
                  LoaderWarning, stacklevel=4)
    return per_rank


def _stream_workers(asked: int | None, streams: int) -> int:
    """The DataLoader workers of a loader with a fixed stream count: as asked, at most one per stream (a
    worker without a stream would idle); None: min(4, CPUs, streams), 0 when that is 1."""
    if asked is None:
        workers = min(4, os.cpu_count() or 1, streams)
        return 0 if workers == 1 else workers
    if asked > streams:
        warnings.warn(f"{streams} stream(s) per rank feed {streams} worker(s), not the {asked} asked for (stream v "
                      f"runs in worker v mod num_workers); using {streams}. Pass streams= for more.",
                      LoaderWarning, stacklevel=4)
        return streams
    return asked


def _resolved(opts: LoaderOptions, n_shards: int, keep_ratio: bool = False) -> LoaderOptions:
    """The options (rank and world_size resolved) with streams, num_workers and decode_threads resolved too;
    warns what it changed."""
    world_size = opts.world_size
    streams = _stream_count(opts, n_shards, keep_ratio)
    if streams is None:
        workers = _workers(opts.num_workers, n_shards, world_size, opts.strict)
    else:
        workers = _stream_workers(opts.num_workers, streams)
    if n_shards < world_size and not opts.resampled:
        feedable_workers(n_shards, world_size, 1, opts.strict)  # raises when strict
        warnings.warn(f"{n_shards} shard(s) for {world_size} ranks: rank(s) {n_shards}..{world_size - 1} get "
                      "no samples this epoch (pass resampled=True for equal ranks)", LoaderWarning, stacklevel=3)
    if opts.pin_memory and not torch.cuda.is_available():
        # As torch's DataLoader does: pinned memory needs an accelerator; without one it is a no-op.
        warnings.warn("pin_memory=True but no CUDA device is available: batches are not pinned",
                      LoaderWarning, stacklevel=3)
        opts = replace(opts, pin_memory=False)
    threads = opts.decode_threads
    if threads is None:  # in the calling process the CPUs would idle between samples; workers have theirs
        threads = min(os.cpu_count() or 1, opts.batch_size) if workers == 0 and opts.image_transform is None else 0
    return replace(opts, num_workers=int(workers), decode_threads=int(threads), streams=streams)


def _shard_cache(src: Source, cache_dir: str | os.PathLike | None, cache_limit: int | None) -> ShardCache | None:
    """The shard cache asked for, checked: it needs the manifest (each shard's sha256 and size)."""
    if cache_dir is None:
        if cache_limit is not None:
            raise LoaderError("cache_limit needs cache_dir (the folder the remote shards are cached in)")
        return None
    if cache_limit is not None and (isinstance(cache_limit, bool) or not isinstance(cache_limit, int)
                                    or cache_limit < 0):
        raise LoaderError(f"cache_limit must be a byte count >= 0 or None (got {cache_limit!r})")
    if src.manifest is None:
        raise LoaderError("cache_dir needs the shards' manifest: every cached shard is checked against its sha256")
    listed = {s.name for s in src.manifest.shards}
    missing = [u for u in src.urls if split_url(u)[1] not in listed]
    if missing:
        raise LoaderError(f"cache_dir: shard {missing[0]!r} has no manifest entry (no sha256 to check it against)")
    return ShardCache(os.fspath(cache_dir), cache_limit)


def _repeat_table(src: Source, dataset: DatasetFacts, opts: LoaderOptions, threshold: float,
                  storage_options: dict | None, cache: ShardCache | None) -> RepeatTable:
    """Repeat-factor sampling's table from one pass over the shards' JSON records (the labels each image holds).

    A record that breaks the record rules raises ShardFormatError, or with on_error="skip" counts as an
    image without classes (the loader skips it anyway when it comes to decode it).
    """
    if src.counts is None:
        raise LoaderError("repeat_factor_threshold needs the shards' manifest (the per-shard counts and classes)")
    per_shard, canvases = [], []
    digests = {s.name: (s.sha256, s.bytes) for s in src.manifest.shards} if src.manifest is not None else {}
    for url, count in zip(src.urls, src.counts):
        pairs, canvas_of = [], {}
        name = split_url(url)[1]
        cached = (cache, *digests[name]) if cache is not None and name in digests else None
        for where, raw in iter_raw_samples(url, opts.on_error, [], count, storage_options, None, cached):
            try:
                labels, canvas_of[raw.key] = record_facts(raw, dataset.record_canvas, dataset.num_classes)
                pairs.append((raw.key, labels))
            except Exception as e:  # noqa: BLE001 - json and the record rules raise assorted types on bad bytes
                if opts.on_error == "raise":
                    raise ShardFormatError(f"{where}: key {raw.key!r}: {type(e).__name__}: {e}") from e
        per_shard.append(pairs)
        canvases.append(canvas_of)
    return repeat_table(per_shard, threshold, opts.seed, canvases if dataset.keep_ratio is not None else None)


def make_loader(  # long because its signature and Args name every option (the issue asks for no **options)
    source: str | os.PathLike | Sequence[str],
    batch_size: int,
    *,
    manifest: Mapping | str | os.PathLike | None = None,
    num_anchors: int | None = None,
    allow_incomplete: bool = False,
    storage_options: dict | None = None,
    shuffle: bool = True,
    num_workers: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    rpn_batch_size: int | None = 256,
    positive_fraction: float = 0.5,
    normalize: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    resampled: bool = False,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    on_error: str = "raise",
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = 2,
    timeout: float = 0,
    strict: bool = False,
    hflip: float = 0.0,
    image_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    decode_threads: int | None = None,
    streams: int | None = None,
    repeat_factor_threshold: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_limit: int | None = None,
) -> ShardLoader:
    """A loader of (images [B,3,H,W], targets) from a split folder (local or a URL such as s3://...), its
    manifest.json, a URL list or a brace pattern. Every option is checked here (LoaderError names the bad one).

    Args:
        source: a split folder, its manifest.json, shard URLs or a brace pattern (``train-{000000..000009}.tar``).
        batch_size: samples per batch (each stream's last batch may hold fewer).
        manifest: describes shards given as URLs: a dict, a split folder or a manifest.json path / URL.
        num_anchors: lets shards without a manifest be read at all.
        allow_incomplete: read the shards an unfinished build published so far.
        storage_options: passed to fsspec for shards on object storage.
        shuffle: shuffle the shard order and the samples (from seed and epoch: an epoch repeats exactly).
        num_workers: DataLoader workers per rank; None: min(4, CPUs, shards per rank), 0 when that is 1.
        seed, epoch: every random draw's source (the shard order, shuffle buffer, anchor sample, flip).
        rpn_batch_size: anchors sampled per image; None delivers the stored labels.
        positive_fraction: at most this share of the sample is positive.
        normalize: float32 normalised [B,3,H,W]; False: uint8 (``normalize_batch`` later, on the device).
        rank, world_size: this process's place in distributed training; None: from torch.distributed, else 0/1.
        resampled: every rank yields the same number of samples (shards drawn again to fill it).
        shuffle_buffer: encoded samples held for the sample-level shuffle.
        on_error: "raise", or "skip": count and log bad samples (``skipped``, ``skip_log``) instead.
        drop_last: drop each stream's last partial batch.
        pin_memory, prefetch_factor, timeout: as torch's DataLoader's.
        strict: fewer shards than streams is an error (else fewer workers, with a LoaderWarning).
        hflip: the probability that a sample is mirrored left-right (needs shards with flip targets).
        image_transform: uint8 HWC -> the same shape and dtype, applied to each image after decoding.
        decode_threads: threads decoding a batch side by side; None: one per CPU (at most the batch size)
            in the calling process without image_transform, else 0.
        streams: streams per rank, fixed whatever num_workers is, so that the order of an epoch depends on
            (seed, epoch) alone; each reads whole shards, stream v runs in worker v mod num_workers. None: for
            keep-ratio shards min(8, shards per rank); else one per worker (the order then depends on it).
        repeat_factor_threshold: t of LVIS's repeat-factor sampling (images with rare classes repeat in an
            epoch); None: every image once. The class frequencies come from one pass over the records, here.
        cache_dir, cache_limit: a local folder keeping the shards read from object storage, each checked
            against the manifest's sha256 before use, at most ``cache_limit`` bytes (None: no limit; LRU).
    """
    opts = LoaderOptions(
        batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, seed=seed, epoch=epoch,
        rpn_batch_size=rpn_batch_size, positive_fraction=positive_fraction, normalize=normalize, rank=rank,
        world_size=world_size, resampled=resampled, shuffle_buffer=shuffle_buffer, on_error=on_error,
        drop_last=drop_last, pin_memory=pin_memory, prefetch_factor=prefetch_factor, timeout=timeout, strict=strict,
        hflip=hflip, image_transform=image_transform, decode_threads=decode_threads, streams=streams)
    rank, world_size = _dist_defaults(opts.rank, opts.world_size)  # a bad layout is refused before any I/O
    opts = replace(opts, rank=rank, world_size=world_size)
    src = resolve_source(source, manifest, allow_incomplete, storage_options)
    dataset = dataset_facts(src.manifest, source, num_anchors)
    if opts.hflip > 0 and dataset.flip_targets is False:
        raise LoaderError(f"hflip={opts.hflip} needs the mirrored images' anchor targets, but {source!r} was built "
                          "with --no-flip-targets (flip_targets=False): rebuild without it, or pass hflip=0")
    cache = _shard_cache(src, cache_dir, cache_limit)
    repeat = None
    if repeat_factor_threshold is not None:
        t = repeat_factor_threshold
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 < t <= 1.0:
            raise LoaderError(f"repeat_factor_threshold must be a fraction within (0, 1] or None (got {t!r})")
        repeat = _repeat_table(src, dataset, opts, float(t), storage_options, cache)
    opts = _resolved(opts, len(src.urls), dataset.keep_ratio is not None)
    return ShardLoader(src, opts, dataset, storage_options, repeat, cache)
