"""The label mapping: the one place that says which class is which.

Label 0 is background; labels 1..80 are the COCO detection classes in sorted COCO category-id order,
which is also the order of the Hub dataset's 0-based ``category`` ClassLabel (hub category c -> label c+1).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
BACKGROUND = "__background__"
CLASS_NAMES: tuple[str, ...] = (BACKGROUND,) + COCO_CLASSES
NUM_CLASSES = len(CLASS_NAMES)  # 81, background included
INVALID_LABEL = -1  # a box whose category is out of range; the transform drops it by rule


def hub_category_to_label(category: np.ndarray) -> np.ndarray:
    """Map the Hub's 0-based ClassLabel ids to labels 1..80; out-of-range ids become INVALID_LABEL."""
    cat = np.asarray(category, dtype=np.int64)
    ok = (cat >= 0) & (cat < len(COCO_CLASSES))
    return np.where(ok, cat + 1, INVALID_LABEL).astype(np.int64)


def check_class_names(names: Sequence[str], where: str) -> None:
    """Raise ValueError unless ``names`` (0-based, no background) equal COCO_CLASSES."""
    names = tuple(names)
    if names != COCO_CLASSES:
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(names, COCO_CLASSES)) if a != b][:5]
        raise ValueError(
            f"{where}: class names do not match the 80 COCO classes in sorted-id order "
            f"(got {len(names)} names; first differences (index, got, expected): {diff})"
        )


def coco_category_map(categories: Sequence[Mapping]) -> dict[int, int]:
    """Map official COCO category ids (1..90, sparse) to labels 1..80 in sorted-id order."""
    cats = sorted(categories, key=lambda c: int(c["id"]))
    check_class_names([c["name"] for c in cats], "COCO annotations 'categories'")
    return {int(c["id"]): i + 1 for i, c in enumerate(cats)}
