"""Hub sources: a dataset id on the Hugging Face Hub, or a local folder in the Hub's layout, read through
one code path: ``datasets`` resolves the split's parquet files, pyarrow reads the row groups a range
of rows needs (``open_hub``); images stay encoded.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterator, Mapping

import datasets
import numpy as np
import pyarrow.parquet as pq

from ..labels import COCO_CLASSES, check_class_names, class_map_from_class_label, hub_category_to_label
from ..records import SourceRow
from .base import Source, resolve_split
from .bbox_format import bbox_format_record

# The Hub rows' features, defined once (the same as the Hub repo's dataset_infos.json).
HUB_FEATURES = datasets.Features(
    {
        "image_id": datasets.Value("int64"),
        "image": datasets.Image(),
        "width": datasets.Value("int64"),
        "height": datasets.Value("int64"),
        "objects": datasets.Sequence(
            {
                "bbox_id": datasets.Value("int64"),
                "category": datasets.ClassLabel(names=list(COCO_CLASSES)),
                "bbox": datasets.Sequence(datasets.Value("float64"), length=4),
                "area": datasets.Value("float64"),
            }
        ),
    }
)


def check_hub_features(features: datasets.Features | None, where: str) -> None:
    """Refuse (ValueError) a dataset whose columns are not the Hub COCO ones, naming what is missing."""
    if features is None:
        return  # unknown until iterated; row conversion reports problems per row
    missing = [c for c in ("image_id", "image", "width", "height", "objects") if c not in features]
    objects = features.get("objects")
    if isinstance(objects, dict):
        missing += [f"objects.{c}" for c in ("bbox_id", "category", "bbox") if c not in objects]
    elif objects is not None:
        missing.append("objects (as a sequence of {bbox_id, category, bbox, area})")
    if missing:
        raise ValueError(f"{where}: not in the Hub COCO layout; missing columns {missing} (have {list(features)})")
    if not isinstance(features["image"], datasets.Image):
        raise ValueError(f"{where}: column 'image' is {features['image']!r}, expected an Image feature")
    category = objects["category"]
    label = getattr(category, "feature", category)
    if isinstance(label, datasets.ClassLabel):
        check_class_names(label.names, f"{where}: objects.category")


def _image_bytes(value) -> bytes | None:
    """Encoded bytes from an undecoded Image cell ({"bytes", "path"} or bytes), or None."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    data = value.get("bytes")
    # A cell with only a path points outside the dataset; the Hub layout embeds bytes, so treat it as missing.
    return None if data is None else bytes(data)


def hub_row_to_source_row(row: Mapping, index: int, origin: str) -> SourceRow:
    """Convert one Hub-shaped row (image undecoded) to a SourceRow; labels mapped to 1..80."""
    objects = row.get("objects") or {}
    bboxes = list(objects.get("bbox") or [])
    cats = list(objects.get("category") or [])
    ids = list(objects.get("bbox_id") or [])
    n = len(bboxes)
    if len(cats) != n or len(ids) not in (0, n):
        raise ValueError(
            f"{origin}: objects have {n} bboxes, {len(cats)} categories and {len(ids)} bbox_ids; "
            "they must be parallel lists"
        )
    raw = np.full((n, 4), np.nan, dtype=np.float64)
    for i, b in enumerate(bboxes):
        if b is not None and len(b) == 4:
            raw[i] = [np.nan if v is None else float(v) for v in b]
    cat = np.array([-1 if c is None else int(c) for c in cats], dtype=np.int64)  # -1 -> INVALID_LABEL
    bbox_ids = np.array([-1 if v is None else int(v) for v in ids] if ids else [-1] * n, dtype=np.int64)
    return SourceRow(
        index=index,
        image_id=int(row["image_id"]),
        image=_image_bytes(row.get("image")),
        width=int(row.get("width") or 0),
        height=int(row.get("height") or 0),
        bbox_ids=bbox_ids,
        labels=hub_category_to_label(cat),
        bboxes=raw,
        iscrowd=np.zeros(n, dtype=bool),  # the Hub rows carry no crowd flag
        origin=origin,
    )


@dataclass(frozen=True)
class _ParquetFile:
    """One data file of a split: where it is, and its row groups' sizes (from the footer alone)."""

    url: str
    group_rows: tuple[int, ...]
    footer_sha256: str

    @property
    def num_rows(self) -> int:
        return sum(self.group_rows)


def _open_file(url: str):
    """A binary file object for a local path or any fsspec URL (hf:// for the Hub)."""
    import fsspec

    return fsspec.open(url, "rb").open()


def _footer(url: str) -> _ParquetFile:
    """Row-group sizes and a digest of the footer (schema, row groups, statistics): no row is read."""
    with _open_file(url) as f:
        meta = pq.ParquetFile(f).metadata
        f.seek(-8, os.SEEK_END)
        length = int.from_bytes(f.read(4), "little")
        f.seek(-8 - length, os.SEEK_END)
        footer = f.read(length)
    return _ParquetFile(url, tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)),
                        hashlib.sha256(footer).hexdigest())


def split_files(source: str, split: str, revision: str | None) -> tuple[str, list[str], datasets.Features | None]:
    """(resolved split, its data files in the order the Hub's own loader reads them, the features)."""
    where = _where(source, revision)
    try:
        builder = datasets.load_dataset_builder(source, revision=revision)
    except (ConnectionError, TimeoutError, OSError) as e:
        raise ConnectionError(
            f"{where}: cannot reach the Hugging Face Hub ({type(e).__name__}: {e}). To build without the network, "
            "point the source at a local folder in the Hub's layout (data/<split>-*.parquet + README.md), or at an "
            "official COCO folder as coco:DIR") from e
    files = builder.config.data_files or {}
    resolved = resolve_split(split, list(files), where)
    return resolved, [str(f) for f in files[resolved]], builder.info.features


def _where(source: str, revision: str | None) -> str:
    local = os.path.isdir(source)
    return f"{'local folder' if local else 'Hub dataset'} {source!r}" + (f" @ {revision}" if revision else "")


def _rows_of(files: list[_ParquetFile], start: int, stop: int, columns: list[str] | None = None) -> Iterator[dict]:
    """Rows start..stop-1 of the split as Hub-shaped dicts, reading only the row groups that hold them."""
    base = 0
    for pf in files:
        if base >= stop:
            return
        if base + pf.num_rows <= start:
            base += pf.num_rows
            continue
        with _open_file(pf.url) as f:
            reader = pq.ParquetFile(f)
            for g, n in enumerate(pf.group_rows):
                if base + n > start and base < stop:
                    table = reader.read_row_group(g, columns=columns)
                    lo, hi = max(start - base, 0), min(stop - base, n)
                    yield from table.slice(lo, hi - lo).to_pylist()
                base += n
                if base >= stop:
                    return


def _image_ids(files: list[_ParquetFile]) -> Iterator[int]:
    for pf in files:
        with _open_file(pf.url) as f:
            yield from pq.ParquetFile(f).read(columns=["image_id"]).column("image_id").to_pylist()


def open_hub(source: str, split: str, revision: str | None, bbox_format: str, detect_rows: int, *,
             hub_crowd: str = "auto") -> Source:
    """Open one split of a Hub dataset id or a local Hub-layout folder, by its parquet files.

    One code path for both: ``datasets`` resolves the data files (the Hub's, pinned at the resolved
    revision, or the folder's), and pyarrow reads only the row groups a range of rows needs, so a part
    of a build never streams the rows of other parts.
    """
    where = _where(source, revision)
    resolved, urls, features = split_files(source, split, revision)
    check_hub_features(features, where)
    files = [_footer(u) for u in urls]
    num_rows = sum(f.num_rows for f in files)

    def origin(i: int) -> str:
        return f"{source} {resolved} row {i}"

    def rows_fn(start: int, stop: int) -> Iterator[SourceRow]:
        for i, r in enumerate(_rows_of(files, start, stop), start):
            yield hub_row_to_source_row(r, i, origin(i))

    head = [hub_row_to_source_row({"image_id": 0, **r}, i, origin(i))
            for i, r in enumerate(_rows_of(files, 0, min(detect_rows, num_rows), ["objects", "width", "height"]))]
    record = bbox_format_record(bbox_format, [(r.bboxes, r.width, r.height) for r in head], f"{where} split {resolved!r}")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.url.rsplit('/', 1)[-1]}:{f.num_rows}:{f.footer_sha256}\n".encode())
    info = {"kind": "hub", "id": source, "local": os.path.isdir(source), "revision": revision, "split": resolved,
            "requested_split": split, "num_rows": num_rows, "files": [f.url.rsplit("/", 1)[-1] for f in files]}
    return Source(info, record, {}, num_rows, "sha256:" + digest.hexdigest(), rows_fn, _image_ids(files),
                  classes=class_map_from_class_label(COCO_CLASSES, f"{where}: objects.category"))
