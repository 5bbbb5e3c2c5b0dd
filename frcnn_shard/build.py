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
from .format import FORMAT_VERSION
from .format.members import sample_members
from .format.targets import label_counts, pack_targets
from .labels import CLASS_NAMES
from .records import Dropped, Sample, SourceRow
from .shards import (
    MANIFEST_NAME, PARTIAL_SUFFIX, SHARD_RE, ShardInfo, ShardWriter, fault_point, file_sha256,
    list_shard_keys, read_manifest, shard_name, write_json_atomic,
)
from .sources import BBOX_FORMAT_CHOICES, DEFAULT_HUB_ID, open_source
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
MAX_RETRY_DELAY_S = 60.0  # the backoff doubles per consecutive failure, up to this
_POLL_S = 0.5  # how often a wait on the worker pool checks that no worker died
log = logging.getLogger("frcnn_shard.build")


class BuildError(RuntimeError):
    """The build cannot start or cannot go on; the message says why and what is kept."""


class OptionError(BuildError):
    """An option value that makes no sense; ``option`` is the BuildOptions field it concerns."""

    def __init__(self, option: str, reason: str):
        super().__init__(f"{option} {reason}")
        self.option, self.reason = option, reason


class BuildInterrupted(BuildError):
    """Stopped by the user or a signal; everything published so far is intact and resumable."""


class SourceError(BuildError):
    """The source failed mid-stream (after the retries allowed for transient errors)."""


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
    samples_per_shard: int = field(default=1000, metadata={"help": "Samples per shard file (the last holds the rest)."})
    max_shard_bytes: int | None = field(default=None, metadata={
        "help": "Also close a shard once it reaches this many bytes.", "type": int})
    max_samples: int | None = field(default=None, metadata={
        "help": "Stop after this many samples (quick runs).", "type": int})
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


@dataclass
class BuildResult:
    """What the build did, for the CLI's summary."""

    out_dir: Path
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


# ---------------------------------------------------------------------------------------------
# Worker side: one process-global state, set once per worker by the pool initializer.

_W: dict = {}


def _init_worker(tcfg: TransformConfig, spec: anc.AnchorSpec, mcfg: anc.MatchConfig, match: bool,
                 ignore_sigint: bool = True) -> None:
    """Per-process setup: the transform config and, on the CPU path, a ready anchor matcher."""
    if ignore_sigint:  # the parent handles Ctrl-C and tears the pool down
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _W["tcfg"] = tcfg
    _W["matcher"] = anc.AnchorMatcher(spec, mcfg) if match else None


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
        try:
            out.append((process_row(row, tcfg), None))
        except Exception as e:  # noqa: BLE001 - one odd row must not stop (or silently hang) the build
            out.append((_processing_error(row, e), None))
    if matcher is not None:
        for i, (item, _) in enumerate(out):
            if isinstance(item, Sample):
                try:
                    labels, matched = matcher.match(item.record.boxes, item.record.crowd_boxes)
                    out[i] = (item, _pack(item, labels, matched))
                except Exception as e:  # noqa: BLE001 - as above
                    out[i] = (_processing_error(rows[i], e), None)
    return out


def _processing_error(row: SourceRow, e: Exception) -> Dropped:
    where = f" ({row.origin})" if row.origin else ""
    return Dropped(row.index, int(row.image_id), DROP_PROCESSING_ERROR, f"{type(e).__name__}: {e}{where}")


def _pack(sample: Sample, labels: np.ndarray, matched: np.ndarray) -> bytes:
    """Pack one sample's anchor targets and note their counts in its JSON record."""
    sample.record.rpn = label_counts(labels)
    return pack_targets(labels, matched)


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


def resilient_rows(source, skip: int, opts: BuildOptions, sleep: Callable[[float], None] = time.sleep
                   ) -> Iterator[SourceRow]:
    """source.rows(skip), resumed at the failed row after a transient error (see is_transient).

    Up to ``opts.retries`` consecutive failures are retried, waiting retry_backoff * 2**k seconds
    (at most MAX_RETRY_DELAY_S); a row read successfully resets the count. Anything else, or one
    failure too many, raises SourceError naming the row.
    """
    next_index, failures = skip, 0
    while True:
        try:
            for row in source.rows(skip=next_index):
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
        raise OptionError("device", "is cuda, but torch sees no CUDA device")
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
        "anchors": anc.anchors_manifest_section(opts.anchor_preset, spec, opts.matching),
        "samples_per_shard": opts.samples_per_shard, "max_shard_bytes": opts.max_shard_bytes,
        "max_samples": opts.max_samples, "max_bad_fraction": opts.max_bad_fraction,
    })


def validate_options(opts: BuildOptions) -> None:
    """Refuse nonsensical options before any work starts (raises OptionError; nothing is created)."""
    at_least = [("samples_per_shard", 1), ("max_shard_bytes", 1), ("max_samples", 1), ("workers", 0),
                ("chunk_size", 1), ("gpu_batch", 1), ("retries", 0)]
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
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise OptionError("out", f"{out} exists and is not a directory")
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError("out", f"{out}: {parent} is a file, not a directory")
    try:
        anchor_spec(opts)  # an unknown preset or impossible custom anchors
    except (ValueError, TypeError, KeyError) as e:
        raise OptionError("anchor_preset", f"(or the anchor sizes, ratios, strides): {e}") from None


def _clean_dir(out_dir: Path) -> None:
    """Remove what a previous build of this split left in its folder: shards, partial files, manifest."""
    for p in out_dir.iterdir():
        if p.name.endswith(PARTIAL_SUFFIX) or p.name == MANIFEST_NAME or SHARD_RE.match(p.name):
            p.unlink()


def _prepare_resume(out_dir: Path, options: dict, overwrite: bool) -> dict | None:
    """Decide between a fresh build and a resume; return the manifest to resume from, or None.

    Stray partial files are removed, shards the manifest does not list (published just before a
    crash, before the manifest caught up) are removed too: they are rebuilt byte for byte.
    """
    if not out_dir.exists():
        try:
            out_dir.mkdir(parents=True)
        except OSError as e:
            raise BuildError(f"cannot create the output directory {out_dir}: {e}") from None
        return None
    if overwrite:
        _clean_dir(out_dir)
        return None
    for p in out_dir.glob("*" + PARTIAL_SUFFIX):
        p.unlink()
    has_manifest = (out_dir / MANIFEST_NAME).exists()
    shards_on_disk = sorted(p.name for p in out_dir.iterdir() if SHARD_RE.match(p.name))
    if not has_manifest:
        if shards_on_disk:
            raise BuildError(
                f"{out_dir} holds shards ({shards_on_disk[0]}, ...) but no manifest; "
                "build with the overwrite option to replace them"
            )
        return None
    manifest = read_manifest(out_dir)
    if manifest.get("options") != options:  # both already in JSON form
        old, new = manifest.get("options", {}), options
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise BuildError(
            f"{out_dir} was built with different options (differing: {', '.join(diff)}); "
            "re-run with the same options to resume, or build with the overwrite option to start again"
        )
    listed = {s["name"]: s for s in manifest["shards"]}
    for name in shards_on_disk:
        if name not in listed:
            (out_dir / name).unlink()
    for s in manifest["shards"]:
        p = out_dir / s["name"]
        if not p.exists() or p.stat().st_size != s["bytes"] or file_sha256(p) != s["sha256"]:
            raise BuildError(
                f"{p}: listed in the manifest but missing or changed since it was written; "
                "build with the overwrite option to rebuild"
            )
    return manifest


def _sum_counts(dicts: Iterable[dict]) -> dict:
    """Add up {reason: count} dicts."""
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return dict(sorted(total.items()))


class _Writer:
    """Ordered sample sink: rolls shards, accounts rows and drops per shard, keeps the manifest current."""

    def __init__(self, out_dir: Path, split: str, opts: BuildOptions, manifest: dict):
        self.out_dir, self.split, self.opts, self.manifest = out_dir, split, opts, manifest
        self.rows_done = sum(s["rows"] for s in manifest["shards"])  # rows accounted for in shards
        self.samples = sum(s["samples"] for s in manifest["shards"])
        self.seen: set[str] = set()
        for s in manifest["shards"]:
            self.seen.update(list_shard_keys(out_dir / s["name"]))
        self.writer: ShardWriter | None = None
        self.consumed = self.rows_done  # rows seen so far, accounted or not
        self.drops: Counter = Counter()
        self.box_drops: Counter = Counter()

    def drop(self, index: int, reason: str, box_drops: dict) -> None:
        """Count a dropped row."""
        self.consumed = index + 1
        self.drops[reason] += 1
        self.box_drops.update(box_drops)

    def add(self, sample: Sample, targets: bytes, index: int) -> None:
        """Write one sample (or count it as a duplicate) and roll the shard when it is full."""
        if sample.key in self.seen:
            self.drop(index, DROP_DUPLICATE_IMAGE_ID, {})
            return
        self.seen.add(sample.key)
        self.consumed = index + 1
        self.box_drops.update(sample.record.box_drops)
        if self.writer is None:
            name = shard_name(self.split, len(self.manifest["shards"]))
            self.writer = ShardWriter(self.out_dir / name)
        self.writer.add(sample.key, sample_members(sample.image_ext, sample.image_bytes, sample.record.to_json(), targets))
        self.samples += 1
        if self.writer.samples == 1:
            fault_point("mid_shard", len(self.manifest["shards"]))
        full = self.writer.samples >= self.opts.samples_per_shard
        too_big = self.opts.max_shard_bytes is not None and self.writer.bytes_written >= self.opts.max_shard_bytes
        if full or too_big:
            self.close_shard()

    def pending(self) -> dict:
        """The rows and drops seen since the last published shard, as the manifest records them."""
        return {
            "rows": self.consumed - self.rows_done,
            "drops": dict(sorted(self.drops.items())), "box_drops": dict(sorted(self.box_drops.items())),
        }

    def close_shard(self) -> None:
        """Publish the open shard and record it, with the rows and drops it accounts for."""
        info: ShardInfo = self.writer.close()
        self.writer = None
        fault_point("published", len(self.manifest["shards"]))
        self.manifest["shards"].append({**asdict(info), **self.pending()})
        self.rows_done = self.consumed
        self.drops, self.box_drops = Counter(), Counter()
        self.write_manifest()
        fault_point("shard_done", len(self.manifest["shards"]) - 1)

    def finish(self) -> None:
        """Publish the last shard, account for trailing dropped rows, and mark the build complete."""
        if self.writer is not None:
            self.close_shard()
        self.manifest["tail"] = self.pending()
        self.manifest["complete"] = True
        self.write_manifest()

    def abort(self) -> None:
        """Drop the open shard, leaving the manifest as it was after the last published shard."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def write_manifest(self) -> None:
        """Recompute totals and rewrite the manifest atomically."""
        m = self.manifest
        parts = m["shards"] + ([m["tail"]] if m.get("tail") else [])
        m["totals"] = {
            "samples": sum(s["samples"] for s in m["shards"]), "shards": len(m["shards"]),
            "bytes": sum(s["bytes"] for s in m["shards"]), "rows": sum(p["rows"] for p in parts),
        }
        m["drops"] = {"images": _sum_counts(p["drops"] for p in parts),
                      "boxes": _sum_counts(p["box_drops"] for p in parts),
                      "annotations": _annotation_drops(m.get("source_stats") or {})}
        write_json_atomic(self.out_dir / MANIFEST_NAME, m, fault_n=len(m["shards"]))


def _annotation_drops(stats: dict) -> dict:
    """Annotations the source could not attach to any row, by reason (dangling: unknown image_id)."""
    return {"dangling": int(stats["dangling_annotations"])} if stats.get("dangling_annotations") else {}


def _new_manifest(opts: BuildOptions, options: dict, source, device: str) -> dict:
    """A manifest for a build that has not published anything yet."""
    return {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "frcnn-shard", "version": __version__},
        "complete": False,
        "split": source.info["split"],
        "source": source.info,
        "source_stats": dict(source.stats),
        "bbox_format": source.bbox_format,
        "options": options,
        "build": {"workers": opts.workers, "device": device},
        "image": {"format": opts.transform.image_format, "size": list(opts.transform.image_size),
                  "resize": opts.transform.resize, "mode": "RGB"},
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                          "rule": "float = (uint8 / 255 - mean) / std, per RGB channel"},
        "classes": list(CLASS_NAMES),
        "anchors": options["anchors"],  # built once, in output_options
        "shards": [], "tail": None,
    }


def _match_on_device(buffer: list, spec_anchors, opts: BuildOptions, device: str) -> list:
    """Match the anchors of the buffered samples in one batched call on the device."""
    samples = [item for item, _ in buffer if isinstance(item, Sample)]
    results = anc.match_batch_torch(
        spec_anchors, [s.record.boxes for s in samples], [s.record.crowd_boxes for s in samples],
        opts.matching, opts.transform.image_size, device=device,
    )
    packed = iter([_pack(s, lab, m) for s, (lab, m) in zip(samples, results)])
    return [(item, next(packed) if isinstance(item, Sample) else None) for item, _ in buffer]


def build(opts: BuildOptions, progress: Callable[[dict], None] | None = None) -> BuildResult:
    """Run (or resume) a build and return its summary; raises BuildError with a reason on failure."""
    validate_options(opts)
    t0 = time.perf_counter()
    device = resolve_device(opts.device)
    spec = anchor_spec(opts)
    match_in_workers = device != "cuda"
    pool = None
    try:
        if opts.workers > 0:
            # Fork before the source is opened, so no reader thread exists yet in the parent.
            pool = multiprocessing.get_context("fork").Pool(
                opts.workers, initializer=_init_worker,
                initargs=(opts.transform, spec, opts.matching, match_in_workers),
            )
        else:
            _init_worker(opts.transform, spec, opts.matching, match_in_workers, ignore_sigint=False)
        return _build(opts, progress, device, spec, pool, t0)
    except KeyboardInterrupt:  # before the first row (opening the source, ...): nothing was written yet
        raise BuildInterrupted(
            "interrupted before any row was processed; nothing new was written. "
            "Run the same command again to resume."
        ) from None
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _build(opts: BuildOptions, progress, device: str, spec: anc.AnchorSpec, pool, t0: float) -> BuildResult:
    """The body of build(), with the worker pool already running."""
    source = open_source(opts.source, opts.split, revision=opts.revision,
                         bbox_format=opts.bbox_format, detect_rows=opts.detect_rows)
    split = source.info["split"]
    out_dir = Path(opts.out) / split
    options = output_options(opts, split, spec)
    manifest = _prepare_resume(out_dir, options, opts.overwrite)
    resumed = manifest is not None
    if manifest is None:
        manifest = _new_manifest(opts, options, source, device)
    else:
        # A resume keeps the recorded decision; a different one would change what the rows mean.
        recorded, now = manifest["bbox_format"]["decision"], source.bbox_format["decision"]
        if recorded != now:
            raise BuildError(f"bbox format decided now ({now}) differs from the recorded one ({recorded})")
    resumed_shards = len(manifest["shards"])  # a fresh manifest lists none
    w = _Writer(out_dir, split, opts, manifest)
    if manifest.get("complete"):
        status = "already complete"
    else:
        status = "resumed" if resumed else "built"
        _run(opts, source, spec, device, pool, w, progress)
    m = w.manifest
    rows = m["totals"]["rows"]
    bad = sum(m["drops"]["images"].get(r, 0) for r in BAD_INPUT_REASONS)
    result = BuildResult(
        out_dir=out_dir, status=status, samples=m["totals"]["samples"], shards=m["totals"]["shards"],
        bytes=m["totals"]["bytes"], rows=rows, drops=m["drops"]["images"], box_drops=m["drops"]["boxes"],
        bbox_format=m["bbox_format"], device=device, seconds=time.perf_counter() - t0,
        resumed_shards=resumed_shards, bad_fraction=bad / rows if rows else 0.0,
    )
    if result.bad_fraction > opts.max_bad_fraction:
        raise BuildError(
            f"{bad} of {rows} rows were skipped as bad input ({result.bad_fraction:.2%} > "
            f"max_bad_fraction {opts.max_bad_fraction:.2%}); by reason: {result.drops}. "
            f"The {result.samples} samples written in {out_dir} are kept."
        )
    return result


def _run(opts: BuildOptions, source, spec, device: str, pool, w: _Writer, progress) -> None:
    """Stream rows through the workers into the writer; on any failure, drop only the open shard."""
    on_gpu = device == "cuda"
    anchors_t = anc.make_anchors(spec) if on_gpu else None
    fmt = source.bbox_format["decision"]
    rows = resilient_rows(source, w.rows_done, opts)
    jobs = ((fmt, chunk) for chunk in _chunks(rows, opts.chunk_size))
    if pool is not None:
        results = _ordered_results(pool, jobs, max_inflight=4 * opts.workers)
    else:
        results = (r for job in jobs for r in _process_chunk(job))
    try:
        buffer: list = []
        for item, targets in results:
            if on_gpu:
                buffer.append((item, targets))
                if sum(isinstance(i, Sample) for i, _ in buffer) < opts.gpu_batch:
                    continue
                batch, buffer = _match_on_device(buffer, anchors_t, opts, device), []
            else:
                batch = [(item, targets)]
            if _write_items(batch, w, opts, progress):
                break
        else:
            if buffer:
                _write_items(_match_on_device(buffer, anchors_t, opts, device), w, opts, progress)
        w.finish()
    except KeyboardInterrupt:
        w.abort()
        raise BuildInterrupted(
            f"interrupted; {len(w.manifest['shards'])} complete shards are kept in {w.out_dir}. "
            "Run the same command again to resume after the last complete shard."
        ) from None
    except BuildError as e:  # the source failed, a worker died
        w.abort()
        raise type(e)(
            f"{e}. The unfinished shard was removed; {len(w.manifest['shards'])} complete shards are kept in "
            f"{w.out_dir}. Run the same command again to resume after the last complete shard."
        ) from e.__cause__
    except OSError as e:
        w.abort()
        raise BuildError(
            f"write failed in {w.out_dir}: {e}. The unfinished shard was removed; the manifest lists "
            f"the {len(w.manifest['shards'])} complete shards. Free space and run the same command to resume."
        ) from e
    except BaseException:
        w.abort()
        raise


def _write_items(batch: list, w: _Writer, opts: BuildOptions, progress) -> bool:
    """Hand processed items to the writer in order; True once max_samples is reached."""
    for item, targets in batch:
        if isinstance(item, Dropped):
            if item.reason == DROP_PROCESSING_ERROR:
                log.warning("row %d (image id %d) dropped: %s", item.index, item.image_id, item.detail)
            w.drop(item.index, item.reason, item.box_drops)
        else:
            w.add(item, targets, item.record.source_index)
        if progress is not None:
            progress({"rows": w.consumed, "samples": w.samples, "shards": len(w.manifest["shards"])})
        if opts.max_samples is not None and w.samples >= opts.max_samples:
            return True
    return False
