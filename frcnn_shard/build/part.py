"""One part of a build, run: source rows -> worker pool (decode, resize, encode, match anchors) -> ordered
part writer, under the part's lock.

Output is a pure function of (source rows, options): the writer keeps source order and the tars are
reproducible, so the worker count never changes a byte. ``PartRun`` carries one part's run state (options,
collaborators, pool, store, layout, header) through its steps; every engine runs parts through it.
"""
from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, replace
from typing import Callable

from .. import anchors as anc
from ..errors import BuildError, BuildInterrupted
from ..format.layout import Layout
from ..format.names import shard_name
from ..records import Dropped, Sample
from ..shards import read_manifest
from ..sources import open_source
from ..storage import open_store
from ..transform import KEEP_RATIO, process_row
from .header import make_header, output_options
from .options import BuildOptions, anchor_spec, resolve_device
from .parts import acquire_lock, holder, release_lock, utc_now
from .pool import chunks, interrupt_on_sigterm, ordered_results, signum, start_pool, stop_pool
from .results import BuildResult, part_result, split_result
from .resume import prepare_part, remove_dead_partials
from .rows import resilient_rows
from .worker import DROP_PROCESSING_ERROR, ProcessRow, pack, process_chunk
from .writer import PartWriter

log = logging.getLogger("frcnn_shard.build")
# (boxes per image, crowd boxes per image, canvas (H, W) per image) -> [(labels, matched)]
MatchBatch = Callable[[list, list, list], list]


@dataclass(frozen=True)
class Collaborators:
    """What a build calls that a test or a benchmark may replace (keyword arguments of build and build_part)."""

    open_source: Callable = open_source  # sources.open_source: the source spec -> a Source
    process_row: ProcessRow = process_row  # transform.process_row: a row -> a Sample (runs in the workers)
    resolve_device: Callable[[str], str] = resolve_device  # options.resolve_device: "auto" -> "cpu" / "cuda"
    # Batched matching elsewhere (the Ray engine's GPU actors, a test's CPU stand-in for a GPU); None: in the
    # workers, or batch_matcher on this machine's GPU when the device is cuda.
    match_batch: MatchBatch | None = None


def batch_matcher(spec: anc.AnchorSpec, cfg: anc.MatchConfig, device: str) -> MatchBatch:
    """A match_batch for ``device``: one batched anchors.match_batch_torch per canvas in the batch (one for a fixed
    canvas), each canvas's anchors made once (this machine's GPU path and the Ray engine's matching actors alike)."""
    made: dict[tuple[int, int], object] = {}

    def match_batch(boxes: list, crowd: list, canvases: list) -> list:
        out: list = [None] * len(boxes)
        for canvas in dict.fromkeys((int(h), int(w)) for h, w in canvases):  # in first-seen order
            idx = [i for i, c in enumerate(canvases) if (int(c[0]), int(c[1])) == canvas]
            if canvas not in made:
                made.clear()  # a batch's canvases come and go: keep one set of anchors on the device
                made[canvas] = anc.make_anchors(spec.at(canvas))
            res = anc.match_batch_torch(made[canvas], [boxes[i] for i in idx], [crowd[i] for i in idx], cfg, canvas,
                                        device=device)
            for i, r in zip(idx, res):
                out[i] = r
        return out

    return match_batch


def open_output(opts: BuildOptions, spec: anc.AnchorSpec, open_source: Callable = open_source) -> tuple:
    """(source, store of the split, layout, header): what every part of a build, on any engine, agrees on."""
    opts = replace(opts, source=_without_trailing_slash(opts.source))  # "DIR/" and "DIR" are one source
    source = open_source(opts.source, opts.split, revision=opts.revision, bbox_format=opts.bbox_format,
                         detect_rows=opts.detect_rows, image_dir=opts.image_dir, classes=opts.classes,
                         hub_crowd=opts.hub_crowd)
    split = source.info["split"]
    store = open_store(opts.out, opts.storage_options).sub(split)
    store.makedirs()
    layout = Layout(min(source.num_rows, opts.max_rows or source.num_rows), opts.rows_per_shard)
    return source, store, layout, make_header(opts, source, output_options(opts, split, spec), layout)


def _without_trailing_slash(source: str) -> str:
    """A source folder's name without trailing slashes (the root stays "/"); a Hub id has none."""
    head, sep, path = source.rpartition("coco:") if source.startswith("coco:") else ("", "", source)
    return head + sep + (path.rstrip("/") or path[:1])


class PartRun:
    """One run of part I of N: the worker pool, then (under the part's lock) resume or start, the rows
    through the workers into the part writer, and what the part did."""

    def __init__(self, opts: BuildOptions, part: tuple[int, int], progress: Callable[[dict], None] | None = None,
                 using: Collaborators = Collaborators()):
        self.t0 = time.perf_counter()
        self.opts, self.part, self.progress, self.using = opts, part, progress, using
        # Matching elsewhere (the Ray engine's GPU actors) is batched matching, as on a GPU here.
        self.device = "cuda" if using.match_batch is not None else using.resolve_device(opts.device)
        self.spec = anchor_spec(opts)
        self.match_batch = using.match_batch
        self.pool = None
        self.source = self.store = self.layout = self.header = None

    def run(self) -> BuildResult:
        """Start the worker pool (or set this process up), build the part, wind the pool down."""
        opts, batched = self.opts, self.device == "cuda"
        old_term, finished = None, False
        try:
            initargs = (opts.transform, self.spec, opts.matching, not batched, opts.flip_targets)
            self.pool = start_pool(opts.workers, initargs, self.using.process_row)
            old_term = interrupt_on_sigterm()
            if batched and self.match_batch is None:
                self.match_batch = batch_matcher(self.spec, opts.matching, self.device)
            res = self._under_lock()
            finished = True
            return res
        except KeyboardInterrupt as e:  # before the first row (opening the source, ...): nothing was written yet
            raise BuildInterrupted("interrupted before any row was processed; nothing new was written. "
                                   "Run the same command again to resume.", signum(e)) from None
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            if self.pool is not None:
                stop_pool(self.pool, finished)

    def _under_lock(self) -> BuildResult:
        """Open the source and output, take the part's lock, build, give the lock back (also on failure)."""
        self.source, self.store, self.layout, self.header = open_output(self.opts, self.spec, self.using.open_source)
        lock = acquire_lock(self.store, *self.part, self.layout.part_shards(*self.part))
        try:
            res = self._resume_or_build()
        except BaseException:
            try:
                release_lock(self.store, lock)
            except OSError:
                pass  # the store is unreachable (the likely cause of the failure): its message is the one to keep
            raise
        release_lock(self.store, lock)
        return res

    def _resume_or_build(self) -> BuildResult:
        """The part's work once its lock is held: resume or start, run, and the part's result."""
        opts, store = self.opts, self.store
        shards = self.layout.part_shards(*self.part)
        if not store.is_local:  # uploads a killed run left unfinished (invisible, but they hold storage)
            store.abort_uploads(shard_name(self.source.info["split"], i) for i in shards)
        record = prepare_part(store, self.header, self.part, shards, opts)
        if record is None:
            return split_result(store, read_manifest(store), "already complete", self.device, self.t0)
        was_complete, resumed = record["complete"], len(record["shards"])
        record["run"] = {**holder(), "workers": opts.workers, "device": self.device, "engine": opts.engine,
                         "started": utc_now()}
        w = PartWriter(store, self.layout, shards, record, self.progress)
        rows_before = w.rows_done
        if not was_complete:
            if store.is_local:  # interrupted writes: this part's own (or, for the whole build, any)
                remove_dead_partials(store, None if opts.part is None else shards)
            self._stream(w)
        if was_complete and opts.part is not None:
            status = "already complete"
        else:
            status = "resumed" if resumed else "built"
        return part_result(store, record, status, self.device, self.t0, resumed, rows_read=w.rows_done - rows_before)

    def _results(self, w: PartWriter):
        """The processed rows of the part's missing shards, in source order (from the pool, or in-process)."""
        fmt = self.source.bbox_format["decision"]
        rows = (row for start, stop in w.missing_rows()
                for row in resilient_rows(self.source, start, stop, self.opts))
        jobs = ((fmt, chunk) for chunk in chunks(rows, self.opts.chunk_size))
        if self.pool is not None:
            return ordered_results(self.pool, jobs, max_inflight=4 * self.opts.workers)
        return (r for job in jobs for r in process_chunk(job))

    def _stream(self, w: PartWriter) -> None:
        """Stream the rows of the part's missing shards through the workers into the writer; on failure drop
        only the open shard."""
        kept = f"the shards published so far are kept in {w.store.url}"
        try:
            buffer: list = []
            for item in self._results(w):
                buffer.append(item)
                if self.match_batch is not None and sum(isinstance(i, Sample) for i, _ in buffer) < self.opts.gpu_batch:
                    continue
                _write_items(self._matched(buffer), w)
                buffer = []
            _write_items(self._matched(buffer), w)
            w.finish()
        except KeyboardInterrupt as e:
            w.abort()
            raise BuildInterrupted(f"interrupted; {kept}. Run the same command again to resume after the last "
                                   "complete shard.", signum(e)) from None
        except BuildError as e:  # the source failed, a worker died
            w.abort()
            raise type(e)(f"{e}. The unfinished shard was removed; {kept}. Run the same command again to resume "
                          "after the last complete shard.") from e.__cause__
        except OSError as e:
            w.abort()
            raise BuildError(f"write failed in {w.store.url} (writing {w.writing}): {e}. The unfinished shard was "
                             f"removed; {kept}. Fix the cause (space, permissions, the storage service) and run the "
                             "same command again to resume.") from e
        except BaseException:
            w.abort()
            raise

    def _matched(self, buffer: list) -> list:
        """The buffered items with the anchors of their samples matched in one batched call (a GPU, here or in a
        Ray actor); as they are when the workers matched them."""
        samples = [item for item, _ in buffer if isinstance(item, Sample)]
        if self.match_batch is None or not samples:
            return buffer
        flip = self.opts.flip_targets
        keep_ratio = self.opts.transform.resize == KEEP_RATIO
        # The mirrored images ride in the same call: one batch of 2n images, the first n as stored.
        records = [s.record for s in samples] + ([s.record.hflip(content=keep_ratio) for s in samples] if flip else [])
        results = self.match_batch([r.boxes for r in records], [r.crowd_boxes for r in records],
                                   [r.size for r in records])
        n = len(samples)
        flipped = results[n:] if flip else [None] * n
        packed = iter([pack(s, stored, f) for s, stored, f in zip(samples, results[:n], flipped)])
        return [(item, next(packed) if isinstance(item, Sample) else None) for item, _ in buffer]


def _write_items(batch: list, w: PartWriter) -> None:
    """Hand processed items to the writer in order."""
    for item, targets in batch:
        if isinstance(item, Dropped):
            if item.reason == DROP_PROCESSING_ERROR:
                log.warning("row %d (image id %d) dropped: %s", item.index, item.image_id, item.detail)
            w.drop(item)
        else:
            w.add(item, targets)


def build_part(opts: BuildOptions, part: tuple[int, int], progress: Callable[[dict], None] | None = None, *,
               match_batch: MatchBatch | None = None, open_source: Callable = open_source,
               process_row: ProcessRow = process_row, resolve_device: Callable[[str], str] = resolve_device
               ) -> BuildResult:
    """Build (or resume) part I of N of a split: its shards and its part record; returns what it did.

    ``match_batch(boxes_list, crowd_list)``, when given, matches the anchors of a batch elsewhere (the
    Ray engine's GPU actors); otherwise matching runs in the workers, or batched on this machine's GPU.
    ``open_source``, ``process_row``, ``resolve_device``: the other collaborators (Collaborators), for tests.
    """
    using = Collaborators(open_source, process_row, resolve_device, match_batch)
    return PartRun(opts, part, progress, using).run()
