"""--resize keep-ratio: each image stored at the size torchvision's GeneralizedRCNNTransform(800, 1333) gives
it, its boxes that transform's resize_boxes, a canvas per sample (the size rounded up to 32), and stored
targets equal to torchvision's own RPN assignment over that canvas's anchors, on tiny_coco."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from conftest import build_shards, require_extra, require_tiny_coco

require_extra("torchvision")
import torch  # noqa: E402
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes  # noqa: E402

from frcnn_shard import anchors as anc  # noqa: E402
from frcnn_shard.format.canvas import canvas_key, canvas_of, keep_ratio_size, resize_boxes_f32  # noqa: E402
from frcnn_shard.format.image import decode_stored_image  # noqa: E402
from frcnn_shard.format.members import JSON_EXT, TARGETS_EXT  # noqa: E402
from frcnn_shard.inspect.check import check_shards  # noqa: E402
from frcnn_shard.storage import LocalStore, read_manifest  # noqa: E402
from frcnn_shard.storage.samples import sample_record, sample_targets  # noqa: E402
from frcnn_shard.storage.tar import tar_members  # noqa: E402
from frcnn_shard.format.members import group_by_key  # noqa: E402
from frcnn_shard.torchvision import fasterrcnn_resnet50_fpn, generator_anchors  # noqa: E402
from frcnn_shard.transform import TransformConfig  # noqa: E402

STOCK = GeneralizedRCNNTransform(800, 1333, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def kr_shards(kr800):
    """tiny_coco, keep-ratio at torchvision's defaults (800 / 1333), torchvision-fpn anchors (conftest)."""
    return kr800


def samples(split_dir):
    """(key, members) of every sample of a split, in shard order."""
    man = read_manifest(split_dir)
    store = LocalStore(split_dir)
    for entry in man.shards:
        with open(split_dir / entry.name, "rb") as f:
            yield from ((raw.key, raw.members, man, store.location(entry.name))
                        for raw in group_by_key(tar_members(f)))


def test_sizes_and_boxes_are_torchvisions_on_random_and_real_sizes():
    rng = random.Random(0)
    root = require_tiny_coco()
    real = [(im["height"], im["width"]) for im in
            json.loads((root / "annotations" / "instances_train2017.json").read_text())["images"]]
    sizes = real + [(rng.randint(40, 3000), rng.randint(40, 3000)) for _ in range(300)] + [(800, 1333), (1333, 800)]
    for h, w in sizes:
        out, _ = STOCK.resize(torch.zeros(1, h, w), None)
        assert tuple(out.shape[-2:]) == keep_ratio_size((h, w), 800, 1333), (h, w)
        boxes = torch.rand(7, 4, generator=torch.Generator().manual_seed(h * w)) * torch.tensor([w, h, w, h])
        ref = resize_boxes(boxes, [h, w], list(out.shape[-2:])).numpy()
        assert np.array_equal(resize_boxes_f32(boxes.numpy(), (h, w), tuple(out.shape[-2:])), ref), (h, w)


def test_records_hold_torchvisions_size_boxes_and_their_canvas(kr_shards):
    root = require_tiny_coco()
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    anns = {a["id"]: a for a in data["annotations"]}
    counts: dict[str, int] = {}
    for key, members, man, where in samples(kr_shards):
        r = sample_record(members, key, where, man.canvas, man.num_classes)
        h, w = r.orig_size
        resized, target = STOCK.resize(torch.zeros(3, h, w), {"boxes": torch.zeros(0, 4)})
        assert tuple(r.content_size) == tuple(resized.shape[-2:]), key
        assert tuple(r.size) == canvas_of(r.content_size) and all(v % 32 == 0 for v in r.size)
        src = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                        for a in (anns[int(i)] for i in r.bbox_ids)], dtype=np.float64).reshape(-1, 4)
        src = np.clip(src, 0, [w, h, w, h]).astype(np.float32)  # our source boxes: clipped to the image
        ref = resize_boxes(torch.from_numpy(src), [h, w], list(r.content_size)).numpy()
        assert np.array_equal(r.boxes, np.minimum(ref, [r.content_size[1], r.content_size[0]] * 2)), key
        image = decode_stored_image(members["jpg"], "jpg", tuple(r.content_size))  # the content only
        assert image.shape[:2] == tuple(r.content_size)
        counts[canvas_key(r.size)] = counts.get(canvas_key(r.size), 0) + 1
    assert counts == man["canvases"] and len(counts) > 3
    assert sum(counts.values()) == man.samples == 49
    assert man.image_hw == (1344, 1344) and man["image"]["min_size"] == 800 and man["image"]["max_size"] == 1333


def test_stored_targets_equal_torchvisions_assignment_over_each_canvas(kr_shards):
    man = read_manifest(kr_shards)
    stock = fasterrcnn_resnet50_fpn(kr_shards, weights_backbone=None, use_stored_targets=False)
    spec = anc.AnchorSpec.from_dict(man.anchors["spec"])
    generator = stock.rpn.anchor_generator
    made: dict = {}
    n = positives = 0
    for key, members, man, where in samples(kr_shards):
        r = sample_record(members, key, where, man.canvas, man.num_classes)
        canvas = tuple(r.size)
        if canvas not in made:
            made[canvas] = torch.from_numpy(generator_anchors(generator, spec.at(canvas)))
        anchors = made[canvas]
        for flipped in (False, True):
            rec = r.hflip(content=True) if flipped else r
            t = sample_targets(members, key, where, man.anchor_count(canvas), flipped=flipped)
            stored_labels, stored_gt = t.dense(len(anchors))
            target = [{"boxes": torch.from_numpy(np.asarray(rec.boxes, dtype=np.float32).reshape(-1, 4))}]
            labels, matched = stock.rpn.assign_targets_to_anchors([anchors], target)
            assert torch.equal(labels[0], torch.from_numpy(stored_labels).float()), (key, flipped)
            pos = labels[0] == 1
            boxes = np.asarray(rec.boxes, dtype=np.float32)
            assert torch.equal(matched[0][pos], torch.from_numpy(boxes[stored_gt[pos.numpy()]])), (key, flipped)
            n, positives = n + 1, positives + int(pos.sum())
    assert n == 98 and positives > 1000


def test_the_models_backbone_gives_the_canvas_anchors(kr_shards):
    """The anchors of the real model (transform, ResNet-50 FPN, generator) on one padded canvas batch."""
    man = read_manifest(kr_shards)
    model = fasterrcnn_resnet50_fpn(kr_shards, weights_backbone=None, use_stored_targets=False).eval()
    image = torch.zeros(3, 800, 1201)  # content 800 x 1201 pads to the canvas 800 x 1216
    with torch.no_grad():
        image_list, _ = GeneralizedRCNNTransform(800, 1333, [0] * 3, [1] * 3)([image])
        feats = list(model.backbone(image_list.tensors).values())
        anchors = model.rpn.anchor_generator(image_list, feats)[0]
    assert tuple(image_list.tensors.shape[-2:]) == (800, 1216)
    spec = anc.AnchorSpec.from_dict(man.anchors["spec"]).at((800, 1216))
    assert torch.equal(anchors, torch.from_numpy(anc.make_anchors(spec)))
    assert len(anchors) == man.anchor_count((800, 1216))


def test_check_deep_passes_and_catches_a_record_with_a_foreign_canvas(kr_shards, tmp_path):
    assert check_shards(kr_shards, workers=0, deep=True).ok
    from frcnn_shard.format.record import record_problems

    key, members, man, _ = next(samples(kr_shards))
    meta = json.loads(members[JSON_EXT])
    assert record_problems(meta, man.canvas, man.num_classes, key)[0] == []
    for size, rule in (([meta["size"][0] + 32, meta["size"][1]], "rounded up"), ([1376, 1376], "rounded up")):
        bad = dict(meta, size=size)
        problems = record_problems(bad, man.canvas, man.num_classes, key)[0]
        assert problems and problems[0][0] == "image_size" and rule in problems[0][1]
    assert TARGETS_EXT in members


def _shard_digests(split_dir) -> list[str]:
    return [e.sha256 for e in read_manifest(split_dir).shards]


def test_batched_matching_groups_each_batch_by_canvas(kr_shards, tmp_path):
    """The batched (GPU) path, run on the CPU here: batches mixing canvases give the worker path's bytes."""
    from frcnn_shard.build import BuildOptions, anchor_spec
    from frcnn_shard.build.part import batch_matcher

    opts = BuildOptions(anchor_preset="torchvision-fpn", transform=TransformConfig(resize="keep-ratio"))
    real = batch_matcher(anchor_spec(opts), opts.matching, "cpu")
    seen: list[int] = []

    def on_cpu(boxes, crowd, canvases):
        seen.append(len(set(map(tuple, canvases))))
        return real(boxes, crowd, canvases)

    dev = build_shards(tmp_path, f"coco:{require_tiny_coco()}", "train2017", anchor_preset="torchvision-fpn",
                       transform=TransformConfig(resize="keep-ratio"), gpu_batch=7, match_batch=on_cpu)
    assert max(seen) > 1  # the batches did mix canvases
    assert _shard_digests(dev.out_dir) == _shard_digests(kr_shards)


@pytest.mark.gpu
def test_cuda_build_equals_the_cpu_build(kr_shards, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    dev = build_shards(tmp_path, f"coco:{require_tiny_coco()}", "train2017", anchor_preset="torchvision-fpn",
                       transform=TransformConfig(resize="keep-ratio"), device="cuda", gpu_batch=16)
    assert dev.device == "cuda" and _shard_digests(dev.out_dir) == _shard_digests(kr_shards)
