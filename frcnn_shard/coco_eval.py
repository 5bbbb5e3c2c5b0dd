"""COCO evaluation from shards: a split's ground truth as a COCO annotations file, and model outputs as
COCO results, both in the original image's pixels with the build's category ids.

The category ids are the manifest's (``Manifest.class_map``): label ``l`` is written as ``ids[l - 1]``, the
source's own category id (a COCO file's, the official ids for COCO's 80), so results evaluate against
``coco-gt``'s file and against the source's own annotations file alike.

No torch here, and pycocotools only inside ``evaluate_bbox``: ``coco_ground_truth`` needs only the
shards' JSON records, and ``coco_results`` takes anything array-like (tensors on any device included).
``evaluate_bbox`` feeds both to pycocotools' ``COCOeval`` (and scores an empty result list as zeros,
where ``loadRes([])`` fails inside pycocotools).

Boxes go back to the original image by the record's ``scale`` (sy, sx) = content_size / orig_size:
the content of the canvas sits at its top-left (stretch fills the canvas, letterbox pads at the bottom
and right, keep-ratio pads each sample to its own canvas), so x_orig = x / sx, y_orig = y / sy in float64,
clipped to the original image. A keep-ratio record's ``scale`` is the float32 ratio its boxes were multiplied
by (torchvision's ``resize_boxes``), so this gives the source boxes back within float32 rounding. A sample the
loader mirrored (``flipped``) has its boxes mirrored back first (format.record.flip_boxes) about what was
mirrored: the target's ``size`` width, the canvas (stretch, letterbox) or the content (keep-ratio, whose
targets' ``size`` is the content and ``canvas`` the padded size).

The ground truth's ``area`` is the box's w * h in original pixels: the shards do not keep COCO's
``area`` (the segmentation's). COCOeval uses ``area`` only to bin AP_small / medium / large; AP,
AP50, AP75 and AR do not depend on it. For official small / medium / large numbers, evaluate
``coco_results`` against the official annotations file itself (same image and category ids).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .anchors.spec import as_numpy
from .format.classes import ClassMap
from .format.manifest import Manifest
from .format.names import split_folder_of
from .format.record import Record, flip_boxes
from .storage.base import Store
from .storage.local import LocalStore
from .storage.location import store_of
from .storage.manifest_io import read_manifest
from .storage.samples import iter_store_shard, sample_record


def original_xywh(boxes_xyxy: Any, scale: Sequence[float], orig_size: Sequence[int]) -> np.ndarray:
    """Canvas xyxy boxes -> float64 [K, 4] COCO xywh in the original image's pixels, clipped to it."""
    sy, sx = (float(v) for v in scale)
    h, w = (float(v) for v in orig_size)
    b = np.asarray(as_numpy(boxes_xyxy), dtype=np.float64).reshape(-1, 4) / np.array([sx, sy, sx, sy])
    b[:, 0::2] = b[:, 0::2].clip(0.0, w)  # a prediction may reach into the letterbox padding
    b[:, 1::2] = b[:, 1::2].clip(0.0, h)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def class_map_of(classes: Any) -> ClassMap:
    """The ClassMap of a build, given as a ClassMap, a Manifest or manifest dict, a ShardLoader (its manifest),
    a split folder or its manifest.json (local or a URL). Required: category ids are the build's, and a
    default would write wrong ones for every build not of COCO's 80 classes."""
    if classes is None:
        raise TypeError("classes is required: the loader, its manifest or split folder, or a ClassMap "
                        "(category ids are the build's own)")
    if isinstance(classes, ClassMap):
        return classes
    if isinstance(classes, (str, os.PathLike)):
        return read_manifest(split_folder_of(classes)).class_map
    if not isinstance(classes, Mapping) and hasattr(classes, "manifest"):  # a ShardLoader, without importing torch
        if classes.manifest is None:
            raise ValueError("the loader has no manifest (pass manifest= to make_loader): its classes are unknown")
        classes = classes.manifest
    if isinstance(classes, Mapping):
        return Manifest.checked(classes if isinstance(classes, dict) else dict(classes), "classes=").class_map
    raise TypeError(f"classes: a ClassMap, a manifest, a loader or a split folder, not {type(classes).__name__}")


def category_ids(labels: Any, classes: ClassMap) -> np.ndarray:
    """Labels 1..K -> the build's category ids (int64); ValueError names a label outside 1..K."""
    lab = np.asarray(as_numpy(labels), dtype=np.int64).reshape(-1)
    k = len(classes.ids)
    bad = lab[(lab < 1) | (lab > k)]
    if bad.size:
        raise ValueError(f"label {int(bad[0])} has no COCO category in this build: its labels are 1..{k} "
                         "(0 is background)")
    return np.asarray(classes.ids, dtype=np.int64)[lab - 1]


def categories_list(classes: ClassMap) -> list[dict]:
    """The annotations file's "categories" list: one {id, name} per label, in label order."""
    return [{"id": int(c), "name": n} for c, n in zip(classes.ids, classes.names)]


def coco_results(outputs: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]], *,
                 classes: Any) -> list[dict]:
    """Detections -> COCO result dicts (image_id, category_id, bbox xywh in original pixels, score).

    ``outputs``: per image, ``boxes`` xyxy in canvas pixels, ``labels`` 1..K and ``scores`` (what
    torchvision's detection models return in eval mode). ``targets``: the loader's per-image dicts of
    the same images, in the same order (their ``image_id``, ``scale``, ``orig_size``, and ``size`` and
    ``flipped`` for a mirrored sample (hflip), are used: the boxes are mirrored back about ``size``'s width,
    the content of a keep-ratio sample, the canvas otherwise). ``classes``: the build whose category ids to write
    (the loader, its manifest or split folder, or a ClassMap: see class_map_of).
    """
    if len(outputs) != len(targets):
        raise ValueError(f"coco_results: {len(outputs)} outputs for {len(targets)} targets (one each per image)")
    cmap = class_map_of(classes)
    results = []
    for out, t in zip(outputs, targets):
        boxes = as_numpy(out["boxes"])
        if t.get("flipped"):  # the model saw the mirrored image: mirror its boxes back before undoing the scale
            boxes = flip_boxes(boxes, int(t["size"][1]))
        boxes = original_xywh(boxes, t["scale"], t["orig_size"])
        labels = as_numpy(out["labels"]).reshape(-1)
        scores = np.asarray(as_numpy(out["scores"]), dtype=np.float64).reshape(-1)
        if not len(boxes) == len(labels) == len(scores):
            raise ValueError(f"image {t['image_id']}: {len(boxes)} boxes, {len(labels)} labels, {len(scores)} scores")
        cats = category_ids(labels, cmap)
        results.extend({"image_id": int(t["image_id"]), "category_id": int(c), "bbox": [float(v) for v in b],
                        "score": float(s)} for b, c, s in zip(boxes, cats, scores))
    return results


def iter_records(split_dir: str | os.PathLike, storage_options: dict | None = None) -> Iterator[Record]:
    """The JSON records of a split (local folder or URL), in manifest order."""
    store = store_of(os.fspath(split_dir), storage_options)
    yield from _records(store, read_manifest(store))


def _records(store: Store, manifest: Manifest) -> Iterator[Record]:
    """The records of the split ``manifest`` describes, each held to the record rules with its K and its canvas
    rule (keep-ratio: each record its own canvas, its boxes within its content)."""
    for entry in manifest.shards:
        for key, members in iter_store_shard(store, entry.name):  # ShardFormatError names a bad sample
            yield sample_record(members, key, store.location(entry.name), manifest.canvas, manifest.num_classes)


def _annotations(r: Record, classes: ClassMap) -> list[dict]:
    """One record's boxes (iscrowd 0) and crowd boxes (iscrowd 1) as COCO annotations, without ids yet."""
    out = []
    for boxes, labels, ids, crowd in ((r.boxes, r.labels, r.bbox_ids, 0),
                                      (r.crowd_boxes, r.crowd_labels, r.crowd_bbox_ids, 1)):
        ids = ids if len(ids) == len(boxes) else np.full(len(boxes), -1)
        for b, c, i in zip(original_xywh(boxes, r.scale, r.orig_size), category_ids(labels, classes), ids):
            out.append({"id": int(i), "image_id": int(r.image_id), "category_id": int(c),
                        "bbox": [float(v) for v in b], "area": float(b[2] * b[3]), "iscrowd": crowd})
    return out


def coco_ground_truth(records: Sequence[Record] | Iterator[Record], *, classes: Any) -> dict:
    """A COCO annotations dict (images, annotations, categories) from a split's records, in original pixels.

    ``classes``: the build's classes (see class_map_of; split_ground_truth passes the manifest's): the
    categories are its {id, name} per label, each box's category_id its label's id. Annotation ids are the
    source's bbox ids when every box has a distinct one (COCO and the Hub give them), else 1..N in record order.
    """
    cmap = class_map_of(classes)
    images, anns = [], []
    for r in records:
        oh, ow = r.orig_size
        images.append({"id": int(r.image_id), "height": int(oh), "width": int(ow)})
        anns.extend(_annotations(r, cmap))
    ids = [a["id"] for a in anns]
    if min(ids, default=1) < 1 or len(set(ids)) != len(ids):
        for n, a in enumerate(anns, start=1):
            a["id"] = n
    return {"info": {"description": "ground truth from frcnn-shard records (box areas, original pixels)"},
            "images": images, "annotations": anns, "categories": categories_list(cmap)}


def split_ground_truth(split_dir: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """A split's ground truth (coco_ground_truth) with the categories and ids of its manifest's classes."""
    store = store_of(os.fspath(split_dir), storage_options)
    manifest = read_manifest(store)
    return coco_ground_truth(_records(store, manifest), classes=manifest.class_map)


def write_coco_ground_truth(split_dir: str | os.PathLike, out: str | os.PathLike,
                            storage_options: dict | None = None) -> dict:
    """Write a split's ground truth as a COCO annotations json (split_ground_truth); returns its counts."""
    gt = split_ground_truth(split_dir, storage_options)
    out = Path(out)
    store = LocalStore(out.parent)
    store.makedirs()
    store.write_atomic(out.name, json.dumps(gt).encode())  # an old file survives a failure
    return {"images": len(gt["images"]), "annotations": len(gt["annotations"]),
            "crowd": sum(a["iscrowd"] for a in gt["annotations"]), "categories": len(gt["categories"])}


# pycocotools' COCOeval.stats, in its order.
BBOX_STATS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def evaluate_bbox(ground_truth: dict | str | os.PathLike, results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """pycocotools' bbox COCOeval of ``results`` (coco_results) against ``ground_truth`` (a COCO annotations
    dict, or the file ``frcnn-shard coco-gt`` wrote): {name: value} for BBOX_STATS, plus ``detections``.

    No detections at all (a young model, nothing above its score threshold) scores every stat 0.0:
    pycocotools itself fails on an empty result list (IndexError in loadRes). pycocotools' printed
    summary is not printed here; print the returned numbers.
    """
    try:
        from pycocotools.coco import COCO  # optional (the [torchvision] extra), needed only here
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ImportError(f"evaluate_bbox needs pycocotools: pip install 'frcnn-shard[torchvision]' ({e})") from e

    if not results:
        return {**{name: 0.0 for name in BBOX_STATS}, "detections": 0}
    if not isinstance(ground_truth, dict):
        ground_truth = json.loads(Path(ground_truth).read_text())
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        gt = COCO()
        gt.dataset = json.loads(json.dumps(ground_truth))  # a copy: createIndex and loadRes change it
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(list(results)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {**{name: float(v) for name, v in zip(BBOX_STATS, ev.stats)}, "detections": len(results)}
