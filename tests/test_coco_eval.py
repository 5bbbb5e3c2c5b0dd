"""COCO evaluation from shards: `coco-gt` gives back tiny_coco's official boxes and ids, and pycocotools'
COCOeval scores predictions mapped by coco_results exactly as it scores the same boxes given in the
official annotations' own coordinates."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import require_extra

ROOT = Path(__file__).resolve().parents[1]


def official(tiny_coco: Path) -> dict:
    return json.loads((tiny_coco / "annotations" / "instances_train2017.json").read_text())


def coco_gt(split_dir: Path, out: Path) -> dict:
    from frcnn_shard.cli import main

    res = CliRunner().invoke(main, ["coco-gt", str(split_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "49 images, 470 annotations (5 crowd" in res.output
    return json.loads(out.read_text())


def average_precision(gt: dict, results: list[dict]) -> np.ndarray:
    """pycocotools' bbox COCOeval summary (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ...)."""
    require_extra("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def loader_predictions(split_dir: Path, shift: tuple[float, float] = (0.0, 0.0), hflip: float = 0.0) -> list[dict]:
    """The loader's boxes as detections (score falling with the box's rank in its image), moved by ``shift``
    original pixels, through coco_results; ``hflip``: the loader's, the boxes then the mirrored ones."""
    import torch

    from frcnn_shard.coco_eval import coco_results
    from frcnn_shard.loader import make_loader

    outputs, targets = [], []
    for _, batch in make_loader(split_dir, 8, shuffle=False, num_workers=0, hflip=hflip):
        for t in batch:
            sy, sx = t["scale"]
            move = torch.tensor([shift[0] * sx, shift[1] * sy] * 2, dtype=torch.float32)
            k = len(t["boxes"])
            outputs.append({"boxes": t["boxes"] + move, "labels": t["labels"],
                            "scores": 1.0 - 0.001 * torch.arange(k, dtype=torch.float32)})
            targets.append(t)
    return coco_results(outputs, targets, classes=split_dir)


def official_predictions(src: dict, shift: tuple[float, float]) -> list[dict]:
    """The official non-crowd boxes moved by ``shift`` and clipped to the image, scored as loader_predictions."""
    size = {im["id"]: (im["height"], im["width"]) for im in src["images"]}
    rank: dict[int, int] = {}
    out = []
    for a in src["annotations"]:
        if a["iscrowd"]:
            continue
        h, w = size[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        x1, x2 = np.clip([x + shift[0], x + bw + shift[0]], 0, w)
        y1, y2 = np.clip([y + shift[1], y + bh + shift[1]], 0, h)
        j = rank[a["image_id"]] = rank.get(a["image_id"], -1) + 1
        out.append({"image_id": a["image_id"], "category_id": a["category_id"],
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": 1.0 - 0.001 * j})
    return out


@pytest.mark.parametrize("shards", ["tiny_shards", "tv_letterbox"])
def test_coco_gt_gives_back_the_official_annotations(shards, request, tiny_coco, tmp_path):
    split = request.getfixturevalue(shards)
    gt = coco_gt(split, tmp_path / "gt.json")
    src = official(tiny_coco)
    want = {a["id"]: a for a in src["annotations"]}
    assert [a["id"] for a in gt["annotations"]] == [a["id"] for a in sorted(
        src["annotations"], key=lambda a: ([im["id"] for im in gt["images"]].index(a["image_id"]), a["iscrowd"]))]
    for a in gt["annotations"]:
        o = want[a["id"]]
        assert (a["image_id"], a["category_id"], a["iscrowd"]) == (o["image_id"], o["category_id"], o["iscrowd"])
        np.testing.assert_allclose(a["bbox"], o["bbox"], atol=2e-3)  # float32 canvas pixels and back
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3])
    images = {im["id"]: im for im in src["images"]}
    assert all(im == {k: images[im["id"]][k] for k in ("id", "height", "width")} for im in gt["images"])
    assert {c["id"]: c["name"] for c in gt["categories"]} == {c["id"]: c["name"] for c in src["categories"]}


@pytest.mark.parametrize("shards", ["tiny_shards", "tv_letterbox"])
def test_ground_truth_as_predictions_scores_ap_one(shards, request, tiny_coco, tmp_path):
    split = request.getfixturevalue(shards)
    preds = loader_predictions(split)
    assert len(preds) == 465
    gt = coco_gt(split, tmp_path / "gt.json")
    assert average_precision(gt, preds)[0] == 1.0
    assert average_precision(official(tiny_coco), preds)[0] == 1.0
    # Crowd boxes are ignore regions (iscrowd=1): neither missing them nor detecting them counts.
    on_crowd = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.5}
                for a in gt["annotations"] if a["iscrowd"]]
    assert len(on_crowd) == 5 and average_precision(gt, preds + on_crowd)[0] == 1.0


@pytest.mark.parametrize("shards", ["tiny_shards", "tv_letterbox"])
def test_mirrored_samples_fed_back_score_ap_one(shards, request, tmp_path):
    """With hflip=1.0 every sample (and its boxes) is mirrored: coco_results mirrors the detections back."""
    from frcnn_shard.coco_eval import evaluate_bbox

    split = request.getfixturevalue(shards)
    gt = coco_gt(split, tmp_path / "gt.json")
    preds = loader_predictions(split, hflip=1.0)
    assert len(preds) == 465
    assert average_precision(gt, preds)[0] == 1.0
    assert evaluate_bbox(gt, preds)["AP"] == 1.0 and evaluate_bbox(tmp_path / "gt.json", preds)["AP"] == 1.0


def test_evaluate_bbox_scores_no_detections_as_zeros(tiny_shards, tmp_path):
    """A young model with no detection above its threshold: zeros, not an IndexError inside pycocotools."""
    require_extra("pycocotools")
    from frcnn_shard.coco_eval import BBOX_STATS, evaluate_bbox

    gt = coco_gt(tiny_shards, tmp_path / "gt.json")
    assert evaluate_bbox(gt, []) == {**{name: 0.0 for name in BBOX_STATS}, "detections": 0}
    got = evaluate_bbox(gt, loader_predictions(tiny_shards))
    assert got["AP"] == 1.0 and got["detections"] == 465
    assert [got[name] for name in BBOX_STATS] == list(average_precision(gt, loader_predictions(tiny_shards)))


@pytest.mark.parametrize("shards", ["tiny_shards", "tv_letterbox"])
def test_shifted_predictions_score_as_the_same_shift_of_the_official_boxes(shards, request, tiny_coco, tmp_path):
    split = request.getfixturevalue(shards)
    gt = coco_gt(split, tmp_path / "gt.json")
    src = official(tiny_coco)
    for shift in ((6.0, -4.0), (-3.5, 9.0)):
        ours = average_precision(gt, loader_predictions(split, shift))
        ref = average_precision(src, official_predictions(src, shift))
        assert 0.05 < ours[0] < 0.9, ours  # the shift costs AP: the comparison has something to find
        np.testing.assert_allclose(ours[[0, 1, 2, 6, 7, 8]], ref[[0, 1, 2, 6, 7, 8]], rtol=0, atol=1e-12)


def test_coco_results_refuse_labels_outside_1_to_80():
    from frcnn_shard.coco_eval import coco_results
    from frcnn_shard.labels import coco_class_map

    t = {"image_id": 1, "scale": (1.0, 1.0), "orig_size": (10, 10)}
    out = {"boxes": np.array([[0, 0, 5, 5]]), "labels": np.array([81]), "scores": np.array([0.9])}
    with pytest.raises(ValueError, match="label 81 has no COCO category"):
        coco_results([out], [t], classes=coco_class_map())
    out["labels"] = np.array([80])
    assert coco_results([out], [t], classes=coco_class_map())[0]["category_id"] == 90
    with pytest.raises(TypeError, match="classes is required"):
        coco_results([out], [t], classes=None)


def test_core_package_works_without_torchvision():
    code = ("import sys; sys.modules['torchvision'] = None; sys.modules['pycocotools'] = None\n"
            "import frcnn_shard.cli, frcnn_shard.coco_eval, frcnn_shard.loader\n"
            "try:\n    import frcnn_shard.torchvision\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    assert "pip install 'frcnn-shard[torchvision]'" in out, out


def test_coco_gt_imports_neither_torch_nor_pycocotools():
    code = ("import sys, frcnn_shard.cli, frcnn_shard.coco_eval; "
            "print(sorted(m for m in ('torch', 'pycocotools', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    assert out.strip() == "[]", out
