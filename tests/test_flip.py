"""Horizontal flip with precomputed targets, and image-only transforms (issue 13).

The flipped targets a loader delivers must be exactly what the matching rule gives for the mirrored
boxes on the same anchors: compared here with anchors.match_reference, for every preset, both resize
modes and sizes whose coarse anchor grids are not mirror-symmetric.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import build_shards
from frcnn_shard import anchors as anc
from frcnn_shard.cli import main
from frcnn_shard.format.members import TARGETS_EXT
from frcnn_shard.format.targets import pack_targets, unpack_all_targets, unpack_targets
from frcnn_shard.inspect.check import check_shards
from frcnn_shard.inspect.info import info_rows
from frcnn_shard.loader import ImageTransformError, LoaderError, hflip_decision, make_loader
from frcnn_shard.shards import ShardWriter, file_sha256, iter_shard, read_manifest
from frcnn_shard.transform import TransformConfig

SIZES = {"400": (400, 400), "320x480": (320, 480)}


def stored_samples(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    """Every sample's members, straight from the tars."""
    return {k: m for s in read_manifest(shard_dir)["shards"] for k, m in iter_shard(shard_dir / s["name"])}


def mirrored(boxes, width: int) -> np.ndarray:
    """The test's own mirror of float32 xyxy boxes about the canvas width."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    w = np.float32(width)
    return np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1).astype(np.float32)


def delivered(loader) -> list[tuple[torch.Tensor, dict]]:
    return [(img, t) for images, targets in loader for img, t in zip(images, targets)]


def level_is_mirror_symmetric(spec: anc.AnchorSpec, anchors: np.ndarray, level: int) -> bool:
    """Whether the anchors of one level, mirrored about the canvas width, are the same set of boxes."""
    counts = [spec.feature_hw(i)[0] * spec.feature_hw(i)[1] * spec.cells_per_location(i) for i in range(spec.num_levels)]
    lv = anchors[sum(counts[:level]):sum(counts[:level + 1])].astype(np.float64)
    w = spec.image_hw[1]
    flipped = np.stack([w - lv[:, 2], lv[:, 1], w - lv[:, 0], lv[:, 3]], axis=1)
    key = lambda a: {tuple(np.round(r, 3)) for r in a}
    return key(flipped) == key(lv)


def assert_flipped_targets_are_the_rule(shard_dir: Path, num_workers: int = 0) -> int:
    """Read every sample flipped and compare it with the reference matcher on the mirrored boxes; returns samples."""
    man = read_manifest(shard_dir)
    h, w = man["image"]["size"]
    cfg = anc.MatchConfig.from_dict(man["anchors"]["matching"])
    stored = stored_samples(shard_dir)
    loader = make_loader(shard_dir, 4, hflip=1.0, rpn_batch_size=None, shuffle=False, normalize=False,
                         num_workers=num_workers)
    anchors = loader.anchors.numpy()
    seen = 0
    for img, t in delivered(loader):
        members = stored[t["key"]]
        meta = json.loads(members["json"])
        assert t["flipped"] is True
        boxes = t["boxes"].numpy()
        np.testing.assert_array_equal(boxes, mirrored(meta["boxes"], w))  # x1' = W - x2, x2' = W - x1, float32
        labels, matched = anc.match_reference(anchors, boxes, mirrored(meta["crowd_boxes"], w), cfg, (h, w))
        np.testing.assert_array_equal(t["anchor_labels"].numpy(), labels)  # bit-identical
        pos = np.flatnonzero(labels == 1)
        want_gt = np.zeros((len(anchors), 4), np.float32)
        want_gt[pos] = boxes[matched[pos]]
        np.testing.assert_array_equal(t["anchor_matched_gt"].numpy(), want_gt)
        # The image is the mirrored decode of the stored one (letterbox: the padding moves to the left).
        decoded = np.asarray(Image.open(io.BytesIO(members["jpg"])).convert("RGB"))
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), decoded[:, ::-1])
        seen += 1
    assert seen == man["totals"]["samples"] > 0
    return seen


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
@pytest.mark.parametrize("preset", anc.PRESETS)
def test_flipped_targets_equal_the_reference_on_the_mirrored_boxes(preset, resize, size, sample_hub, tmp_path):
    hw = SIZES[size]
    res = build_shards(tmp_path, str(sample_hub), "train", anchor_preset=preset, rows_per_shard=24,
                       transform=TransformConfig(image_size=hw, resize=resize))
    spec = anc.preset_spec(preset, hw)
    anchors = anc.make_anchors(spec)
    symmetric = [level_is_mirror_symmetric(spec, anchors, i) for i in range(spec.num_levels)]
    if size == "400" and preset in ("frcnn-fpn", "detectron2-fpn", "torchvision-fpn"):
        # Strides 32 and 64 at 400 px: the cell centres do not mirror onto cell centres.
        assert not symmetric[3] and not symmetric[4], symmetric
    assert_flipped_targets_are_the_rule(res.out_dir)


@pytest.mark.parametrize("preset,resize,size,matching", [
    ("frcnn-fpn", "letterbox", "400", {"crowd_ignore": True}),
    ("torchvision-fpn", "stretch", "320x480", {"crowd_ignore": True, "ignore_cross_boundary": True,
                                               "low_quality": "argmax"}),
])
def test_flipped_targets_on_real_coco_with_crowd_boxes(preset, resize, size, matching, tiny_coco, tmp_path):
    res = build_shards(tmp_path, f"coco:{tiny_coco}", "train2017", anchor_preset=preset,
                       transform=TransformConfig(image_size=SIZES[size], resize=resize),
                       matching=anc.MatchConfig(**matching))
    crowd = sum(len(json.loads(m["json"])["crowd_boxes"]) for m in stored_samples(res.out_dir).values())
    assert crowd > 0  # the mirrored crowd boxes take part in the rule
    assert assert_flipped_targets_are_the_rule(res.out_dir, num_workers=2) == 49
    report = check_shards(res.out_dir, deep=True)
    assert report.ok, [str(p) for p in report.problems]


def test_default_build_stores_both_orientations(tiny_shards):
    man = read_manifest(tiny_shards)
    n = man["anchors"]["count"]
    assert man["anchors"]["flip_targets"] is True and man["options"]["anchors"]["flip_targets"] is True
    for key, members in stored_samples(tiny_shards).items():
        stored, flipped = unpack_all_targets(members[TARGETS_EXT], n)
        assert json.loads(members["json"])["rpn"] == stored.counts(n)  # the record counts the stored orientation
    assert dict(info_rows(man))["flip targets"].startswith("stored")


# ----------------------------------------------------------------------------- decisions


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, sample_hub) -> Path:
    """The sample in 6 shards of 4, so that 2 ranks x 2 workers have shards to read."""
    return build_shards(tmp_path_factory.mktemp("flip_small"), str(sample_hub), "train", rows_per_shard=4).out_dir


def decisions(shard_dir, epoch=0, **kw) -> dict[str, bool]:
    loader = make_loader(shard_dir, 3, hflip=0.5, seed=7, **kw)
    loader.set_epoch(epoch)
    return {t["key"]: t["flipped"] for _, t in delivered(loader)}


def test_flip_decisions_do_not_depend_on_workers_or_ranks(small_shards):
    ref = decisions(small_shards, num_workers=0)
    assert len(ref) == 24 and 0 < sum(ref.values()) < 24
    assert decisions(small_shards, num_workers=2) == ref
    split = {}
    for rank in (0, 1):
        part = decisions(small_shards, num_workers=2, rank=rank, world_size=2)
        assert not set(part) & set(split)
        split.update(part)
    assert split == ref
    assert decisions(small_shards, num_workers=0, shuffle=False) == ref  # nor on the order
    assert ref == {k: hflip_decision(7, 0, k, 0.5) for k in ref}


def test_flip_decisions_differ_across_epochs_and_flip_about_half(tiny_shards):
    per_epoch = [decisions(tiny_shards, epoch=e, num_workers=0) for e in range(4)]
    assert all(len(d) == 49 for d in per_epoch)
    assert len({tuple(sorted(d.items())) for d in per_epoch}) == 4  # every epoch its own draw
    flipped = [sum(d.values()) for d in per_epoch]
    # Binomial(49, 0.5): sd 3.5; each epoch within 4 sd, the 196 draws together within 4 sd (7).
    assert all(11 <= f <= 38 for f in flipped), flipped
    assert 70 <= sum(flipped) <= 126, flipped
    assert decisions(tiny_shards, epoch=2, num_workers=0) == per_epoch[2]  # reproducible


def test_hflip_never_changes_the_anchor_sample_of_an_unflipped_sample(tiny_shards):
    plain = {t["key"]: t for _, t in delivered(make_loader(tiny_shards, 4, num_workers=0, seed=3, shuffle=False))}
    flips = {t["key"]: t for _, t in delivered(make_loader(tiny_shards, 4, num_workers=0, seed=3, shuffle=False,
                                                           hflip=0.5))}
    unflipped = [k for k, t in flips.items() if not t["flipped"]]
    assert 0 < len(unflipped) < 49
    for k in unflipped:
        assert torch.equal(plain[k]["anchor_labels"], flips[k]["anchor_labels"])
        assert torch.equal(plain[k]["anchor_matched_gt"], flips[k]["anchor_matched_gt"])
    for k, t in flips.items():  # a flipped sample's sample is drawn from its flipped targets
        if t["flipped"]:
            labels = t["anchor_labels"].numpy()
            stored = unpack_targets(stored_samples(tiny_shards)[k][TARGETS_EXT], len(labels), flipped=True)
            assert set(np.flatnonzero(labels == 1)) <= set(stored.positive)
            assert not set(np.flatnonzero(labels == 0)) & (set(stored.positive) | set(stored.ignore))


# ----------------------------------------------------------------------------- build options


def test_no_flip_targets_stores_one_orientation_on_both_build_paths(sample_hub, tmp_path):
    from frcnn_shard.build import BuildOptions, anchor_spec, batch_matcher

    src = str(sample_hub)
    with_flip = build_shards(tmp_path / "flip", src, "train")
    cpu = build_shards(tmp_path / "cpu", src, "train", flip_targets=False)
    man = read_manifest(cpu.out_dir)
    assert man["anchors"]["flip_targets"] is False
    assert dict(info_rows(man))["flip targets"].startswith("not stored")
    n = man["anchors"]["count"]
    a, b = stored_samples(with_flip.out_dir), stored_samples(cpu.out_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["json"] == b[key]["json"] and a[key]["jpg"] == b[key]["jpg"]
        (only,) = unpack_all_targets(b[key][TARGETS_EXT], n)
        stored = unpack_all_targets(a[key][TARGETS_EXT], n)[0]  # flipping adds, never changes the stored targets
        assert all(np.array_equal(x, y) for x, y in zip(only, stored))
    assert check_shards(cpu.out_dir, deep=True).ok
    with pytest.raises(LoaderError, match="hflip=0.5.*--no-flip-targets"):
        make_loader(cpu.out_dir, 4, hflip=0.5)
    assert len(delivered(make_loader(cpu.out_dir, 4, num_workers=0))) == 24  # hflip=0 reads it fine
    # The batched (--device cuda) path run on the CPU writes the same bytes with and without flip targets.
    on_cpu = batch_matcher(anchor_spec(BuildOptions()), BuildOptions().matching, "cpu")
    for flip, ref in ((True, with_flip), (False, cpu)):
        dev = build_shards(tmp_path / f"dev{flip}", src, "train", flip_targets=flip, gpu_batch=5, match_batch=on_cpu)
        assert dev.device == "cuda"
        assert [file_sha256(dev.out_dir / s["name"]) for s in read_manifest(dev.out_dir)["shards"]] == \
            [s["sha256"] for s in read_manifest(ref.out_dir)["shards"]]


def test_cli_flip_targets_switch(sample_hub, tmp_path):
    args = ["build", "--source", str(sample_hub), "--split", "train", "--workers", "0", "--device", "cpu",
            "--max-rows", "4"]
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "a"), "--no-flip-targets"])
    assert r.exit_code == 0, r.output
    assert read_manifest(tmp_path / "a" / "train")["anchors"]["flip_targets"] is False
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert read_manifest(tmp_path / "b" / "train")["anchors"]["flip_targets"] is True
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "b"), "--no-flip-targets"])
    assert r.exit_code != 0 and "different options" in r.output  # a resume must keep the choice
    assert "--flip-targets / --no-flip-targets" in CliRunner().invoke(main, ["build", "--help"]).output


# ----------------------------------------------------------------------------- check, show


def rewrite(shard_dir: Path, key: str, targets: bytes) -> None:
    """Replace one sample's targets member and make the manifest's shard entry agree with the new file."""
    man = read_manifest(shard_dir)
    for entry in man["shards"]:
        samples = list(iter_shard(shard_dir / entry["name"]))
        if key not in dict(samples):
            continue
        w = ShardWriter(shard_dir / entry["name"])
        for k, members in samples:
            members = {**members, TARGETS_EXT: targets} if k == key else members
            w.add(k, [(e, members[e]) for e in ("jpg", "json", TARGETS_EXT)])
        info = w.close()
        entry.update(bytes=info.bytes, sha256=info.sha256)
    man["totals"]["bytes"] = sum(e["bytes"] for e in man["shards"])
    (shard_dir / "manifest.json").write_text(json.dumps(man))


def test_check_verifies_the_flipped_targets(sample_hub, tmp_path):
    shards = build_shards(tmp_path, str(sample_hub), "train", rows_per_shard=8).out_dir
    n = read_manifest(shards)["anchors"]["count"]
    samples = stored_samples(shards)
    k1, k2 = sorted(samples)[:2]
    stored, flipped = (t.dense(n) for t in unpack_all_targets(samples[k1][TARGETS_EXT], n))
    wrong = flipped[0].copy()
    wrong[np.flatnonzero(wrong == 0)[:5]] = -1  # five negatives become ignore: a valid encoding, the wrong targets
    rewrite(shards, k1, pack_targets(*stored, flipped=(wrong, flipped[1])))
    assert check_shards(shards).ok  # the fast check cannot see it
    (p,) = check_shards(shards, deep=True).problems
    assert (p.key, p.rule) == (k1, "targets_deep") and p.detail.startswith(f"hflip: 5 of {n} anchor labels differ")
    # A member without its flipped orientation, in a build that promises one.
    s2 = unpack_all_targets(samples[k2][TARGETS_EXT], n)[0].dense(n)
    rewrite(shards, k2, pack_targets(*s2))
    problems = {p.key: p for p in check_shards(shards).problems}
    assert problems[k2].rule == "targets_invalid" and "1 orientation(s)" in problems[k2].detail
    with pytest.raises(Exception, match="no flipped"):
        delivered(make_loader(shards, 4, hflip=1.0, num_workers=0, shuffle=False))


def test_show_flip(tiny_shards, sample_hub, tmp_path):
    pytest.importorskip("matplotlib")
    from frcnn_shard.inspect.show import render_samples

    plain, flip = tmp_path / "plain.png", tmp_path / "flip.png"
    assert render_samples(tiny_shards, indices=[3], anchors=True, out=plain) == \
        render_samples(tiny_shards, indices=[3], anchors=True, out=flip, flip=True)
    assert plain.read_bytes() != flip.read_bytes()
    r = CliRunner().invoke(main, ["show", str(tiny_shards), "--index", "3", "--anchors", "--flip",
                                  "--out", str(tmp_path / "cli.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cli.png").read_bytes() == flip.read_bytes()
    no_flip = build_shards(tmp_path / "nf", str(sample_hub), "train", max_rows=2, flip_targets=False).out_dir
    r = CliRunner().invoke(main, ["show", str(no_flip), "--index", "0", "--flip", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "--no-flip-targets" in r.output


# ----------------------------------------------------------------------------- image_transform


def invert(image: np.ndarray) -> np.ndarray:
    return 255 - image


def invert_in_place(image: np.ndarray) -> np.ndarray:
    np.subtract(255, image, out=image)
    return image


def crop(image: np.ndarray) -> np.ndarray:
    return image[:-1]


def as_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32)


def broken(image: np.ndarray) -> np.ndarray:
    raise RuntimeError("jitter failed")


@pytest.mark.parametrize("transform", [invert, invert_in_place])
def test_image_transform_runs_after_the_flip_in_the_workers(small_shards, transform):
    stored = stored_samples(small_shards)
    kw = dict(hflip=0.5, seed=1, shuffle=False, normalize=False, rpn_batch_size=None)
    plain = {t["key"]: (img, t) for img, t in delivered(make_loader(small_shards, 4, num_workers=0, **kw))}
    got = delivered(make_loader(small_shards, 4, num_workers=2, image_transform=transform, **kw))
    assert len(got) == 24 and 0 < sum(t["flipped"] for _, t in got) < 24
    for img, t in got:
        decoded = np.asarray(Image.open(io.BytesIO(stored[t["key"]]["jpg"])).convert("RGB"))
        want = decoded[:, ::-1] if t["flipped"] else decoded
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), 255 - want)
        assert torch.equal(t["anchor_labels"], plain[t["key"]][1]["anchor_labels"])  # the geometry is untouched


@pytest.mark.parametrize("transform,message,workers", [
    (crop, r"must return a uint8 array of the input's shape \(400, 400, 3\).*got uint8 \(399, 400, 3\)", 0),
    (crop, r"must return a uint8 array of the input's shape", 2),  # raised in a worker, re-raised here
    (as_float, r"got float32 \(400, 400, 3\)", 0),
    (lambda image: None, "got NoneType", 0),  # forgot to return
    (broken, "image_transform raised RuntimeError: jitter failed", 0),
])
def test_image_transform_that_breaks_the_rule_is_refused(small_shards, transform, message, workers):
    first = read_manifest(small_shards)["shards"][0]["first_key"]
    loader = make_loader(small_shards, 4, num_workers=workers, shuffle=False, image_transform=transform)
    with pytest.raises(ImageTransformError, match=message) as e:
        delivered(loader)
    if not workers:
        assert f"key {first!r}" in str(e.value)
    else:
        assert "key '" in str(e.value)


@pytest.mark.parametrize("opts,message", [
    ({"hflip": 1.5}, "hflip must be a probability within 0..1"),
    ({"hflip": -0.1}, "hflip must be"),
    ({"hflip": "0.5"}, "hflip must be"),
    ({"hflip": True}, "hflip must be"),
    ({"image_transform": 3}, "image_transform must be a callable"),
])
def test_bad_augmentation_options_are_refused(tiny_shards, opts, message):
    with pytest.raises(LoaderError, match=message):
        make_loader(tiny_shards, 4, **opts)
