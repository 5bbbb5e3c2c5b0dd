"""Hub sources with any classes, their schema read from the parquet files, and COCO crowd boxes recovered.

Every folder here holds tiny_coco's real images and annotations, rewritten in another Hub layout.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import build_shards, require_tiny_coco  # noqa: E402
from frcnn_shard import sources as S  # noqa: E402
from frcnn_shard.errors import SourceFormError  # noqa: E402
from frcnn_shard.labels import COCO_CATEGORY_IDS, COCO_CLASSES  # noqa: E402
from frcnn_shard.shards import iter_shard, read_manifest  # noqa: E402
from frcnn_shard.sources import fixtures as F  # noqa: E402

CROWD_RULE = "bbox_id >= 900000000000 (COCO 2017 crowd ids)"
TINY_CROWD = 5  # iscrowd annotations in tiny_coco's train2017 (the coco: build's count, checked below)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return require_tiny_coco()


@pytest.fixture(scope="module")
def coco_rows(tiny) -> list[dict]:
    """tiny_coco's train2017 as Hub rows (crowd annotations as ordinary objects, bbox_id = COCO id)."""
    return list(F.coco_to_hub_rows(tiny, "train2017"))


@pytest.fixture(scope="module")
def coco_json(tiny) -> dict:
    return json.loads((tiny / "annotations" / "instances_train2017.json").read_text())


@pytest.fixture(scope="module")
def hub_coco(coco_rows, tmp_path_factory) -> Path:
    """tiny_coco as a Hub folder with the Hub COCO's features (several files)."""
    return F.write_hub_folder(tmp_path_factory.mktemp("hub_coco"), {"train": coco_rows}, rows_per_file=20)


def _with_categories(rows: list[dict], new) -> list[dict]:
    """Copies of ``rows`` whose categories (0-based COCO indexes) become ``new(index)``."""
    out = []
    for r in rows:
        objects = dict(r["objects"], category=[new(c) for c in r["objects"]["category"]])
        out.append(dict(r, objects=objects))
    return out


def _cppe5(rows: list[dict], list_of_structs: bool) -> list[dict]:
    """The object-detection guide's layout: objects.id for bbox_id, as a struct of lists or a list of structs."""
    out = []
    for r in rows:
        o = r["objects"]
        cols = {"id": o["bbox_id"], "area": o["area"], "bbox": o["bbox"], "category": o["category"]}
        objects = [dict(zip(cols, v)) for v in zip(*cols.values())] if list_of_structs else cols
        out.append(dict(r, objects=objects))
    return out


def _records(out_dir: Path) -> dict[int, dict]:
    """Every sample's JSON record of a built split, by image id."""
    records = {}
    for shard in read_manifest(out_dir)["shards"]:
        for key, members in iter_shard(out_dir / shard["name"]):
            records[int(key)] = json.loads(members["json"])
    return records


# ---------------------------------------------------------------------------------------- classes


def _supercategories(coco_json: dict) -> tuple[list[str], dict[int, int]]:
    """tiny_coco's supercategories in order of first appearance (not sorted), and COCO index -> their index."""
    cats = sorted(coco_json["categories"], key=lambda c: c["id"])
    names = list(dict.fromkeys(c["supercategory"] for c in cats))
    return names, {i: names.index(c["supercategory"]) for i, c in enumerate(cats)}


def test_custom_class_label_numbers_labels_in_its_order(coco_rows, coco_json, tmp_path):
    names, index_of = _supercategories(coco_json)
    assert names != sorted(names)  # so ClassLabel order and sorted order differ
    rows = _with_categories(coco_rows, index_of.get)
    folder = F.write_hub_folder(tmp_path / "hub", {"train": rows},
                                features=F.hub_features(datasets.ClassLabel(names=names)))
    src = S.open_source(str(folder), "train")
    assert src.classes.names == tuple(names) and src.classes.order == "ClassLabel order"
    for want, got in zip(rows, src.rows()):
        assert got.labels.tolist() == [c + 1 for c in want["objects"]["category"]]
    assert src.crowd["rule"] == "none" and "not COCO's 80" in src.crowd["evidence"]
    res = build_shards(tmp_path / "out", str(folder), "train", max_rows=6)
    manifest = read_manifest(res.out_dir)
    assert manifest["categories"]["list"] == [{"label": i + 1, "name": n, "id": i + 1, "source_id": i}
                                              for i, n in enumerate(names)]
    assert manifest["classes"] == ["__background__"] + names
    by_id = {r["image_id"]: r for r in rows}
    for image_id, rec in _records(res.out_dir).items():
        assert set(rec["labels"]) <= {c + 1 for c in by_id[image_id]["objects"]["category"]}


def test_string_categories_are_sorted_over_every_split(coco_rows, tmp_path):
    rows = _with_categories(coco_rows, lambda c: COCO_CLASSES[c])
    train, val = rows[:30], rows[30:]
    names_in = [{c for r in part for c in r["objects"]["category"]} for part in (train, val)]
    assert names_in[1] - names_in[0]  # a class only val has: train's labels must still leave room for it
    folder = F.write_hub_folder(tmp_path / "hub", {"train": train, "val": val},
                                features=F.hub_features(datasets.Value("string")))
    every = sorted(names_in[0] | names_in[1])
    opened = {split: S.open_source(str(folder), split) for split in ("train", "val")}
    for split, part in (("train", train), ("val", val)):
        src = opened[split]
        assert src.classes.names == tuple(every) and src.classes.source_ids == tuple(every)
        assert src.classes.order == "sorted names"
        for want, got in zip(part, src.rows()):
            assert got.labels.tolist() == [every.index(c) + 1 for c in want["objects"]["category"]]
    assert opened["train"].crowd["rule"] == "none"
    manifest = read_manifest(build_shards(tmp_path / "out", str(folder), "train", max_rows=4).out_dir)
    assert [e["name"] for e in manifest["categories"]["list"]] == every


@pytest.mark.parametrize("list_of_structs", [False, True], ids=["struct_of_lists", "list_of_structs"])
def test_cppe5_layout_reads_like_the_coco_layout(coco_rows, hub_coco, tmp_path, list_of_structs):
    features = F.hub_features(datasets.ClassLabel(names=list(COCO_CLASSES)), id_field="id",
                              list_of_structs=list_of_structs)
    folder = F.write_hub_folder(tmp_path / "hub", {"train": _cppe5(coco_rows, list_of_structs)}, features=features)
    got, want = S.open_source(str(folder), "train"), S.open_source(str(hub_coco), "train")
    assert got.classes.to_manifest()["list"] == want.classes.to_manifest()["list"]
    assert got.crowd == want.crowd and got.crowd["annotations"] == TINY_CROWD
    for a, b in zip(got.rows(), want.rows(), strict=True):
        assert a.image_id == b.image_id and a.image == b.image
        for name in ("labels", "bbox_ids", "bboxes", "iscrowd"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert build_shards(tmp_path / "out", str(folder), "train", max_rows=4).rows == 4


def test_without_a_card_the_names_come_from_the_parquet_metadata(coco_rows, tmp_path):
    folder = F.write_hub_folder(tmp_path / "hub", {"train": coco_rows[:6]}, write_card=False)
    assert "dataset_info" not in (folder / "README.md").read_text()
    src = S.open_source(str(folder), "train")
    assert src.classes.names == COCO_CLASSES and src.classes.ids == COCO_CATEGORY_IDS
    assert "parquet schema's Hugging Face metadata" in src.classes.evidence


def test_without_a_card_the_schema_is_still_checked(coco_rows, tmp_path):
    features = F.hub_features(datasets.ClassLabel(names=list(COCO_CLASSES)))
    objects = dict(features["objects"])
    del objects["bbox_id"]
    features["objects"] = objects
    rows = [dict(r, objects={k: v for k, v in r["objects"].items() if k != "bbox_id"}) for r in coco_rows[:6]]
    folder = F.write_hub_folder(tmp_path / "hub", {"train": rows}, features=features, write_card=False)
    with pytest.raises(SourceFormError) as err:
        S.open_source(str(folder), "train")
    message = str(err.value)
    assert str(folder / "data" / "train-00000-of-00001.parquet") in message
    assert "objects.bbox_id (or objects.id)" in message and "accepted:" in message


def test_card_and_parquet_metadata_disagreeing_is_an_error(coco_rows, coco_json, tmp_path):
    names, _ = _supercategories(coco_json)
    folder = F.write_hub_folder(tmp_path / "hub", {"train": coco_rows[:6]},
                                card_features=F.hub_features(datasets.ClassLabel(names=names)))
    with pytest.raises(SourceFormError, match=r"ClassLabel names disagree.*dataset card.*parquet schema"):
        S.open_source(str(folder), "train")


def test_integer_categories_without_names_are_refused(coco_rows, tmp_path):
    folder = F.write_hub_folder(tmp_path / "hub", {"train": coco_rows[:6]},
                                features=F.hub_features(datasets.Value("int64")))
    with pytest.raises(SourceFormError, match="class names are unknown.*no ClassLabel"):
        S.open_source(str(folder), "train")


# ------------------------------------------------------------------------------------------ crowd


def test_hub_crowd_boxes_equal_the_coco_build(tiny, hub_coco, coco_json, tmp_path):
    hub = build_shards(tmp_path / "hub", str(hub_coco), "train").out_dir
    coco = build_shards(tmp_path / "coco", f"coco:{tiny}", "train2017").out_dir
    crowd = read_manifest(hub)["crowd"]
    assert crowd["rule"] == CROWD_RULE and crowd["annotations"] == TINY_CROWD == read_manifest(coco)["crowd"]["annotations"]
    assert sum(a["iscrowd"] for a in coco_json["annotations"]) == TINY_CROWD
    assert f"{TINY_CROWD} of 470 boxes in 50 rows" in crowd["evidence"]
    a, b = _records(hub), _records(coco)
    assert a.keys() == b.keys()
    fields = ("boxes", "labels", "bbox_ids", "crowd_boxes", "crowd_labels", "crowd_bbox_ids", "box_drops")
    for image_id in a:
        assert {f: a[image_id][f] for f in fields} == {f: b[image_id][f] for f in fields}, image_id
    assert sum(len(r["crowd_bbox_ids"]) for r in a.values()) > 0


def test_hub_crowd_off_keeps_crowd_ids_as_ordinary_boxes(hub_coco, coco_json):
    crowd_ids = {a["id"] for a in coco_json["annotations"] if a["iscrowd"]}
    src = S.open_source(str(hub_coco), "train", hub_crowd="off")
    assert src.crowd == {"rule": "none", "evidence": "hub_crowd off: every box is an ordinary box", "annotations": 0}
    rows = list(src.rows())
    assert not any(r.iscrowd.any() for r in rows)
    seen = {int(i): int(lab) for r in rows for i, lab in zip(r.bbox_ids, r.labels) if i in crowd_ids}
    assert seen.keys() == crowd_ids and all(1 <= lab <= 80 for lab in seen.values())
    auto = list(S.open_source(str(hub_coco), "train").rows())
    assert {int(i) for r in auto for i in r.bbox_ids[r.iscrowd]} == crowd_ids


@pytest.mark.parametrize("part", ["image_id", "category"])
def test_an_id_that_does_not_encode_its_row_turns_the_rule_off(coco_rows, tmp_path, part):
    rows = [dict(r, objects=dict(r["objects"], bbox_id=list(r["objects"]["bbox_id"]))) for r in coco_rows]
    at = [(i, k) for i, r in enumerate(rows) for k, b in enumerate(r["objects"]["bbox_id"]) if b >= 9 * 10**11]
    row, k = at[-1]
    assert row > 1  # past the rows read to decide the bbox format: the whole split is checked
    # Another image's id, or another category's: still >= 9e11, but not this box's.
    rows[row]["objects"]["bbox_id"][k] += 1 if part == "image_id" else 100_000_000
    folder = F.write_hub_folder(tmp_path / "hub", {"train": rows}, rows_per_file=20)
    src = S.open_source(str(folder), "train", detect_rows=1)
    assert src.crowd["rule"] == "none" and src.crowd["annotations"] == 0
    evidence = src.crowd["evidence"]
    assert evidence.startswith(f"rule not applied: 1 of the {len(at)} bbox_ids >= 900000000000")
    assert f"row {row}, image_id {rows[row]['image_id']}" in evidence and "do not encode their own row" in evidence
    assert not any(r.iscrowd.any() for r in src.rows())
