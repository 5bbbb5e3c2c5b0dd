"""What a build (or one part of it) did, from its part record or its manifest, and the bad-input limit."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BuildError
from ..format.manifest import Manifest
from ..format.names import DROPS_NAME, PARTS_DIR
from ..transform import DROP_CORRUPT_IMAGE, DROP_MISSING_IMAGE, DROP_SIZE_MISMATCH, DROP_TOO_MANY_PIXELS
from .parts import record_name, sum_counts
from .worker import DROP_DUPLICATE_IMAGE_ID, DROP_PROCESSING_ERROR

# Image drop reasons that mean broken input (counted against max_bad_fraction); "no_boxes" is not
# one of them: COCO itself has images without annotations.
BAD_INPUT_REASONS = (DROP_MISSING_IMAGE, DROP_CORRUPT_IMAGE, DROP_TOO_MANY_PIXELS, DROP_SIZE_MISMATCH,
                     DROP_DUPLICATE_IMAGE_ID, DROP_PROCESSING_ERROR)
DROPS_SHOWN = 5  # dropped rows named in a result (all of them are in drops.jsonl)


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


def _bad_fraction(drops: dict, rows: int) -> tuple[int, float]:
    bad = sum(drops.get(r, 0) for r in BAD_INPUT_REASONS)
    return bad, bad / rows if rows else 0.0


def _out_dir(store) -> Path | str:
    return store.path if store.is_local else store.url


def part_result(store, record: dict, status: str, device: str, t0: float, resumed: int, rows_read: int = 0
                ) -> BuildResult:
    """What one part did, from its record."""
    entries = record["shards"]
    drops = sum_counts(e["drops"] for e in entries)
    rows = sum(e["rows"][1] - e["rows"][0] for e in entries)
    bad, frac = _bad_fraction(drops, rows)
    return BuildResult(
        out_dir=_out_dir(store), status=status,
        samples=sum(e["samples"] for e in entries), shards=len(entries), bytes=sum(e["bytes"] for e in entries),
        rows=rows, drops=drops, box_drops=sum_counts(e["box_drops"] for e in entries),
        bbox_format=record["header"]["bbox_format"], device=device, seconds=time.perf_counter() - t0,
        resumed_shards=resumed, bad_fraction=frac, part=tuple(record["part"]), rows_read=rows_read,
        dropped=[d for e in entries for d in e["dropped"]][:DROPS_SHOWN],
        drops_file=store.sub(PARTS_DIR).location(record_name(*record["part"])))


def split_result(store, manifest: Manifest, status: str, device: str, t0: float, resumed: int = 0) -> BuildResult:
    """What the whole build did, from its manifest (and the first lines of drops.jsonl)."""
    totals, drops = manifest.totals, manifest.drops
    _, frac = _bad_fraction(drops["images"], totals["rows"])
    first = store.read_bytes(DROPS_NAME).splitlines()[:DROPS_SHOWN] if drops.get("rows") else []
    return BuildResult(
        out_dir=_out_dir(store), status=status, samples=totals["samples"],
        shards=totals["shards"], bytes=totals["bytes"], rows=totals["rows"], drops=drops["images"],
        box_drops=drops["boxes"], bbox_format=manifest.bbox_format, device=device,
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
