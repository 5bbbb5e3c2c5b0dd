"""The JSON record of a sample (``<key>.json``): one type, written by the build and read by the loader,
check, stats and show.

Boxes are float32 values written as ``float(np.float32(v))``, so reading them back as float32 is exact.
Field order and separators are fixed: equal records give byte-identical members.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

REQUIRED_FIELDS = ("image_id", "size", "boxes", "labels", "rpn")  # what a sound record must hold


class RecordError(ValueError):
    """A JSON record that is not a valid record; the message says which field and why."""


def key_of(image_id: int) -> str:
    """The sample key of an image id: 12 zero-padded digits (the COCO file-name stem)."""
    return f"{int(image_id):012d}"


def box_list(boxes: np.ndarray) -> list[list[float]]:
    """float32 [K, 4] -> JSON lists whose numbers read back as the same float32 values."""
    return [[float(v) for v in row] for row in np.asarray(boxes, dtype=np.float32)]


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Boxes of the horizontally mirrored canvas: x1' = W - x2, x2' = W - x1 in float32 (W: the canvas width).

    The one definition of the flip: the build matches the anchors against exactly these boxes and the
    loader delivers exactly these, so the stored flipped targets are what the rule gives for them.
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    w = np.float32(width)
    return np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1)


def box_array(value: Any, name: str, dtype: type = np.float32) -> np.ndarray:
    """A JSON box list (or None) -> [K, 4] array; RecordError when it is not a list of 4-number lists."""
    try:
        a = np.asarray(value if value is not None else [], dtype=dtype)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer beyond float64
        raise RecordError(f"{name} is not a list of numbers") from None
    if a.size == 0:
        return a.reshape(0, 4)
    if a.ndim != 2 or a.shape[1] != 4:
        raise RecordError(f"{name} has shape {list(a.shape)}, expected [N, 4]")
    return a


def _ints(value: Any, name: str) -> np.ndarray:
    try:
        a = np.asarray(value if value is not None else [], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        raise RecordError(f"{name} is not a list of integers") from None
    return a


def _pair(value: Any, name: str, kind: type) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise RecordError(f"{name} is {value!r}, expected a pair")
    return tuple(kind(v) for v in value)


@dataclass
class Record:
    """One sample's record; boxes in pixels of the stored (resized) image, xyxy."""

    key: str
    image_id: int
    orig_size: tuple[int, int]  # (H, W) of the source image
    size: tuple[int, int]  # (H, W) of the stored canvas
    content_size: tuple[int, int]  # the part of the canvas holding image content
    scale: tuple[float, float]  # (sy, sx): content_size / orig_size
    pad: tuple[int, int]  # zero padding at the bottom and right (letterbox)
    boxes: np.ndarray  # float32 [K, 4]
    labels: np.ndarray  # int64 [K], 1..80
    bbox_ids: np.ndarray  # int64 [K]
    crowd_boxes: np.ndarray  # float32 [C, 4]
    crowd_labels: np.ndarray  # int64 [C]
    crowd_bbox_ids: np.ndarray  # int64 [C]
    box_drops: dict[str, int] = field(default_factory=dict)
    source_index: int = -1  # position of the row in the source
    rpn: dict[str, int] | None = None  # anchor-label counts, set by the anchor step

    def to_dict(self) -> dict:
        """The JSON form, in the fixed field order."""
        d = {
            "key": self.key, "image_id": int(self.image_id),
            "orig_size": [int(v) for v in self.orig_size], "size": [int(v) for v in self.size],
            "content_size": [int(v) for v in self.content_size], "scale": [float(v) for v in self.scale],
            "pad": [int(v) for v in self.pad],
            "boxes": box_list(self.boxes), "labels": [int(v) for v in self.labels],
            "bbox_ids": [int(v) for v in self.bbox_ids],
            "crowd_boxes": box_list(self.crowd_boxes), "crowd_labels": [int(v) for v in self.crowd_labels],
            "crowd_bbox_ids": [int(v) for v in self.crowd_bbox_ids],
            "box_drops": dict(self.box_drops), "source_index": int(self.source_index),
        }
        if self.rpn is not None:
            d["rpn"] = dict(self.rpn)
        return d

    def to_json(self) -> bytes:
        """The member bytes: UTF-8 JSON with compact separators."""
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, d: Any) -> "Record":
        """A record from its parsed JSON; RecordError names the first field that is not valid."""
        if not isinstance(d, dict):
            raise RecordError(f"JSON record is a {type(d).__name__}, expected an object")
        size = _pair(d.get("size"), "size", int)
        boxes = box_array(d.get("boxes"), "boxes")
        if not np.isfinite(boxes).all():
            raise RecordError("boxes hold non-finite coordinates")
        labels = _ints(d.get("labels"), "labels")
        if len(labels) != len(boxes):
            raise RecordError(f"{len(boxes)} boxes but {len(labels)} labels")
        try:
            return cls._from_valid_dict(d, size, boxes, labels)
        except (TypeError, ValueError) as e:
            raise RecordError(f"JSON record: {e}") from None

    @classmethod
    def _from_valid_dict(cls, d: dict, size: tuple, boxes: np.ndarray, labels: np.ndarray) -> "Record":
        return cls(
            key=str(d.get("key", "")), image_id=int(d.get("image_id", -1)),
            orig_size=_pair(d.get("orig_size", size), "orig_size", int), size=size,
            content_size=_pair(d.get("content_size", size), "content_size", int),
            scale=_pair(d.get("scale", (1.0, 1.0)), "scale", float), pad=_pair(d.get("pad", (0, 0)), "pad", int),
            boxes=boxes, labels=labels, bbox_ids=_ints(d.get("bbox_ids"), "bbox_ids"),
            crowd_boxes=box_array(d.get("crowd_boxes"), "crowd_boxes"),
            crowd_labels=_ints(d.get("crowd_labels"), "crowd_labels"),
            crowd_bbox_ids=_ints(d.get("crowd_bbox_ids"), "crowd_bbox_ids"),
            box_drops=dict(d.get("box_drops") or {}), source_index=int(d.get("source_index", -1)),
            rpn=d.get("rpn"),
        )

    def hflip(self) -> "Record":
        """The record of the horizontally mirrored canvas: boxes and crowd boxes flipped (flip_boxes), all else kept."""
        w = self.size[1]
        return replace(self, boxes=flip_boxes(self.boxes, w), crowd_boxes=flip_boxes(self.crowd_boxes, w))

    @classmethod
    def from_json(cls, data: bytes) -> "Record":
        """Parse a JSON member (RecordError when it is not JSON or not a valid record)."""
        return cls.from_dict(parse_json(data))


def parse_json(data: bytes) -> Any:
    """The parsed JSON member, not yet checked as a record (RecordError when it is not JSON)."""
    try:
        return json.loads(data)
    except ValueError as e:  # UnicodeDecodeError is a ValueError too
        raise RecordError(f"not valid JSON: {e}") from None
