"""The keep-ratio contract (``--resize keep-ratio``): each image's stored size and its canvas.

The stored size is exactly what torchvision's ``GeneralizedRCNNTransform(min_size, max_size)`` resizes an
image to: one factor ``s = min(min_size / shortest, max_size / longest)`` in Python floats, and each side
``floor(side * s)`` (``torch.nn.functional.interpolate`` with ``recompute_scale_factor=True``). Boxes are
torchvision's ``resize_boxes``: float32 coordinates times the float32 ratio ``new / old`` per axis.

A sample's canvas is its stored size rounded up to a multiple of 32, per side: the padded size torchvision's
``batch_images`` gives a batch whose largest image is this one. A batch of samples of one canvas is therefore
padded to exactly that canvas, so targets computed over the canvas's anchors are the ones torchvision's RPN
computes for that batch, padding included.
"""
from __future__ import annotations

import math

import numpy as np

CANVAS_DIVISOR = 32  # torchvision's size_divisible: the padded batch is a multiple of it


def keep_ratio_size(orig_hw: tuple[int, int], min_size: int, max_size: int) -> tuple[int, int]:
    """(H, W) torchvision's transform resizes an image of ``orig_hw`` to (same factor, same rounding)."""
    h, w = int(orig_hw[0]), int(orig_hw[1])
    if h <= 0 or w <= 0 or min_size <= 0 or max_size <= 0:
        raise ValueError(f"keep_ratio_size: sizes must be positive, got {orig_hw}, min {min_size}, max {max_size}")
    s = min(min_size / min(h, w), max_size / max(h, w))  # Python floats, as torchvision's eager path
    return max(1, math.floor(h * s)), max(1, math.floor(w * s))


def canvas_of(content_hw: tuple[int, int], divisor: int = CANVAS_DIVISOR) -> tuple[int, int]:
    """The canvas of a stored size: each side rounded up to a multiple of ``divisor``."""
    h, w = int(content_hw[0]), int(content_hw[1])
    return -(-h // divisor) * divisor, -(-w // divisor) * divisor


def largest_canvas(max_size: int, divisor: int = CANVAS_DIVISOR) -> tuple[int, int]:
    """The canvas no keep-ratio sample exceeds: no side is stored longer than ``max_size``."""
    side = -(-int(max_size) // divisor) * divisor
    return side, side


def box_ratio(orig_hw: tuple[int, int], new_hw: tuple[int, int]) -> tuple[float, float]:
    """(ry, rx): torchvision's float32 ``new / old`` per axis, as Python floats (exact float32 values)."""
    ry = np.float32(new_hw[0]) / np.float32(orig_hw[0])
    rx = np.float32(new_hw[1]) / np.float32(orig_hw[1])
    return float(ry), float(rx)


def resize_boxes_f32(boxes: np.ndarray, orig_hw: tuple[int, int], new_hw: tuple[int, int]) -> np.ndarray:
    """torchvision's ``resize_boxes`` in numpy: float32 xyxy boxes times the float32 ratio per axis (float32)."""
    ry, rx = box_ratio(orig_hw, new_hw)
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return b * np.array([rx, ry, rx, ry], dtype=np.float32)


def canvas_key(canvas_hw: tuple[int, int]) -> str:
    """"HxW": how the manifest and shard entries name a canvas."""
    return f"{int(canvas_hw[0])}x{int(canvas_hw[1])}"


def parse_canvas_key(text: str) -> tuple[int, int] | None:
    """(H, W) of an "HxW" canvas key, or None when it is not one (positive multiples of 32)."""
    h, sep, w = str(text).partition("x")
    if not (sep and h.isdigit() and w.isdigit() and len(h) <= 6 and len(w) <= 6):
        return None
    hw = int(h), int(w)
    return hw if all(v > 0 and v % CANVAS_DIVISOR == 0 for v in hw) else None


class KeepRatioCanvas:
    """The record-size rule of a keep-ratio build (what readers pass where a fixed build passes its (H, W)):
    a record's ``size`` is its ``content_size`` rounded up to a multiple of 32, within ``largest``."""

    def __init__(self, largest: tuple[int, int]):
        self.largest = (int(largest[0]), int(largest[1]))

    def content_of(self, meta: dict) -> tuple[tuple[int, int] | None, str]:
        """(the content (H, W) that bounds the record's boxes, "") or (None, why the sizes break the rule)."""
        size, content = meta.get("size"), meta.get("content_size")
        for name, v in (("size", size), ("content_size", content)):
            if not (type(v) is list and len(v) == 2 and all(type(x) is int and 0 < x < 1 << 31 for x in v)):
                return None, f"{name} {str(v)[:40]} is not a pair of positive integers"
        if list(canvas_of(content)) != size:
            return None, f"size {size} is not content_size {content} rounded up to a multiple of {CANVAS_DIVISOR}"
        if size[0] > self.largest[0] or size[1] > self.largest[1]:
            return None, f"size {size} exceeds the manifest's largest canvas {list(self.largest)}"
        return (content[0], content[1]), ""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeepRatioCanvas) and other.largest == self.largest

    def __hash__(self) -> int:
        return hash(self.largest)

    def __repr__(self) -> str:
        return f"KeepRatioCanvas(largest={self.largest})"
