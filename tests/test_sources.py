"""Sources: bbox-format detection, Hub-layout folders, coco: folders, resume."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from frcnn_shard import sources as S
from frcnn_shard.sources import fixtures as F, hub as H
from frcnn_shard import transform as T
from frcnn_shard.labels import COCO_CLASSES, INVALID_LABEL
from frcnn_shard.records import Dropped, Sample
from frcnn_shard.sources.fixtures import PALETTE, make_sample_hub_folder

TINY_COCO = Path(__file__).resolve().parents[1].parent / "shared/data/tiny_coco"


@pytest.fixture(scope="session")
def tiny_coco() -> Path:
    if not (TINY_COCO / "annotations/instances_train2017.json").is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"tiny_coco not found at {TINY_COCO} (required when CI=true)")
        pytest.skip(f"tiny_coco not found at {TINY_COCO}")
    return TINY_COCO


@pytest.fixture(scope="session")
def tiny_hub(tiny_coco, tmp_path_factory) -> dict[str, Path]:
    """tiny_coco written as Hub-layout folders, one per bbox convention (several parquet files each)."""
    root = tmp_path_factory.mktemp("tiny_hub")
    return {
        fmt: F.write_hub_folder(
            root / fmt, {"train": F.coco_to_hub_rows(tiny_coco, "train2017", bbox_format=fmt)}, rows_per_file=20
        )
        for fmt in ("xywh", "xyxy")
    }


@pytest.fixture(scope="session")
def sample_hub(tmp_path_factory) -> Path:
    return make_sample_hub_folder(tmp_path_factory.mktemp("sample") / "hub", n_train=12, n_val=5, seed=3)


# ------------------------------------------------------------------------------ bbox detection



def detect(samples, tol: float = 1.0) -> tuple[str, dict]:
    """(decision, evidence) through the public pair: the evidence, then the rule that decides from it."""
    evidence = S.bbox_format_evidence(samples, tol)
    return S.decide_bbox_format(evidence), evidence


def _xywh_samples():
    # COCO-like: small boxes far from the origin, so w < x somewhere (impossible as xyxy).
    return [(np.array([[100, 50, 30, 40], [10, 10, 200, 100]]), 640, 480), (np.zeros((0, 4)), 10, 10)]


def _xyxy_samples():
    # x2 + x1 > width somewhere (impossible as xywh).
    return [(np.array([[100, 50, 130, 90], [400, 300, 600, 470]]), 640, 480)]


def test_detect_xywh():
    decision, ev = detect(_xywh_samples())
    assert decision == "xywh"
    assert ev["boxes_examined"] == 2 and ev["xyxy_violations"] == 1 and ev["xywh_violations"] == 0


def test_detect_xyxy():
    decision, ev = detect(_xyxy_samples())
    assert decision == "xyxy"
    assert ev["xywh_violations"] == 1 and ev["xyxy_violations"] == 0
    # Either axis counts: here only y + h passes the image height.
    decision, ev = detect([(np.array([[10, 300, 20, 400]]), 640, 480)])
    assert decision == "xyxy" and ev["xywh_violations"] == 1


def test_detect_tolerance():
    # One pixel past the edge is rounding, not evidence.
    with pytest.raises(S.BboxFormatError):
        detect([(np.array([[10, 10, 630.5, 100]]), 640, 480)])
    assert detect([(np.array([[10, 10, 630.5, 100]]), 640, 480)], tol=0.0)[0] == "xyxy"


def test_detect_conflict_raises():
    with pytest.raises(S.BboxFormatError, match="conflict.*bbox_format") as e:
        detect(_xywh_samples() + _xyxy_samples())
    assert e.value.evidence["xyxy_violations"] == 1 and e.value.evidence["xywh_violations"] == 1
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "samples",
    [[], [(np.zeros((0, 4)), 100, 100)], [(np.array([[1, 1, 5, 5]]), 100, 100)], [(np.full((1, 4), np.nan), 9, 9)]],
    ids=["no-rows", "no-boxes", "ambiguous", "non-finite"],
)
def test_detect_without_evidence_raises(samples):
    with pytest.raises(S.BboxFormatError, match="no evidence.*bbox_format"):
        detect(samples)


# ---------------------------------------------------------------------------- Hub-layout folder


def _hub_row(image_id: int, cats: list[int], boxes: list[list[float]], w: int = 64, h: int = 48) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (image_id % 255, 0, 0)).save(buf, format="PNG")
    return {
        "image_id": image_id,
        "image": {"bytes": buf.getvalue(), "path": None},
        "width": w,
        "height": h,
        "objects": {
            "bbox_id": [image_id * 10 + k for k in range(len(cats))],
            "category": cats,
            "bbox": boxes,
            "area": [float(b[2] * b[3]) for b in boxes],
        },
    }


def _small_rows(n: int, start: int = 1) -> list[dict]:
    # w < x in the first box: rules out xyxy, so auto decides xywh.
    return [_hub_row(i, [i % 80, 79], [[30, 5, 10, 20], [0, 0, 64, 48]]) for i in range(start, start + n)]


def test_hub_folder_splits_are_train_and_val(tmp_path):
    folder = F.write_hub_folder(tmp_path / "hub", {"train": _small_rows(7), "val": _small_rows(3, 100)}, rows_per_file=3)
    names = sorted(p.name for p in (folder / "data").iterdir())
    assert names == [
        "train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet",
        "val-00000-of-00001.parquet",
    ]
    assert datasets.get_dataset_split_names(str(folder)) == ["train", "val"]
    # The README pins the layout: num_rows comes from its dataset_info, the features from it too.
    ds = datasets.load_dataset(str(folder), split="train", streaming=True)
    assert ds.features == H.HUB_FEATURES
    assert ds.info.splits["train"].num_examples == 7
    readme = (folder / "README.md").read_text()
    assert "- split: val\n    path: data/val-*" in readme and "dataset_info:" in readme


def test_hub_folder_round_trip(tmp_path):
    rows = _small_rows(5)
    rows[2]["objects"]["category"] = [0, 80 - 1]
    folder = F.write_hub_folder(tmp_path / "hub", {"train": rows, "val": _small_rows(2, 50)})
    src = S.open_source(str(folder), "train")
    got = list(src.rows())
    assert [r.index for r in got] == list(range(5))
    for want, r in zip(rows, got):
        assert r.image_id == want["image_id"] and r.image == want["image"]["bytes"]
        assert (r.width, r.height) == (64, 48)
        np.testing.assert_array_equal(r.bboxes, want["objects"]["bbox"])
        np.testing.assert_array_equal(r.labels, np.array(want["objects"]["category"]) + 1)
        np.testing.assert_array_equal(r.bbox_ids, want["objects"]["bbox_id"])
        assert r.bboxes.dtype == np.float64 and r.labels.dtype == np.int64 and not r.iscrowd.any()
        assert f"{folder} train row {r.index}" == r.origin
    assert src.info == {
        "kind": "hub", "id": str(folder), "local": True, "revision": None, "split": "train",
        "requested_split": "train", "num_rows": 5, "files": ["train-00000-of-00001.parquet"],
    }
    assert src.bbox_format["decision"] == "xywh" and src.bbox_format["rows_examined"] == 5
    json.dumps([src.info, src.bbox_format, src.stats])  # JSON-able, for the manifest


def test_validation_alias_and_unknown_split(sample_hub):
    src = S.open_source(str(sample_hub), "validation")
    assert src.info["split"] == "val" and src.info["requested_split"] == "validation"
    assert src.info["num_rows"] == 5 == len(list(src.rows()))
    assert all(r.image_id > 1_000_000 for r in src.rows())
    with pytest.raises(ValueError, match=r"unknown split 'test'.*\['train', 'val'\]"):
        S.open_source(str(sample_hub), "test")


def test_resolve_split_rules():
    assert S.resolve_split("validation", ["train", "validation", "val"]) == "validation"
    assert S.resolve_split("validation", ["train", "val"]) == "val"
    assert S.resolve_split("train", ["train2017", "val2017"]) == "train2017"
    assert S.resolve_split("validation", ["train2017", "val2017"]) == "val2017"
    with pytest.raises(ValueError, match="available splits"):
        S.resolve_split("val", ["train"])


def test_hub_feature_check_refuses_missing_columns():
    H.check_hub_features(H.HUB_FEATURES, "test")
    with pytest.raises(ValueError, match="missing columns"):
        H.check_hub_features(datasets.Features({"image": datasets.Image()}), "test")


def test_hub_row_with_invalid_category_and_missing_values():
    row = _hub_row(1, [5, 80], [[1, 2, 3, 4], [1, 2, 3, 4]])
    row["objects"]["bbox"][1] = [1, None, 3, 4]
    r = H.hub_row_to_source_row(row, 0, "x")
    assert r.labels.tolist() == [6, INVALID_LABEL]
    assert np.isnan(r.bboxes[1, 1])


def test_explicit_format_records_contradicting_evidence(sample_hub):
    src = S.open_source(str(sample_hub), "train", bbox_format="xyxy")
    rec = src.bbox_format
    assert rec["requested"] == "xyxy" and rec["decision"] == "xyxy" and rec["rule"] == "explicit"
    assert rec["evidence"]["xyxy_violations"] > 0 and rec["contradicted_by_evidence"] is True
    ok = S.open_source(str(sample_hub), "train", bbox_format="xywh").bbox_format
    assert ok["decision"] == "xywh" and ok["contradicted_by_evidence"] is False


def test_auto_without_evidence_fails_at_open(tmp_path):
    folder = F.write_hub_folder(tmp_path / "hub", {"train": [_hub_row(1, [0], [[1, 1, 5, 5]])]})
    with pytest.raises(S.BboxFormatError, match="bbox_format"):
        S.open_source(str(folder), "train")
    with pytest.raises(S.BboxFormatError):
        S.open_source(str(folder), "train", detect_rows=0)
    assert S.open_source(str(folder), "train", bbox_format="xywh").bbox_format["decision"] == "xywh"


@pytest.mark.parametrize("detect_rows", [4, 200])
def test_hub_resume_matches_tail(sample_hub, detect_rows):
    src = S.open_source(str(sample_hub), "train", detect_rows=detect_rows)
    full = [(r.index, r.image_id, r.image) for r in src.rows()]
    assert [i for i, _, _ in full] == list(range(12))
    for k in (0, 1, 4, 5, 11, 12, 20):
        tail = [(r.index, r.image_id, r.image) for r in src.rows(k)]
        assert tail == full[k:], k
    # A fresh source read from the middle directly.
    fresh = S.open_source(str(sample_hub), "train", detect_rows=detect_rows)
    assert [(r.index, r.image_id, r.image) for r in fresh.rows(7)] == full[7:]
    with pytest.raises(ValueError):
        src.rows(-1)


def test_sample_folder_is_deterministic_and_boxes_match_pixels(tmp_path, sample_hub):
    again = make_sample_hub_folder(tmp_path / "again", n_train=12, n_val=5, seed=3)
    for name in ("train-00000-of-00001.parquet", "val-00000-of-00001.parquet"):
        assert (again / "data" / name).read_bytes() == (sample_hub / "data" / name).read_bytes()
    other = make_sample_hub_folder(tmp_path / "other", n_train=12, n_val=5, seed=4)
    assert (other / "data/train-00000-of-00001.parquet").read_bytes() != (again / "data/train-00000-of-00001.parquet").read_bytes()
    sizes, counts = set(), []
    for r in S.open_source(str(sample_hub), "train").rows():
        img = np.asarray(Image.open(io.BytesIO(r.image)).convert("RGB")).astype(int)
        assert img.shape[:2] == (r.height, r.width)
        sizes.add((r.width, r.height))
        counts.append(len(r.bboxes))
        assert ((r.labels >= 1) & (r.labels <= 80)).all()
        for x, y, w, h in r.bboxes.astype(int):
            # The box centre is inside the drawn shape: a solid palette colour, not the noisy background.
            cy, cx = y + h // 2, x + w // 2
            patch = img[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3)
            assert patch.std(axis=0).max() < 8
            assert min(np.abs(patch.mean(axis=0) - c).max() for c in PALETTE) < 20
    assert len(sizes) > 3 and min(counts) >= 1 and max(counts) <= 6


# ------------------------------------------------------------------------------------ coco: DIR


def test_coco_source_on_tiny_coco(tiny_coco):
    src = S.open_source(f"coco:{tiny_coco}", "train2017")
    data = json.loads((tiny_coco / "annotations/instances_train2017.json").read_text())
    rows = list(src.rows())
    assert len(rows) == 50 == src.info["num_rows"]
    assert [r.image_id for r in rows] == [im["id"] for im in data["images"]]
    assert sum(len(r.bboxes) for r in rows) == 470
    assert sum(int(r.iscrowd.sum()) for r in rows) == 5
    assert src.stats["dangling_annotations"] == 0 and src.stats["annotations"] == 470
    assert src.info["kind"] == "coco" and src.info["split"] == "train2017"
    assert src.bbox_format["decision"] == "xywh" and src.bbox_format["evidence"]["xywh_violations"] == 0
    # Labels: rank of the category id in sorted-id order, + 1; names agree with COCO_CLASSES.
    sorted_ids = sorted(c["id"] for c in data["categories"])
    names = {c["id"]: c["name"] for c in data["categories"]}
    anns = {a["id"]: a for a in data["annotations"]}
    for r in rows:
        for bid, label, box, crowd in zip(r.bbox_ids, r.labels, r.bboxes, r.iscrowd):
            a = anns[int(bid)]
            assert label == sorted_ids.index(a["category_id"]) + 1
            assert COCO_CLASSES[label - 1] == names[a["category_id"]]
            np.testing.assert_array_equal(box, a["bbox"])
            assert bool(crowd) == bool(a["iscrowd"])
    first = rows[0]
    assert first.image == (tiny_coco / "train2017" / data["images"][0]["file_name"]).read_bytes()
    assert first.origin.endswith(data["images"][0]["file_name"])
    # Split aliases and errors.
    assert S.open_source(f"coco:{tiny_coco}", "train").info["split"] == "train2017"
    with pytest.raises(ValueError, match=r"unknown split 'val'.*\['train2017'\]"):
        S.open_source(f"coco:{tiny_coco}", "val")
    with pytest.raises(ValueError, match="COCO-format boxes are"):
        S.open_source(f"coco:{tiny_coco}", "train2017", bbox_format="xyxy")


def test_coco_resume_matches_tail(tiny_coco):
    src = S.open_source(f"coco:{tiny_coco}", "train2017")
    full = [(r.index, r.image_id) for r in src.rows()]
    assert [(r.index, r.image_id) for r in src.rows(17)] == full[17:]


def _write_coco(root: Path, split: str, images, annotations, files) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    cats = [{"id": i, "name": n} for i, n in zip(
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33,
         34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
         62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90],
        COCO_CLASSES,
    )]
    cats.reverse()  # file order must not matter, only id order
    doc = {"images": images, "annotations": annotations, "categories": cats}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    for name in files:
        Image.new("RGB", (64, 48), (9, 9, 9)).save(root / split / name)


def test_coco_missing_image_dangling_and_empty(tmp_path):
    images = [
        {"id": 3, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 1, "file_name": "missing.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48},
    ]
    anns = [
        {"id": 10, "image_id": 3, "category_id": 90, "bbox": [30, 5, 10, 20], "area": 200, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 1},
        {"id": 12, "image_id": 999, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 13, "image_id": 3, "category_id": 12, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0},
    ]
    _write_coco(tmp_path, "val2017", images, anns, ["a.jpg", "b.jpg"])
    with pytest.raises(ValueError, match=r"1 annotations have a category_id that is not in 'categories' "
                                         r"\(annotation 13 category_id 12\)"):
        S.open_source(f"coco:{tmp_path}", "validation")
    anns[3]["category_id"] = 90  # a label of the build, then moved out of range to the transform's rule
    _write_coco(tmp_path, "val2017", images, anns, ["a.jpg", "b.jpg"])
    src = S.open_source(f"coco:{tmp_path}", "validation")
    assert src.info["split"] == "val2017"
    rows = list(src.rows())
    assert [r.image_id for r in rows] == [3, 1, 2]  # order of the images list
    assert src.stats["dangling_annotations"] == 1 and src.stats["images_without_annotations"] == 1
    assert rows[0].labels.tolist() == [80, 80]  # id 90 -> 80
    rows[0].labels[1] = INVALID_LABEL  # as a source marks a category outside its class list
    assert rows[1].image is None and rows[1].iscrowd.tolist() == [True]
    assert len(rows[2].bboxes) == 0 and rows[2].image is not None
    cfg = T.TransformConfig()
    out = [T.process_row(r, cfg) for r in rows]
    assert isinstance(out[0], Sample) and out[0].record.box_drops == {"bad_category": 1}
    assert isinstance(out[1], Dropped) and out[1].reason == "missing_image" and "missing.jpg" in out[1].detail
    assert isinstance(out[2], Dropped) and out[2].reason == "no_boxes"


def test_coco_folder_without_annotations(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations"):
        S.open_source(f"coco:{tmp_path}", "train2017")


# ------------------------------------------------------------------ tiny_coco through the Hub path


@pytest.mark.parametrize("fmt", ["xywh", "xyxy"])
def test_tiny_coco_hub_folder_auto_detects(tiny_coco, tiny_hub, fmt):
    src = S.open_source(str(tiny_hub[fmt]), "train")
    assert src.bbox_format["decision"] == fmt and src.bbox_format["requested"] == "auto"
    assert src.info["num_rows"] == 50 and datasets.get_dataset_split_names(str(tiny_hub[fmt])) == ["train"]
    coco_rows = list(S.open_source(f"coco:{tiny_coco}", "train2017").rows())
    hub_rows = list(src.rows())
    assert len(hub_rows) == 50 and sum(len(r.bboxes) for r in hub_rows) == 470
    for c, h in zip(coco_rows, hub_rows):
        assert (c.image_id, c.image, c.width, c.height) == (h.image_id, h.image, h.width, h.height)
        np.testing.assert_array_equal(c.labels, h.labels)
        np.testing.assert_array_equal(c.bbox_ids, h.bbox_ids)
        np.testing.assert_allclose(T.to_xyxy(h.bboxes, fmt), T.to_xyxy(c.bboxes, "xywh"), atol=1e-9)


def test_tiny_coco_same_samples_from_both_conventions(tiny_hub):
    by_fmt = {}
    for fmt, folder in tiny_hub.items():
        src = S.open_source(str(folder), "train")
        cfg = T.TransformConfig(bbox_format=src.bbox_format["decision"])
        by_fmt[fmt] = [T.process_row(r, cfg) for r in list(src.rows())[:10]]
    for a, b in zip(by_fmt["xywh"], by_fmt["xyxy"]):
        assert type(a) is type(b)
        if isinstance(a, Sample):
            assert a.image_bytes == b.image_bytes
            np.testing.assert_allclose(a.record.boxes, b.record.boxes, atol=1e-3)
