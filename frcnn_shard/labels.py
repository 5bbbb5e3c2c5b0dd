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
# The official COCO 2017 detection category ids (1..90, ten never used), increasing: label l (1..80) is
# COCO_CATEGORY_IDS[l - 1], the class COCO_CLASSES[l - 1]. Evaluation maps labels back through this.
COCO_CATEGORY_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33,
    34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
    62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
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


def label_to_coco_id(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Labels 1..80 -> official COCO category ids (int64); ValueError names a label outside 1..80."""
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    bad = lab[(lab < 1) | (lab > len(COCO_CATEGORY_IDS))]
    if bad.size:
        raise ValueError(f"label {int(bad[0])} has no COCO category: labels are 1..{len(COCO_CATEGORY_IDS)} "
                         "(0 is background)")
    return np.asarray(COCO_CATEGORY_IDS, dtype=np.int64)[lab - 1]


def coco_categories() -> list[dict]:
    """The COCO annotations file's "categories" list for labels 1..80 (id and name)."""
    return [{"id": cid, "name": name} for cid, name in zip(COCO_CATEGORY_IDS, COCO_CLASSES)]
