"""Sources: where rows come from (Hub dataset id, a local folder in the Hub's layout, or coco:DIR).

All sources yield ``SourceRow`` records with raw boxes (in the convention recorded in
``Source.bbox_format``) and labels already mapped to 1..80. Images stay encoded: decoding happens in
the transform, in our own workers.
"""
from __future__ import annotations

import json
import os
import re
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .labels import COCO_CLASSES, INVALID_LABEL, check_class_names, coco_category_map, hub_category_to_label
from .records import SourceRow

DEFAULT_HUB_ID = "detection-datasets/coco"
COCO_PREFIX = "coco:"
BBOX_FORMAT_CHOICES = ("auto", "xywh", "xyxy")

# The Hub rows' features, defined once (the same as the Hub repo's dataset_infos.json).
HUB_FEATURES = datasets.Features(
    {
        "image_id": datasets.Value("int64"),
        "image": datasets.Image(),
        "width": datasets.Value("int64"),
        "height": datasets.Value("int64"),
        "objects": datasets.Sequence(
            {
                "bbox_id": datasets.Value("int64"),
                "category": datasets.ClassLabel(names=list(COCO_CLASSES)),
                "bbox": datasets.Sequence(datasets.Value("float64"), length=4),
                "area": datasets.Value("float64"),
            }
        ),
    }
)

_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")
_PARQUET_ROW_GROUP = 100  # image rows are large; small row groups keep streaming reads small


class BboxFormatError(ValueError):
    """The bbox convention cannot be decided from the data; ``evidence`` holds the counts seen."""

    def __init__(self, message: str, evidence: dict | None = None):
        super().__init__(message)
        self.evidence = dict(evidence or {})


# ------------------------------------------------------------------------------- bbox detection


def bbox_format_evidence(samples: Iterable[tuple[np.ndarray, int, int]], tol: float = 1.0) -> dict:
    """Count, over (raw boxes [N, 4], width, height) samples, the boxes that rule out each convention."""
    examined = xyxy_bad = xywh_bad = skipped = 0
    for boxes, width, height in samples:
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        finite = np.isfinite(b).all(axis=1)
        skipped += int((~finite).sum())
        b = b[finite]
        examined += len(b)
        # Read as xyxy, a box whose far corner precedes its near corner is impossible.
        xyxy_bad += int(((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).sum())
        # Read as xywh, a box that reaches past the image (beyond rounding) is impossible.
        xywh_bad += int(((b[:, 0] + b[:, 2] > width + tol) | (b[:, 1] + b[:, 3] > height + tol)).sum())
    return {
        "boxes_examined": examined,
        "xyxy_violations": xyxy_bad,
        "xywh_violations": xywh_bad,
        "non_finite_skipped": skipped,
        "tol": float(tol),
    }


def decide_bbox_format(evidence: Mapping) -> str:
    """Return "xywh" or "xyxy" when exactly one is ruled out by the evidence; else raise BboxFormatError."""
    xyxy_out = evidence["xyxy_violations"] > 0
    xywh_out = evidence["xywh_violations"] > 0
    if xyxy_out and not xywh_out:
        return "xywh"
    if xywh_out and not xyxy_out:
        return "xyxy"
    counts = (
        f"{evidence['boxes_examined']} boxes examined, {evidence['xyxy_violations']} impossible as xyxy "
        f"(x2 < x1 or y2 < y1), {evidence['xywh_violations']} impossible as xywh (past the image edge)"
    )
    if xyxy_out and xywh_out:
        why = f"conflicting evidence: both conventions are ruled out ({counts})"
    else:
        why = f"no evidence either way ({counts})"
    raise BboxFormatError(f"cannot tell the bbox format: {why}; pass --bbox-format xywh or --bbox-format xyxy", evidence)


def detect_bbox_format(samples: Iterable[tuple[np.ndarray, int, int]], tol: float = 1.0) -> tuple[str, dict]:
    """Decide the bbox convention from (raw boxes [N, 4], width, height) samples: (decision, evidence)."""
    evidence = bbox_format_evidence(samples, tol)
    return decide_bbox_format(evidence), evidence


def _bbox_format_record(
    requested: str, samples: list[tuple[np.ndarray, int, int]], where: str, fixed: str | None = None
) -> dict:
    """Build Source.bbox_format from the examined rows; raise BboxFormatError when auto cannot decide."""
    evidence = bbox_format_evidence(samples)
    record = {"requested": requested, "decision": None, "evidence": evidence, "rows_examined": len(samples)}
    if fixed is not None:
        record["decision"] = fixed
        record["rule"] = f"fixed by the source layout ({fixed})"
    elif requested == "auto":
        try:
            record["decision"] = decide_bbox_format(evidence)
        except BboxFormatError as e:
            raise BboxFormatError(f"{where}, first {len(samples)} rows: {e}", evidence) from e
        record["rule"] = "auto: the one convention not ruled out by the examined boxes"
    else:
        record["decision"] = requested
        record["rule"] = "explicit"
    # Make a wrong explicit choice visible in the manifest.
    violations = evidence[f"{record['decision']}_violations"]
    record["contradicted_by_evidence"] = bool(violations > 0)
    return record


# ---------------------------------------------------------------------------------------- splits


def resolve_split(requested: str, available: Iterable[str], where: str = "source") -> str:
    """Map a requested split onto an available one ("validation" -> "val", "train" -> "train2017")."""
    available = list(available)
    candidates = [requested] + (["val"] if requested == "validation" else [])
    for cand in candidates:
        if cand in available:
            return cand
    for cand in candidates:
        dated = [a for a in available if re.fullmatch(re.escape(cand) + r"\d{4}", a)]
        if len(dated) == 1:
            return dated[0]
    raise ValueError(f"{where}: unknown split {requested!r}; available splits: {sorted(available)}")


# ----------------------------------------------------------------------------------------- Source


class Source:
    """An opened source: metadata, the bbox-format decision, stats, and a resumable row stream."""

    def __init__(self, info: dict, bbox_format: dict, stats: dict, rows_fn: Callable[[int], Iterator[SourceRow]]):
        self.info = info
        self.bbox_format = bbox_format
        self.stats = stats
        self._rows_fn = rows_fn

    def rows(self, skip: int = 0) -> Iterator[SourceRow]:
        """Yield rows from position ``skip`` on; ``SourceRow.index`` is the position in the full stream."""
        if int(skip) != skip or skip < 0:
            raise ValueError(f"rows(skip={skip!r}): skip must be an integer >= 0")
        return self._rows_fn(int(skip))

    def __repr__(self) -> str:
        return f"Source({self.info!r}, bbox_format={self.bbox_format.get('decision')!r})"


def open_source(
    source: str,
    split: str,
    *,
    revision: str | None = None,
    bbox_format: str = "auto",
    detect_rows: int = 200,
) -> Source:
    """Open a Hub dataset id, a local Hub-layout folder, or ``coco:DIR`` for one split."""
    if bbox_format not in BBOX_FORMAT_CHOICES:
        raise ValueError(f"bbox format {bbox_format!r} is not one of {BBOX_FORMAT_CHOICES}")
    if detect_rows < 0:
        raise ValueError(f"detect_rows must be >= 0, got {detect_rows}")
    if source.startswith(COCO_PREFIX):
        if revision is not None:
            raise ValueError(f"{source}: revision applies to Hub datasets only, not to a coco: folder")
        return _open_coco(source, split, bbox_format, detect_rows)
    return _open_hub(source, split, revision, bbox_format, detect_rows)


# -------------------------------------------------------------------------------------------- hub


def _check_hub_features(features: datasets.Features | None, where: str) -> None:
    """Refuse a dataset whose columns are not the Hub COCO ones, naming what is missing."""
    if features is None:
        return  # unknown until iterated; row conversion reports problems per row
    missing = [c for c in ("image_id", "image", "width", "height", "objects") if c not in features]
    objects = features.get("objects")
    if isinstance(objects, dict):
        missing += [f"objects.{c}" for c in ("bbox_id", "category", "bbox") if c not in objects]
    elif objects is not None:
        missing.append("objects (as a sequence of {bbox_id, category, bbox, area})")
    if missing:
        raise ValueError(f"{where}: not in the Hub COCO layout; missing columns {missing} (have {list(features)})")
    if not isinstance(features["image"], datasets.Image):
        raise ValueError(f"{where}: column 'image' is {features['image']!r}, expected an Image feature")
    category = objects["category"]
    label = getattr(category, "feature", category)
    if isinstance(label, datasets.ClassLabel):
        check_class_names(label.names, f"{where}: objects.category")


def _image_bytes(value) -> bytes | None:
    """Encoded bytes from an undecoded Image cell ({"bytes", "path"} or bytes), or None."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    data = value.get("bytes")
    # A cell with only a path points outside the dataset; the Hub layout embeds bytes, so treat it as missing.
    return None if data is None else bytes(data)


def hub_row_to_source_row(row: Mapping, index: int, origin: str) -> SourceRow:
    """Convert one Hub-shaped row (image undecoded) to a SourceRow; labels mapped to 1..80."""
    objects = row.get("objects") or {}
    bboxes = list(objects.get("bbox") or [])
    cats = list(objects.get("category") or [])
    ids = list(objects.get("bbox_id") or [])
    n = len(bboxes)
    if len(cats) != n or len(ids) not in (0, n):
        raise ValueError(
            f"{origin}: objects have {n} bboxes, {len(cats)} categories and {len(ids)} bbox_ids; "
            "they must be parallel lists"
        )
    raw = np.full((n, 4), np.nan, dtype=np.float64)
    for i, b in enumerate(bboxes):
        if b is not None and len(b) == 4:
            raw[i] = [np.nan if v is None else float(v) for v in b]
    cat = np.array([-1 if c is None else int(c) for c in cats], dtype=np.int64)  # -1 -> INVALID_LABEL
    bbox_ids = np.array([-1 if v is None else int(v) for v in ids] if ids else [-1] * n, dtype=np.int64)
    return SourceRow(
        index=index,
        image_id=int(row["image_id"]),
        image=_image_bytes(row.get("image")),
        width=int(row.get("width") or 0),
        height=int(row.get("height") or 0),
        bbox_ids=bbox_ids,
        labels=hub_category_to_label(cat),
        bboxes=raw,
        iscrowd=np.zeros(n, dtype=bool),  # the Hub rows carry no crowd flag
        origin=origin,
    )


def _open_hub(source: str, split: str, revision: str | None, bbox_format: str, detect_rows: int) -> Source:
    local = os.path.isdir(source)
    where = f"{'local folder' if local else 'Hub dataset'} {source!r}" + (f" @ {revision}" if revision else "")
    available = datasets.get_dataset_split_names(source, revision=revision)
    resolved = resolve_split(split, available, where)
    # One code path for the Hub and for local folders: streaming load_dataset.
    ds = datasets.load_dataset(source, split=resolved, streaming=True, revision=revision)
    _check_hub_features(ds.features, where)
    ds = ds.cast_column("image", datasets.Image(decode=False))  # decode in our workers, not here
    num_rows = None
    splits = ds.info.splits
    if splits and resolved in splits and splits[resolved].num_examples:
        num_rows = int(splits[resolved].num_examples)

    def origin(i: int) -> str:
        return f"{source} {resolved} row {i}"

    def convert(stream: Iterable[Mapping], start: int) -> Iterator[SourceRow]:
        for i, r in enumerate(stream, start):
            yield hub_row_to_source_row(r, i, origin(i))

    # Rows examined for the bbox format are buffered and replayed, so they are streamed once.
    live = iter(ds)
    head = list(convert(islice(live, detect_rows), 0))
    record = _bbox_format_record(bbox_format, [(r.bboxes, r.width, r.height) for r in head], f"{where} split {resolved!r}")
    state = {"live": live}

    def rows_fn(skip: int) -> Iterator[SourceRow]:
        live_it = state.pop("live", None)
        if live_it is not None and skip <= len(head):
            # First pass: continue the stream the detection started.
            yield from head[skip:]
            yield from convert(live_it, len(head))
            return
        start = max(skip, len(head))
        yield from head[skip:]
        if len(head) < detect_rows:
            return  # the buffer already holds the whole split
        yield from convert(ds.skip(start), start)

    info = {
        "kind": "hub",
        "id": source,
        "local": local,
        "revision": revision,
        "split": resolved,
        "requested_split": split,
        "num_rows": num_rows,
    }
    return Source(info, record, {}, rows_fn)


# ------------------------------------------------------------------------------------------- coco


def _coco_split_files(coco_dir: Path, split: str) -> tuple[str, Path]:
    """Resolve a split in an official COCO folder to (split name, annotation file)."""
    ann_dir = coco_dir / "annotations"
    if not ann_dir.is_dir():
        raise FileNotFoundError(f"COCO folder {coco_dir}: no annotations/ directory (expected annotations/instances_<split>.json)")
    available = sorted(p.name[len("instances_") : -len(".json")] for p in ann_dir.glob("instances_*.json"))
    resolved = resolve_split(split, available, f"COCO folder {coco_dir}")
    return resolved, ann_dir / f"instances_{resolved}.json"


def _load_coco(ann_file: Path) -> dict:
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ann_file}: not valid JSON ({e})") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{ann_file}: missing list {key!r}; not a COCO instances file")
    return data


def _group_annotations(data: dict) -> tuple[dict[int, list[dict]], int]:
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


def _coco_bbox(ann: Mapping) -> list[float]:
    b = ann.get("bbox")
    if not isinstance(b, (list, tuple)) or len(b) != 4:
        return [float("nan")] * 4  # the transform drops it as non_finite
    return [float("nan") if v is None else float(v) for v in b]


def _coco_boxes(anns: list[dict]) -> np.ndarray:
    """The raw [x, y, w, h] boxes of an image's annotations as float64 [N, 4]."""
    return np.array([_coco_bbox(a) for a in anns], dtype=np.float64).reshape(-1, 4)


def _coco_row(image: Mapping, anns: list[dict], catmap: dict[int, int], index: int, img_dir: Path) -> SourceRow:
    path = img_dir / str(image["file_name"])
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        data = None  # the transform drops it as missing_image, with this path as origin
    return SourceRow(
        index=index,
        image_id=int(image["id"]),
        image=data,
        width=int(image.get("width") or 0),
        height=int(image.get("height") or 0),
        bbox_ids=np.array([int(a.get("id", -1)) for a in anns], dtype=np.int64),
        labels=np.array([catmap.get(int(a.get("category_id", -1)), INVALID_LABEL) for a in anns], dtype=np.int64),
        bboxes=_coco_boxes(anns),
        iscrowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
        origin=str(path),
    )


def _open_coco(source: str, split: str, bbox_format: str, detect_rows: int) -> Source:
    coco_dir = Path(source[len(COCO_PREFIX) :])
    resolved, ann_file = _coco_split_files(coco_dir, split)
    # Refused before the annotation file (hundreds of MB for train) is parsed.
    if bbox_format == "xyxy":
        raise ValueError(f"{ann_file}: official COCO annotations are [x, y, w, h]; --bbox-format xyxy does not apply")
    data = _load_coco(ann_file)
    catmap = coco_category_map(data["categories"])
    by_image, dangling = _group_annotations(data)
    images = data["images"]
    img_dir = coco_dir / resolved

    def row(i: int) -> SourceRow:
        im = images[i]
        return _coco_row(im, by_image[int(im["id"])], catmap, i, img_dir)

    # The evidence is recorded for the manifest; it needs no image bytes.
    examined = [
        (_coco_boxes(by_image[int(im["id"])]), int(im.get("width") or 0), int(im.get("height") or 0))
        for im in images[:detect_rows]
    ]
    record = _bbox_format_record(bbox_format, examined, str(ann_file), fixed="xywh")

    def rows_fn(skip: int) -> Iterator[SourceRow]:
        for i in range(skip, len(images)):
            yield row(i)

    stats = {
        "images": len(images),
        "annotations": len(data["annotations"]),
        "crowd_annotations": sum(1 for v in by_image.values() for a in v if a.get("iscrowd")),
        "images_without_annotations": sum(1 for v in by_image.values() if not v),
        "annotations_unknown_category": sum(
            1 for v in by_image.values() for a in v if int(a.get("category_id", -1)) not in catmap
        ),
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
    }
    return Source(info, record, stats, rows_fn)


# --------------------------------------------------------------------------- writing Hub folders


def _readme(splits: dict[str, int]) -> str:
    """README.md whose YAML pins the split names and features, so datasets infers nothing."""
    split_dict = datasets.SplitDict()
    for name, n in splits.items():
        split_dict.add(datasets.SplitInfo(name=name, num_examples=n))
    info = datasets.DatasetInfo(features=HUB_FEATURES, splits=split_dict)._to_yaml_dict()
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for name in splits:
        lines += [f"  - split: {name}", f"    path: data/{name}-*"]
    # JSON is valid YAML flow style: no YAML library needed to write it.
    lines += ["dataset_info: " + json.dumps(info), "---", ""]
    body = (
        "# COCO-style detection rows in the Hub layout\n\n"
        "Written by frcnn-shard (`write_hub_folder`): the features and splits of "
        f"`{DEFAULT_HUB_ID}` ({', '.join(f'{k}: {v} rows' for k, v in splits.items())}).\n"
    )
    return "\n".join(lines) + body


def write_hub_folder(
    out_dir: str | os.PathLike, rows_by_split: Mapping[str, Iterable[Mapping]], *, rows_per_file: int = 500
) -> Path:
    """Write Hub-shaped rows as data/<split>-0000i-of-0000N.parquet plus README.md; return the folder."""
    if rows_per_file <= 0:
        raise ValueError(f"rows_per_file must be > 0, got {rows_per_file}")
    out = Path(out_dir)
    data_dir = out / "data"
    bad = [s for s in rows_by_split if not _SPLIT_NAME.fullmatch(s)]
    if bad:
        raise ValueError(f"split names {bad} must be letters, digits and underscores")
    if data_dir.exists() and any(data_dir.iterdir()):
        raise FileExistsError(f"{data_dir} is not empty; write a Hub folder into a fresh directory")
    data_dir.mkdir(parents=True, exist_ok=True)
    schema = HUB_FEATURES.arrow_schema  # carries the features as Hugging Face metadata
    counts: dict[str, int] = {}
    for split, rows in rows_by_split.items():
        parts: list[Path] = []
        n = 0
        it = iter(rows)
        while True:
            chunk = [HUB_FEATURES.encode_example(dict(r)) for r in islice(it, rows_per_file)]
            if not chunk and parts:
                break
            part = data_dir / f"{split}-{len(parts):05d}.parquet.partial"
            table = pa.Table.from_pylist(chunk, schema=schema)
            pq.write_table(table, part, row_group_size=_PARQUET_ROW_GROUP)
            parts.append(part)
            n += len(chunk)
            if len(chunk) < rows_per_file:
                break
        # File names carry the total, known only at the end.
        for i, part in enumerate(parts):
            part.rename(data_dir / f"{split}-{i:05d}-of-{len(parts):05d}.parquet")
        counts[split] = n
    (out / "README.md").write_text(_readme(counts), encoding="utf-8")
    return out


def coco_to_hub_rows(coco_dir: str | os.PathLike, split: str, *, bbox_format: str = "xywh") -> Iterator[dict]:
    """Convert an official COCO folder's split to Hub-shaped rows (crowd boxes become ordinary objects)."""
    if bbox_format not in ("xywh", "xyxy"):
        raise ValueError(f"bbox_format must be 'xywh' or 'xyxy', got {bbox_format!r}")
    root = Path(coco_dir)
    resolved, ann_file = _coco_split_files(root, split)
    data = _load_coco(ann_file)
    catmap = coco_category_map(data["categories"])
    by_image, _ = _group_annotations(data)
    for im in data["images"]:
        path = root / resolved / str(im["file_name"])
        anns = by_image[int(im["id"])]
        objects: dict[str, list] = {"bbox_id": [], "category": [], "bbox": [], "area": []}
        for a in anns:
            cid = int(a["category_id"])
            if cid not in catmap:
                raise ValueError(f"{ann_file}: annotation {a.get('id')} has unknown category_id {cid}")
            x, y, w, h = _coco_bbox(a)
            objects["bbox_id"].append(int(a["id"]))
            objects["category"].append(catmap[cid] - 1)  # 0-based, sorted-id order, as the Hub ClassLabel
            objects["bbox"].append([x, y, w, h] if bbox_format == "xywh" else [x, y, x + w, y + h])
            objects["area"].append(float(a.get("area", w * h)))
        yield {
            "image_id": int(im["id"]),
            "image": {"bytes": path.read_bytes(), "path": None},
            "width": int(im["width"]),
            "height": int(im["height"]),
            "objects": objects,
        }
