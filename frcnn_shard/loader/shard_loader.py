"""ShardLoader, the iterable of (images, targets) a training loop takes, and make_loader, which checks what
it is asked for, resolves the defaults (ranks, workers, decode threads) and says what it changed."""
from __future__ import annotations

import numbers
import os
import warnings
from dataclasses import replace
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from .. import anchors as anc
from ..format.manifest import Manifest
from ..format.members import ShardFormatError
from ..malloc import tune_worker_malloc
from .collate import Batch
from .decode import DecodeOptions
from .merge import in_stream_order
from .options import DEFAULT_SHUFFLE_BUFFER, DatasetFacts, LoaderError, LoaderOptions, LoaderWarning
from .plan import EpochPlan, batch_count, feedable_workers, plan_epoch
from .repeat import RepeatTable, record_labels, repeat_table
from .resume import Progress, StreamPosition, dataset_identity, from_state, order_options, to_state
from .cache import ShardCache
from .sources import Source, dataset_facts, resolve_source, split_url
from .stream import ShardStream, StreamConfig, iter_raw_samples

MAX_SKIP_LOG = 1000  # skip messages kept per epoch; the count itself is never capped


def _init_worker(_: int) -> None:
    """A DataLoader worker of ours keeps the memory it frees (a mirrored sample's images were faulted in afresh)."""
    tune_worker_malloc()


def _passthrough(item: Batch) -> Batch:
    # DataLoader with batch_size=None applies collate_fn per item; ours arrive already collated.
    return item


class ShardLoader:
    """Iterable of (images, targets) over frcnn-shard shards; ``options`` holds what make_loader was given."""

    def __init__(self, src: Source, options: LoaderOptions, dataset: DatasetFacts,
                 storage_options: dict | None = None, repeat: RepeatTable | None = None,
                 cache: ShardCache | None = None):
        self.storage_options = storage_options
        self.cache = cache  # the local cache of remote shards (None: none)
        self.repeat = repeat  # repeat-factor sampling's table (None: every image once per epoch)
        self.urls = list(src.urls)
        self.counts = src.counts
        self.manifest: Manifest | None = src.manifest
        self.options = options
        self.dataset = dataset
        self.epoch = options.epoch
        self.skipped = 0  # samples skipped (on_error="skip") in the current / last epoch
        self.skip_log: list[str] = []  # their messages (at most MAX_SKIP_LOG)
        self.skipped_total = 0
        self._anchors: torch.Tensor | None = None
        self._streams: int | None = None  # streams per rank taken from a loaded state (None: one per worker)
        self._identity = dataset_identity(self.manifest, self.urls)
        self._progress: Progress | None = None  # the current (or last) iteration's place in its epoch
        self._resume: Progress | None = None  # a loaded state's place, taken by the next iteration
        self._plan()  # validate the shard / worker layout now, not at the first batch

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names from the manifest, index = label (0 = background)."""
        if self.manifest is None:
            raise LoaderError("no manifest: the class names are unknown (pass manifest= to make_loader)")
        return tuple(self.manifest.classes)

    @property
    def batch_size(self) -> int:
        """Samples per batch (the last batch of each stream may hold fewer)."""
        return self.options.batch_size

    @property
    def num_workers(self) -> int:
        """DataLoader worker processes (0: batches are made in the calling process)."""
        return self.options.num_workers

    @property
    def anchors(self) -> torch.Tensor:
        """The float32 [A, 4] anchors the targets refer to, from the manifest (count and sha256 verified)."""
        if self._anchors is None:
            if self.manifest is None:
                raise LoaderError("no manifest: the anchors are unknown (pass manifest= to make_loader)")
            self._anchors = torch.from_numpy(anc.anchors_from_manifest(self.manifest.anchors))  # C-contiguous
        return self._anchors

    def check_anchors(self, model_anchors: Any, atol: float = 1e-4) -> None:
        """Raise unless a model's own anchor generator gives the shards' anchors, in the same order."""
        if self.manifest is None:
            raise LoaderError("no manifest: cannot check anchors (pass manifest= to make_loader)")
        # Compared as float32, the shards' dtype; as_numpy takes tensors on any device, Boxes and per-level lists.
        anc.check_anchors(anc.as_numpy(model_anchors).astype(np.float32), self.manifest.anchors, atol=atol)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: shard order, shuffle buffer and anchor sampling are all reseeded from it."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0 (got {epoch})")
        if self._resume is not None and self._resume.epoch != int(epoch):
            self._resume = None  # a loaded state resumes its own epoch only
        self.epoch = int(epoch)

    @property
    def streams(self) -> int:
        """Streams per rank, which the order of an epoch depends on: one per worker, or a loaded state's count
        (its streams then run in the ``num_workers`` processes this loader has)."""
        return self._streams or self.workers

    def _order_options(self) -> dict:
        return order_options(self.options, self.repeat.threshold if self.repeat is not None else None)

    def state_dict(self) -> dict:
        """This rank's place in the current epoch, a small JSON-able dict: after the last batch taken, or the
        epoch's start when none was. ``load_state_dict`` on a loader made the same way continues from it."""
        p = self._resume or self._progress
        if p is None or p.epoch != self.epoch:
            p = Progress(self.epoch, [StreamPosition() for _ in range(self.streams)], -1, 0, self.skipped_total)
        return to_state(p, self._identity, self._order_options())

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from ``state_dict``): the next iteration yields the rest of its epoch,
        exactly, whatever ``num_workers`` is; LoaderError when the state is malformed or another loader's."""
        p = from_state(state, self._identity, self._order_options())
        self._streams = len(p.positions)
        self.epoch, self._resume, self._progress = p.epoch, p, None
        self.skipped, self.skipped_total, self.skip_log = p.skipped, p.skipped_total, []

    @property
    def workers(self) -> int:
        """Streams per rank: DataLoader workers, or 1 when reading in the main process."""
        return max(1, self.options.num_workers)

    def _plan(self) -> EpochPlan:
        o = self.options
        return plan_epoch(len(self.urls), self.counts, seed=o.seed, epoch=self.epoch, shuffle=o.shuffle,
                          world_size=o.world_size, workers=self.streams, resampled=o.resampled)

    def _slot_counts(self) -> list[int] | None:
        """Samples per stream of this rank in the current epoch (None when the shards' counts are unknown)."""
        if self.counts is None:
            return None
        plan, o = self._plan(), self.options
        slots = [w * o.world_size + o.rank for w in range(self.streams)]
        if plan.quotas is not None:
            return [plan.quotas[s] for s in slots]
        cfg = self._stream_config()
        return [sum(cfg.items_of(i) for i in plan.slots[s]) for s in slots]

    @property
    def num_samples(self) -> int | None:
        """Samples this rank yields in the current epoch (None when the shards' counts are unknown)."""
        per = self._slot_counts()
        return None if per is None else sum(per)

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (each worker ends with its own partial batch)."""
        per = self._slot_counts()
        if per is None:
            raise TypeError("length unknown: the shards' sample counts need a manifest")
        return sum(batch_count(p, self.options.batch_size, self.options.drop_last) for p in per)

    def _stream_config(self, progress: Progress | None = None) -> StreamConfig:
        """What each stream of the current epoch needs, picked from the options and the manifest's facts;
        ``progress``: where a resumed epoch's streams stand."""
        o, ds = self.options, self.dataset
        starts = tuple(progress.positions) if progress is not None and progress.started else None
        return StreamConfig(
            urls=tuple(self.urls), counts=tuple(self.counts) if self.counts is not None else None,
            plan=self._plan(), epoch=self.epoch, rank=o.rank, world_size=o.world_size, workers=self.workers,
            seed=o.seed, shuffle_buffer=o.shuffle_buffer if o.shuffle else 0, on_error=o.on_error,
            batch_size=o.batch_size, drop_last=o.drop_last, decode_threads=o.decode_threads, dataset=ds,
            decode=DecodeOptions(o.seed, o.hflip, o.rpn_batch_size, o.positive_fraction, o.image_transform),
            norm=(ds.mean, ds.std) if o.normalize else None, storage_options=self.storage_options,
            streams=self.streams, starts=starts, first=max(0, progress.first_turn()) if starts else 0,
            repeat=self.repeat, cache=self.cache, digests=self._digests())

    def _digests(self) -> tuple[tuple[str, int], ...] | None:
        """(sha256, bytes) of each URL's shard, from its manifest entry (the cache checks every shard by them)."""
        if self.cache is None or self.manifest is None:
            return None
        entries = {s.name: (s.sha256, s.bytes) for s in self.manifest.shards}
        return tuple(entries[split_url(u)[1]] for u in self.urls)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[dict]]]:
        o = self.options
        resumed = self._resume is not None and self._resume.epoch == self.epoch
        progress = self._resume if resumed else Progress(
            self.epoch, [StreamPosition() for _ in range(self.streams)], -1, 0, self.skipped_total)
        self._resume, self._progress = None, progress
        self.skipped, self.skip_log = progress.skipped, []
        live = [v for v, p in enumerate(progress.positions) if not p.ended]
        if not live:
            return
        stream = ShardStream(self._stream_config(progress))
        if o.num_workers == 0:
            items = iter(stream)
        else:
            kw = {"prefetch_factor": o.prefetch_factor} if o.prefetch_factor else {}
            # Pinning happens in unpack, on the dense tensors the training loop receives.
            items = iter(torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=o.num_workers, collate_fn=_passthrough, timeout=o.timeout,
                worker_init_fn=_init_worker, **kw,
            ))
        for item in in_stream_order(items, live, progress.first_turn()):
            progress.take(item.stream, item.raw, item.exact, item.end)
            if item.skipped:
                self.skipped += item.skipped
                self.skipped_total += item.skipped
                progress.skipped, progress.skipped_total = self.skipped, self.skipped_total
                self.skip_log.extend(item.skip_log[: max(0, MAX_SKIP_LOG - len(self.skip_log))])
            if item.images is None:
                continue
            yield item.unpack(o.pin_memory)

    def __repr__(self) -> str:
        o = self.options
        return (f"ShardLoader({len(self.urls)} shards, batch_size={o.batch_size}, rank={o.rank}/"
                f"{o.world_size}, workers={o.num_workers}, epoch={self.epoch}, resampled={o.resampled})")


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


def _resolved(opts: LoaderOptions, n_shards: int) -> LoaderOptions:
    """The options (rank and world_size resolved) with num_workers and decode_threads resolved too; warns
    what it changed."""
    world_size = opts.world_size
    workers = _workers(opts.num_workers, n_shards, world_size, opts.strict)
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
    return replace(opts, num_workers=int(workers), decode_threads=int(threads))


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
    per_shard = []
    digests = {s.name: (s.sha256, s.bytes) for s in src.manifest.shards} if src.manifest is not None else {}
    for url, count in zip(src.urls, src.counts):
        pairs = []
        name = split_url(url)[1]
        cached = (cache, *digests[name]) if cache is not None and name in digests else None
        for where, raw in iter_raw_samples(url, opts.on_error, [], count, storage_options, None, cached):
            try:
                pairs.append((raw.key, record_labels(raw, dataset.image_hw, dataset.num_classes)))
            except Exception as e:  # noqa: BLE001 - json and the record rules raise assorted types on bad bytes
                if opts.on_error == "raise":
                    raise ShardFormatError(f"{where}: key {raw.key!r}: {type(e).__name__}: {e}") from e
        per_shard.append(pairs)
    return repeat_table(per_shard, threshold, opts.seed)


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
        hflip=hflip, image_transform=image_transform, decode_threads=decode_threads)
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
    return ShardLoader(src, _resolved(opts, len(src.urls)), dataset, storage_options, repeat, cache)
