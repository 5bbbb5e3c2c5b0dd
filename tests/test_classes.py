"""ClassMap, the one record of a build's classes: the --classes remap, the manifest section and its
2.0 fallback, and the label bound every source's rows pass through."""
from __future__ import annotations

import json

import numpy as np
import pytest

from frcnn_shard.format.classes import ClassMap, ClassMapError
from frcnn_shard.format.manifest import Manifest
from frcnn_shard.labels import (COCO_CATEGORY_IDS, COCO_CLASSES, EXCLUDED_LABEL, INVALID_LABEL,
                                class_map_from_class_label, class_map_from_names, coco_class_map, keep_classes)
from frcnn_shard.records import SourceRow
from frcnn_shard.sources.base import Source


def test_keep_classes_remaps_every_label_by_name():
    full = coco_class_map()
    kept, remap = keep_classes(full, ["dog", "person", "car"], "test")
    assert kept.names == ("dog", "person", "car") and kept.ids == (18, 1, 3) and kept.kept_from == 80
    brute = [INVALID_LABEL] + [kept.names.index(n) + 1 if n in kept.names else EXCLUDED_LABEL for n in full.names]
    assert remap.tolist() == brute
    with pytest.raises(ClassMapError, match=r"\['cat dog'\] are not classes"):
        keep_classes(full, ["cat dog"], "test")


def test_the_manifest_section_round_trips_and_a_2_0_manifest_reads_as_coco():
    for cmap in (coco_class_map(), class_map_from_names(["b", "a", "b", "c"], "x"),
                 keep_classes(class_map_from_class_label(["x", "y", "z"], "w"), ["z", "x"], "w")[0]):
        section = json.loads(json.dumps(cmap.to_manifest()))
        assert ClassMap.from_manifest(section, "m") == cmap
    assert class_map_from_class_label(COCO_CLASSES, "w").ids == COCO_CATEGORY_IDS
    assert class_map_from_class_label(["x", "y"], "w").ids == (1, 2)
    old = Manifest({"classes": ["__background__", *COCO_CLASSES]})
    assert old.class_map == coco_class_map()
    other = Manifest({"classes": ["__background__", "cat", "dog"]})
    assert other.class_map.names == ("cat", "dog") and other.class_map.ids == (1, 2)


def _row(labels: list[int]) -> SourceRow:
    n = len(labels)
    return SourceRow(index=0, image_id=1, image=b"", width=10, height=10, bbox_ids=np.arange(n),
                     labels=np.array(labels, dtype=np.int64), bboxes=np.zeros((n, 4)), iscrowd=np.zeros(n, bool))


def test_every_row_label_is_bounded_to_the_class_list_and_remapped():
    cmap = class_map_from_names(["a", "b", "c"], "test")

    def source(labels):
        return Source({"id": "t"}, {}, {}, 1, "f", lambda a, b: iter([_row(labels)]), [1], classes=cmap)

    assert next(source([1, 3, 4, 0, -1, 99]).rows()).labels.tolist() == [1, 3, -1, -1, -1, -1]
    src = source([1, 2, 3, 4, -1])
    src.keep_classes(["c", "a"])
    assert src.classes.names == ("c", "a")
    assert next(src.rows()).labels.tolist() == [2, EXCLUDED_LABEL, 1, INVALID_LABEL, INVALID_LABEL]
