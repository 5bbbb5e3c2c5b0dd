"""The label mapping: how a source's classes become labels 1..K (``format.classes.ClassMap``).

Label 0 is background. Every source numbers its classes by one documented rule (``class_map_from_*``), and
``keep_classes`` applies ``--classes``. COCO's 80 classes are the default: labels 1..80 in sorted COCO
category-id order, which is also the order of the Hub dataset's 0-based ``category`` ClassLabel.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .format.classes import BACKGROUND, ClassMap, ClassMapError

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
CLASS_NAMES: tuple[str, ...] = (BACKGROUND,) + COCO_CLASSES
NUM_CLASSES = len(CLASS_NAMES)  # 81, background included
INVALID_LABEL = -1  # a box whose category is not in the class list; the transform drops it (bad_category)
EXCLUDED_LABEL = -2  # a box of a class --classes left out; the transform drops it (excluded_class)


def coco_class_map() -> ClassMap:
    """COCO's 80 classes with their official category ids (labels in sorted-id order)."""
    return ClassMap(COCO_CLASSES, COCO_CATEGORY_IDS, COCO_CATEGORY_IDS, "sorted category id",
                    "the 80 COCO 2017 detection categories")


def class_map_from_coco_categories(categories: Any, where: str) -> ClassMap:
    """A COCO-format file's ``categories`` (any ids, any names): labels 1..K follow the sorted category ids.

    ``where`` names the file in errors. ClassMapError names a category without an integer ``id`` or a
    string ``name``, a duplicate id or name, or an empty list.
    """
    if not isinstance(categories, list):
        raise ClassMapError(f"{where}: 'categories' must be a list")
    bad = [c for c in categories if not isinstance(c, dict) or type(c.get("id")) is not int
           or not isinstance(c.get("name"), str)]
    if bad:
        raise ClassMapError(f"{where}: every category needs an integer 'id' and a string 'name' (got {str(bad[0])[:80]})")
    cats = sorted(categories, key=lambda c: c["id"])
    ids = tuple(c["id"] for c in cats)
    return ClassMap(tuple(c["name"] for c in cats), ids, ids, "sorted category id",
                    f"{where} 'categories': {len(cats)} entries, ids {ids[0] if ids else '-'}..{ids[-1] if ids else '-'}")


def class_map_from_class_label(names: Sequence[str], where: str) -> ClassMap:
    """A Hub ClassLabel's names, in their own order: label = index + 1.

    When the names are COCO's 80, evaluation writes the official COCO category ids; otherwise the labels.
    """
    names = tuple(names)
    labels = tuple(range(1, len(names) + 1))
    ids = COCO_CATEGORY_IDS if names == COCO_CLASSES else labels
    return ClassMap(names, ids, tuple(range(len(names))), "ClassLabel order",
                    f"{where}: ClassLabel of {len(names)} names" + (" (COCO's 80)" if ids is COCO_CATEGORY_IDS else ""))


def class_map_from_names(names: Sequence[str], where: str) -> ClassMap:
    """Classes known by name only (VOC xml, string categories): labels 1..K follow the sorted names."""
    ordered = tuple(sorted(set(names)))
    return ClassMap(ordered, tuple(range(1, len(ordered) + 1)), ordered, "sorted names",
                    f"{where}: {len(ordered)} distinct names")


def label_lookup(cmap: ClassMap) -> dict[int | str, int]:
    """{source id: label} for mapping a source's rows."""
    return {s: i + 1 for i, s in enumerate(cmap.source_ids)}


def keep_classes(cmap: ClassMap, keep: Sequence[str], where: str) -> tuple[ClassMap, np.ndarray]:
    """Keep and order a subset of classes (``--classes``): (the new map, remap) with ``remap[old label]`` the
    new label, or EXCLUDED_LABEL for a class left out (``remap[0]`` is INVALID_LABEL).

    Category and source ids stay the source's. ClassMapError names requested classes the source lacks,
    and repeated ones.
    """
    keep = [str(k).strip() for k in keep]
    missing = [k for k in keep if k not in cmap.names]
    if missing:
        raise ClassMapError(f"{where}: --classes names {missing[:10]} are not classes of the source "
                            f"(it has {len(cmap.names)}: {list(cmap.names[:10])}{' ...' if len(cmap.names) > 10 else ''})")
    position = {n: i for i, n in enumerate(cmap.names)}
    picked = [position[k] for k in keep]
    new = ClassMap(tuple(cmap.names[i] for i in picked), tuple(cmap.ids[i] for i in picked),
                   tuple(cmap.source_ids[i] for i in picked), f"--classes order (the source's: {cmap.order})",
                   cmap.evidence, kept_from=len(cmap.names))
    remap = np.full(cmap.num_classes, EXCLUDED_LABEL, dtype=np.int64)
    remap[0] = INVALID_LABEL
    remap[np.asarray(picked, dtype=np.int64) + 1] = np.arange(1, len(picked) + 1)
    return new, remap


__all__ = [
    "BACKGROUND", "CLASS_NAMES", "COCO_CATEGORY_IDS", "COCO_CLASSES", "ClassMap", "ClassMapError", "EXCLUDED_LABEL",
    "INVALID_LABEL", "NUM_CLASSES", "class_map_from_class_label", "class_map_from_coco_categories",
    "class_map_from_names", "coco_class_map", "keep_classes", "label_lookup",
]
