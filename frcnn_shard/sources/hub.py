"""Hub sources: a dataset id on the Hugging Face Hub, or a local folder in the Hub's layout, read through
one code path (``datasets.load_dataset(streaming=True)``), images left encoded.
"""
from __future__ import annotations

import os
from itertools import islice
from typing import Iterable, Iterator, Mapping

import datasets
import numpy as np

from ..labels import COCO_CLASSES, check_class_names, hub_category_to_label
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


def open_hub(source: str, split: str, revision: str | None, bbox_format: str, detect_rows: int) -> Source:
    local = os.path.isdir(source)
    where = f"{'local folder' if local else 'Hub dataset'} {source!r}" + (f" @ {revision}" if revision else "")
    available = datasets.get_dataset_split_names(source, revision=revision)
    resolved = resolve_split(split, available, where)
    # One code path for the Hub and for local folders: streaming load_dataset.
    ds = datasets.load_dataset(source, split=resolved, streaming=True, revision=revision)
    check_hub_features(ds.features, where)
    ds = ds.cast_column("image", datasets.Image(decode=False))  # decode in our workers, not here
    num_rows = None
    splits = ds.info.splits
    if splits and resolved in splits and splits[resolved].num_examples:
        num_rows = int(splits[resolved].num_examples)

    def origin(i: int) -> str:
        return f"{source} {resolved} row {i}"

    def convert(stream: Iterable[Mapping], start: int) -> Iterator[SourceRow]:
        for i, r in enumerate(stream, start):
            yield hub_row_to_source_row(r, i, origin(i))

    # Rows examined for the bbox format are buffered and replayed, so they are streamed once.
    live = iter(ds)
    head = list(convert(islice(live, detect_rows), 0))
    record = bbox_format_record(bbox_format, [(r.bboxes, r.width, r.height) for r in head], f"{where} split {resolved!r}")
    state = {"live": live}

    def rows_fn(skip: int) -> Iterator[SourceRow]:
        live_it = state.pop("live", None)
        if live_it is not None and skip <= len(head):
            # First pass: continue the stream the detection started.
            yield from head[skip:]
            yield from convert(live_it, len(head))
            return
        start = max(skip, len(head))
        yield from head[skip:]
        if len(head) < detect_rows:
            return  # the buffer already holds the whole split
        yield from convert(ds.skip(start), start)

    info = {
        "kind": "hub",
        "id": source,
        "local": local,
        "revision": revision,
        "split": resolved,
        "requested_split": split,
        "num_rows": num_rows,
    }
    return Source(info, record, {}, rows_fn)
