"""The readers on keep-ratio shards (issue 23), where every sample has its own canvas and its own scale:
coco-gt gives tiny_coco's boxes back within float32 rounding, the ground truth fed back through coco_results
(mirrored too) scores AP 1.0, and info, stats and show read and show the canvases."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import require_extra, require_tiny_coco

from frcnn_shard.coco_eval import coco_results, evaluate_bbox, iter_records, split_ground_truth
from frcnn_shard.format.canvas import canvas_key
from frcnn_shard.inspect.info import info_rows
from frcnn_shard.inspect.stats import compute_stats, stats_table
from frcnn_shard.storage import read_manifest


def official() -> dict:
    return json.loads((require_tiny_coco() / "annotations" / "instances_train2017.json").read_text())


def run_cli(*args: str):
    from frcnn_shard.cli import main

    return CliRunner().invoke(main, list(args))


def float32_bound(side: float) -> float:
    """What float32 rounding allows a coordinate in an image whose longest side is ``side``: the source box
    rounded to float32, times the float32 ratio rounded again, then divided back (an ulp each, and one spare)."""
    return 3 * float(np.spacing(np.float32(side)))


def record_detections(split_dir, flip: bool) -> tuple[list[dict], list[dict]]:
    """Each record's boxes as detections in its canvas pixels (mirrored in place when ``flip``, as the loader
    delivers a mirrored keep-ratio sample), with the targets the loader gives: ``size`` = the content."""
    outputs, targets = [], []
    for r in iter_records(split_dir):
        rec = r.hflip(content=True) if flip else r
        k = len(rec.boxes)
        outputs.append({"boxes": rec.boxes, "labels": rec.labels, "scores": 1.0 - 0.001 * np.arange(k)})
        targets.append({"image_id": r.image_id, "scale": r.scale, "orig_size": r.orig_size,
                        "size": r.content_size, "canvas": r.size, "flipped": flip})
    return outputs, targets


@pytest.mark.parametrize("build", ["kr400", "kr800"])
def test_coco_gt_gives_back_tiny_cocos_boxes(build, request, tmp_path):
    split = request.getfixturevalue(build)
    res = run_cli("coco-gt", str(split), "--out", str(tmp_path / "gt.json"))
    assert res.exit_code == 0, res.output
    gt = json.loads((tmp_path / "gt.json").read_text())
    src = official()
    want = {a["id"]: a for a in src["annotations"]}
    images = {im["id"]: im for im in src["images"]}
    assert len(gt["images"]) == 49 and len(gt["annotations"]) == 470
    worst = 0.0
    for a in gt["annotations"]:
        o, im = want[a["id"]], images[a["image_id"]]
        assert (a["image_id"], a["category_id"], a["iscrowd"]) == (o["image_id"], o["category_id"], o["iscrowd"])
        h, w = im["height"], im["width"]
        x, y, bw, bh = o["bbox"]
        ref = np.clip([x, y, x + bw, y + bh], 0, [w, h, w, h])  # our source boxes are clipped to the image
        got = np.array([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]])
        err = float(np.abs(got - ref).max())
        assert err <= float32_bound(max(h, w)), (a["id"], got, ref)
        worst = max(worst, err)
    assert 0 < worst < 2e-4  # float32 rounding, no more: far inside the fixed builds' 2e-3


@pytest.mark.parametrize("flip", [False, True])
def test_ground_truth_fed_back_scores_ap_one(kr400, flip):
    require_extra("pycocotools")
    gt = split_ground_truth(kr400)
    outputs, targets = record_detections(kr400, flip)
    results = coco_results(outputs, targets, classes=kr400)
    assert len(results) == 465
    assert evaluate_bbox(gt, results)["AP"] == 1.0
    assert evaluate_bbox(official(), results)["AP"] == 1.0  # against tiny_coco's own annotations too
    # Each detection lands on its source box within float32 rounding, mirrored or not.
    want = {a["id"]: a["bbox"] for a in gt["annotations"] if not a["iscrowd"]}
    ids = [i for r in iter_records(kr400) for i in r.bbox_ids]
    sides = [max(r.orig_size) for r in iter_records(kr400) for _ in r.bbox_ids]
    for res, i, side in zip(results, ids, sides):
        np.testing.assert_allclose(res["bbox"], want[int(i)], rtol=0, atol=2 * float32_bound(side))


def test_a_flip_about_the_canvas_would_miss(kr400):
    """The mirrored boxes go back about the content's width: about the canvas's they land elsewhere."""
    require_extra("pycocotools")
    gt = split_ground_truth(kr400)
    outputs, targets = record_detections(kr400, flip=True)
    wrong = [dict(t, size=t["canvas"]) for t in targets]
    assert evaluate_bbox(gt, coco_results(outputs, wrong, classes=kr400))["AP"] < 0.9


def test_info_names_the_canvas_rule_and_the_canvases(kr400):
    man = read_manifest(kr400)
    rows = dict(info_rows(man))
    n = len(man["canvases"])
    assert n > 5
    assert rows["image"].startswith(f"keep-ratio 400/666, {n} canvases, largest 672x672 (HxW), jpg")
    counts = sorted(man["canvases"].items(), key=lambda kv: (-kv[1], kv[0]))
    assert rows["canvases"].startswith(", ".join(f"{k} {v}" for k, v in counts[:3]))
    assert "at 672x672 (each canvas its own" in rows["anchors"]
    res = run_cli("info", str(kr400))
    assert res.exit_code == 0 and f"{counts[0][0]} {counts[0][1]}" in res.output, res.output


def test_stats_reads_each_sample_at_its_canvas(kr400):
    man = read_manifest(kr400)
    st = compute_stats(kr400)
    records = list(iter_records(kr400))
    assert st["samples"] == 49 and st["boxes"] == 465
    c = st["canvases"]
    assert c["counts"] == man["canvases"] and list(c["counts"].values()) == sorted(c["counts"].values(), reverse=True)
    assert c["rule"] == "keep-ratio 400/666"
    content = sum(r.content_size[0] * r.content_size[1] for r in records)
    canvas = sum(r.size[0] * r.size[1] for r in records)
    assert c["padding_share"] == pytest.approx(1 - content / canvas) and 0.01 < c["padding_share"] < 0.2
    # Each image's anchor labels count its own canvas's anchors.
    pi = st["per_image"]
    want = [man.anchor_count(r.size) for r in records]
    assert pi["anchors"] == want and len(set(want)) > 3
    assert [p + q + i for p, q, i in zip(pi["positive"], pi["negative"], pi["ignore"])] == want
    # Box sizes in each sample's content pixels; COCO's classes through each sample's scale, as the source's boxes.
    sides = np.concatenate([np.sqrt((r.boxes[:, 2] - r.boxes[:, 0]) * (r.boxes[:, 3] - r.boxes[:, 1])) for r in records])
    assert st["box_sizes"]["max"] == pytest.approx(float(sides.max())) and st["box_sizes"]["max"] <= 666
    src = {a["id"]: a for a in official()["annotations"]}
    orig = np.array([np.sqrt(src[int(i)]["bbox"][2] * src[int(i)]["bbox"][3]) for r in records for i in r.bbox_ids])
    assert st["box_sizes"]["coco_area"] == {"small": int((orig < 32).sum()), "medium": int(((orig >= 32) & (orig < 96)).sum()),
                                            "large": int((orig >= 96).sum())}
    text = stats_table(st)
    assert f"canvases          {len(c['counts'])} canvases (keep-ratio 400/666), padding" in text
    top = next(iter(c["counts"]))
    assert f"{top} {c['counts'][top]}" in text and f"of its canvas's {min(want)}..{max(want)}" in text


def test_show_draws_each_sample_at_its_content(kr400, tmp_path):
    require_extra("matplotlib")
    from frcnn_shard.inspect.show import sample_figure

    records = list(iter_records(kr400))
    for flip in (False, True):
        fig, keys = sample_figure(kr400, indices=[0, 1, 2], anchors=True, flip=flip)
        for ax, key in zip(fig.axes, keys):
            r = next(r for r in records if r.key == key)
            assert ax.images[0].get_array().shape[:2] == tuple(r.content_size)
            title = ax.get_title()
            assert title.endswith(f"canvas {canvas_key(r.size)}") and ("(flipped)" in title) == flip
            assert f"{r.rpn['positive']} positive anchor" in title or flip  # the stored counts are unflipped
    out = tmp_path / "show.png"
    res = run_cli("show", str(kr400), "--index", "0", "--anchors", "--flip", "--out", str(out))
    assert res.exit_code == 0 and out.exists(), res.output
