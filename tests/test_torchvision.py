"""torchvision's Faster R-CNN on shards: the stored targets are what its own RPN matching computes on
tiny_coco, the losses are the same bit for bit, the transform is stock arithmetic without the resize,
and shards or models that cannot agree are refused with the preset and the size named."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import require_extra

require_extra("torchvision")
import torch  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.transform import GeneralizedRCNNTransform  # noqa: E402

from frcnn_shard import anchors as anc  # noqa: E402
from frcnn_shard.loader import make_loader  # noqa: E402
from frcnn_shard.torchvision import (  # noqa: E402
    AnchorMismatchError, StoredTargetsRPN, fasterrcnn_resnet50_fpn, generator_anchors,
)

MULTI_SIZES = ((32, 40), (64, 80), (128, 160), (256, 320), (512, 640))


pytestmark = pytest.mark.usefixtures("two_torch_threads")


def rpn_anchors(model, images: torch.Tensor) -> list[torch.Tensor]:
    """The anchors the model's RPN gets for a batch: its transform, its backbone, its anchor generator."""
    with torch.no_grad():
        image_list, _ = model.transform(list(images))
        feats = list(model.backbone(image_list.tensors).values())
        return model.rpn.anchor_generator(image_list, feats)


@pytest.mark.parametrize("shards", ["tv_shards", "tv_letterbox"])
def test_stored_targets_equal_torchvision_assignment(shards, request):
    loader = make_loader(request.getfixturevalue(shards), 4, shuffle=False, num_workers=0, rpn_batch_size=None,
                         normalize=False)
    stock = fasterrcnn_resnet50_fpn(loader, weights_backbone=None, use_stored_targets=False)
    assert type(stock.rpn) is not StoredTargetsRPN
    images, targets = next(iter(loader))
    anchors = rpn_anchors(stock, images[:1])[0]
    assert torch.equal(anchors, loader.anchors)  # the model's own anchors, bit for bit
    n = positives = 0
    for images, targets in loader:
        labels, matched = stock.rpn.assign_targets_to_anchors([anchors] * len(targets), targets)
        for t, lab, m in zip(targets, labels, matched):
            assert torch.equal(lab, t["anchor_labels"].float()), t["key"]
            pos = lab == 1
            assert torch.equal(m[pos], t["anchor_matched_gt"][pos]), t["key"]
            n, positives = n + 1, positives + int(pos.sum())
    assert n == 49 and positives > 1000


def test_losses_identical_to_stock_torchvision(tv_shards):
    loader = make_loader(tv_shards, 2, shuffle=False, num_workers=0, rpn_batch_size=None, normalize=False)
    torch.manual_seed(0)
    stock = fasterrcnn_resnet50_fpn(loader, weights_backbone=None, use_stored_targets=False)
    stored = fasterrcnn_resnet50_fpn(loader, weights_backbone=None)
    stored.load_state_dict(stock.state_dict())  # the RPN swap keeps every parameter name
    assert isinstance(stored.rpn, StoredTargetsRPN)
    images, targets = next(iter(loader))
    losses = []
    for model in (stock, stored):
        model.train()
        torch.manual_seed(1)  # the same sampler draws in both (RPN and RoI heads)
        with torch.no_grad():
            losses.append({k: v.item() for k, v in model(images, targets).items()})
    assert losses[0] == losses[1]
    assert set(losses[0]) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert stored.rpn.anchors_checked


def test_stock_sampler_keeps_the_loaders_sample(tv_shards):
    loader = make_loader(tv_shards, 8, shuffle=False, num_workers=0, normalize=False)  # 256 per image, 0.5
    model = fasterrcnn_resnet50_fpn(loader, weights_backbone=None)
    for epoch in range(2):
        loader.set_epoch(epoch)
        for _, targets in loader:
            labels = [t["anchor_labels"].float() for t in targets]
            pos, neg = model.rpn.fg_bg_sampler(labels)
            for lab, p, q in zip(labels, pos, neg):
                assert int((lab >= 0).sum()) == 256
                assert torch.equal(p.bool(), lab == 1) and torch.equal(q.bool(), lab == 0)


def test_transform_is_stock_arithmetic_without_the_resize(tv_shards):
    u8 = make_loader(tv_shards, 2, shuffle=False, num_workers=0, normalize=False)
    f32 = make_loader(tv_shards, 2, shuffle=False, num_workers=0, normalize=True)
    model = fasterrcnn_resnet50_fpn(u8, weights_backbone=None)
    images, targets = next(iter(u8))
    ours, _ = model.transform(list(images))
    stock = GeneralizedRCNNTransform(400, 400, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    ref, _ = stock([im.float() / 255 for im in images])
    assert ours.tensors.shape == (2, 3, 416, 416) and ours.image_sizes == [(400, 400)] * 2
    assert torch.equal(ours.tensors, ref.tensors)
    floats, _ = next(iter(f32))
    from_floats, _ = model.transform(list(floats))  # normalised by the loader: taken as it is
    torch.testing.assert_close(from_floats.tensors, ours.tensors, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"canvas is \(400, 400\)"):
        model.transform([torch.zeros(3, 320, 400, dtype=torch.uint8)])


def test_anchor_check_names_preset_and_size(tv_shards):
    loader = make_loader(tv_shards, 1, shuffle=False, num_workers=0, normalize=False)
    model = fasterrcnn_resnet50_fpn(loader, weights_backbone=None)
    model.transform = GeneralizedRCNNTransform(512, 512, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # resizes
    model.train()
    images, targets = next(iter(loader))
    with pytest.raises(AnchorMismatchError, match=r"preset 'torchvision-fpn' at 400x400"):
        model([im.float() / 255 for im in images], targets)
    assert not model.rpn.anchors_checked


def _with_anchors(manifest: dict, preset: str, spec: anc.AnchorSpec) -> dict:
    m = copy.deepcopy(manifest)
    m["anchors"] = anc.anchors_manifest_section(preset, spec, anc.MatchConfig())
    return m


def test_refuses_what_torchvision_cannot_match(tv_shards, tiny_shards):
    loader = make_loader(tv_shards, 1, num_workers=0)
    with pytest.raises(AnchorMismatchError, match=r"preset 'frcnn-fpn' at 400x400.*ratios are w/h"):
        fasterrcnn_resnet50_fpn(tiny_shards, weights_backbone=None)  # a shard folder of the default preset
    man = loader.manifest
    for preset, why in (("detectron2-fpn", "not rounded"), ("c4", "strides")):
        with pytest.raises(AnchorMismatchError, match=rf"preset '{preset}' at 400x400.*{why}"):
            fasterrcnn_resnet50_fpn(_with_anchors(man, preset, anc.preset_spec(preset, 400)), weights_backbone=None)
    size_major = anc.AnchorSpec(**{**anc.preset_spec("torchvision-fpn", 400, sizes=MULTI_SIZES).to_dict(),
                                   "order": "level,row,col,size,ratio"})
    with pytest.raises(AnchorMismatchError, match="size-major"):
        fasterrcnn_resnet50_fpn(_with_anchors(man, "torchvision-fpn", size_major), weights_backbone=None)
    with pytest.raises(ValueError, match="min_size: set by the shards"):
        fasterrcnn_resnet50_fpn(loader, weights_backbone=None, min_size=800)
    with pytest.raises(ValueError, match="pos_iou=0.7, neg_iou=0.3"):
        fasterrcnn_resnet50_fpn(loader, weights_backbone=None, rpn_fg_iou_thresh=0.6)
    other = AnchorGenerator(sizes=((16,), (32,), (64,), (128,), (256,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    with pytest.raises(AnchorMismatchError, match="gives other anchors"):
        fasterrcnn_resnet50_fpn(loader, weights_backbone=None, rpn_anchor_generator=other)
    assert fasterrcnn_resnet50_fpn(str(tv_shards / "manifest.json"), weights_backbone=None, num_classes=5
                                   ).roi_heads.box_predictor.cls_score.out_features == 5


def test_several_sizes_per_level_in_torchvision_order(tv_shards):
    spec = anc.preset_spec("torchvision-fpn", 400, sizes=MULTI_SIZES)
    assert spec.order == "level,row,col,ratio,size"
    a = anc.make_anchors(spec)
    assert a.shape[0] == 86484
    # The stock model's RPN, run on a real batch, sees exactly the preset's anchors.
    man = _with_anchors(make_loader(tv_shards, 1, num_workers=0).manifest, "torchvision-fpn", spec)
    model = fasterrcnn_resnet50_fpn(man, weights_backbone=None, use_stored_targets=False)
    assert torch.equal(rpn_anchors(model, torch.zeros(1, 3, 400, 400, dtype=torch.uint8))[0], torch.from_numpy(a))
    # The size-major order this preset had before puts 57,656 of them elsewhere.
    old = anc.AnchorSpec(**{**spec.to_dict(), "order": "level,row,col,size,ratio"})
    assert int((anc.make_anchors(old) != a).any(1).sum()) == 57656
    # Other sizes, three per level, other ratios: torchvision's AnchorGenerator agrees.
    for hw, sizes, ratios in (((320, 480), ((32, 40, 50), (64, 80, 101), (128, 161, 203), (256, 322, 406),
                                            (512, 645, 812)), None), (512, MULTI_SIZES, (0.25, 0.5, 1.0, 2.0, 4.0))):
        spec = anc.preset_spec("torchvision-fpn", hw, sizes=sizes, ratios=ratios)
        gen = AnchorGenerator(sizes=spec.sizes, aspect_ratios=(spec.ratios,) * 5)
        np.testing.assert_array_equal(generator_anchors(gen, spec), anc.make_anchors(spec))


def test_training_step_moves_targets_to_the_images_device(tv_shards):
    loader = make_loader(tv_shards, 2, shuffle=False, num_workers=0, normalize=True)
    model = fasterrcnn_resnet50_fpn(loader, weights_backbone=None)
    model.train()
    images, targets = next(iter(loader))  # float32, normalised in the loader
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.rpn.head.cls_logits.weight.grad.abs().sum() > 0


@pytest.mark.gpu
def test_cuda_training_step(tv_shards):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    loader = make_loader(tv_shards, 2, shuffle=False, num_workers=0, normalize=False)
    model = fasterrcnn_resnet50_fpn(loader, weights_backbone=None).cuda().train()
    images, targets = next(iter(loader))
    losses = model(images.cuda(), targets)  # targets stay on the CPU: the transform moves them
    assert all(torch.isfinite(v) for v in losses.values())


def test_eval_outputs_map_to_coco_results(tv_letterbox):
    from frcnn_shard.labels import COCO_CATEGORY_IDS
    from frcnn_shard.torchvision import coco_results

    loader = make_loader(tv_letterbox, 2, shuffle=False, num_workers=0, normalize=False)
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(loader, weights_backbone=None, box_score_thresh=0.0).eval()
    images, targets = next(iter(loader))
    with torch.no_grad():
        outputs = model(images)
    assert all(len(o["boxes"]) > 0 for o in outputs)  # untrained, but no score threshold
    results = coco_results(outputs, targets, classes=loader)
    assert len(results) == sum(len(o["boxes"]) for o in outputs)
    for r in results:
        t = next(t for t in targets if t["image_id"] == r["image_id"])
        h, w = t["orig_size"]
        x, y, bw, bh = r["bbox"]
        assert r["category_id"] in COCO_CATEGORY_IDS and 0 <= r["score"] <= 1
        assert 0 <= x <= x + bw <= w + 1e-6 and 0 <= y <= y + bh <= h + 1e-6
    # Boxes come back in the original image's pixels: canvas x / sx.
    o, t = outputs[0], targets[0]
    first = [r for r in results if r["image_id"] == t["image_id"]][0]
    assert first["bbox"][0] == pytest.approx(min(float(o["boxes"][0, 0]) / t["scale"][1], t["orig_size"][1]), abs=1e-4)
