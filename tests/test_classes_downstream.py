"""Every reader downstream of a build takes its classes from the manifest: coco-gt and coco_results write the
source's own category ids, the torchvision model has K + 1 outputs, and info, stats and show name the
manifest's classes. On real images: tiny_coco as a custom COCO dataset (its 80 categories renumbered to
sparse, unordered ids and renamed), and a ``--classes dog,person`` subset of the official layout."""
from __future__ import annotations

import json
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import build_shards, require_extra, require_tiny_coco

ANNOTATIONS = Path("annotations") / "instances_train2017.json"
SUBSET = ("dog", "person")  # official COCO ids 18 and 1: the subset's labels run against the ids' order


def renumbered(src: dict, seed: int = 7) -> dict:
    """``src`` with its categories shuffled, given ids 1000 - 7 * i in the shuffled order and prefixed names."""
    cats = list(src["categories"])
    random.Random(seed).shuffle(cats)
    new_id = {c["id"]: 1000 - 7 * i for i, c in enumerate(cats)}
    return {**src, "categories": [{**c, "id": new_id[c["id"]], "name": f"my {c['name']}"} for c in cats],
            "annotations": [{**a, "category_id": new_id[a["category_id"]]} for a in src["annotations"]]}


@pytest.fixture(scope="module")
def custom_dir(tmp_path_factory) -> Path:
    """A custom COCO-layout dataset: tiny_coco's images (symlinked) with renumbered, renamed categories."""
    tiny = require_tiny_coco()
    root = tmp_path_factory.mktemp("custom_coco")
    (root / "annotations").mkdir()
    (root / ANNOTATIONS).write_text(json.dumps(renumbered(json.loads((tiny / ANNOTATIONS).read_text()))))
    (root / "train2017").symlink_to(tiny / "train2017", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def custom_shards(tmp_path_factory, custom_dir) -> Path:
    return build_shards(tmp_path_factory.mktemp("custom_shards"), f"coco:{custom_dir}", "train2017").out_dir


@pytest.fixture(scope="module")
def subset_shards(tmp_path_factory) -> Path:
    """tiny_coco (official ids) keeping dog and person, with torchvision's anchors for the model."""
    return build_shards(tmp_path_factory.mktemp("subset_shards"), f"coco:{require_tiny_coco()}", "train2017",
                        classes=SUBSET, anchor_preset="torchvision-fpn").out_dir


def run_cli(*args: str):
    from frcnn_shard.cli import main

    return CliRunner().invoke(main, list(args))


def coco_gt(split_dir: Path, out: Path) -> dict:
    res = run_cli("coco-gt", str(split_dir), "--out", str(out))
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def fed_back(split_dir: Path) -> list[dict]:
    """The loader's ground-truth boxes as detections (score falling with the box's rank), through coco_results."""
    import torch

    from frcnn_shard.coco_eval import coco_results
    from frcnn_shard.loader import make_loader

    loader = make_loader(split_dir, 8, shuffle=False, num_workers=0)
    from frcnn_shard.storage import read_manifest

    man = read_manifest(split_dir)
    assert loader.classes == ("__background__", *man.class_map.names)  # index = label, from the manifest
    outputs, targets = [], []
    for _, batch in loader:
        for t in batch:
            k = len(t["boxes"])
            outputs.append({"boxes": t["boxes"], "labels": t["labels"],
                            "scores": 1.0 - 0.001 * torch.arange(k, dtype=torch.float32)})
            targets.append(t)
    return coco_results(outputs, targets, classes=loader)


# ------------------------------------------------------------------------------ coco-gt, coco_results


def test_custom_ids_fed_back_score_ap_one(custom_shards, custom_dir, tmp_path):
    """Detections carry the file's own category ids: AP 1.0 against coco-gt and against the source file."""
    require_extra("pycocotools")
    from frcnn_shard.coco_eval import evaluate_bbox

    preds = fed_back(custom_shards)
    assert len(preds) == 465
    assert evaluate_bbox(coco_gt(custom_shards, tmp_path / "gt.json"), preds)["AP"] == 1.0
    assert evaluate_bbox(custom_dir / ANNOTATIONS, preds)["AP"] == 1.0


def test_coco_gt_writes_the_files_categories_and_ids(custom_shards, custom_dir, tmp_path):
    src = json.loads((custom_dir / ANNOTATIONS).read_text())
    gt = coco_gt(custom_shards, tmp_path / "gt.json")
    assert gt["categories"] == [{"id": c["id"], "name": c["name"]}
                                for c in sorted(src["categories"], key=lambda c: c["id"])]
    want = {a["id"]: a["category_id"] for a in src["annotations"]}
    assert len(gt["annotations"]) == 470
    assert all(a["category_id"] == want[a["id"]] for a in gt["annotations"])


def test_subset_build_writes_the_source_ids(subset_shards, tiny_coco, tmp_path):
    from frcnn_shard.coco_eval import iter_records
    from frcnn_shard.shards import read_manifest

    m = read_manifest(subset_shards)
    assert m.classes == ("__background__",) + SUBSET and m.class_map.ids == (18, 1) and m.class_map.kept_from == 80
    labels = {int(v) for r in iter_records(subset_shards) for v in np.concatenate([r.labels, r.crowd_labels])}
    assert labels == {1, 2}
    gt = coco_gt(subset_shards, tmp_path / "gt.json")
    assert gt["categories"] == [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}]
    official = {a["id"]: a["category_id"] for a in json.loads((tiny_coco / ANNOTATIONS).read_text())["annotations"]}
    assert gt["annotations"] and all(a["category_id"] == official[a["id"]] for a in gt["annotations"])
    assert {a["category_id"] for a in gt["annotations"]} == {18, 1}


def test_coco_results_map_labels_through_the_manifest(subset_shards, tiny_shards):
    from frcnn_shard.coco_eval import coco_results
    from frcnn_shard.shards import read_manifest

    t = {"image_id": 1, "scale": (1.0, 1.0), "orig_size": (10, 10)}
    out = {"boxes": np.array([[0, 0, 5, 5], [1, 1, 4, 4]]), "labels": np.array([1, 2]), "scores": np.array([0.9, 0.8])}
    for classes in (subset_shards, read_manifest(subset_shards), read_manifest(subset_shards).class_map,
                    subset_shards / "manifest.json", str(subset_shards)):
        assert [r["category_id"] for r in coco_results([out], [t], classes=classes)] == [18, 1]
    with pytest.raises(ValueError, match="label 3 "):
        coco_results([{**out, "labels": np.array([1, 3])}], [t], classes=subset_shards)
    # An official COCO build keeps the official ids: label 80 is COCO's category 90.
    assert coco_results([{**out, "labels": np.array([1, 80])}], [t], classes=tiny_shards)[1]["category_id"] == 90


def test_official_build_keeps_the_official_categories(tiny_shards, tiny_coco):
    from frcnn_shard.coco_eval import split_ground_truth

    src = json.loads((tiny_coco / ANNOTATIONS).read_text())
    gt = split_ground_truth(tiny_shards)
    assert gt["categories"] == [{"id": c["id"], "name": c["name"]} for c in src["categories"]]


# ------------------------------------------------------------------------------------------- the model


def test_model_has_one_output_per_class_and_the_background(subset_shards):
    require_extra("torchvision")
    from frcnn_shard.loader import make_loader
    from frcnn_shard.torchvision import fasterrcnn_resnet50_fpn

    loader = make_loader(subset_shards, 2, shuffle=False, num_workers=0, normalize=False)
    for source in (loader, subset_shards):
        box = fasterrcnn_resnet50_fpn(source, weights_backbone=None).roi_heads.box_predictor
        assert (box.cls_score.out_features, box.bbox_pred.out_features) == (3, 12)
    given = fasterrcnn_resnet50_fpn(loader, weights_backbone=None, num_classes=5).roi_heads.box_predictor
    assert given.cls_score.out_features == 5


# --------------------------------------------------------------------------------- info, stats, show


def test_info_names_the_classes(subset_shards, custom_shards):
    from frcnn_shard.inspect.info import info_rows
    from frcnn_shard.shards import read_manifest

    rows = dict(info_rows(read_manifest(subset_shards)))
    assert rows["classes"].startswith("2 of the source's 80") and "--classes order" in rows["classes"]
    assert rows["class ids"] == "1 dog (id 18), 2 person (id 1)"
    assert rows["crowd"].startswith("iscrowd, 5 in the source; ")
    res = run_cli("info", str(custom_shards))
    assert res.exit_code == 0, res.output
    line = next(v for v in res.output.splitlines() if v.startswith("class ids"))
    src = read_manifest(custom_shards).class_map
    assert f"1 {src.names[0]} (id {src.ids[0]})" in line and "(+70 more)" in line
    assert "80, sorted category id" in res.output


def test_stats_names_the_manifest_classes(custom_shards, subset_shards):
    from frcnn_shard.inspect.stats import compute_stats, stats_table
    from frcnn_shard.shards import read_manifest

    names = read_manifest(custom_shards).classes
    st = compute_stats(custom_shards)
    assert st["classes"] and all(r["name"] == names[r["label"]] and r["name"].startswith("my ") for r in st["classes"])
    assert f"  {st['classes'][0]['name']} " in stats_table(st)
    sub = compute_stats(subset_shards)
    assert {(r["label"], r["name"], r["id"]) for r in sub["classes"]} == {(1, "dog", 18), (2, "person", 1)}
    res = run_cli("stats", str(subset_shards), "--out", str(subset_shards.parent / "stats.png"))
    assert res.exit_code == 0 and "person" in res.output and "2 classes present of 2" in res.output, res.output


def test_show_draws_the_manifest_names(custom_shards):
    pytest.importorskip("matplotlib")
    from frcnn_shard.coco_eval import iter_records
    from frcnn_shard.inspect.show import sample_figure
    from frcnn_shard.shards import read_manifest

    names = read_manifest(custom_shards).classes
    record = next(iter_records(custom_shards))
    fig, _ = sample_figure(custom_shards, indices=[0])
    drawn = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert drawn[:len(record.labels)] == [names[v] for v in record.labels]
    assert [d for d in drawn[len(record.labels):]] == [f"crowd {names[v]}" for v in record.crowd_labels]


# ------------------------------------------------------------------------------------------------ check


def rewrite_first_record(folder: Path, mutate) -> None:
    """Shard 0 rewritten with its first record mutated; the manifest's bytes and sha256 follow (tests/test_hostile.py)."""
    from frcnn_shard.shards import ShardWriter
    from frcnn_shard.storage import LocalStore

    man = json.loads((folder / "manifest.json").read_text())
    entry = man["shards"][0]
    with tarfile.open(folder / entry["name"]) as tar:
        members = [(m.name.split(".", 1), tar.extractfile(m).read()) for m in tar.getmembers()]
    first = members[0][0][0]
    members = [((k, e), json.dumps(mutate(json.loads(b))).encode() if (k, e) == (first, "json") else b)
               for (k, e), b in members]
    (folder / entry["name"]).unlink()
    writer = ShardWriter(LocalStore(folder), entry["name"])
    for key in dict.fromkeys(k for (k, _), _ in members):
        writer.add(key, [(e, b) for (k, e), b in members if k == key])
    info = writer.close()
    man["totals"]["bytes"] += info.bytes - entry["bytes"]
    entry.update(bytes=info.bytes, sha256=info.sha256)
    (folder / "manifest.json").write_text(json.dumps(man))


def test_check_reports_a_label_past_the_subsets_classes(subset_shards, tmp_path):
    folder = Path(shutil.copytree(subset_shards, tmp_path / "train2017"))
    assert run_cli("check", str(folder)).exit_code == 0
    rewrite_first_record(folder, lambda r: {**r, "labels": [3] + r["labels"][1:]})
    res = run_cli("check", str(folder))
    assert res.exit_code == 1 and "label_invalid" in res.output, res.output
    first = json.loads((folder / "manifest.json").read_text())["shards"][0]["first_key"]
    assert first in res.output
