"""The worker side of the build: one process-global state, set once per worker by the pool initializer,
and the chunk of rows a worker turns into samples (transform, then anchor matching and packing on the CPU path).

``init_worker``, ``process_chunk``, ``match_orientations`` and ``pack`` are also the benchmarks' way in
(scripts/bench_build.py times each stage); nothing else outside build/ calls them.
"""
from __future__ import annotations

import signal
from dataclasses import replace
from typing import Callable

import numpy as np

from .. import anchors as anc
from ..faults import fault_point
from ..format.record import Record
from ..format.targets import label_counts, pack_targets
from ..malloc import tune_worker_malloc
from ..records import Dropped, Sample, SourceRow
from ..transform import KEEP_RATIO, TransformConfig, process_row

# A row whose processing raised something other than the transform's own image errors (a Pillow
# oddity, a bug): dropped and counted under this reason, with the exception logged.
DROP_PROCESSING_ERROR = "processing_error"
# A row whose image id was already written (the writer keeps the first).
DROP_DUPLICATE_IMAGE_ID = "duplicate_image_id"

_W: dict = {}

ProcessRow = Callable[[SourceRow, TransformConfig], Sample]


def init_worker(tcfg: TransformConfig, spec: anc.AnchorSpec, mcfg: anc.MatchConfig, match: bool,
                flip: bool, pool_worker: bool = True, process: ProcessRow = process_row) -> None:
    """Per-process setup: the transform config and, on the CPU path, a ready anchor matcher.

    ``pool_worker``: in a process of the build's own pool (False: in the caller's process, workers=0).
    ``process``: what turns a row into a sample (transform.process_row; a test injects a failing one).
    """
    if pool_worker:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tears the pool down
        tune_worker_malloc()
    _W["tcfg"] = tcfg
    _W["matcher"] = CanvasMatchers(spec, mcfg) if match else None
    _W["flip"] = flip
    _W["process"] = process


def process_chunk(job: tuple[str, list[SourceRow]]) -> list[tuple[Sample | Dropped, bytes | None]]:
    """Process a chunk of rows in a worker: transform each, then match its anchors on the CPU path.

    Two passes over the chunk: first every row's transform (decode, resize, encode), then the anchor
    matching and packing of the samples. Running each kind of work back to back keeps its code and
    data (the codec's tables, the anchor array) in the CPU caches; the results are the same as one
    row at a time. The bbox-format decision travels with the chunk because the pool is forked before
    the source is opened (and so before the decision is known).
    """
    bbox_format, rows = job
    tcfg = replace(_W["tcfg"], bbox_format=bbox_format)
    out = [_transform(row, tcfg, _W["process"]) for row in rows]
    matchers = _W["matcher"]
    if matchers is not None:
        for i, (item, _) in enumerate(out):
            if isinstance(item, Sample):
                try:
                    matcher = matchers.at(item.record.size)
                    out[i] = (item, pack(item, *match_orientations(matcher, item.record, _W["flip"],
                                                                   tcfg.resize == KEEP_RATIO)))
                except Exception as e:  # noqa: BLE001 - one odd row must not stop (or silently hang) the build
                    out[i] = (_processing_error(rows[i], e), None)
    return out


def _transform(row: SourceRow, tcfg: TransformConfig, process: ProcessRow) -> tuple[Sample | Dropped, None]:
    """One row's sample (targets still to come), or the drop record that says why there is none."""
    fault_point("worker_row", row.index)
    if row.duplicate_of is not None:
        return Dropped(row.index, int(row.image_id), DROP_DUPLICATE_IMAGE_ID,
                       f"image id {row.image_id} is already row {row.duplicate_of}", origin=row.origin), None
    try:
        return process(row, tcfg), None
    except Exception as e:  # noqa: BLE001 - one odd row must not stop (or silently hang) the build
        return _processing_error(row, e), None


def _processing_error(row: SourceRow, e: Exception) -> Dropped:
    where = f" ({row.origin})" if row.origin else ""
    return Dropped(row.index, int(row.image_id), DROP_PROCESSING_ERROR, f"{type(e).__name__}: {e}{where}",
                   origin=row.origin)


class CanvasMatchers:
    """An AnchorMatcher per canvas, made on first use: one for a fixed canvas; for keep-ratio, the spec at each
    sample's canvas, the most recently used MAX kept (each holds its anchors: ~4 MB at 1344 x 1344)."""

    MAX = 8

    def __init__(self, spec: anc.AnchorSpec, cfg: anc.MatchConfig):
        self.spec, self.cfg = spec, cfg
        self._made: dict[tuple[int, int], anc.AnchorMatcher] = {}

    def at(self, canvas_hw) -> anc.AnchorMatcher:
        """The matcher of the anchors over ``canvas_hw``."""
        key = (int(canvas_hw[0]), int(canvas_hw[1]))
        matcher = self._made.pop(key, None) or anc.AnchorMatcher(self.spec.at(key), self.cfg)
        self._made[key] = matcher  # most recently used last
        while len(self._made) > self.MAX:
            self._made.pop(next(iter(self._made)))
        return matcher


def match_orientations(matcher: anc.AnchorMatcher, record: Record, flip: bool, keep_ratio: bool = False
                       ) -> tuple[tuple, tuple | None]:
    """(labels, matched) of the image as stored and, with ``flip``, of the mirrored image (Record.hflip's boxes;
    ``keep_ratio``: the content is mirrored in place)."""
    stored = matcher.match(record.boxes, record.crowd_boxes)
    if not flip:
        return stored, None
    mirrored = record.hflip(content=keep_ratio)
    return stored, matcher.match(mirrored.boxes, mirrored.crowd_boxes)


def pack(sample: Sample, stored: tuple[np.ndarray, np.ndarray], flipped: tuple | None) -> bytes:
    """Pack one sample's anchor targets (both orientations when given) and note the stored counts in its record."""
    sample.record.rpn = label_counts(stored[0])
    return pack_targets(*stored, flipped=flipped)
