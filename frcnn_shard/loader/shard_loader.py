"""ShardLoader, the iterable of (images, targets) a training loop takes (``make.make_loader`` makes one)."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from .. import anchors as anc
from ..format.manifest import Manifest
from ..malloc import tune_worker_malloc
from .cache import ShardCache
from .collate import Batch
from .decode import DecodeOptions
from .merge import in_stream_order
from .options import DatasetFacts, LoaderError, LoaderOptions
from .plan import EpochPlan, batch_count, canvas_batch_count, plan_epoch
from .repeat import RepeatTable
from .resume import Progress, StreamPosition, dataset_identity, from_state, order_options, to_state
from .sources import Source, shard_canvases, split_url
from .stream import StreamConfig
from .workers import ShardStream

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
        self._canvas_anchors: dict[tuple[int, int], torch.Tensor] = {}  # keep-ratio: anchors_for's cache
        self._anchor_maker: anc.CanvasAnchors | None = None
        self._canvases = shard_canvases(self.manifest, self.urls)  # keep-ratio: samples per canvas of each URL
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
    def keep_ratio(self) -> bool:
        """The shards hold a canvas per sample (``--resize keep-ratio``): a batch is of one canvas."""
        return self.dataset.keep_ratio is not None

    @property
    def anchors(self) -> torch.Tensor:
        """The float32 [A, 4] anchors the targets refer to, from the manifest (count and sha256 verified).

        A keep-ratio build has anchors per canvas: LoaderError, pointing to ``anchors_for``."""
        if self.keep_ratio:
            raise LoaderError("keep-ratio shards have a canvas per batch, and anchors per canvas: use "
                              "loader.anchors_for(t['canvas']) (the batch's (H, W): images.shape[-2:])")
        if self._anchors is None:
            if self.manifest is None:
                raise LoaderError("no manifest: the anchors are unknown (pass manifest= to make_loader)")
            self._anchors = torch.from_numpy(anc.anchors_from_manifest(self.manifest.anchors))  # C-contiguous
        return self._anchors

    def anchors_for(self, canvas_hw: Any) -> torch.Tensor:
        """The float32 [A, 4] anchors of a batch of canvas ``canvas_hw`` (H, W): the build's spec at that canvas,
        which its targets index (cached per canvas). A fixed-canvas loader takes its own canvas only."""
        if self.manifest is None:
            raise LoaderError("no manifest: the anchors are unknown (pass manifest= to make_loader)")
        hw = (int(canvas_hw[0]), int(canvas_hw[1]))
        if not self.keep_ratio:
            if hw != self.manifest.image_hw:
                raise LoaderError(f"these shards have one canvas, {self.manifest.image_hw}, not {hw}")
            return self.anchors
        if hw not in self._canvas_anchors:
            count = self.dataset.anchors_at(hw)
            if count is None:
                raise LoaderError(f"canvas {hw} is not one of the manifest's canvases "
                                  f"({', '.join(f'{h}x{w}' for (h, w), _ in self.dataset.canvas_anchors)})")
            if self._anchor_maker is None:  # verifies the manifest's anchors (count, sha256) on its first use
                self._anchor_maker = anc.CanvasAnchors(self.manifest, keep=0)  # the tensors below are the cache
            anchors = self._anchor_maker.at(hw)
            if len(anchors) != count:
                raise LoaderError(f"the spec gives {len(anchors)} anchors at {hw}, the manifest counts {count}")
            self._canvas_anchors[hw] = torch.from_numpy(anchors)
        return self._canvas_anchors[hw]

    def check_anchors(self, model_anchors: Any, atol: float = 1e-4, canvas_hw: Any = None) -> None:
        """Raise unless a model's own anchor generator gives the shards' anchors, in the same order (keep-ratio:
        those of ``canvas_hw``, the canvas of the batch the model's anchors were made for)."""
        if self.manifest is None:
            raise LoaderError("no manifest: cannot check anchors (pass manifest= to make_loader)")
        # Compared as float32, the shards' dtype; as_numpy takes tensors on any device, Boxes and per-level lists.
        got = anc.as_numpy(model_anchors).astype(np.float32)
        if self.keep_ratio or canvas_hw is not None:
            if canvas_hw is None:
                raise LoaderError("keep-ratio shards have anchors per canvas: pass canvas_hw= (the batch's (H, W))")
            hw = (int(canvas_hw[0]), int(canvas_hw[1]))
            spec = anc.AnchorSpec.from_dict(self.manifest.anchors["spec"]).at(hw)
            self.anchors_for(hw)  # the canvas must be one of the shards'
            anc.check_anchors(got, spec, atol=atol)
            return
        anc.check_anchors(got, self.manifest.anchors, atol=atol)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: shard order, shuffle buffer and anchor sampling are all reseeded from it."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0 (got {epoch})")
        if self._resume is not None and self._resume.epoch != int(epoch):
            self._resume = None  # a loaded state resumes its own epoch only
        self.epoch = int(epoch)

    @property
    def streams(self) -> int:
        """Streams per rank, which the order of an epoch depends on: a loaded state's count, else the
        ``streams`` option (keep-ratio: 8 by default, capped by the shards per rank), else one per worker;
        stream v runs in worker v % num_workers."""
        return self._streams or self.options.streams or self.workers

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
                          world_size=o.world_size, workers=self.streams, resampled=o.resampled,
                          canvas_batch=o.batch_size if self.keep_ratio else None)

    def _slot_counts(self) -> list[int] | None:
        """Samples per stream of this rank in the current epoch (None when the shards' counts are unknown)."""
        if self.counts is None:
            return None
        plan, o = self._plan(), self.options
        slots = [w * o.world_size + o.rank for w in range(self.streams)]
        if plan.quotas is not None:
            return [plan.quotas[s] for s in slots]
        if plan.batches is not None:  # keep-ratio, resampled: full batches only
            return [plan.batches[s] * o.batch_size for s in slots]
        cfg = self._stream_config()
        return [sum(cfg.items_of(i) for i in plan.slots[s]) for s in slots]

    def _slot_canvases(self) -> list[dict[tuple[int, int], int]] | None:
        """Keep-ratio: samples per canvas of each stream of this rank in the current epoch (None: unknown)."""
        if self._canvases is None:
            return None
        plan, o = self._plan(), self.options
        out = []
        for v in range(self.streams):
            per: dict[tuple[int, int], int] = {}
            for i in plan.slots[v * o.world_size + o.rank]:
                shard = self._canvases[i]
                if self.repeat is not None:
                    shard = self.repeat.canvas_items(i, shard, self.epoch)
                for c, n in shard.items():
                    per[c] = per.get(c, 0) + n
            out.append(per)
        return out

    @property
    def num_samples(self) -> int | None:
        """Samples this rank yields in the current epoch (None when the shards' counts are unknown)."""
        per = self._slot_counts()
        return None if per is None else sum(per)

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (each stream ends with its own partial batch; a
        keep-ratio stream with one per canvas)."""
        per = self._slot_counts()
        if per is None:
            raise TypeError("length unknown: the shards' sample counts need a manifest")
        o = self.options
        if self.keep_ratio:
            plan = self._plan()
            if plan.batches is not None:
                return sum(plan.batches[v * o.world_size + o.rank] for v in range(self.streams))
            canvases = self._slot_canvases()
            if canvases is None:
                raise TypeError("length unknown: the manifest's shard entries do not count their canvases")
            return sum(canvas_batch_count(c, o.batch_size, o.drop_last) for c in canvases)
        return sum(batch_count(p, o.batch_size, o.drop_last) for p in per)

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
            progress.take(item.stream, item.raw, item.exact, item.end, item.pending)
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
