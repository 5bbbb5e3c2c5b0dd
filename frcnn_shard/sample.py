"""A small synthetic detection dataset, made here (no network), in the Hub layout.

Each image is a noisy background with 1..6 non-overlapping filled rectangles or ellipses in distinct
colours; since nothing overlaps, each shape's box is exactly the pixels it covers.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from .labels import COCO_CLASSES
from .sources import write_hub_folder

_MIN_SIDE, _MAX_SIDE = 240, 640
_MIN_OBJ = 24  # px: large enough to survive any sensible resize and min_box_size
_PALETTE = (
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
    colours = rng.permutation(len(_PALETTE))[: len(boxes)]
    objects: dict[str, list] = {"bbox_id": [], "category": [], "bbox": [], "area": []}
    for k, ((x, y, bw, bh), c) in enumerate(zip(boxes, colours)):
        # PIL shapes include both end points: [x, x + bw - 1] covers exactly bw pixels.
        corners = [x, y, x + bw - 1, y + bh - 1]
        if rng.random() < 0.5:
            draw.rectangle(corners, fill=_PALETTE[c])
            area = float(bw * bh)
        else:
            draw.ellipse(corners, fill=_PALETTE[c])
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
