"""Hub sources: a dataset id on the Hugging Face Hub, or a local folder in the Hub's layout, read through
one code path: ``datasets`` resolves the split's parquet files, pyarrow reads the row groups a range
of rows needs (``open_hub``); images stay encoded.

**Layout.** The schema is read from every parquet data file of the split (all must agree, metadata aside),
so it is checked whether or not the folder has a dataset card. One row per image:

- ``image_id``: integer, the image's id (the sample key);
- ``image``: an Image feature (``struct{bytes, path}``, the bytes embedded) or plain binary;
- ``width``, ``height``: integers, the image size the boxes refer to;
- ``objects``: the image's boxes, either a struct of parallel lists (``datasets.Sequence({...})``, what
  ``push_to_hub`` writes) or a list of structs (``datasets.List({...})``), with the fields
  ``bbox_id`` (detection-datasets/coco) or ``id`` (the Hugging Face object-detection guide's layout,
  e.g. cppe-5): an integer annotation id per box; ``category``: an integer ClassLabel index or a string
  class name; ``bbox``: 4 numbers (xywh or xyxy, decided from the data: ``bbox_format``); ``area``:
  optional, not read. Other columns and fields are ignored.

A file that lacks one of these is refused (``SourceFormError``) naming the file, what is missing, and this
layout. When a dataset card (README ``dataset_info``) declares the features, its layout must be the files'.

**Classes.** Integer categories are a ClassLabel's indexes: its names come from the dataset card's features
or, without a card, from the Hugging Face features stored in the parquet schema metadata; where both
(or several files) name the classes, the names must be equal, else an error. Label = index + 1, in the
ClassLabel's order; the official COCO category ids are recorded when the names are COCO's 80. Integer
categories with no ClassLabel names anywhere are refused: the names are unknown. String categories: the
classes are the sorted set of the category strings of every split's files (so train and val number
them alike), label = rank + 1. A category outside the list is labelled INVALID_LABEL (dropped as
``bad_category``).

**Crowd.** The Hub's COCO (detection-datasets/coco) keeps COCO's crowd annotations as ordinary objects whose
``bbox_id`` is the COCO annotation id, and drops ``iscrowd``. COCO 2017 crowd ids are
900000000000 + category_id * 100000000 + image_id; every other COCO id is below 10^9. With
``hub_crowd="auto"``, when the classes are COCO's 80 (official ids) and every ``bbox_id >= 900000000000``
in the split encodes its own row's ``image_id`` and its own box's official category id by that formula
(checked over the whole split at open, from the ``image_id`` and ``objects`` columns alone), those boxes
are crowd boxes (``iscrowd``). If any such id does not encode its row, or there is none, or the classes
are not COCO's, no box is a crowd box and the manifest's ``crowd`` says why. ``hub_crowd="off"``: never.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SourceFormError
from ..format.classes import ClassMap
from ..labels import (COCO_CATEGORY_IDS, COCO_CLASSES, INVALID_LABEL, class_map_from_class_label,
                      class_map_from_names, label_lookup)
from ..records import SourceRow
from .base import Source, resolve_split
from .bbox_format import bbox_format_record
from .hub_schema import (HubLayout, check_hub_features, class_label_names, decided_class_names,
                         hub_layout, object_columns, parquet_features)

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


def _image_bytes(value) -> bytes | None:
    """Encoded bytes from an undecoded Image cell ({"bytes", "path"} or bytes), or None."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    data = value.get("bytes")
    # A cell with only a path points outside the dataset; the Hub layout embeds bytes, so treat it as missing.
    return None if data is None else bytes(data)


@dataclass(frozen=True)
class RowRules:
    """How one split's rows become SourceRows: {category as stored: label}, the objects' id field, and
    whether ids >= CROWD_ID_BASE are crowd boxes (decided over the whole split at open)."""

    lookup: Mapping[int | str, int]
    id_field: str = "bbox_id"
    crowd_ids: bool = False


COCO_RULES = RowRules(label_lookup(class_map_from_class_label(COCO_CLASSES, "HUB_FEATURES")))
CROWD_ID_BASE = 900_000_000_000  # COCO 2017 crowd ids: BASE + category_id * CROWD_CATEGORY_STEP + image_id
CROWD_CATEGORY_STEP = 100_000_000
CROWD_RULE = "bbox_id >= 900000000000 (COCO 2017 crowd ids)"


def _objects_dict(objects, id_field: str) -> dict:
    """The objects of a row as parallel lists, whichever nesting the file uses; the id field as bbox_id."""
    if isinstance(objects, list):  # a list of structs
        objects = {k: [o.get(k) if o else None for o in objects] for k in (id_field, "category", "bbox")}
    objects = objects or {}
    return {"bbox_id": objects.get(id_field), "category": objects.get("category"), "bbox": objects.get("bbox")}


def hub_row_to_source_row(row: Mapping, index: int, origin: str, rules: RowRules = COCO_RULES) -> SourceRow:
    """Convert one Hub-shaped row (image undecoded) to a SourceRow; labels by ``rules`` (default: COCO's 80)."""
    objects = _objects_dict(row.get("objects"), rules.id_field)
    bboxes = list(objects["bbox"] or [])
    cats = list(objects["category"] or [])
    ids = list(objects["bbox_id"] or [])
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
    bbox_ids = np.array([-1 if v is None else int(v) for v in ids] if ids else [-1] * n, dtype=np.int64)
    return SourceRow(
        index=index,
        image_id=int(row["image_id"]),
        image=_image_bytes(row.get("image")),
        width=int(row.get("width") or 0),
        height=int(row.get("height") or 0),
        bbox_ids=bbox_ids,
        labels=np.array([rules.lookup.get(c, INVALID_LABEL) for c in cats], dtype=np.int64),
        bboxes=raw,
        iscrowd=(bbox_ids >= CROWD_ID_BASE) if rules.crowd_ids else np.zeros(n, dtype=bool),
        origin=origin,
    )


@dataclass(frozen=True)
class _ParquetFile:
    """One data file of a split: where it is, and its row groups' sizes (from the footer alone)."""

    url: str
    group_rows: tuple[int, ...]
    footer_sha256: str
    schema: pa.Schema = field(compare=False, repr=False)

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
        reader = pq.ParquetFile(f)
        meta, schema = reader.metadata, reader.schema_arrow
        f.seek(-8, os.SEEK_END)
        length = int.from_bytes(f.read(4), "little")
        f.seek(-8 - length, os.SEEK_END)
        footer = f.read(length)
    return _ParquetFile(url, tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)),
                        hashlib.sha256(footer).hexdigest(), schema)


def hub_data_files(source: str, revision: str | None) -> tuple[dict[str, list[str]], datasets.Features | None]:
    """({split: its data files in the order the Hub's own loader reads them}, the dataset card's features)."""
    where = _where(source, revision)
    try:
        builder = datasets.load_dataset_builder(source, revision=revision)
    except (ConnectionError, TimeoutError, OSError) as e:
        raise ConnectionError(
            f"{where}: cannot reach the Hugging Face Hub ({type(e).__name__}: {e}). To build without the network, "
            "point the source at a local folder in the Hub's layout (data/<split>-*.parquet + README.md), or at an "
            "official COCO folder as coco:DIR") from e
    files = builder.config.data_files or {}
    return {str(k): [str(f) for f in v] for k, v in files.items()}, builder.info.features


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


def _schema_difference(a: pa.Schema, b: pa.Schema) -> list[str]:
    """The columns present in one schema only, or typed differently."""
    names = list(dict.fromkeys(a.names + b.names))
    return [n for n in names if n not in a.names or n not in b.names or a.field(n).type != b.field(n).type]


def split_layout(files: Sequence[_ParquetFile], card: datasets.Features | None, where: str) -> HubLayout:
    """The split's layout: every data file's schema checked (naming the file) and equal to the first's,
    metadata aside; a dataset card's declared layout must be the files'."""
    if not files:
        raise SourceFormError(f"{where}: the split has no data files")
    layout = hub_layout(files[0].schema, files[0].url)
    bare = files[0].schema.remove_metadata()
    for pf in files[1:]:
        hub_layout(pf.schema, pf.url)
        if not pf.schema.remove_metadata().equals(bare):
            raise SourceFormError(f"{pf.url}: columns {_schema_difference(pf.schema, bare)} differ from "
                                  f"{files[0].url}'s; every data file of a split must have the same schema")
    declared = check_hub_features(card, f"{where}: the dataset card's features (README dataset_info)")
    if declared is not None and declared != layout:
        raise SourceFormError(f"{where}: the dataset card declares {declared}, the data files hold {layout} "
                              f"({files[0].url}); the card must describe the files")
    return layout


def _category_strings(data_files: Mapping[str, Sequence[str]]) -> set[str]:
    """Every category string of every split's files (only the image_id and objects.category columns read)."""
    names: set[str] = set()
    for split in sorted(data_files):
        for url in data_files[split]:
            with _open_file(url) as f:
                layout = hub_layout(pq.ParquetFile(f).schema_arrow, url)
                if layout.category != "string":
                    raise SourceFormError(f"{url}: objects.category holds integers, while other data files "
                                          "hold strings; every split must use one kind")
                names.update(c for c in object_columns(f, layout, ["category"], url)["category"] if c is not None)
    return names


def hub_classes(layout: HubLayout, card: datasets.Features | None, files: Sequence[_ParquetFile],
                data_files: Mapping[str, Sequence[str]], where: str) -> ClassMap:
    """The split's classes: the sorted category strings of all splits, or the ClassLabel's names (the card's
    and every file's metadata agreeing); SourceFormError when integer categories have no names."""
    if layout.category == "string":
        return class_map_from_names(_category_strings(data_files),
                                    f"{where}: objects.category strings of splits {sorted(data_files)}")
    per_file = [(pf.url, class_label_names(parquet_features(pf.schema, pf.url))) for pf in files]
    names, place = decided_class_names(class_label_names(card), per_file, where)
    if names is None:
        raise SourceFormError(
            f"{where}: objects.category holds integers, but the class names are unknown: no ClassLabel names "
            "them, neither in a dataset card (README dataset_info features) nor in the parquet files' Hugging Face "
            "metadata. Declare objects.category as datasets.ClassLabel(names=[...]), or store the names as strings")
    return class_map_from_class_label(names, f"{place}: objects.category")


def _split_boxes(files: Sequence[_ParquetFile], layout: HubLayout) -> tuple[dict[str, np.ndarray], int]:
    """Every box of the split: its id, category, image id and row in the split; and the split's row count."""
    parts, base = [], 0
    for pf in files:
        with _open_file(pf.url) as f:
            cols = object_columns(f, layout, [layout.id_field, "category"], pf.url)
        cols["row"] = cols["row"] + base
        parts.append(cols)
        base += pf.num_rows
    keys = ("id", "category", "image_id", "row")
    boxes = {k: np.concatenate([p[layout.id_field if k == "id" else k] for p in parts]).astype(np.int64)
             for k in keys}
    return boxes, base


def _crowd(rule: str, evidence: str, annotations: int = 0) -> dict:
    """The Source's crowd record."""
    return {"rule": rule, "evidence": evidence, "annotations": annotations}


def coco_crowd_rule(boxes: Mapping[str, np.ndarray], rows: int, classes: ClassMap) -> dict:
    """The crowd record of a split with COCO's classes: the crowd-id rule applies when every
    bbox_id >= CROWD_ID_BASE encodes its own row's image id and its box's official category id."""
    ids, cats, image_ids = boxes["id"], boxes["category"], boxes["image_id"]
    seen = f"{len(ids)} boxes in {rows} rows"
    big = np.flatnonzero(ids >= CROWD_ID_BASE)
    if big.size == 0:
        return _crowd("none", f"no bbox_id >= {CROWD_ID_BASE} among {seen}: the split has no COCO crowd ids")
    category_id = dict(zip(classes.source_ids, classes.ids))
    # Python ints: the formula's values must not wrap, whatever ids a file holds.
    want = [CROWD_ID_BASE + category_id[int(c)] * CROWD_CATEGORY_STEP + int(i) if int(c) in category_id else None
            for c, i in zip(cats[big], image_ids[big])]
    bad = [(k, w) for k, w in zip(big, want) if w != int(ids[k])]
    if bad:
        k, w = bad[0]
        return _crowd("none", (
            f"rule not applied: {len(bad)} of the {big.size} bbox_ids >= {CROWD_ID_BASE} among {seen} do not encode "
            f"their own row (first: row {int(boxes['row'][k])}, image_id {int(image_ids[k])}, category {int(cats[k])}, "
            f"bbox_id {int(ids[k])}; 900000000000 + category_id * 100000000 + image_id = {w}); every box stays "
            "an ordinary box"))
    return _crowd(CROWD_RULE, (
        f"{big.size} of {seen} have bbox_id >= {CROWD_ID_BASE}, and each equals 900000000000 + category_id * "
        "100000000 + image_id for its own row's image_id and its box's official COCO category id"), int(big.size))


def crowd_record(files: Sequence[_ParquetFile], layout: HubLayout, classes: ClassMap, hub_crowd: str) -> dict:
    """The Source's ``crowd`` record: {"rule", "evidence", "annotations"} (hub_crowd: auto or off)."""
    if hub_crowd == "off":
        return _crowd("none", "hub_crowd off: every box is an ordinary box")
    if classes.ids != COCO_CATEGORY_IDS:
        return _crowd("none", f"the classes are not COCO's 80 with their official ids ({len(classes.names)} classes, "
                              f"{classes.order}): bbox ids carry no crowd meaning")
    return coco_crowd_rule(*_split_boxes(files, layout), classes)


def open_hub(source: str, split: str, revision: str | None, bbox_format: str, detect_rows: int, *,
             hub_crowd: str = "auto") -> Source:
    """Open one split of a Hub dataset id or a local Hub-layout folder, by its parquet files.

    One code path for both: ``datasets`` resolves the data files (the Hub's, pinned at the resolved
    revision, or the folder's), and pyarrow reads only the row groups a range of rows needs, so a part
    of a build never streams the rows of other parts. The schema, the classes and the crowd rule are
    decided here, from the files (the module docstring).
    """
    where = _where(source, revision)
    data_files, card = hub_data_files(source, revision)
    resolved = resolve_split(split, list(data_files), where)
    files = [_footer(u) for u in data_files[resolved]]
    layout = split_layout(files, card, where)
    classes = hub_classes(layout, card, files, data_files, where)
    crowd = crowd_record(files, layout, classes, hub_crowd)
    rules = RowRules(label_lookup(classes), layout.id_field, crowd["rule"] == CROWD_RULE)
    num_rows = sum(f.num_rows for f in files)

    def origin(i: int) -> str:
        return f"{source} {resolved} row {i}"

    def rows_fn(start: int, stop: int) -> Iterator[SourceRow]:
        for i, r in enumerate(_rows_of(files, start, stop), start):
            yield hub_row_to_source_row(r, i, origin(i), rules)

    head = [hub_row_to_source_row({"image_id": 0, **r}, i, origin(i), rules)
            for i, r in enumerate(_rows_of(files, 0, min(detect_rows, num_rows), ["objects", "width", "height"]))]
    record = bbox_format_record(bbox_format, [(r.bboxes, r.width, r.height) for r in head], f"{where} split {resolved!r}")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.url.rsplit('/', 1)[-1]}:{f.num_rows}:{f.footer_sha256}\n".encode())
    info = {"kind": "hub", "id": source, "local": os.path.isdir(source), "revision": revision, "split": resolved,
            "requested_split": split, "num_rows": num_rows, "files": [f.url.rsplit("/", 1)[-1] for f in files]}
    return Source(info, record, {}, num_rows, "sha256:" + digest.hexdigest(), rows_fn, _image_ids(files),
                  classes=classes, crowd=crowd)
