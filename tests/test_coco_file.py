"""Any COCO-format file as a source (coco:FILE.json): custom classes, LVIS and Objects365 image paths,
--classes, and the errors a bad file gets. Real images: tiny_coco turned into a custom dataset."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import build_shards, require_tiny_coco
from frcnn_shard.cli import main
from frcnn_shard.errors import FrcnnShardError
from frcnn_shard.inspect.check import check_shards
from frcnn_shard.sources import open_source
from frcnn_shard.storage import read_manifest


def tiny() -> tuple[Path, dict]:
    root = require_tiny_coco()
    return root, json.loads((root / "annotations" / "instances_train2017.json").read_text())


def supercategory_file(folder: Path, *, link_images: bool = True) -> tuple[Path, dict[int, str]]:
    """tiny_coco as a custom dataset: its supercategories as the classes, under sparse ids listed out of
    order, written as ``folder/_annotations.coco.json`` beside the images (a Roboflow-style export).
    Returns the file and {category id: name}."""
    root, data = tiny()
    supers = sorted({c["supercategory"] for c in data["categories"]})
    rng = random.Random(7)
    ids = rng.sample(range(100, 5000), len(supers))  # sparse, and not in name order
    sid = dict(zip(supers, ids))
    of_cat = {c["id"]: sid[c["supercategory"]] for c in data["categories"]}
    cats = [{"id": sid[s], "name": s, "supercategory": "thing"} for s in supers]
    rng.shuffle(cats)
    anns = [dict(a, category_id=of_cat[a["category_id"]]) for a in data["annotations"]]
    folder.mkdir(parents=True, exist_ok=True)
    if link_images:
        for im in data["images"]:
            os.symlink(root / "train2017" / im["file_name"], folder / im["file_name"])
    path = folder / "_annotations.coco.json"
    path.write_text(json.dumps({"images": data["images"], "annotations": anns, "categories": cats}))
    return path, {c["id"]: c["name"] for c in cats}


def test_custom_file_labels_follow_the_sorted_category_ids(tmp_path):
    path, names = supercategory_file(tmp_path / "train")
    src = open_source(f"coco:{path}", "train")
    ids = sorted(names)
    assert src.classes.ids == tuple(ids) and src.classes.source_ids == tuple(ids)
    assert src.classes.names == tuple(names[i] for i in ids)
    assert src.classes.order == "sorted category id"
    _, data = tiny()
    rows = list(src.rows())
    assert len(rows) == len(data["images"]) and all(r.image is not None for r in rows)
    label_of = {i: n + 1 for n, i in enumerate(ids)}
    by_ann = {a["id"]: a for a in json.loads(path.read_text())["annotations"]}
    for r in rows:
        assert r.labels.tolist() == [label_of[by_ann[b]["category_id"]] for b in r.bbox_ids.tolist()]


def test_custom_file_builds_checks_and_records_its_classes(tmp_path):
    path, names = supercategory_file(tmp_path / "export" / "train")
    res = build_shards(tmp_path / "out", f"coco:{path}", "train")
    man = read_manifest(res.out_dir)
    ids = sorted(names)
    assert man.classes[1:] == tuple(names[i] for i in ids)
    assert [(e["label"], e["id"], e["name"]) for e in man["categories"]["list"]] == [
        (n + 1, i, names[i]) for n, i in enumerate(ids)]
    assert man["crowd"]["rule"] == "iscrowd" and man["crowd"]["annotations"] == 5
    assert man["format_version"] == "2.1"
    assert check_shards(res.out_dir, workers=0).ok


def test_images_in_another_folder_lvis_and_objects365_paths(tmp_path):
    root, data = tiny()
    path, _ = supercategory_file(tmp_path / "ann", link_images=False)
    doc = json.loads(path.read_text())
    # LVIS: no file_name, the image named by coco_url's last two parts under --image-dir.
    for im in doc["images"]:
        im["coco_url"] = "http://images.cocodataset.org/train2017/" + im.pop("file_name")
    path.write_text(json.dumps(doc))
    src = open_source(f"coco:{path}", "val", image_dir=str(root))
    assert all(r.image is not None for r in src.rows(0, 5))
    # Objects365: file_name with folders, under --image-dir.
    o365 = tmp_path / "o365"
    (o365 / "images" / "v1" / "patch0").mkdir(parents=True)
    for im in doc["images"]:
        name = im.pop("coco_url").rsplit("/", 1)[1]
        os.symlink(root / "train2017" / name, o365 / "images" / "v1" / "patch0" / name)
        im["file_name"] = f"images/v1/patch0/{name}"
    path.write_text(json.dumps(doc))
    rows = list(open_source(f"coco:{path}", "train", image_dir=str(o365)).rows(0, 5))
    assert all(r.image is not None for r in rows)
    assert rows[0].image == (root / "train2017" / data["images"][0]["file_name"]).read_bytes()


def test_a_file_name_that_leaves_the_image_folder_is_never_opened(tmp_path):
    path, _ = supercategory_file(tmp_path / "train")
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((require_tiny_coco() / "train2017" / tiny()[1]["images"][0]["file_name"]).read_bytes())
    doc = json.loads(path.read_text())
    doc["images"][0]["file_name"] = "../secret.jpg"
    doc["images"][1]["file_name"] = str(secret)
    path.write_text(json.dumps(doc))
    rows = list(open_source(f"coco:{path}", "train").rows(0, 3))
    assert rows[0].image is None and rows[1].image is None and rows[2].image is not None
    assert "outside the image folder" in rows[0].origin


def test_classes_keeps_and_orders_a_subset(tmp_path):
    path, names = supercategory_file(tmp_path / "train")
    res = build_shards(tmp_path / "out", f"coco:{path}", "train", classes=("vehicle", "animal", "person"))
    man = read_manifest(res.out_dir)
    assert man.classes == ("__background__", "vehicle", "animal", "person")
    by_name = {n: i for i, n in names.items()}
    assert [e["id"] for e in man["categories"]["list"]] == [by_name["vehicle"], by_name["animal"], by_name["person"]]
    assert man["categories"]["kept_from"] == len(names)
    assert man["drops"]["boxes"].get("excluded_class", 0) > 0
    assert check_shards(res.out_dir, workers=0).ok
    with pytest.raises(FrcnnShardError, match=r"--classes names \['vehicles'\] are not classes of the source"):
        open_source(f"coco:{path}", "train", classes=("vehicles", "person"))


@pytest.mark.parametrize("change, message", [
    (lambda d: d["categories"].append(dict(d["categories"][0], id=99999)), r"duplicate class names: \['"),
    (lambda d: d["categories"].append(dict(d["categories"][0], name="other")), r"duplicate category ids"),
    (lambda d: d.update(categories=[]), r"the class list is empty"),
    (lambda d: d["categories"].append({"id": "7", "name": "x"}), r"integer 'id' and a string 'name'"),
    (lambda d: d["annotations"][3].update(category_id=123456), r"1 annotations have a category_id that is not in"),
    (lambda d: d.update(images=[]), r"'images' is empty: no images found"),
    (lambda d: d.pop("annotations"), r"missing list 'annotations'"),
])
def test_a_bad_file_gets_an_error_naming_it_and_the_rule(tmp_path, change, message):
    path, _ = supercategory_file(tmp_path / "train", link_images=False)
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(FrcnnShardError, match=message) as e:
        open_source(f"coco:{path}", "train")
    assert str(path) in str(e.value)
    out = CliRunner().invoke(main, ["build", "--source", f"coco:{path}", "--split", "train",
                                    "--out", str(tmp_path / "o"), "--workers", "0"])
    assert out.exit_code == 2 and "Traceback" not in out.output and str(path) in out.output, out.output


def test_the_cli_builds_a_file_with_an_image_dir_and_classes(tmp_path):
    root, _ = tiny()
    path, _ = supercategory_file(tmp_path / "ann", link_images=False)
    out = CliRunner().invoke(main, ["build", "--source", f"coco:{path}", "--image-dir", str(root / "train2017"),
                                    "--split", "train", "--classes", "person,animal", "--out", str(tmp_path / "o"),
                                    "--workers", "0", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert read_manifest(tmp_path / "o" / "train").classes == ("__background__", "person", "animal")


@pytest.mark.parametrize("make, found", [
    (lambda d: [(d / f"{i}.jpg").write_bytes(b"x") for i in range(3)], "3 image files and no annotations"),
    (lambda d: [(d / "dataset_info.json").write_text("{}"), (d / "state.json").write_text("{}"),
                (d / "data-00000-of-00001.arrow").write_bytes(b"")], "save_to_disk folder"),
    (lambda d: [(d / "annotations").mkdir(), (d / "annotations" / "instances_val2017.json").write_text("{}")],
     "an official COCO folder (annotations/instances_*.json); give it as coco:DIR"),
    (lambda d: [(d / "Annotations").mkdir(), (d / "Annotations" / "1.xml").write_text("<a/>")],
     "a Pascal VOC folder"),
    (lambda d: None, "an empty folder"),
])
def test_a_folder_of_another_kind_says_what_it_holds_and_the_forms(tmp_path, make, found):
    folder = tmp_path / "src"
    folder.mkdir()
    make(folder)
    out = CliRunner().invoke(main, ["build", "--source", str(folder), "--split", "train", "--out", str(tmp_path / "o")])
    assert out.exit_code == 2 and "Traceback" not in out.output, out.output
    assert found in out.output and "coco:FILE.json" in out.output and "voc:DIR" in out.output
