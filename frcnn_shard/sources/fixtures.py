"""Hub-layout folders made here, for tests, benchmarks and the demo: ``write_hub_folder`` (any Hub-shaped
rows, as parquet files with the Hub's features or others: ``hub_features``), ``coco_to_hub_rows`` (an
official COCO folder's rows in the Hub's shape) and the embedded synthetic sample (``make_sample_hub_folder``).
"""
from __future__ import annotations

import io
import json
import os
import re
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from ..labels import COCO_CLASSES, class_map_from_coco_categories, label_lookup
from .coco import coco_bbox, coco_split_files, group_annotations, load_coco
from . import DEFAULT_HUB_ID
from .hub import HUB_FEATURES

_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")
_PARQUET_ROW_GROUP = 100  # image rows are large; small row groups keep streaming reads small


def hub_features(category: datasets.ClassLabel | datasets.Value, *, id_field: str = "bbox_id",
                 list_of_structs: bool = False) -> datasets.Features:
    """Hub row features with another category feature (a ClassLabel, or Value("string") / Value("int64")),
    id field ("bbox_id", or "id" as in the object-detection guide's cppe-5) or objects nesting."""
    if id_field not in ("bbox_id", "id"):
        raise ValueError(f"id_field must be 'bbox_id' or 'id', got {id_field!r}")
    objects = {id_field: datasets.Value("int64"), "category": category,
               "bbox": datasets.Sequence(datasets.Value("float64"), length=4), "area": datasets.Value("float64")}
    return datasets.Features({
        "image_id": datasets.Value("int64"), "image": datasets.Image(), "width": datasets.Value("int64"),
        "height": datasets.Value("int64"),
        "objects": datasets.List(objects) if list_of_structs else datasets.Sequence(objects),
    })


def _readme(splits: dict[str, int], features: datasets.Features | None = HUB_FEATURES) -> str:
    """README.md whose YAML pins the split names and (unless ``features`` is None) the features."""
    split_dict = datasets.SplitDict()
    for name, n in splits.items():
        split_dict.add(datasets.SplitInfo(name=name, num_examples=n))
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for name in splits:
        lines += [f"  - split: {name}", f"    path: data/{name}-*"]
    if features is not None:
        info = datasets.DatasetInfo(features=features, splits=split_dict)._to_yaml_dict()
        # JSON is valid YAML flow style: no YAML library needed to write it.
        lines += ["dataset_info: " + json.dumps(info)]
    lines += ["---", ""]
    counts = ", ".join(f"{k}: {v} rows" for k, v in splits.items())
    what = f"the features and splits of `{DEFAULT_HUB_ID}`" if features == HUB_FEATURES else "its own features"
    body = f"# COCO-style detection rows in the Hub layout\n\nWritten by frcnn-shard (`write_hub_folder`): {what} ({counts}).\n"
    return "\n".join(lines) + body


def write_hub_folder(
    out_dir: str | os.PathLike, rows_by_split: Mapping[str, Iterable[Mapping]], *, rows_per_file: int = 500,
    features: datasets.Features = HUB_FEATURES, write_card: bool = True, card_features: datasets.Features | None = None,
) -> Path:
    """Write Hub-shaped rows as data/<split>-0000i-of-0000N.parquet plus README.md; return the folder.

    The parquet files carry ``features`` (default: the Hub COCO's) as their Hugging Face schema metadata;
    the README's dataset_info declares ``card_features`` (default: the same). ``write_card=False`` leaves
    dataset_info out (the README then only maps the splits to their files), as a folder with no card.
    """
    if rows_per_file <= 0:
        raise ValueError(f"rows_per_file must be > 0, got {rows_per_file}")
    out = Path(out_dir)
    data_dir = out / "data"
    bad = [s for s in rows_by_split if not _SPLIT_NAME.fullmatch(s)]
    if bad:
        raise ValueError(f"split names {bad} must be letters, digits and underscores")
    if data_dir.exists() and any(data_dir.iterdir()):
        raise FileExistsError(f"{data_dir} is not empty; write a Hub folder into a fresh directory")
    data_dir.mkdir(parents=True, exist_ok=True)
    schema = features.arrow_schema  # carries the features as Hugging Face metadata
    counts: dict[str, int] = {}
    for split, rows in rows_by_split.items():
        parts: list[Path] = []
        n = 0
        it = iter(rows)
        while True:
            chunk = [features.encode_example(dict(r)) for r in islice(it, rows_per_file)]
            if not chunk and parts:
                break
            part = data_dir / f"{split}-{len(parts):05d}.parquet.partial"
            table = pa.Table.from_pylist(chunk, schema=schema)
            pq.write_table(table, part, row_group_size=_PARQUET_ROW_GROUP)
            parts.append(part)
            n += len(chunk)
            if len(chunk) < rows_per_file:
                break
        # File names carry the total, known only at the end.
        for i, part in enumerate(parts):
            part.rename(data_dir / f"{split}-{i:05d}-of-{len(parts):05d}.parquet")
        counts[split] = n
    card = (card_features or features) if write_card else None
    (out / "README.md").write_text(_readme(counts, card), encoding="utf-8")
    return out


def coco_to_hub_rows(coco_dir: str | os.PathLike, split: str, *, bbox_format: str = "xywh") -> Iterator[dict]:
    """Convert an official COCO folder's split to Hub-shaped rows (crowd boxes become ordinary objects)."""
    if bbox_format not in ("xywh", "xyxy"):
        raise ValueError(f"bbox_format must be 'xywh' or 'xyxy', got {bbox_format!r}")
    root = Path(coco_dir)
    resolved, ann_file = coco_split_files(root, split)
    data, _ = load_coco(ann_file)
    classes = class_map_from_coco_categories(data["categories"], str(ann_file))
    if classes.names != COCO_CLASSES:  # the rows are written with the COCO ClassLabel
        raise ValueError(f"{ann_file}: coco_to_hub_rows writes COCO's 80 classes; this file's classes differ")
    catmap = label_lookup(classes)
    by_image, _ = group_annotations(data)
    for im in data["images"]:
        path = root / resolved / str(im["file_name"])
        anns = by_image[int(im["id"])]
        objects: dict[str, list] = {"bbox_id": [], "category": [], "bbox": [], "area": []}
        for a in anns:
            cid = int(a["category_id"])
            if cid not in catmap:
                raise ValueError(f"{ann_file}: annotation {a.get('id')} has unknown category_id {cid}")
            x, y, w, h = coco_bbox(a)
            objects["bbox_id"].append(int(a["id"]))
            objects["category"].append(catmap[cid] - 1)  # 0-based, sorted-id order, as the Hub ClassLabel
            objects["bbox"].append([x, y, w, h] if bbox_format == "xywh" else [x, y, x + w, y + h])
            objects["area"].append(float(a.get("area", w * h)))
        yield {
            "image_id": int(im["id"]),
            "image": {"bytes": path.read_bytes(), "path": None},
            "width": int(im["width"]),
            "height": int(im["height"]),
            "objects": objects,
        }


# ------------------------------------------------------------------------- the synthetic sample
# Each image is a noisy background with 1..6 non-overlapping filled rectangles or ellipses in distinct
# colours; since nothing overlaps, each shape's box is exactly the pixels it covers.

_MIN_SIDE, _MAX_SIDE = 240, 640
_MIN_OBJ = 24  # px: large enough to survive any sensible resize and min_box_size
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)
_VAL_ID_OFFSET = 1_000_000  # image ids of the val split, disjoint from train


def _place_boxes(rng: np.random.Generator, w: int, h: int, n: int) -> list[tuple[int, int, int, int]]:
    """Up to n non-overlapping integer xywh boxes (1 px gap) inside a w x h image."""
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(n * 30):
        if len(boxes) == n:
            break
        bw = int(rng.integers(_MIN_OBJ, max(_MIN_OBJ + 1, w // 2)))
        bh = int(rng.integers(_MIN_OBJ, max(_MIN_OBJ + 1, h // 2)))
        x = int(rng.integers(0, w - bw + 1))
        y = int(rng.integers(0, h - bh + 1))
        if all(x + bw + 1 <= ox or ox + ow + 1 <= x or y + bh + 1 <= oy or oy + oh + 1 <= y for ox, oy, ow, oh in boxes):
            boxes.append((x, y, bw, bh))
    return boxes


def _make_row(rng: np.random.Generator, image_id: int, first_bbox_id: int) -> dict:
    """One Hub-shaped row: JPEG bytes and exactly known xywh boxes."""
    w = int(rng.integers(_MIN_SIDE, _MAX_SIDE + 1))
    h = int(rng.integers(_MIN_SIDE, _MAX_SIDE + 1))
    background = rng.normal(110, 25, size=(h, w, 3)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(img)
    boxes = _place_boxes(rng, w, h, int(rng.integers(1, 7)))
    colours = rng.permutation(len(PALETTE))[: len(boxes)]
    objects: dict[str, list] = {"bbox_id": [], "category": [], "bbox": [], "area": []}
    for k, ((x, y, bw, bh), c) in enumerate(zip(boxes, colours)):
        # PIL shapes include both end points: [x, x + bw - 1] covers exactly bw pixels.
        corners = [x, y, x + bw - 1, y + bh - 1]
        if rng.random() < 0.5:
            draw.rectangle(corners, fill=PALETTE[c])
            area = float(bw * bh)
        else:
            draw.ellipse(corners, fill=PALETTE[c])
            area = float(np.pi * bw * bh / 4)
        objects["bbox_id"].append(first_bbox_id + k)
        objects["category"].append(int(rng.integers(0, len(COCO_CLASSES))))
        objects["bbox"].append([float(x), float(y), float(bw), float(bh)])
        objects["area"].append(area)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return {"image_id": image_id, "image": {"bytes": buf.getvalue(), "path": None}, "width": w, "height": h, "objects": objects}


def sample_rows(n: int, seed: int, stream: int = 0, id_offset: int = 0) -> Iterator[dict]:
    """Yield n deterministic synthetic Hub-shaped rows (xywh boxes, 0-based categories)."""
    rng = np.random.default_rng([seed, stream])
    for i in range(n):
        image_id = id_offset + i + 1
        yield _make_row(rng, image_id, first_bbox_id=image_id * 10)


def make_sample_hub_folder(out_dir: str | os.PathLike, *, n_train: int = 32, n_val: int = 8, seed: int = 0) -> Path:
    """Write a small synthetic dataset as a Hub-layout folder (splits train and val, xywh boxes)."""
    if n_train < 0 or n_val < 0:
        raise ValueError(f"n_train and n_val must be >= 0, got {n_train}, {n_val}")
    # Separate streams per split, so changing n_val does not change the train images.
    return write_hub_folder(
        out_dir,
        {
            "train": sample_rows(n_train, seed, stream=0),
            "val": sample_rows(n_val, seed, stream=1, id_offset=_VAL_ID_OFFSET),
        },
    )
