"""The build: source rows -> worker pool (decode, resize, encode, match anchors) -> ordered shard writer.

Output is a pure function of (source rows, options): the writer keeps source order and the tars are
reproducible, so the worker count never changes a byte. A shard is published atomically and the
manifest rewritten after each one, which is what makes an interrupted build resumable.
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from . import __version__, anchors as anc
from .errors import (  # noqa: F401 - re-exported for callers of the build
    BuildError, BuildInterrupted, LockedError, MergeError, OptionError, PartRecordError, SourceError,
)
from .format import FORMAT_VERSION
from .malloc import tune_worker_malloc
from .format.members import sample_members
from .format.record import Record
from .format.targets import label_counts, pack_targets
from .labels import CLASS_NAMES
from .records import Dropped, Sample, SourceRow
from .shards import (
    MANIFEST_NAME, PARTIAL_SUFFIX, SHARD_RE, ShardInfo, ShardWriter, fault_point, read_manifest, shard_name,
)
from .parts import (
    DROPS_NAME, PARTS_DIR, Layout, acquire_lock, differing_keys, holder, merge, parse_part, read_records,
    record_name, release_lock, same_build, shard_differs, sum_counts, take_over, write_record,
)
from .sources import BBOX_FORMAT_CHOICES, DEFAULT_HUB_ID, open_source
from .storage import StorageError, open_store
from .transform import (
    DROP_CORRUPT_IMAGE, DROP_MISSING_IMAGE, DROP_SIZE_MISMATCH, DROP_TOO_MANY_PIXELS, IMAGENET_MEAN, IMAGENET_STD,
    TransformConfig, process_row,
)

# A row whose processing raised something other than the transform's own image errors (a Pillow
# oddity, a bug): dropped and counted under this reason, with the exception logged.
DROP_PROCESSING_ERROR = "processing_error"
# A row whose image id was already written (the writer keeps the first).
DROP_DUPLICATE_IMAGE_ID = "duplicate_image_id"
# Image drop reasons that mean broken input (counted against max_bad_fraction); "no_boxes" is not
# one of them: COCO itself has images without annotations.
BAD_INPUT_REASONS = (DROP_MISSING_IMAGE, DROP_CORRUPT_IMAGE, DROP_TOO_MANY_PIXELS, DROP_SIZE_MISMATCH,
                     DROP_DUPLICATE_IMAGE_ID, DROP_PROCESSING_ERROR)
DEVICES = ("auto", "cpu", "cuda")  # where anchor targets are matched
ENGINES = ("local", "ray")  # what runs the parts
MAX_RETRY_DELAY_S = 60.0  # the backoff doubles per consecutive failure, up to this
_POLL_S = 0.5  # how often a wait on the worker pool checks that no worker died
_TEARDOWN_S = 3.0  # the longest a stopped build waits for its worker pool to wind down before killing it
log = logging.getLogger("frcnn_shard.build")


# Exceptions from these packages come from the network layer (Hub streaming); they are retried.
_NETWORK_MODULES = ("aiohttp", "httpx", "httpcore", "urllib3", "requests", "huggingface_hub", "fsspec")
# OSErrors that are about local files or the disk, not the network: retrying cannot help.
_LOCAL_OSERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_LOCAL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def is_transient(exc: BaseException) -> bool:
    """True for an error worth retrying: ConnectionError, TimeoutError, other OSErrors except local-file
    and full-disk ones, and any exception from a network package (aiohttp, httpx, requests, ...)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return not isinstance(exc, _LOCAL_OSERRORS) and exc.errno not in _LOCAL_ERRNOS
    return type(exc).__module__.split(".")[0] in _NETWORK_MODULES


def parse_storage_options(text: str) -> dict:
    """The --storage-options JSON object (ValueError when it is not one; the values are never echoed)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"must be a JSON object ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, got a {type(value).__name__}")
    return value


@dataclass(frozen=True)
class BuildOptions:
    """Everything `frcnn-shard build` takes; the output-shaping part is recorded in the manifest."""

    # A field's "help" is its documentation and makes it a command-line option (cli.py builds the
    # options from these fields); "choices" and "parse" say how the option's text is read.
    source: str = field(default=DEFAULT_HUB_ID, metadata={
        "help": "Hub dataset id, a local folder in the Hub's layout, or coco:DIR (official COCO layout)."})
    split: str = field(default="train", metadata={"help": "train / val (hub); train2017 / val2017 (coco:)."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit).", "type": str})
    out: str = field(default="shards", metadata={"help": "Output root; shards go to OUT/<split>/."})
    bbox_format: str = field(default="auto", metadata={
        "help": "How the source's bbox is written; auto decides from geometry and records the evidence.",
        "choices": BBOX_FORMAT_CHOICES})
    transform: TransformConfig = field(default_factory=TransformConfig)
    anchor_preset: str = field(default=anc.DEFAULT_PRESET, metadata={
        "help": "The anchor layout (docs/FORMAT.md lists each preset's sizes, ratios and strides).",
        "choices": anc.PRESETS})
    anchor_sizes: tuple | None = field(default=None, metadata={
        "help": "Override sizes per level, e.g. 32,64,128,256,512 (or 32/40,... for several).", "parse": anc.parse_sizes})
    anchor_ratios: tuple | None = field(default=None, metadata={
        "help": "Override aspect ratios, e.g. 0.5,1,2 (in the preset's convention).", "parse": anc.parse_numbers})
    anchor_strides: tuple | None = field(default=None, metadata={
        "help": "Override strides per level, e.g. 4,8,16,32,64.", "parse": anc.parse_numbers})
    matching: anc.MatchConfig = field(default_factory=anc.MatchConfig)
    flip_targets: bool = field(default=True, metadata={
        "help": "Also store the anchor targets of the horizontally mirrored image, for the loader's hflip "
                "(a few hundred bytes per sample, docs/BENCHMARKS.md)."})
    rows_per_shard: int = field(default=1000, metadata={
        "help": "Source rows per shard: shard i holds the kept samples of rows [i*N, (i+1)*N), so every way of "
                "running the build writes the same shards."})
    max_rows: int | None = field(default=None, metadata={
        "help": "Build only the first N rows of the split (quick runs).", "type": int})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "Exit non-zero when more than this fraction of rows is skipped as bad input."})
    workers: int = field(default_factory=lambda: os.cpu_count() or 1, metadata={
        "help": "Worker processes (0: in-process)."})
    device: str = field(default="auto", metadata={
        "help": "Where anchor targets are matched (auto: CUDA when available).", "choices": DEVICES})
    gpu_batch: int = field(default=64, metadata={"help": "Images per batched GPU matching call."})
    chunk_size: int = 8  # rows per task sent to a worker
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing build with different options."})
    detect_rows: int = 200  # rows examined to decide the bbox format
    retries: int = field(default=5, metadata={
        "help": "Consecutive transient source errors (dropped connection, timeout) retried before stopping."})
    retry_backoff: float = field(default=1.0, metadata={
        "help": "Seconds before the first retry; doubles per consecutive failure (at most 60 s)."})
    part: tuple[int, int] | None = field(default=None, metadata={
        "help": "Build only part I of N (0 <= I < N), e.g. 3/16, or auto (SLURM_ARRAY_TASK_ID/COUNT, else "
                "RANK/WORLD_SIZE); run `frcnn-shard merge` once every part is done.", "parse": parse_part})
    engine: str = field(default="local", metadata={
        "help": "local: this machine; ray: the parts as Ray tasks on a cluster (RAY_ADDRESS or --ray-address, "
                "else a local one), merged at the end.", "choices": ENGINES})
    ray_address: str | None = field(default=None, metadata={"help": "The Ray cluster to use (default: RAY_ADDRESS).",
                                                            "type": str})
    storage_options: dict | None = field(default=None, metadata={
        "help": "JSON object of fsspec options for --out (e.g. endpoint, profile); secrets are never logged or "
                "recorded. The standard AWS_* settings work without it.", "parse": parse_storage_options})


@dataclass
class BuildResult:
    """What the build (or one part of it) did, for the CLI's summary."""

    out_dir: Path | str  # the split's folder (a URL for object storage)
    status: str  # "built", "resumed", "already complete"
    samples: int
    shards: int
    bytes: int
    rows: int
    drops: dict
    box_drops: dict
    bbox_format: dict
    device: str
    seconds: float
    resumed_shards: int = 0
    bad_fraction: float = 0.0
    part: tuple[int, int] | None = None  # (I, N) for a part build; None for the whole build
    dropped: list = field(default_factory=list)  # the first dropped rows (drop records)
    drops_file: str | None = None  # where every dropped row is listed
    rows_read: int = 0  # source rows this run read (a resumed or finished build reads fewer than ``rows``)


# ---------------------------------------------------------------------------------------------
# Worker side: one process-global state, set once per worker by the pool initializer.

_W: dict = {}


def _init_worker(tcfg: TransformConfig, spec: anc.AnchorSpec, mcfg: anc.MatchConfig, match: bool,
                 flip: bool, pool_worker: bool = True) -> None:
    """Per-process setup: the transform config and, on the CPU path, a ready anchor matcher.

    ``pool_worker``: in a process of the build's own pool (False: in the caller's process, workers=0).
    """
    if pool_worker:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tears the pool down
        tune_worker_malloc()
    _W["tcfg"] = tcfg
    _W["matcher"] = anc.AnchorMatcher(spec, mcfg) if match else None
    _W["flip"] = flip


def _process_chunk(job: tuple[str, list[SourceRow]]) -> list[tuple[Sample | Dropped, bytes | None]]:
    """Process a chunk of rows in a worker: transform each, then match its anchors on the CPU path.

    Two passes over the chunk: first every row's transform (decode, resize, encode), then the anchor
    matching and packing of the samples. Running each kind of work back to back keeps its code and
    data (the codec's tables, the anchor array) in the CPU caches; the results are the same as one
    row at a time. The bbox-format decision travels with the chunk because the pool is forked before
    the source is opened (and so before the decision is known).
    """
    bbox_format, rows = job
    tcfg = replace(_W["tcfg"], bbox_format=bbox_format)
    matcher = _W["matcher"]
    out: list = []
    for row in rows:
        fault_point("worker_row", row.index)
        if row.duplicate_of is not None:
            out.append((Dropped(row.index, int(row.image_id), DROP_DUPLICATE_IMAGE_ID,
                                f"image id {row.image_id} is already row {row.duplicate_of}", origin=row.origin), None))
            continue
        try:
            out.append((process_row(row, tcfg), None))
        except Exception as e:  # noqa: BLE001 - one odd row must not stop (or silently hang) the build
            out.append((_processing_error(row, e), None))
    if matcher is not None:
        for i, (item, _) in enumerate(out):
            if isinstance(item, Sample):
                try:
                    out[i] = (item, _pack(item, *_match_orientations(matcher, item.record, _W["flip"])))
                except Exception as e:  # noqa: BLE001 - as above
                    out[i] = (_processing_error(rows[i], e), None)
    return out


def _processing_error(row: SourceRow, e: Exception) -> Dropped:
    where = f" ({row.origin})" if row.origin else ""
    return Dropped(row.index, int(row.image_id), DROP_PROCESSING_ERROR, f"{type(e).__name__}: {e}{where}",
                   origin=row.origin)


def _match_orientations(matcher: anc.AnchorMatcher, record: Record, flip: bool) -> tuple[tuple, tuple | None]:
    """(labels, matched) of the image as stored and, with ``flip``, of the mirrored image (Record.hflip's boxes)."""
    stored = matcher.match(record.boxes, record.crowd_boxes)
    if not flip:
        return stored, None
    mirrored = record.hflip()
    return stored, matcher.match(mirrored.boxes, mirrored.crowd_boxes)


def _pack(sample: Sample, stored: tuple[np.ndarray, np.ndarray], flipped: tuple | None) -> bytes:
    """Pack one sample's anchor targets (both orientations when given) and note the stored counts in its record."""
    sample.record.rpn = label_counts(stored[0])
    return pack_targets(*stored, flipped=flipped)


# ---------------------------------------------------------------------------------------------
# Main side.


def _chunks(rows: Iterable[SourceRow], n: int) -> Iterator[list[SourceRow]]:
    """Group rows into lists of n (the last may be shorter; so is the one before a SourceError)."""
    chunk: list[SourceRow] = []
    try:
        for row in rows:
            chunk.append(row)
            if len(chunk) == n:
                yield chunk
                chunk = []
    except SourceError:
        if chunk:  # the rows read before the source failed are still processed and written
            yield chunk
        raise
    if chunk:
        yield chunk


def _worker_pids(pool) -> set[int]:
    return {p.pid for p in pool._pool}


def _get(result, pool, pids: set[int]):
    """result.get(), but raise BuildError when a worker died meanwhile (its task would never finish).

    multiprocessing.Pool silently replaces a worker that was killed (e.g. by the out-of-memory killer)
    and the chunk it held is lost, so a plain get() would wait forever.
    """
    while True:
        try:
            return result.get(_POLL_S)
        except multiprocessing.TimeoutError:
            if _worker_pids(pool) != pids:
                raise BuildError(
                    "a worker process died unexpectedly (killed by a signal, e.g. by the system for lack of "
                    "memory); the rows it held are lost"
                ) from None


def _ordered_results(pool, chunks: Iterator[list[SourceRow]], max_inflight: int):
    """Map chunks over the pool in source order with at most max_inflight chunks in the air.

    Pool.imap would read the whole input ahead (its feeder thread is unbounded); this keeps memory
    flat whatever the dataset size.
    """
    pids = _worker_pids(pool)
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append(pool.apply_async(_process_chunk, (chunk,)))
            if len(pending) >= max_inflight:
                yield from _get(pending.popleft(), pool, pids)
    except SourceError:
        while pending:  # rows read before the source failed are written before the build stops
            yield from _get(pending.popleft(), pool, pids)
        raise
    while pending:
        yield from _get(pending.popleft(), pool, pids)


def resilient_rows(source, start: int, stop: int, opts: BuildOptions, sleep: Callable[[float], None] = time.sleep
                   ) -> Iterator[SourceRow]:
    """source.rows(start, stop), resumed at the failed row after a transient error (see is_transient).

    Up to ``opts.retries`` consecutive failures are retried, waiting retry_backoff * 2**k seconds
    (at most MAX_RETRY_DELAY_S); a row read successfully resets the count. Anything else, or one
    failure too many, raises SourceError naming the row.
    """
    next_index, failures = start, 0
    while True:
        try:
            for row in source.rows(next_index, stop):
                yield row
                next_index, failures = row.index + 1, 0
            return
        except Exception as e:  # noqa: BLE001 - classified below
            transient = is_transient(e)
            if not transient or failures >= opts.retries:
                tried = f" after {failures} retr{'y' if failures == 1 else 'ies'}" if failures else ""
                kind = "transient error" if transient else "error"
                raise SourceError(f"the source failed at row {next_index}{tried} ({kind}): "
                                  f"{type(e).__name__}: {e}") from e
            delay = min(opts.retry_backoff * 2.0 ** failures, MAX_RETRY_DELAY_S)
            failures += 1
            log.warning("source failed at row %d (%s: %s); retry %d of %d in %.3g s",
                        next_index, type(e).__name__, e, failures, opts.retries, delay)
            sleep(delay)


# The device nodes through which a GPU reaches a Linux process (NVIDIA, Jetson, WSL2, ROCm): without
# any of them torch.cuda.is_available() is False, and asking torch costs its import (1.5-2 s).
_GPU_DEVICE_NODES = ("/dev/nvidia*", "/dev/nvgpu*", "/dev/nvhost-*", "/dev/nvmap", "/dev/dxg", "/dev/kfd")


def _gpu_may_be_visible() -> bool:
    """False only where torch cannot see a GPU: Linux without any GPU device node."""
    if not sys.platform.startswith("linux"):
        return True
    return any(glob.glob(pattern) for pattern in _GPU_DEVICE_NODES)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU is an error.

    'auto' asks torch only where a GPU device node exists, so a CPU-only build never imports torch.
    """
    if device not in DEVICES:
        raise OptionError("device", f"must be one of {', '.join(DEVICES)} (got {device!r})")
    if device == "cpu" or (device == "auto" and not _gpu_may_be_visible()):
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise OptionError("device", f"is cuda, but torch {torch.__version__} sees no CUDA device "
                          "(use auto or cpu to match anchors on the CPU)")
    return "cpu"


def anchor_spec(opts: BuildOptions) -> anc.AnchorSpec:
    """The anchor spec of a build: the preset at the build's image size, custom values applied."""
    return anc.preset_spec(
        opts.anchor_preset, opts.transform.image_size,
        sizes=opts.anchor_sizes, ratios=opts.anchor_ratios, strides=opts.anchor_strides,
    )


def _jsonable(obj):
    """Normalise to what JSON gives back (tuples -> lists), so option dicts compare equal after a round trip."""
    return json.loads(json.dumps(obj))


def output_options(opts: BuildOptions, split: str, spec: anc.AnchorSpec) -> dict:
    """The options that shape the output; a resume must see exactly these again."""
    tdict = opts.transform.to_dict()
    tdict.pop("bbox_format", None)  # the decision lives in the manifest's bbox_format section
    return _jsonable({
        "source": opts.source, "revision": opts.revision, "split": split,
        "bbox_format": opts.bbox_format, "transform": tdict,
        "anchors": anc.anchors_manifest_section(opts.anchor_preset, spec, opts.matching,
                                                flip_targets=opts.flip_targets),
        "rows_per_shard": opts.rows_per_shard, "max_rows": opts.max_rows, "max_bad_fraction": opts.max_bad_fraction,
    })


def _check_local_out(out: Path) -> None:
    """A local output root must be (or be creatable as) a directory."""
    if out.exists() and not out.is_dir():
        raise OptionError("out", f"{out} exists and is not a directory")
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError("out", f"{out}: {parent} is a file, not a directory")


def validate_options(opts: BuildOptions) -> None:
    """Refuse nonsensical options before any work starts (raises OptionError; nothing is created)."""
    at_least = [("rows_per_shard", 1), ("max_rows", 1), ("workers", 0), ("chunk_size", 1), ("gpu_batch", 1),
                ("retries", 0)]
    for name, low in at_least:
        value = getattr(opts, name)
        if value is not None and value < low:
            raise OptionError(name, f"must be >= {low} (got {value})")
    if not 0.0 <= opts.max_bad_fraction <= 1.0:
        raise OptionError("max_bad_fraction", f"must be within 0..1 (got {opts.max_bad_fraction})")
    if not (math.isfinite(opts.retry_backoff) and opts.retry_backoff >= 0):
        raise OptionError("retry_backoff", f"must be a finite number >= 0 (got {opts.retry_backoff})")
    if opts.device not in DEVICES:
        raise OptionError("device", f"must be one of {', '.join(DEVICES)} (got {opts.device!r})")
    if opts.device != "auto" and opts.engine != "ray":  # auto falls back to the CPU; cuda asks torch (Ray: the cluster)
        resolve_device(opts.device)
    if opts.part is not None and not (len(opts.part) == 2 and 0 <= opts.part[0] < opts.part[1]):
        raise OptionError("part", f"must be (I, N) with 0 <= I < N (got {opts.part!r})")
    if opts.engine not in ENGINES:
        raise OptionError("engine", f"must be one of {', '.join(ENGINES)} (got {opts.engine!r})")
    if opts.engine == "ray" and opts.part is not None:
        raise OptionError("part", "and engine ray exclude each other: the Ray engine runs every part itself")
    try:
        store = open_store(opts.out, opts.storage_options)
    except StorageError as e:
        raise OptionError("out", str(e)) from None
    if store.is_local:
        _check_local_out(Path(store.path))
    try:
        anchor_spec(opts)  # an unknown preset or impossible custom anchors
    except (ValueError, TypeError, KeyError) as e:
        raise OptionError("anchor_preset", f"(or the anchor sizes, ratios, strides): {e}") from None


# ---------------------------------------------------------------------------------------------
# One part: the shards of a row range, written in order, recorded in the part record.


class _PartWriter:
    """Ordered sample sink of one part: shard i takes the rows of shard i, empty or not."""

    def __init__(self, store, layout: Layout, shards: range, record: dict, progress):
        self.store, self.layout, self.range, self.record, self.progress = store, layout, shards, record, progress
        # Shards the record lists already (its own earlier runs, or taken over from a build split another
        # way: then not necessarily a prefix of the range); only the others are built.
        self.done = {e["index"] for e in record["shards"]}
        self.cur = shards.start - 1  # the shard being filled
        self._advance()
        self.writer: ShardWriter | None = None
        self.writing = store.url  # the file being written, for a message when a write fails
        self.samples = sum(e["samples"] for e in record["shards"])
        self.rows_done = sum(e["rows"][1] - e["rows"][0] for e in record["shards"])
        self.rows_total = sum(b - a for a, b in map(layout.shard_rows, shards))
        self._reset()

    def _advance(self) -> None:
        """Move to the next shard of the range that is not listed yet (range.stop when none is left)."""
        self.cur += 1
        while self.cur in self.done:
            self.cur += 1

    def missing_rows(self) -> list[tuple[int, int]]:
        """The row ranges [start, stop) of the shards still to build, contiguous shards joined."""
        spans: list[tuple[int, int]] = []
        for i in (i for i in self.range if i not in self.done):
            start, stop = self.layout.shard_rows(i)
            if spans and spans[-1][1] == start:
                start = spans.pop()[0]
            spans.append((start, stop))
        return spans

    def _reset(self) -> None:
        self.drops: Counter = Counter()
        self.box_drops: Counter = Counter()
        self.dropped: list[dict] = []

    def _open(self) -> ShardWriter:
        if self.writer is None:
            name = shard_name(self.record["header"]["split"], self.cur)
            self.writing = self.store.location(name)
            self.writer = ShardWriter(self.store, name)
        return self.writer

    def _close(self) -> None:
        """Publish the current shard (an empty tar when all its rows were dropped) and record it."""
        info: ShardInfo = self._open().close()
        self.writer = None
        fault_point("published", self.cur)
        start, stop = self.layout.shard_rows(self.cur)
        self.record["shards"].append({
            **asdict(info), "index": self.cur, "rows": [start, stop], "drops": dict(sorted(self.drops.items())),
            "box_drops": dict(sorted(self.box_drops.items())), "dropped": self.dropped})
        self.record["shards"].sort(key=lambda e: e["index"])  # listed in index order, taken-over ones too
        self.done.add(self.cur)
        self._write_record(fault_n=self.cur)
        fault_point("shard_done", self.cur)
        self._reset()
        self._advance()

    def _write_record(self, fault_n: int | None = None) -> None:
        self.writing = self.store.sub(PARTS_DIR).location(record_name(*self.record["part"]))
        write_record(self.store, self.record, fault_n=fault_n)

    def _to(self, row: int) -> None:
        """Close every shard before the one holding ``row``."""
        target = self.layout.shard_of(row)
        while self.cur < target:
            self._close()

    def drop(self, item: Dropped) -> None:
        """Count and record a dropped row."""
        self._to(item.index)
        self.drops[item.reason] += 1
        self.box_drops.update(item.box_drops)
        self.dropped.append(item.to_dict())
        self._step(item.index)

    def add(self, sample: Sample, targets: bytes) -> None:
        """Write one sample into its shard."""
        row = sample.record.source_index
        self._to(row)
        self.box_drops.update(sample.record.box_drops)
        w = self._open()
        w.add(sample.key, sample_members(sample.image_ext, sample.image_bytes, sample.record.to_json(), targets))
        if w.samples == 1:
            fault_point("mid_shard", self.cur)
        self.samples += 1
        self._step(row)

    def _step(self, row: int) -> None:
        self.rows_done += 1
        if row + 1 == self.layout.shard_rows(self.cur)[1]:
            self._close()  # the shard's last row: publish it now, not when the next row arrives
        if self.progress is not None:
            self.progress({"rows": self.rows_done, "rows_total": self.rows_total, "samples": self.samples,
                           "shards": len(self.done), "shards_total": len(self.range)})

    def finish(self) -> None:
        """Publish the part's remaining shards and mark the part complete."""
        while self.cur < self.range.stop:
            self._close()
        self.record["complete"] = True
        self.record["run"]["finished"] = _now()
        self._write_record()

    def abort(self) -> None:
        """Drop the open shard; the part record lists exactly the published ones."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _header(opts: BuildOptions, source, options: dict, layout: Layout) -> dict:
    """What every part of a build computes identically: the manifest apart from shards, totals and run."""
    return {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "frcnn-shard", "version": __version__},
        "split": source.info["split"],
        "source": source.info,
        "source_fingerprint": source.fingerprint,
        "source_stats": dict(source.stats),
        "bbox_format": source.bbox_format,
        "options": options,
        "layout": {"rows": layout.rows, "rows_per_shard": layout.rows_per_shard, "shards": layout.shards},
        "image": {"format": opts.transform.image_format, "size": list(opts.transform.image_size),
                  "resize": opts.transform.resize, "mode": "RGB"},
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                          "rule": "float = (uint8 / 255 - mean) / std, per RGB channel"},
        "classes": list(CLASS_NAMES),
        "anchors": options["anchors"],  # built once, in output_options
    }


def _differing(a: dict, b: dict) -> str:
    return ", ".join(differing_keys(a, b))


def split_state(store, header: dict, opts: BuildOptions, shards: range | None, part: tuple[int, int]) -> bool:
    """Clean up for overwrite, or check what an earlier build left; True when the split is complete already.

    Refuses (BuildError) a split whose manifest was built with other options or source.
    ``shards``: the part's shards, whose files (with its record) overwrite removes; None: the whole split.
    """
    if opts.overwrite:
        _clean(store, shards, part)
        return False
    if not store.exists(MANIFEST_NAME):
        return False
    built = read_manifest(store)
    if not same_build({k: built.get(k) for k in header}, header):
        raise BuildError(f"{store.url} was built with different options or source (differing: "
                         f"{_differing({k: built.get(k) for k in header}, header)}); re-run with the same "
                         "options, or build with the overwrite option to start again")
    return True


def _prepare_part(store, header: dict, part: tuple[int, int], shards: range, opts: BuildOptions) -> dict | None:
    """The part record to continue from (a fresh one when there is none); None when the split is already complete.

    Refuses (BuildError) a split built with other options, unless overwrite. The shards that records of
    a build split another way list in this part's range are taken over (parts.take_over): their bytes
    do not depend on the split.
    """
    whole = opts.part is None
    if split_state(store, header, opts, None if whole else shards, part) and whole:
        return None
    records = read_records(store)
    record = records.get(record_name(*part))
    if record is not None and not same_build(record["header"], header):
        raise BuildError(f"{store.url}: part {part[0]} of {part[1]} was built with different options or source "
                         f"(differing: {_differing(record['header'], header)}); re-run with the same options, or "
                         "build with the overwrite option")
    if record is None:
        record = {"part": list(part), "shard_range": [shards.start, shards.stop], "header": header, "shards": [],
                  "complete": False, "run": {}}
    _verify_listed(store, record)
    taken = take_over(store, records, part, shards, header, adopt=not opts.overwrite)
    # A taken-over shard that is missing or changed is simply built again (same bytes).
    taken = [e for e in taken if shard_differs(store, e, hash_it=store.is_local) is None]
    if taken:
        record["shards"] = sorted(record["shards"] + taken, key=lambda e: e["index"])
        record["complete"] = len(record["shards"]) == len(shards)
        write_record(store, record)
    return record


def _verify_listed(store, record: dict) -> None:
    """Every shard a part record lists is there, with its size (and, on local disk, its sha256)."""
    for e in record["shards"]:
        if shard_differs(store, e, hash_it=store.is_local):
            raise BuildError(f"{store.location(e['name'])}: listed in {PARTS_DIR}/{record_name(*record['part'])} but "
                             "missing or changed since; build with the overwrite option to rebuild")


def _clean(store, shards: range | None, part: tuple[int, int]) -> None:
    """Remove what an earlier build left: everything of the split, or (for one part) its shards and record."""
    store.remove(MANIFEST_NAME)
    store.remove(DROPS_NAME)
    names = store.names()
    for n in names:
        m = SHARD_RE.match(n.removesuffix(PARTIAL_SUFFIX))
        if m and (shards is None or int(m.group("index")) in shards):
            store.remove(n)
    records = store.sub(PARTS_DIR)
    for n in records.names():
        if n.endswith(".json") and (shards is None or n == record_name(*part)):
            records.remove(n)


def _interrupt_on_sigterm():
    """Make SIGTERM stop the build like Ctrl-C (the open shard dropped, a resume hint); returns the old handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise _Terminated()

    return signal.signal(signal.SIGTERM, stop)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the build was (the handler of _interrupt_on_sigterm)."""


def build_part(opts: BuildOptions, part: tuple[int, int], progress: Callable[[dict], None] | None = None,
               match_batch: Callable | None = None) -> BuildResult:
    """Build (or resume) part I of N of a split: its shards and its part record; returns what it did.

    ``match_batch(boxes_list, crowd_list)``, when given, matches the anchors of a batch elsewhere (the
    Ray engine's GPU actors); otherwise matching runs in the workers, or batched on this machine's GPU.
    """
    t0 = time.perf_counter()
    device = "cuda" if match_batch is not None else resolve_device(opts.device)
    spec = anchor_spec(opts)
    batched = device == "cuda"
    pool, old_term, finished = None, None, False
    try:
        if opts.workers > 0:
            # Fork before the source is opened, so no reader thread exists yet in the parent; the
            # workers keep the default SIGTERM (a quiet death), the parent catches it below.
            pool = multiprocessing.get_context("fork").Pool(
                opts.workers, initializer=_init_worker, initargs=(opts.transform, spec, opts.matching, not batched, opts.flip_targets))
        else:
            _init_worker(opts.transform, spec, opts.matching, not batched, opts.flip_targets, pool_worker=False)
        old_term = _interrupt_on_sigterm()
        if batched and match_batch is None:
            anchors = anc.make_anchors(spec)

            def match_batch(boxes, crowd):
                return anc.match_batch_torch(anchors, boxes, crowd, opts.matching, opts.transform.image_size, device=device)
        res = _build_part(opts, part, progress, device, spec, pool, match_batch, t0)
        finished = True
        return res
    except KeyboardInterrupt as e:  # before the first row (opening the source, ...): nothing was written yet
        raise BuildInterrupted("interrupted before any row was processed; nothing new was written. "
                               "Run the same command again to resume.", signum(e)) from None
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if pool is not None:
            _stop_pool(pool, finished)


def _stop_pool(pool, finished: bool) -> None:
    """Wind the worker pool down: gently after a finished build, at once (and never hanging) otherwise.

    A worker killed by a signal sent to the whole process group (Slurm, timeout) may die holding a
    lock of the pool's task queue, and Pool.terminate() then waits for that lock forever: it gets
    _TEARDOWN_S, then the workers are killed and the build goes on with its report.
    """
    if finished:
        pool.close()
        pool.join()
        return
    import threading

    stopper = threading.Thread(target=pool.terminate, daemon=True, name="frcnn-shard-pool-stop")
    stopper.start()
    stopper.join(_TEARDOWN_S)
    if stopper.is_alive():
        for p in list(getattr(pool, "_pool", ())):
            if p.exitcode is None:
                p.kill()


def signum(e: BaseException) -> int:
    """The signal behind an interruption: SIGTERM or SIGINT."""
    return signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT


def open_output(opts: BuildOptions, spec) -> tuple:
    """(source, store of the split, layout, header): what every part of a build, on any engine, agrees on."""
    opts = replace(opts, source=_without_trailing_slash(opts.source))  # "DIR/" and "DIR" are one source
    source = open_source(opts.source, opts.split, revision=opts.revision, bbox_format=opts.bbox_format,
                         detect_rows=opts.detect_rows)
    split = source.info["split"]
    store = open_store(opts.out, opts.storage_options).sub(split)
    store.makedirs()
    layout = Layout(min(source.num_rows, opts.max_rows or source.num_rows), opts.rows_per_shard)
    return source, store, layout, _header(opts, source, output_options(opts, split, spec), layout)


def _without_trailing_slash(source: str) -> str:
    """A source folder's name without trailing slashes (the root stays "/"); a Hub id has none."""
    head, sep, path = source.rpartition("coco:") if source.startswith("coco:") else ("", "", source)
    return head + sep + (path.rstrip("/") or path[:1])


def _build_part(opts, part, progress, device, spec, pool, match_batch, t0) -> BuildResult:
    """The body of build_part, with the worker pool running."""
    source, store, layout, header = open_output(opts, spec)
    lock = acquire_lock(store, *part, layout.part_shards(*part))
    try:
        res = _build_locked_part(opts, part, progress, device, pool, match_batch, t0, source, store, layout, header)
    except BaseException:
        try:
            release_lock(store, lock)
        except OSError:
            pass  # the store is unreachable (the likely cause of the failure): its message is the one to keep
        raise
    release_lock(store, lock)
    return res


def _build_locked_part(opts, part, progress, device, pool, match_batch, t0, source, store, layout, header
                       ) -> BuildResult:
    """The part's work once its lock is held: resume or start, run, and the part's result."""
    split = source.info["split"]
    shards = layout.part_shards(*part)
    if not store.is_local:  # uploads a killed run left unfinished (invisible, but they hold storage)
        store.abort_uploads(shard_name(split, i) for i in shards)
    record = _prepare_part(store, header, part, shards, opts)
    if record is None:
        return _result(store, read_manifest(store), "already complete", device, t0)
    was_complete = record["complete"]
    resumed = len(record["shards"])
    record["run"] = {**holder(), "workers": opts.workers, "device": device, "engine": opts.engine, "started": _now()}
    w = _PartWriter(store, layout, shards, record, progress)
    rows_before = w.rows_done
    if not was_complete:
        if store.is_local:  # interrupted writes: this part's own (or, for the whole build, any)
            _remove_dead_partials(store, None if opts.part is None else shards)
        _run(opts, source, w, pool, match_batch, layout)
    if was_complete and opts.part is not None:
        status = "already complete"
    else:
        status = "resumed" if resumed else "built"
    return _part_result(store, record, status, device, t0, resumed, rows_read=w.rows_done - rows_before)


def _remove_dead_partials(store, shards: range | None) -> None:
    """Remove the ``*.partial`` shards of ``shards`` (None: all). The caller holds the lock of a part that
    covers them, which excludes every live writer of these shards: each is a dead writer's."""
    for n in store.names():
        m = SHARD_RE.match(n.removesuffix(PARTIAL_SUFFIX))
        if n.endswith(PARTIAL_SUFFIX) and m and (shards is None or int(m.group("index")) in shards):
            store.remove(n)


def _run(opts: BuildOptions, source, w: _PartWriter, pool, match_batch, layout: Layout) -> None:
    """Stream the rows of the part's missing shards through the workers into the writer; on failure drop
    only the open shard."""
    fmt = source.bbox_format["decision"]
    rows = (row for start, stop in w.missing_rows() for row in resilient_rows(source, start, stop, opts))
    jobs = ((fmt, chunk) for chunk in _chunks(rows, opts.chunk_size))
    if pool is not None:
        results = _ordered_results(pool, jobs, max_inflight=4 * opts.workers)
    else:
        results = (r for job in jobs for r in _process_chunk(job))
    kept = f"the shards published so far are kept in {w.store.url}"
    try:
        buffer: list = []
        for item in results:
            buffer.append(item)
            if match_batch is not None and sum(isinstance(i, Sample) for i, _ in buffer) < opts.gpu_batch:
                continue
            _write_items(_match_buffer(buffer, match_batch, opts) if match_batch else buffer, w)
            buffer = []
        _write_items(_match_buffer(buffer, match_batch, opts) if match_batch else buffer, w)
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


def _match_buffer(buffer: list, match_batch: Callable, opts: BuildOptions) -> list:
    """Match the anchors of the buffered samples in one batched call (a GPU, here or in a Ray actor)."""
    samples = [item for item, _ in buffer if isinstance(item, Sample)]
    if not samples:
        return buffer
    # The mirrored images ride in the same call: one batch of 2n images, the first n as stored.
    records = [s.record for s in samples] + ([s.record.hflip() for s in samples] if opts.flip_targets else [])
    results = match_batch([r.boxes for r in records], [r.crowd_boxes for r in records])
    n = len(samples)
    flipped = results[n:] if opts.flip_targets else [None] * n
    packed = iter([_pack(s, stored, f) for s, stored, f in zip(samples, results[:n], flipped)])
    return [(item, next(packed) if isinstance(item, Sample) else None) for item, _ in buffer]


def _write_items(batch: list, w: _PartWriter) -> None:
    """Hand processed items to the writer in order."""
    for item, targets in batch:
        if isinstance(item, Dropped):
            if item.reason == DROP_PROCESSING_ERROR:
                log.warning("row %d (image id %d) dropped: %s", item.index, item.image_id, item.detail)
            w.drop(item)
        else:
            w.add(item, targets)


# ---------------------------------------------------------------------------------------------
# Results, the whole build, merge.

DROPS_SHOWN = 5  # dropped rows named in a result (all of them are in drops.jsonl)


def _bad_fraction(drops: dict, rows: int) -> tuple[int, float]:
    bad = sum(drops.get(r, 0) for r in BAD_INPUT_REASONS)
    return bad, bad / rows if rows else 0.0


def _part_result(store, record: dict, status: str, device: str, t0: float, resumed: int, rows_read: int = 0
                 ) -> BuildResult:
    """What one part did, from its record."""
    entries = record["shards"]
    drops = sum_counts(e["drops"] for e in entries)
    rows = sum(e["rows"][1] - e["rows"][0] for e in entries)
    bad, frac = _bad_fraction(drops, rows)
    return BuildResult(
        out_dir=store.path if store.is_local else store.url, status=status,
        samples=sum(e["samples"] for e in entries), shards=len(entries), bytes=sum(e["bytes"] for e in entries),
        rows=rows, drops=drops, box_drops=sum_counts(e["box_drops"] for e in entries),
        bbox_format=record["header"]["bbox_format"], device=device, seconds=time.perf_counter() - t0,
        resumed_shards=resumed, bad_fraction=frac, part=tuple(record["part"]), rows_read=rows_read,
        dropped=[d for e in entries for d in e["dropped"]][:DROPS_SHOWN],
        drops_file=store.sub(PARTS_DIR).location(record_name(*record["part"])))


def _result(store, manifest: dict, status: str, device: str, t0: float, resumed: int = 0) -> BuildResult:
    """What the whole build did, from its manifest (and the first lines of drops.jsonl)."""
    totals, drops = manifest["totals"], manifest["drops"]
    _, frac = _bad_fraction(drops["images"], totals["rows"])
    first = store.read_bytes(DROPS_NAME).splitlines()[:DROPS_SHOWN] if drops.get("rows") else []
    return BuildResult(
        out_dir=store.path if store.is_local else store.url, status=status, samples=totals["samples"],
        shards=totals["shards"], bytes=totals["bytes"], rows=totals["rows"], drops=drops["images"],
        box_drops=drops["boxes"], bbox_format=manifest["bbox_format"], device=device,
        seconds=time.perf_counter() - t0, resumed_shards=resumed, bad_fraction=frac,
        dropped=[json.loads(line) for line in first], drops_file=store.location(DROPS_NAME))


def check_bad_fraction(res: BuildResult, max_bad_fraction: float) -> None:
    """Raise BuildError when the split holds no sample, or more rows than allowed were bad input (everything
    written is kept)."""
    named = "; ".join(f"row {d['row']} (image id {d['image_id']}): {d['reason']}" for d in res.dropped)
    if res.samples == 0:
        why = (f"all {res.rows} rows were dropped, by reason: {res.drops}. First dropped: {named}. Every dropped "
               f"row is listed in {res.drops_file}") if res.rows else "the source split has no rows"
        raise BuildError(f"the split in {res.out_dir} holds no samples: {why}. Fix the source (or the options), "
                         "then build again with the overwrite option.")
    if res.bad_fraction > max_bad_fraction:
        bad = sum(res.drops.get(r, 0) for r in BAD_INPUT_REASONS)
        raise BuildError(
            f"{bad} of {res.rows} rows were skipped as bad input ({res.bad_fraction:.2%} > max_bad_fraction "
            f"{max_bad_fraction:.2%}); by reason: {res.drops}. First dropped: {named}. Every dropped row is listed in "
            f"{res.drops_file}. The {res.samples} samples written in {res.out_dir} are kept.")


def merge_split(location, storage_options: dict | None = None, max_bad_fraction: float | None = None) -> BuildResult:
    """Merge the parts of a built split (``<out>/<split>``): checks them, writes drops.jsonl and the manifest."""
    t0 = time.perf_counter()
    store = open_store(location, storage_options)
    manifest = merge(store)
    res = _result(store, manifest, "merged", "-", t0)
    limit = manifest["options"]["max_bad_fraction"] if max_bad_fraction is None else max_bad_fraction
    check_bad_fraction(res, limit)
    return res


def build(opts: BuildOptions, progress: Callable[[dict], None] | None = None) -> BuildResult:
    """Run (or resume) a build, or one part of it; raises BuildError with a reason on failure.

    The whole build (no ``part``) runs its one part here, or every part on Ray (engine "ray"), then
    merges: the manifest appears last. A part build writes its shards and part record only.
    """
    validate_options(opts)
    if opts.engine == "ray":
        from .ray_engine import build_on_ray

        res = build_on_ray(opts, progress)
    elif opts.part is not None:
        return build_part(opts, opts.part, progress)
    else:
        part_res = build_part(opts, (0, 1), progress)
        store = open_store(part_res.out_dir, opts.storage_options)
        if part_res.status != "already complete" or not store.exists(MANIFEST_NAME):
            merge(store)
        res = _result(store, read_manifest(store), part_res.status, part_res.device, 0.0, part_res.resumed_shards)
        res.seconds, res.rows_read = part_res.seconds, part_res.rows_read
    check_bad_fraction(res, opts.max_bad_fraction)
    return res

