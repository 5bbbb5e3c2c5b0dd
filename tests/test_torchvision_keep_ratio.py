"""torchvision's Faster R-CNN on keep-ratio shards (issue 23): each batch one canvas, each image its content
top-left. The model crops each image to its content and pads the batch as stock torchvision does, its
AnchorGenerator's anchors are the build's per canvas, the stored targets are its own RPN assignment, and the
losses equal torchvision's own model fed the content images, bit for bit, on tiny_coco.

The batches are made here from the shards (records, images and stored targets), as the loader delivers them:
uint8 [B, 3, Hc, Wc], content top-left, zero pad; targets with ``size`` = the content, ``canvas`` = (Hc, Wc)
and the stored labels unsampled (``rpn_batch_size=None``)."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

from conftest import require_extra

require_extra("torchvision")
import torch  # noqa: E402
from torchvision.models.detection.transform import GeneralizedRCNNTransform  # noqa: E402

from frcnn_shard import anchors as anc  # noqa: E402
from frcnn_shard.format.image import decode_stored_image  # noqa: E402
from frcnn_shard.format.members import group_by_key  # noqa: E402
from frcnn_shard.format.record import Record  # noqa: E402
from frcnn_shard.storage import LocalStore, read_manifest  # noqa: E402
from frcnn_shard.storage.samples import sample_record, sample_targets  # noqa: E402
from frcnn_shard.storage.tar import tar_members  # noqa: E402
from frcnn_shard.torchvision import (  # noqa: E402
    AnchorMismatchError, KeepRatioTransform, StoredTargetsRPN, content_images, fasterrcnn_resnet50_fpn,
    generator_anchors,
)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture(scope="module")
def stock400(kr400):
    """The model on kr400 with torchvision's own RPN matching (built once: ResNet-50's init takes a while)."""
    torch.manual_seed(0)
    return fasterrcnn_resnet50_fpn(kr400, weights_backbone=None, use_stored_targets=False)


def by_canvas(split_dir) -> dict[tuple[int, int], list[tuple]]:
    """{canvas: [(key, members, where), ...]} over a split, in shard order."""
    man = read_manifest(split_dir)
    store = LocalStore(split_dir)
    out: dict[tuple[int, int], list[tuple]] = {}
    for entry in man.shards:
        with open(split_dir / entry.name, "rb") as f:
            for raw in group_by_key(tar_members(f)):
                where = store.location(entry.name)
                r = sample_record(raw.members, raw.key, where, man.canvas, man.num_classes)
                out.setdefault(tuple(r.size), []).append((raw.key, raw.members, where))
    return out


def make_batch(split_dir, samples: list[tuple], flips: list[bool]) -> tuple[torch.Tensor, list[dict]]:
    """The loader's keep-ratio batch of samples of one canvas: uint8 [B, 3, Hc, Wc] (content top-left, zero pad),
    targets with the content ``size``, the ``canvas`` and the stored targets unsampled (1 / 0 / -1)."""
    man = read_manifest(split_dir)
    images, targets = [], []
    for (key, members, where), flip in zip(samples, flips):
        r = sample_record(members, key, where, man.canvas, man.num_classes)
        canvas, (h, w) = tuple(r.size), tuple(r.content_size)
        image = torch.zeros(3, *canvas, dtype=torch.uint8)
        pixels = decode_stored_image(members["jpg"], "jpg", (h, w), mirror=flip)
        image[:, :h, :w] = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
        rec = r.hflip(content=True) if flip else r
        a = man.anchor_count(canvas)
        labels, gt = sample_targets(members, key, where, a, flipped=flip).dense(a)
        boxes = torch.from_numpy(np.asarray(rec.boxes, dtype=np.float32).reshape(-1, 4))
        matched = torch.zeros(a, 4)
        matched[labels == 1] = boxes[gt[labels == 1]]
        images.append(image)
        targets.append({"boxes": boxes, "labels": torch.from_numpy(rec.labels), "anchor_labels":
                        torch.from_numpy(labels.astype(np.int64)), "anchor_matched_gt": matched, "key": key,
                        "image_id": r.image_id, "size": (h, w), "canvas": canvas, "orig_size": r.orig_size,
                        "scale": r.scale, "flipped": flip})
    return torch.stack(images), targets


def pairs(split_dir) -> list[tuple[torch.Tensor, list[dict]]]:
    """Every canvas of a split as batches of two (one left over alone), the second of each pair mirrored."""
    out = []
    for group in by_canvas(split_dir).values():
        for i in range(0, len(group), 2):
            chunk = group[i:i + 2]
            out.append(make_batch(split_dir, chunk, [False, True][:len(chunk)]))
    return out


def feature_stubs(spec: anc.AnchorSpec) -> list[torch.Tensor]:
    """Zero feature maps of the resnet50-FPN's sizes over the spec's canvas (the generator reads only shapes)."""
    return [torch.zeros(1, 1, *spec.feature_hw(level)) for level in range(spec.num_levels)]


def two_contents(groups: dict, smallest: bool = False) -> tuple[tuple[int, int], list[tuple]]:
    """A canvas with two samples of different content sizes (so the padding differs within the batch): of the
    canvases with the most samples, or the smallest ones."""
    order = (lambda kv: kv[0][0] * kv[0][1]) if smallest else (lambda kv: -len(kv[1]))
    for canvas, group in sorted(groups.items(), key=order):
        sizes = {}
        for s in group:
            sizes.setdefault(tuple(_record(s).content_size), s)
        if len(sizes) >= 2:
            return canvas, list(sizes.values())[:2]
    raise AssertionError("no canvas holds two content sizes")


def _record(sample: tuple) -> Record:
    return Record.from_json(sample[1]["json"])


@contextlib.contextmanager
def parts(model, **swap):
    """The model with some parts (transform, rpn) swapped for the block, restored after."""
    old = {name: getattr(model, name) for name in swap}
    for name, part in swap.items():
        setattr(model, name, part)
    try:
        yield model
    finally:
        for name, part in old.items():
            setattr(model, name, part)


def stock_transform(min_size: int, max_size: int) -> GeneralizedRCNNTransform:
    """torchvision's own transform. In training its resize draws a size per image (torch_choice) even for one
    min_size, which would shift the samplers' draws: ``_skip_resize``, torchvision's switch for images already at
    their size, skips it (these contents are at their size: the resize is the identity on them anyway)."""
    transform = GeneralizedRCNNTransform(min_size, max_size, MEAN, STD)
    transform._skip_resize = True
    return transform


def losses_of(model, images, targets) -> dict[str, float]:
    """One training forward's losses, the samplers seeded alike for every model compared."""
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        return {k: v.item() for k, v in model(images, targets).items()}


# ------------------------------------------------------------------------------------------- tests


def test_stored_targets_equal_torchvisions_assignment_on_every_canvas(kr400, stock400):
    man = read_manifest(kr400)
    stock = stock400
    stored = StoredTargetsRPN.from_rpn(stock.rpn, man.anchors, keep_ratio=True)
    spec = anc.AnchorSpec.from_dict(man.anchors["spec"])
    n = positives = 0
    canvases = set()
    for images, targets in pairs(kr400):
        image_list, moved = stock.transform(images, targets)
        canvas = tuple(image_list.tensors.shape[-2:])
        assert canvas == targets[0]["canvas"] and image_list.image_sizes == [t["size"] for t in targets]
        anchors = stock.rpn.anchor_generator(image_list, feature_stubs(spec.at(canvas)))
        assert len(anchors[0]) == man.anchor_count(canvas)
        labels, matched = stock.rpn.assign_targets_to_anchors(anchors, moved)
        ours, ours_gt = stored.assign_targets_to_anchors(anchors, moved)
        for t, lab, m, lab2, m2 in zip(targets, labels, matched, ours, ours_gt):
            assert torch.equal(lab, t["anchor_labels"].float()) and torch.equal(lab2, lab), (t["key"], t["flipped"])
            pos = lab == 1
            assert torch.equal(m[pos], t["anchor_matched_gt"][pos]) and torch.equal(m2[pos], m[pos]), t["key"]
            n, positives = n + 1, positives + int(pos.sum())
        canvases.add(canvas)
    assert n == 49 and positives > 500
    assert stored.checked_canvases == canvases and len(canvases) == len(man["canvases"]) > 3


def test_transform_is_stock_batching_of_the_contents(kr400, stock400):
    model = stock400
    assert isinstance(model.transform, KeepRatioTransform)
    canvas, chosen = two_contents(by_canvas(kr400))
    images, targets = make_batch(kr400, chosen, [False, True])
    crops = content_images(images, targets)
    assert [tuple(c.shape[-2:]) for c in crops] == [t["size"] for t in targets]
    ours, _ = model.transform(images, targets)
    stock = GeneralizedRCNNTransform(400, 666, MEAN, STD)  # resizes: the contents are already its size
    ref, _ = stock([c.float() / 255 for c in crops])
    assert tuple(ours.tensors.shape) == (2, 3, *canvas) and ours.image_sizes == ref.image_sizes
    assert torch.equal(ours.tensors, ref.tensors)  # zero pad after the normalisation, as stock
    uncropped = GeneralizedRCNNTransform(400, 666, MEAN, STD)([im.float() / 255 for im in images])[0]
    assert not torch.equal(uncropped.tensors, ref.tensors)  # the padded canvas itself would differ
    # Eval: the content crops without targets give the same batch; a whole canvas is taken whole.
    no_targets, _ = model.transform(crops)
    assert torch.equal(no_targets.tensors, ours.tensors) and no_targets.image_sizes == ours.image_sizes
    assert model.transform(images)[0].image_sizes == [canvas, canvas]
    normalised = [(im.float() / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
                  for im in images]
    torch.testing.assert_close(model.transform(normalised, targets)[0].tensors, ours.tensors, atol=1e-5, rtol=0)
    dets = [{"boxes": torch.ones(1, 4)}]
    assert model.transform.postprocess(dets, [(1, 1)], [(2, 2)]) is dets


def test_a_batch_holds_one_canvas(kr400, stock400):
    model = stock400
    groups = by_canvas(kr400)
    (c1, g1), (c2, g2) = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:2]
    a, ta = make_batch(kr400, g1[:1], [False])
    b, tb = make_batch(kr400, g2[:1], [False])
    big = torch.zeros(2, 3, max(c1[0], c2[0]), max(c1[1], c2[1]), dtype=torch.uint8)
    big[0, :, :c1[0], :c1[1]], big[1, :, :c2[0], :c2[1]] = a[0], b[0]
    with pytest.raises(ValueError, match="a batch holds the samples of one canvas"):
        model.transform(big, ta + tb)
    with pytest.raises(ValueError, match="larger than the shards' largest canvas"):
        model.transform([torch.zeros(3, 704, 64, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="smaller than its target's content size"):
        model.transform([a[0][:, :100, :100]], ta)


def test_anchors_are_checked_per_canvas(kr400):
    man = read_manifest(kr400)
    rpn = fasterrcnn_resnet50_fpn(kr400, weights_backbone=None).rpn
    assert isinstance(rpn, StoredTargetsRPN) and rpn.keep_ratio and not rpn.anchors_checked
    spec = anc.AnchorSpec.from_dict(man.anchors["spec"])
    wide = next(c for c in by_canvas(kr400) if c[1] > c[0] and (c[1], c[0]) in by_canvas(kr400))
    images, targets = make_batch(kr400, by_canvas(kr400)[wide][:1], [False])
    tall = torch.from_numpy(anc.make_anchors(spec.at((wide[1], wide[0]))))
    assert len(tall) == man.anchor_count(wide)  # the transposed canvas: as many anchors, other ones
    with pytest.raises(AnchorMismatchError, match=rf"preset 'torchvision-fpn' at canvas {wide[0]}x{wide[1]}"):
        rpn.assign_targets_to_anchors([tall], targets)
    assert not rpn.anchors_checked
    rpn.assign_targets_to_anchors([torch.from_numpy(generator_anchors(rpn.anchor_generator, spec.at(wide)))], targets)
    assert rpn.checked_canvases == {wide}


def test_losses_identical_to_stock_and_to_torchvisions_own_model(kr400, stock400):
    """Ours with stored targets == ours with torchvision's matching == torchvision's model fed the contents."""
    canvas, chosen = two_contents(by_canvas(kr400))
    images, targets = make_batch(kr400, chosen, [False, True])
    stored = StoredTargetsRPN.from_rpn(stock400.rpn, read_manifest(kr400).anchors, keep_ratio=True)
    crops = [c.float() / 255 for c in content_images(images, targets)]
    plain_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    losses = [losses_of(stock400, images, targets)]
    with parts(stock400, rpn=stored) as model:
        losses.append(losses_of(model, images, targets))
    with parts(stock400, transform=stock_transform(400, 666)) as model:  # torchvision's own model
        losses.append(losses_of(model, crops, plain_targets))
    assert losses[0] == losses[1] == losses[2], losses
    assert stored.checked_canvases == {canvas}


def test_eval_gives_content_pixels(kr400, stock400):
    canvas, chosen = two_contents(by_canvas(kr400))
    images, targets = make_batch(kr400, chosen[:1], [True])
    stock400.eval()
    thresh = stock400.roi_heads.score_thresh
    stock400.roi_heads.score_thresh = 0.0  # untrained: keep every detection
    try:
        with torch.no_grad():
            outputs = stock400(images, targets)
    finally:
        stock400.roi_heads.score_thresh = thresh
    h, w = targets[0]["size"]
    boxes = outputs[0]["boxes"]
    assert len(boxes) > 0 and float(boxes[:, 2].max()) <= w and float(boxes[:, 3].max()) <= h  # content pixels
    assert float(boxes[:, 2].max()) > 0.9 * w  # not rescaled to the canvas or shrunk


def test_losses_identical_at_800_1333(kr800):
    """torchvision's COCO recipe: ours with stored targets == torchvision's own model fed the contents."""
    man = read_manifest(kr800)
    assert man.image_hw == (1344, 1344) and len(man["canvases"]) > 3
    canvas, chosen = two_contents(by_canvas(kr800), smallest=True)  # the least ResNet-50 work
    images, targets = make_batch(kr800, chosen[:1], [True])  # one image: its own padding (two: the 400 test)
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(kr800, weights_backbone=None, use_stored_targets=False)
    stored = StoredTargetsRPN.from_rpn(model.rpn, man.anchors, keep_ratio=True)
    crops = [c.float() / 255 for c in content_images(images, targets)]
    with parts(model, rpn=stored) as ours:
        losses = [losses_of(ours, images, targets)]
    with parts(model, transform=stock_transform(800, 1333)) as plain:
        losses.append(losses_of(plain, crops, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]))
    assert losses[0] == losses[1], losses
    assert stored.checked_canvases == {canvas}


def test_the_loaders_batches_train_the_model_as_torchvision_does(kr400, stock400):
    """End to end: make_loader's keep-ratio batches (uint8 and normalised, mirrored too) into the model; the stored
    targets give the losses of torchvision's own matching, and of torchvision's model fed the contents."""
    from frcnn_shard.loader import make_loader

    stored = StoredTargetsRPN.from_rpn(stock400.rpn, read_manifest(kr400).anchors, keep_ratio=True)
    seen = 0
    for normalize in (False, True):
        loader = make_loader(kr400, 2, shuffle=False, num_workers=0, rpn_batch_size=None, normalize=normalize,
                             hflip=0.5, seed=3)
        model = fasterrcnn_resnet50_fpn(loader, weights_backbone=None)
        assert type(model.transform) is type(stock400.transform)
        for images, targets in loader:
            if len(targets) < 2:
                continue
            assert all(tuple(t["canvas"]) == tuple(images.shape[-2:]) for t in targets)
            crops = [c if normalize else c.float() / 255 for c in content_images(images, targets)]
            plain = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
            losses = [losses_of(stock400, images, targets)]
            with parts(stock400, rpn=stored) as m:
                losses.append(losses_of(m, images, targets))
            if not normalize:  # torchvision's own model normalises the [0, 1] contents itself
                with parts(stock400, transform=stock_transform(400, 666)) as m:
                    losses.append(losses_of(m, crops, plain))
            assert len(set(map(str, losses))) == 1, losses
            seen += 1
            break
    assert seen == 2
