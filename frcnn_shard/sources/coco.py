"""The official COCO folder layout (``coco:DIR``): ``annotations/instances_<split>.json`` plus the image
folder ``<split>/``; category ids 1..90 become labels 1..80.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from ..labels import INVALID_LABEL, class_map_from_coco_categories, label_lookup
from ..records import SourceRow
from .base import Source, resolve_split
from .bbox_format import bbox_format_record

COCO_PREFIX = "coco:"


def coco_split_files(coco_dir: Path, split: str) -> tuple[str, Path]:
    """Resolve a split in an official COCO folder to (split name, annotation file)."""
    ann_dir = coco_dir / "annotations"
    if not ann_dir.is_dir():
        raise FileNotFoundError(f"COCO folder {coco_dir}: no annotations/ directory (expected annotations/instances_<split>.json)")
    available = sorted(p.name[len("instances_") : -len(".json")] for p in ann_dir.glob("instances_*.json"))
    resolved = resolve_split(split, available, f"COCO folder {coco_dir}")
    return resolved, ann_dir / f"instances_{resolved}.json"


def load_coco(ann_file: Path) -> tuple[dict, str]:
    """The parsed annotation file and the sha256 of its bytes (the split's fingerprint)."""
    raw = ann_file.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ann_file}: not valid JSON ({e})") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{ann_file}: missing list {key!r}; not a COCO instances file")
    return data, "sha256:" + hashlib.sha256(raw).hexdigest()


def group_annotations(data: dict) -> tuple[dict[int, list[dict]], int]:
    """Annotations by image id, in file order, and the number whose image_id is not in ``images``."""
    by_image: dict[int, list[dict]] = {int(im["id"]): [] for im in data["images"]}
    dangling = 0
    for ann in data["annotations"]:
        bucket = by_image.get(int(ann["image_id"]))
        if bucket is None:
            dangling += 1
        else:
            bucket.append(ann)
    return by_image, dangling


def coco_bbox(ann: Mapping) -> list[float]:
    b = ann.get("bbox")
    if not isinstance(b, (list, tuple)) or len(b) != 4:
        return [float("nan")] * 4  # the transform drops it as non_finite
    return [float("nan") if v is None else float(v) for v in b]


def _coco_boxes(anns: list[dict]) -> np.ndarray:
    """The raw [x, y, w, h] boxes of an image's annotations as float64 [N, 4]."""
    return np.array([coco_bbox(a) for a in anns], dtype=np.float64).reshape(-1, 4)


def _coco_row(image: Mapping, anns: list[dict], catmap: dict[int, int], index: int, img_dir: Path) -> SourceRow:
    path = img_dir / str(image["file_name"])
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        data = None  # the transform drops it as missing_image, with this path as origin
    return SourceRow(
        index=index,
        image_id=int(image["id"]),
        image=data,
        width=int(image.get("width") or 0),
        height=int(image.get("height") or 0),
        bbox_ids=np.array([int(a.get("id", -1)) for a in anns], dtype=np.int64),
        labels=np.array([catmap.get(int(a.get("category_id", -1)), INVALID_LABEL) for a in anns], dtype=np.int64),
        bboxes=_coco_boxes(anns),
        iscrowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
        origin=str(path),
    )


def open_coco(source: str, split: str, bbox_format: str, detect_rows: int, *, image_dir: str | None = None) -> Source:
    """Open one split of an official COCO folder (``coco:DIR``)."""
    coco_dir = Path(source[len(COCO_PREFIX) :]).expanduser()
    if not coco_dir.is_dir():
        raise FileNotFoundError(f"no such folder: {coco_dir} (source {source!r})")
    resolved, ann_file = coco_split_files(coco_dir, split)
    # Refused before the annotation file (hundreds of MB for train) is parsed.
    if bbox_format == "xyxy":
        raise ValueError(f"{ann_file}: official COCO annotations are [x, y, w, h]; bbox format xyxy does not apply")
    data, fingerprint = load_coco(ann_file)
    classes = class_map_from_coco_categories(data["categories"], str(ann_file))
    catmap = label_lookup(classes)
    by_image, dangling = group_annotations(data)
    images = data["images"]
    img_dir = coco_dir / resolved

    def row(i: int) -> SourceRow:
        im = images[i]
        return _coco_row(im, by_image[int(im["id"])], catmap, i, img_dir)

    # The evidence is recorded for the manifest; it needs no image bytes.
    examined = [
        (_coco_boxes(by_image[int(im["id"])]), int(im.get("width") or 0), int(im.get("height") or 0))
        for im in images[:detect_rows]
    ]
    record = bbox_format_record(bbox_format, examined, str(ann_file), fixed="xywh")

    def rows_fn(start: int, stop: int) -> Iterator[SourceRow]:
        for i in range(start, stop):
            yield row(i)

    stats = {
        "images": len(images),
        "annotations": len(data["annotations"]),
        "crowd_annotations": sum(1 for v in by_image.values() for a in v if a.get("iscrowd")),
        "images_without_annotations": sum(1 for v in by_image.values() if not v),
        "annotations_unknown_category": sum(
            1 for v in by_image.values() for a in v if int(a.get("category_id", -1)) not in catmap
        ),
        "dangling_annotations": dangling,
    }
    info = {
        "kind": "coco",
        "id": source,
        "revision": None,
        "split": resolved,
        "requested_split": split,
        "num_rows": len(images),
        "annotation_file": str(ann_file),
    }
    crowd = {"rule": "iscrowd", "evidence": f"{ann_file}: the annotations' iscrowd flag",
             "annotations": stats["crowd_annotations"]}
    return Source(info, record, stats, len(images), fingerprint, rows_fn, (int(im["id"]) for im in images),
                  classes=classes, crowd=crowd)
