"""COCO-format annotations: the official folder layout (``coco:DIR``: ``annotations/instances_<split>.json``
plus the image folder ``<split>/``) or any COCO-format file (``coco:FILE.json``, images in ``--image-dir``,
default the file's own folder: custom exports, LVIS, Objects365). Labels 1..K follow the sorted category ids
of the file's ``categories``; evaluation writes those ids back.

An image's file is ``file_name`` under the image folder (folders in it allowed, as Objects365 writes them);
without ``file_name`` (LVIS), the last two parts of ``coco_url`` (``train2017/000000391895.jpg``), so an
image folder holding ``train2017/`` and ``val2017/`` serves LVIS. A name that would leave the image folder
(absolute, or with ``..``) is never opened: the row drops as ``missing_image``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from ..errors import SourceFormError
from ..format.names import SPLIT_RE
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
        raise SourceFormError(f"{ann_file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise SourceFormError(f"{ann_file}: not a COCO-format file (a JSON object with images, annotations, categories)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise SourceFormError(f"{ann_file}: missing list {key!r}; not a COCO-format file")
    if not data["images"]:
        raise SourceFormError(f"{ann_file}: 'images' is empty: no images found")
    return data, "sha256:" + hashlib.sha256(raw).hexdigest()


def unknown_categories(data: dict, catmap: Mapping[int | str, int], ann_file: Path) -> None:
    """SourceFormError when an annotation's category_id is not in ``categories`` (names the first few)."""
    bad = [a for a in data["annotations"] if a.get("category_id") not in catmap]
    if bad:
        first = ", ".join(f"annotation {a.get('id')!r} category_id {a.get('category_id')!r}" for a in bad[:3])
        raise SourceFormError(f"{ann_file}: {len(bad)} annotations have a category_id that is not in 'categories' "
                              f"({first}); every annotation's category must be listed")


def image_relpath(image: Mapping) -> str:
    """Where an image lies under the image folder: ``file_name``, else the last two parts of ``coco_url``."""
    name = image.get("file_name")
    if isinstance(name, str) and name:
        return name
    url = image.get("coco_url")
    if isinstance(url, str) and "/" in url:
        return "/".join(url.rstrip("/").split("/")[-2:])
    return ""


def _inside(img_dir: Path, rel: str) -> Path | None:
    """``img_dir / rel`` when it stays inside ``img_dir`` (no absolute name, no ``..``), else None."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts:
        return None
    return img_dir.joinpath(*parts)


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
    rel = image_relpath(image)
    path = _inside(img_dir, rel)
    data = None
    if path is not None:
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            pass  # the transform drops it as missing_image, with this path as origin
    return SourceRow(
        index=index,
        image_id=int(image["id"]),
        image=data,
        width=int(image.get("width") or 0),
        height=int(image.get("height") or 0),
        bbox_ids=np.array([int(a.get("id", -1)) for a in anns], dtype=np.int64),
        labels=np.array([catmap.get(a.get("category_id"), INVALID_LABEL) for a in anns], dtype=np.int64),
        bboxes=_coco_boxes(anns),
        iscrowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
        origin=str(path if path is not None else f"{img_dir}/{rel} (outside the image folder: not opened)"),
    )


def coco_files(source: str, split: str, image_dir: str | None) -> tuple[str, Path, Path]:
    """(split name, annotation file, image folder) of ``coco:DIR`` (official layout) or ``coco:FILE.json``."""
    target = Path(source[len(COCO_PREFIX) :]).expanduser()
    if target.is_file():
        if not SPLIT_RE.match(split):
            raise SourceFormError(f"{source}: split {split!r} names the output folder: letters, digits and _ only")
        images = Path(image_dir).expanduser() if image_dir else target.parent
        if not images.is_dir():
            raise SourceFormError(f"image folder {images} of {source!r} is not a folder")
        return split, target, images
    if not target.is_dir():
        raise FileNotFoundError(f"no such file or folder: {target} (source {source!r}; coco:DIR or coco:FILE.json)")
    if image_dir is not None:
        raise SourceFormError(f"{source}: --image-dir applies to coco:FILE.json; an official COCO folder's images "
                              "are its <split>/ folder")
    resolved, ann_file = coco_split_files(target, split)
    return resolved, ann_file, target / resolved


def open_coco(source: str, split: str, bbox_format: str, detect_rows: int, *, image_dir: str | None = None) -> Source:
    """Open one split of an official COCO folder (``coco:DIR``) or a COCO-format file (``coco:FILE.json``)."""
    resolved, ann_file, img_dir = coco_files(source, split, image_dir)
    # Refused before the annotation file (hundreds of MB for train) is parsed.
    if bbox_format == "xyxy":
        raise ValueError(f"{ann_file}: COCO-format boxes are [x, y, w, h]; bbox format xyxy does not apply")
    data, fingerprint = load_coco(ann_file)
    classes = class_map_from_coco_categories(data["categories"], str(ann_file))
    catmap = label_lookup(classes)
    unknown_categories(data, catmap, ann_file)
    by_image, dangling = group_annotations(data)
    images = data["images"]

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
        "image_dir": str(img_dir),
    }
    crowd = {"rule": "iscrowd", "evidence": f"{ann_file}: the annotations' iscrowd flag",
             "annotations": stats["crowd_annotations"]}
    return Source(info, record, stats, len(images), fingerprint, rows_fn, (int(im["id"]) for im in images),
                  classes=classes, crowd=crowd)
