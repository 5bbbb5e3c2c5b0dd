"""The JSON record of a sample (``<key>.json``): one type, written by the build and read by the loader,
check, stats and show.

Boxes are float32 values written as ``float(np.float32(v))``, so reading them back as float32 is exact.
Field order and separators are fixed: equal records give byte-identical members.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import FrcnnShardError
from .canvas import KeepRatioCanvas
from .image import RULE_IMAGE_SIZE

REQUIRED_FIELDS = ("image_id", "size", "boxes", "labels", "rpn")  # what a sound record must hold
BOX_EPS = 1e-3  # boxes are float32 in resized pixels, clipped to the image; allow float32 rounding

# Rule names of record_problems, as check reports them and tests match them; docs/INSPECT.md explains each one.
RULE_KEY_MISMATCH = "key_mismatch"
RULE_JSON_INVALID = "json_invalid"
RULE_BOX_INVALID = "box_invalid"
RULE_LABEL_INVALID = "label_invalid"


class RecordError(FrcnnShardError, ValueError):
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

    def hflip(self, content: bool = False) -> "Record":
        """The record of the mirrored stored image: boxes and crowd boxes flipped (flip_boxes), all else kept.

        ``content``: a keep-ratio sample, whose stored image is its content (mirrored in place, top-left of its
        canvas); else the stored image is the whole canvas."""
        w = self.content_size[1] if content else self.size[1]
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
    except RecursionError:  # json's parser refuses deep nesting safely; nothing else recurses on a record
        raise RecordError("not valid JSON: nested too deeply") from None


def checked_record(data: bytes, canvas_hw: tuple[int, int] | KeepRatioCanvas | None, num_classes: int, key: str
                   ) -> "Record":
    """The Record of a JSON member that keeps every record rule (``record_problems``), else RecordError
    "rule: detail" for the first rule it breaks. The arguments are record_problems' (``data``: the member)."""
    meta = parse_json(data)
    problems, _ = record_problems(meta, canvas_hw, num_classes, key)
    if problems:
        rule, detail = problems[0]
        raise RecordError(f"{rule}: {detail}")
    return Record.from_dict(meta)


# ------------------------------------------------------------------------------ the record rules


def record_problems(meta: Any, canvas_hw: tuple[int, int] | KeepRatioCanvas | None, num_classes: int, key: str
                    ) -> tuple[list[tuple[str, str]], int | None]:
    """The record rules, for check and the loader alike: ([(rule, detail)], number of boxes or None).

    ``meta``: the parsed JSON member; ``canvas_hw``: the manifest's canvas rule (``Manifest.canvas``: its image
    size, or for a keep-ratio build a KeepRatioCanvas, whose records' boxes lie in their content; None without
    a manifest: the record's own ``size`` bounds the boxes); ``num_classes``: background included (``Manifest.num_classes``),
    so labels must be integers in 1..num_classes-1; ``key``: the sample's key, which must be the
    12-digit image_id (and the record's own ``key``, when it has one). The common, sound record is
    decided in plain Python, in one pass over its boxes and labels.
    """
    if not isinstance(meta, dict):
        return [(RULE_JSON_INVALID, f"JSON member is a {type(meta).__name__}, expected an object")], None
    out = _field_problems(meta, key)
    if isinstance(canvas_hw, KeepRatioCanvas):  # a canvas per sample: the boxes lie in its content
        canvas_hw, why = canvas_hw.content_of(meta)
        if canvas_hw is None:
            return out + [(RULE_IMAGE_SIZE, why)], None
    elif canvas_hw is None:
        size = meta.get("size")
        if not (type(size) is list and len(size) == 2 and all(type(v) is int and v > 0 for v in size)):
            return out + [(RULE_JSON_INVALID, f"size {size!r} is not a pair of positive integers")], None
        canvas_hw = (size[0], size[1])
    elif "size" in meta and meta["size"] != list(canvas_hw):
        out.append((RULE_IMAGE_SIZE, f"JSON size {meta['size']!r} differs from the manifest's {list(canvas_hw)}"))
    num_boxes = _box_problems(meta.get("boxes"), meta.get("crowd_boxes"), canvas_hw, out)
    if num_boxes is None:
        return out, None
    out += _geometry_problems(meta, num_classes)
    labels = meta.get("labels")
    if (type(labels) is list and len(labels) == num_boxes
            and all(type(v) is int and 0 < v < num_classes for v in labels)):
        return out, num_boxes  # the common case, in one pass; _label_problems words any problem
    out += _label_problems(labels, num_boxes, num_classes)
    return out, num_boxes


def _field_problems(meta: dict, key: str) -> list[tuple[str, str]]:
    """Required fields present; key == the 12-digit image_id and the record's own key."""
    out: list[tuple[str, str]] = []
    missing = [f for f in REQUIRED_FIELDS if f not in meta]
    if missing:
        out.append((RULE_JSON_INVALID, f"JSON member lacks {', '.join(missing)}"))
    image_id = meta.get("image_id")
    if "image_id" in meta:
        if not isinstance(image_id, int) or isinstance(image_id, bool) or key_of(image_id) != key:
            out.append((RULE_KEY_MISMATCH, f"key is not the 12-digit image_id ({image_id!r})"))
    if "key" in meta and meta["key"] != key:
        out.append((RULE_KEY_MISMATCH, f"JSON 'key' is {meta['key']!r}"))
    return out


def _box_problems(boxes_v: Any, crowd_v: Any, hw: tuple[int, int], out: list[tuple[str, str]]) -> int | None:
    """Append the problems of the boxes and crowd boxes to ``out``; the number of boxes (None: unreadable)."""
    w, h = hw[1] + BOX_EPS, hw[0] + BOX_EPS
    if _boxes_clean(boxes_v, w, h) and _boxes_clean(crowd_v, w, h):
        return len(boxes_v) if boxes_v is not None else 0
    boxes, why = _box_array_or_why(boxes_v, "boxes")
    if boxes is None:
        out.append((RULE_BOX_INVALID, why))
        return None
    bad = _bad_boxes(boxes, hw)
    if len(bad):
        i = int(bad[0])
        out.append((RULE_BOX_INVALID, f"{len(bad)} of {len(boxes)} boxes non-finite, empty or outside "
                                      f"{hw[1]}x{hw[0]} (first: #{i} {boxes[i].tolist()})"))
    crowd, why = _box_array_or_why(crowd_v, "crowd_boxes")
    if crowd is None:
        out.append((RULE_BOX_INVALID, why))
    elif len(bad_c := _bad_boxes(crowd, hw)):
        out.append((RULE_BOX_INVALID, f"{len(bad_c)} of {len(crowd)} crowd boxes non-finite, empty or outside the image"))
    return len(boxes)


_PAIRS = (("orig_size", 1), ("content_size", 1), ("pad", 0))  # (field, least value): integer pairs


def _geometry_problems(meta: dict, num_classes: int) -> list[tuple[str, str]]:
    """The optional fields readers compute with (coco-gt undoes ``scale`` into ``orig_size``): integer pairs,
    a positive finite scale, and one crowd label in 1..num_classes-1 per crowd box."""
    out = [(RULE_JSON_INVALID, f"{name} {_short(meta[name])} is not a pair of integers >= {least}")
           for name, least in _PAIRS if name in meta and not (
               type(meta[name]) is list and len(meta[name]) == 2
               and all(type(v) is int and least <= v < 1 << 31 for v in meta[name]))]
    scale = meta.get("scale", [1.0, 1.0])
    if not (type(scale) is list and len(scale) == 2 and all(
            type(v) in (int, float) and 0 < v < math.inf for v in scale)):
        out.append((RULE_JSON_INVALID, f"scale {_short(scale)} is not a pair of positive finite numbers"))
    crowd_labels = meta.get("crowd_labels") or []
    crowd = meta["crowd_boxes"] if type(meta.get("crowd_boxes")) is list else []
    if not (type(crowd_labels) is list and len(crowd_labels) == len(crowd)
            and all(type(v) is int and 0 < v < num_classes for v in crowd_labels)):
        out.append((RULE_LABEL_INVALID, f"crowd_labels {_short(crowd_labels)} are not one label in "
                                        f"1..{num_classes - 1} per crowd box"))
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _label_problems(labels: Any, num_boxes: int, num_classes: int) -> list[tuple[str, str]]:
    """Labels: a list of integers (not bools, not 1.5), one per box, each in 1..num_classes-1."""
    if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        return [(RULE_LABEL_INVALID, "labels is not a list of integers")]
    out = []
    if len(labels) != num_boxes:
        out.append((RULE_LABEL_INVALID, f"{len(labels)} labels for {num_boxes} boxes"))
    wrong = [v for v in labels if not 1 <= v < num_classes]
    if wrong:
        out.append((RULE_LABEL_INVALID, f"labels outside 1..{num_classes - 1}: {sorted(set(wrong))[:5]}"))
    return out


def _box_array_or_why(value: Any, what: str) -> tuple[np.ndarray | None, str]:
    """JSON list -> float64 [N,4] array, or (None, why)."""
    try:
        return box_array(value, what, np.float64), ""
    except RecordError as e:
        return None, str(e)


def _boxes_clean(value: Any, w: float, h: float) -> bool:
    """True when ``value`` is None or a list of [x1, y1, x2, y2] number lists with every box inside the
    image (w, h: the image size plus BOX_EPS) and not empty: the common case, decided in plain Python,
    which for a handful of boxes is several times faster than building arrays. False means "look
    closer": _box_array_or_why / _bad_boxes then find (and word) the problem, or find none.

    The comparisons are _bad_boxes' own, so a box passes here only if it passes there: a NaN fails
    every comparison, an infinity fails one of the bounds, a non-number raises TypeError.
    """
    if value is None:
        return True
    if type(value) is not list:
        return False
    lo = -BOX_EPS
    try:
        for b in value:
            if type(b) is not list or len(b) != 4:
                return False
            x1, y1, x2, y2 = b
            if not (lo <= x1 < x2 <= w and lo <= y1 < y2 <= h):
                return False
    except TypeError:
        return False
    return True


def _bad_boxes(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Indices of boxes that are non-finite, outside the image (beyond BOX_EPS) or empty."""
    h, w = hw
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(a).all(axis=1)
        bad |= (a[:, 0] < -BOX_EPS) | (a[:, 1] < -BOX_EPS) | (a[:, 2] > w + BOX_EPS) | (a[:, 3] > h + BOX_EPS)
        bad |= ~(a[:, 2] > a[:, 0]) | ~(a[:, 3] > a[:, 1])
    return np.flatnonzero(bad)
