"""The Hub layout's schema rules, read from the parquet files themselves (``hub`` documents the layout):
which columns a data file must have (``hub_layout``), that every file of a split agrees, where the class
names come from (``class_label_names``, ``decided_class_names``), and the per-box columns read with
pyarrow alone (``object_columns``), without images, for the checks made over a whole split at open.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import SourceFormError

ROW_COLUMNS = ("image_id", "image", "width", "height", "objects")
ID_FIELDS = ("bbox_id", "id")  # detection-datasets' name, then the object-detection guide's (cppe-5)
ACCEPTED = ("image_id (int), image (Image: struct{bytes, path}, or binary), width (int), height (int), "
            "objects: {bbox_id or id (int), category (int or string), bbox (4 numbers), area (optional)}, "
            "as a struct of lists or a list of structs")
STRUCT_OF_LISTS = "struct of lists"  # datasets.Sequence({...}), what push_to_hub writes
LIST_OF_STRUCTS = "list of structs"  # datasets.List({...}), or a plain pyarrow list<struct>


@dataclass(frozen=True)
class HubLayout:
    """What the row conversion needs to know of a split's schema.

    ``id_field`` is the objects field that holds each box's annotation id ("bbox_id" or "id"); ``nesting``
    is STRUCT_OF_LISTS or LIST_OF_STRUCTS; ``category`` is "int" (a ClassLabel index) or "string" (a name).
    """

    id_field: str
    nesting: str
    category: str


def _objects_fields(objects: pa.DataType) -> tuple[str, dict[str, pa.DataType]] | None:
    """(nesting, {field: the per-box type}) of the objects column's type, or None for another shape."""
    if pa.types.is_struct(objects):
        fields = {objects.field(i).name: objects.field(i).type for i in range(objects.num_fields)}
        if all(pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
               for t in fields.values()):
            return STRUCT_OF_LISTS, {n: t.value_type for n, t in fields.items()}
        return None
    if (pa.types.is_list(objects) or pa.types.is_large_list(objects)) and pa.types.is_struct(objects.value_type):
        item = objects.value_type
        return LIST_OF_STRUCTS, {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
    return None


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _column_problems(schema: pa.Schema) -> list[str]:
    """What the top-level columns lack (missing or of a type the rows cannot be read as)."""
    problems = [c for c in ROW_COLUMNS if c not in schema.names]
    for c in ("image_id", "width", "height"):
        if c in schema.names and not pa.types.is_integer(schema.field(c).type):
            problems.append(f"{c} (an integer column; it is {schema.field(c).type})")
    if "image" in schema.names:
        t = schema.field("image").type
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)
                or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)):
            problems.append(f"image (an Image feature, struct{{bytes, path}}, or binary; it is {t})")
    return problems


def _objects_problems(fields: dict[str, pa.DataType]) -> list[str]:
    """What the objects' fields lack: an id field, category (int or string) and bbox (a list of numbers)."""
    problems = []
    if not any(f in fields for f in ID_FIELDS):
        problems.append("objects.bbox_id (or objects.id)")
    elif not pa.types.is_integer(fields[next(f for f in ID_FIELDS if f in fields)]):
        problems.append("objects.bbox_id / objects.id as integers")
    cat = fields.get("category")
    if cat is None:
        problems.append("objects.category")
    elif not (pa.types.is_integer(cat) or _is_string(cat)):
        problems.append(f"objects.category as integers or strings (it is {cat})")
    box = fields.get("bbox")
    if box is None:
        problems.append("objects.bbox")
    elif not (pa.types.is_list(box) or pa.types.is_fixed_size_list(box) or pa.types.is_large_list(box)):
        problems.append(f"objects.bbox as a list of 4 numbers (it is {box})")
    return problems


def hub_layout(schema: pa.Schema, where: str) -> HubLayout:
    """The layout of one data file's schema; SourceFormError names the file, what is missing and what is accepted."""
    problems = _column_problems(schema)
    shape = _objects_fields(schema.field("objects").type) if "objects" in schema.names else None
    if "objects" in schema.names and shape is None:
        problems.append(f"objects as a struct of lists or a list of structs (it is {schema.field('objects').type})")
    if shape is not None:
        problems += _objects_problems(shape[1])
    if problems:
        raise SourceFormError(f"{where}: not in an accepted Hub layout: missing columns {problems} "
                              f"(have {schema.names}); accepted: {ACCEPTED}")
    nesting, fields = shape
    id_field = next(f for f in ID_FIELDS if f in fields)
    return HubLayout(id_field, nesting, "string" if _is_string(fields["category"]) else "int")


def check_hub_features(features: datasets.Features | None, where: str) -> HubLayout | None:
    """The layout a dataset card's features declare (None without a card); SourceFormError as ``hub_layout``."""
    if features is None:
        return None
    return hub_layout(features.arrow_schema, where)


def parquet_features(schema: pa.Schema, where: str) -> datasets.Features | None:
    """The Hugging Face features a data file stores in its schema metadata (b"huggingface"), or None."""
    if not schema.metadata or b"huggingface" not in schema.metadata:
        return None
    try:
        return datasets.Features.from_arrow_schema(schema)
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
        raise SourceFormError(f"{where}: unreadable Hugging Face features in the parquet metadata ({e})") from e


def class_label_names(features: datasets.Features | None) -> tuple[str, ...] | None:
    """The names of objects.category's ClassLabel in these features (None: no features, or no ClassLabel)."""
    objects = None if features is None else features.get("objects")
    if isinstance(objects, (datasets.List, datasets.LargeList)):  # a list of structs
        objects = objects.feature
    category = objects.get("category") if isinstance(objects, dict) else None
    label = getattr(category, "feature", category)  # a struct of lists holds List(ClassLabel)
    return tuple(label.names) if isinstance(label, datasets.ClassLabel) else None


def decided_class_names(card: tuple[str, ...] | None, files: Sequence[tuple[str, tuple[str, ...] | None]],
                        where: str) -> tuple[tuple[str, ...] | None, str]:
    """(the ClassLabel names, where they were read) from the card and each data file's metadata.

    Names found in more than one place must be equal: a card and data files that disagree number the same
    rows two ways, so nothing here picks one (SourceFormError names both).
    """
    found = [(f"{where}: the dataset card (README dataset_info)", card)] if card is not None else []
    found += [(f"{url}: the parquet schema's Hugging Face metadata", names) for url, names in files if names is not None]
    for place, names in found[1:]:
        if names != found[0][1]:
            first = [(i, a, b) for i, (a, b) in enumerate(zip(names, found[0][1])) if a != b][:3]
            raise SourceFormError(
                f"{where}: objects.category's ClassLabel names disagree: {found[0][0]} has {len(found[0][1])} names, "
                f"{place} has {len(names)} (first differences (index, here, there): {first}); make them equal")
    return (found[0][1], found[0][0]) if found else (None, "")


def _field_path(pf: pq.ParquetFile, field: str, where: str) -> str:
    """The column path that selects objects.<field> in this file (the list wrappers' names vary by writer)."""
    for i in range(pf.metadata.num_columns):
        parts = pf.metadata.schema.column(i).path.split(".")
        if parts[0] == "objects" and field in parts[1:]:
            return ".".join(parts[: parts.index(field, 1) + 1])
    raise SourceFormError(f"{where}: objects.{field} is not a column of this file; accepted: {ACCEPTED}")


def _flat_field(objects: pa.Array, field: str, nesting: str) -> tuple[np.ndarray, np.ndarray]:
    """(boxes per row, the field's values of every box in row order; integers with null as -1)."""
    if nesting == STRUCT_OF_LISTS:
        lists = pc.struct_field(objects, field)
        lengths, values = lists.value_lengths(), lists.flatten()
    else:
        lengths, values = objects.value_lengths(), pc.struct_field(objects.flatten(), field)
    if pa.types.is_integer(values.type):
        values = values.fill_null(-1)
    return lengths.fill_null(0).to_numpy(), values.to_numpy(zero_copy_only=False)


def object_columns(f, layout: HubLayout, fields: Sequence[str], where: str) -> dict[str, np.ndarray]:
    """Per-box arrays of ``fields`` of an open data file, and each box's "image_id" and "row" (in the file);
    no image is read. SourceFormError names the first row whose per-box lists differ in length."""
    pf = pq.ParquetFile(f)
    table = pf.read(columns=["image_id"] + [_field_path(pf, n, where) for n in fields])
    objects = table.column("objects").combine_chunks()
    out: dict[str, np.ndarray] = {}
    lengths = None
    for name in fields:
        counts, out[name] = _flat_field(objects, name, layout.nesting)
        if lengths is not None and not np.array_equal(counts, lengths):
            row = int(np.flatnonzero(counts != lengths)[0])
            raise SourceFormError(f"{where} row {row}: objects' lists differ in length ({fields}); they must be parallel")
        lengths = counts
    lengths = np.zeros(table.num_rows, dtype=np.int64) if lengths is None else lengths
    out["image_id"] = np.repeat(table.column("image_id").fill_null(-1).to_numpy(), lengths)
    out["row"] = np.repeat(np.arange(table.num_rows), lengths)
    return out
