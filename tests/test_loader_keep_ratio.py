"""The loader on keep-ratio shards (issue 23, item 3): batches of one canvas (content top-left, zero padding),
every sample once per epoch, an order from (seed, epoch) alone whatever num_workers is, ranks that partition
the samples, drop_last, exact hflip (content mirrored in place, the stored mirrored targets), len(), resume;
tiny_coco built with keep-ratio at 384/640 (canvases up to 640; 31 of the 49 contents as wide as their canvas,
decoded straight into their batch row, the others copied), in shards of 8 (7 shards)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from conftest import build_shards, require_tiny_coco
from frcnn_shard import anchors as anc
from frcnn_shard import make_loader
from frcnn_shard.format.canvas import canvas_of
from frcnn_shard.format.image import decode_stored_image
from frcnn_shard.format.members import JSON_EXT, TARGETS_EXT, group_by_key
from frcnn_shard.format.record import Record, flip_boxes
from frcnn_shard.format.targets import unpack_targets
from frcnn_shard.loader import LoaderError, LoaderWarning
from frcnn_shard.loader import canvas_stream
from frcnn_shard.storage import read_manifest
from frcnn_shard.storage.tar import tar_members
from frcnn_shard.transform import IMAGENET_MEAN, IMAGENET_STD, TransformConfig

B = 3


@pytest.fixture(scope="module")
def kr(tmp_path_factory):
    tiny = require_tiny_coco()
    return build_shards(tmp_path_factory.mktemp("kr_loader"), f"coco:{tiny}", "train2017", rows_per_shard=8,
                        transform=TransformConfig(resize="keep-ratio", min_size=384, max_size=640)).out_dir


@pytest.fixture(scope="module")
def stored(kr):
    """key -> (record, members) of every stored sample."""
    man = read_manifest(kr)
    out = {}
    for entry in man.shards:
        with open(kr / entry.name, "rb") as f:
            for raw in group_by_key(tar_members(f)):
                out[raw.key] = (Record.from_json(raw.members[JSON_EXT]), raw.members)
    return out


def loader_of(kr, **kw):
    for k, v in (("batch_size", B), ("num_workers", 0), ("shuffle_buffer", 8), ("normalize", False)):
        kw.setdefault(k, v)
    return make_loader(kr, **kw)


def fingerprint(batch) -> tuple:
    """What must repeat exactly: canvas, keys in order, flips, the sampled anchors of each image."""
    images, targets = batch
    return (tuple(images.shape[-2:]),) + tuple(
        (t["key"], t["flipped"], tuple(np.flatnonzero(t["anchor_labels"].numpy() == 1)),
         tuple(np.flatnonzero(t["anchor_labels"].numpy() == 0))) for t in targets)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k, *_ in b[1:]]


def test_a_batch_is_one_canvas_content_top_left_and_zero_padding(kr, stored):
    man = read_manifest(kr)
    loader = loader_of(kr)
    canvases = Counter()
    for images, targets in loader:
        hc, wc = images.shape[-2:]
        assert images.dtype.is_floating_point is False and images.shape[:2] == (len(targets), 3)
        for img, t in zip(images, targets):
            record, members = stored[t["key"]]
            h, w = t["size"]
            assert t["canvas"] == (hc, wc) == canvas_of((h, w)) == tuple(record.size)
            assert (h, w) == tuple(record.content_size) and (h, w) != (hc, wc) or (h, w) == (hc, wc)
            content = decode_stored_image(members["jpg"], "jpg", (h, w))
            assert np.array_equal(img.permute(1, 2, 0)[:h, :w].numpy(), content), t["key"]
            assert not img[:, h:].any() and not img[:, :, w:].any(), t["key"]
            a = loader.anchors_for((hc, wc))
            assert len(t["anchor_labels"]) == len(t["anchor_matched_gt"]) == len(a) == man.anchor_count((hc, wc))
            assert (t["anchor_labels"] != -1).sum() <= 256 and (t["anchor_labels"] != -1).sum() > 0
        canvases[(int(hc), int(wc))] += len(targets)
    assert {f"{h}x{w}": n for (h, w), n in canvases.items()} == man["canvases"] and len(canvases) > 3


def test_a_content_as_wide_as_its_canvas_is_decoded_straight_into_its_row(kr, monkeypatch):
    calls = []
    real = canvas_stream.decode_sample

    def spy(url, raw, ds, how, epoch, out=None):
        got = real(url, raw, ds, how, epoch, out)
        calls.append((ds.image_hw[1] % 32 == 0, out is not None and np.shares_memory(out, got.image)))
        return got

    monkeypatch.setattr(canvas_stream, "decode_sample", spy)
    for hflip in (0.0, 1.0):
        list(loader_of(kr, hflip=hflip))
    assert calls.count((True, True)) == 2 * 31 and calls.count((False, False)) == 2 * 18


def test_the_grouping_rule_is_exact(kr, stored):
    """One stream in manifest order: a batch as soon as a canvas's bucket holds B samples, then at the end the
    partial buckets, the one whose oldest sample waits longest first."""
    man = read_manifest(kr)
    order = []
    for entry in man.shards:
        with open(kr / entry.name, "rb") as f:
            order += [raw.key for raw in group_by_key(tar_members(f))]
    waiting: dict[tuple, list[str]] = {}  # canvas -> keys; a dict keeps the order its buckets were opened in
    expected = []
    for key in order:
        canvas = tuple(stored[key][0].size)
        waiting.setdefault(canvas, []).append(key)
        if len(waiting[canvas]) == B:
            expected.append(waiting.pop(canvas))
    expected += list(waiting.values())
    got = [[t["key"] for t in targets] for _, targets in loader_of(kr, streams=1, shuffle=False)]
    assert got == expected and any(len(b) < B for b in got[:-1])


def test_normalised_batches_pad_with_zeros_after_normalising(kr, stored):
    mean, std = np.array(IMAGENET_MEAN).reshape(3, 1, 1), np.array(IMAGENET_STD).reshape(3, 1, 1)
    for images, targets in loader_of(kr, normalize=True, decode_threads=2):
        assert images.dtype == np.float32 or str(images.dtype) == "torch.float32"
        for img, t in zip(images.numpy(), targets):
            h, w = t["size"]
            content = decode_stored_image(stored[t["key"]][1]["jpg"], "jpg", (h, w)).transpose(2, 0, 1)
            assert np.allclose(img[:, :h, :w], (content / 255.0 - mean) / std, atol=1e-5)
            assert not img[:, h:].any() and not img[:, :, w:].any()


def test_every_sample_once_per_epoch_and_len_is_exact(kr, stored):
    loader = loader_of(kr, num_workers=2)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = [fingerprint(b) for b in loader]
        assert sorted(keys_of(batches)) == sorted(stored)
        assert len(batches) == len(loader) and loader.num_samples == len(stored) == 49
    assert len(loader) > 49 / B  # one partial batch per stream and canvas at most, so more than 49 / 3


@pytest.mark.parametrize("kw", [{"hflip": 0.5}, {"hflip": 0.5, "shuffle": False}, {"shuffle_buffer": 0},
                                {"streams": 3, "rpn_batch_size": 64}])
def test_the_sequence_is_the_same_for_any_worker_count(kr, kw):
    runs = {}
    for workers in (0, 1, 2, 3):
        loader = loader_of(kr, num_workers=workers, seed=5, **kw)
        loader.set_epoch(2)
        runs[workers] = [fingerprint(b) for b in loader]
        assert loader.streams == kw.get("streams", 7)  # min(8, 7 shards), whatever the workers
    assert runs[0] == runs[1] == runs[2] == runs[3]
    assert any(f for b in runs[0] for _, f, *_ in b[1:]) or "hflip" not in kw


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_partition_the_samples(kr, stored, world_size):
    seen = []
    for rank in range(world_size):
        loader = loader_of(kr, rank=rank, world_size=world_size, num_workers=rank % 2)
        loader.set_epoch(1)
        batches = [fingerprint(b) for b in loader]
        assert len(batches) == len(loader)
        seen += keys_of(batches)
    assert sorted(seen) == sorted(stored)


def test_resampled_ranks_yield_the_same_number_of_full_batches(kr):
    lengths = []
    for rank in range(3):
        loader = loader_of(kr, rank=rank, world_size=3, resampled=True, num_workers=rank % 2)
        batches = [fingerprint(b) for b in loader]
        assert all(len(b) - 1 == B for b in batches)  # every batch full
        assert len(batches) == len(loader) == -(-49 // (3 * B))
        lengths.append(len(batches))
    assert len(set(lengths)) == 1


def test_drop_last_drops_each_streams_partial_batch_of_each_canvas(kr):
    full = [fingerprint(b) for b in loader_of(kr)]
    dropped_loader = loader_of(kr, drop_last=True, num_workers=2)
    dropped = [fingerprint(b) for b in dropped_loader]
    assert all(len(b) - 1 == B for b in dropped) and len(dropped) == len(dropped_loader) > 0
    assert dropped == [b for b in full if len(b) - 1 == B]  # the full batches, in the same order


def test_hflip_is_exact(kr, stored):
    man = read_manifest(kr)
    wider = 0
    for images, targets in loader_of(kr, hflip=1.0, rpn_batch_size=None):
        for img, t in zip(images, targets):
            record, members = stored[t["key"]]
            h, w = t["size"]
            assert t["flipped"]
            content = decode_stored_image(members["jpg"], "jpg", (h, w))
            assert np.array_equal(img.permute(1, 2, 0)[:h, :w].numpy(), content[:, ::-1])  # mirrored in place
            assert not img[:, h:].any() and not img[:, :, w:].any()
            assert np.array_equal(t["boxes"].numpy(), record.hflip(content=True).boxes)
            assert np.array_equal(t["boxes"].numpy(), flip_boxes(record.boxes, w))  # about the content's width
            flipped = unpack_targets(members[TARGETS_EXT], man.anchor_count(t["canvas"]), flipped=True)
            labels, matched = flipped.dense(len(t["anchor_labels"]))
            assert np.array_equal(t["anchor_labels"].numpy(), labels)
            pos = labels == 1
            assert np.array_equal(t["anchor_matched_gt"].numpy()[pos], t["boxes"].numpy()[matched[pos]])
            wider += t["canvas"][1] != w
    assert wider > 10  # most contents are narrower than their canvas: the two flips differ there


def interrupted(kr, stop_after: int, before: int, after: int, **kw) -> list:
    """Epoch 1 cut after ``stop_after`` batches, saved through JSON, resumed by a new loader, then epoch 2."""
    first = loader_of(kr, num_workers=before, hflip=0.5, **kw)
    first.set_epoch(1)
    it = iter(first)
    head = [fingerprint(next(it)) for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))
    again = loader_of(kr, num_workers=after, hflip=0.5, **kw)
    again.load_state_dict(state)
    rest = [fingerprint(b) for b in again]
    again.set_epoch(2)
    return [head + rest, [fingerprint(b) for b in again]]


@pytest.mark.parametrize("stop,before,after,kw", [
    (4, 0, 0, {}), (9, 2, 0, {}), (13, 0, 3, {}), (20, 1, 2, {}), (6, 2, 1, {"shuffle_buffer": 0}),
    (3, 0, 2, {"drop_last": True, "streams": 2}), (5, 0, 1, {"resampled": True, "world_size": 2, "rank": 1}),
    (24, 0, 0, {}),  # in the last batches: the partial buckets being flushed
])
def test_resume_mid_epoch_is_exact(kr, stop, before, after, kw):
    whole = loader_of(kr, hflip=0.5, **kw)
    expected = []
    for e in (1, 2):
        whole.set_epoch(e)
        expected.append([fingerprint(b) for b in whole])
    assert stop < len(expected[0])
    got = interrupted(kr, stop, before, after, **kw)
    assert got == expected


def test_a_state_names_the_samples_waiting_in_the_buckets(kr):
    loader = loader_of(kr)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    waiting = [p[3] for p in state["positions"] if len(p) == 4]
    assert waiting and all(isinstance(n, int) for w in waiting for n in w)
    assert len(json.dumps(state)) < 4000
    bad = json.loads(json.dumps(state))
    v = next(i for i, p in enumerate(bad["positions"]) if len(p) == 4)
    bad["positions"][v][3] = [10 ** 6]  # a sample the stream had not delivered
    again = loader_of(kr)
    again.load_state_dict(bad)
    with pytest.raises(LoaderError, match="waiting in a bucket"):
        list(again)


def test_anchors_point_to_anchors_for_which_caches_per_canvas(kr):
    man = read_manifest(kr)
    loader = loader_of(kr)
    with pytest.raises(LoaderError, match="anchors_for"):
        loader.anchors
    canvas = (384, 576)
    a = loader.anchors_for(canvas)
    spec = anc.AnchorSpec.from_dict(man.anchors["spec"]).at(canvas)
    assert a.dtype.is_floating_point and np.array_equal(a.numpy(), anc.make_anchors(spec))
    assert loader.anchors_for([384, 576]) is a
    loader.check_anchors(anc.make_anchors(spec), canvas_hw=canvas)
    with pytest.raises(LoaderError, match="not one of the manifest's canvases"):
        loader.anchors_for((640, 640))
    with pytest.raises(LoaderError, match="canvas_hw"):
        loader.check_anchors(anc.make_anchors(spec))


def test_repeat_factors_count_their_copies_per_canvas(kr, stored):
    loader = loader_of(kr, repeat_factor_threshold=0.3, num_workers=2)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = [fingerprint(b) for b in loader]
        keys = keys_of(batches)
        assert set(keys) == set(stored) and len(keys) > 49
        assert len(batches) == len(loader) and len(keys) == loader.num_samples


def test_fixed_canvas_shards_take_a_stream_count_for_a_worker_independent_order(tiny_shards):
    def run(**kw):
        loader = make_loader(tiny_shards, 4, shuffle_buffer=8, hflip=0.0, **kw)
        return loader, [fingerprint(b) for b in loader]

    runs = [run(num_workers=w, streams=3) for w in (0, 2, 3)]
    assert all(r[0].streams == 3 for r in runs) and runs[0][1] == runs[1][1] == runs[2][1]
    assert len(runs[0][1]) == len(runs[0][0])
    default = run(num_workers=2)[0]
    assert default.streams == 2 and default.options.streams is None  # the default is unchanged: one per worker
    with pytest.warns(LoaderWarning, match="stream"):
        assert run(num_workers=4, streams=2)[0].num_workers == 2


def damaged_copy(kr, tmp_path, edit) -> tuple:
    """The split copied with one sample of its first shard changed by ``edit(members)``; (folder, its key)."""
    import shutil
    import tarfile

    out = tmp_path / "train2017"
    shutil.copytree(kr, out)
    name = read_manifest(kr).shards[0].name
    with tarfile.open(kr / name) as src, tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as dst:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
        key = members[0][0].name.split(".")[0]
        for m, data in members:
            if m.name.startswith(key + "."):
                data = edit(m.name.split(".", 1)[1], data)
            m.size = len(data)
            dst.addfile(m, __import__("io").BytesIO(data))
    return out, key


def _foreign_canvas(ext: str, data: bytes) -> bytes:
    if ext != "json":
        return data
    meta = json.loads(data)
    meta["content_size"], meta["size"], meta["boxes"], meta["labels"] = [20, 20], [32, 32], [], []
    return json.dumps(meta).encode()


def _corrupt_image(ext: str, data: bytes) -> bytes:
    return data[:200] if ext == "jpg" else data


@pytest.mark.parametrize("edit,message", [(_foreign_canvas, "not one of the manifest's canvases"),
                                          (_corrupt_image, "corrupt image")])
def test_a_bad_sample_is_refused_or_skipped_and_counted(kr, tmp_path, edit, message):
    from frcnn_shard.format.members import ShardFormatError

    folder, key = damaged_copy(kr, tmp_path, edit)
    with pytest.raises(ShardFormatError, match=message):
        list(loader_of(folder))
    loader = loader_of(folder, on_error="skip", num_workers=2)
    keys = [t["key"] for _, targets in loader for t in targets]
    assert key not in keys and len(keys) == 48 and loader.skipped == 1 and message in loader.skip_log[0]
