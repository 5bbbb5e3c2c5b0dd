"""Resuming mid-epoch (issue 24): ``state_dict`` after any batch, ``load_state_dict`` on a loader made the same
way, with the same or another ``num_workers``: the rest of that epoch exactly (keys, order, flips, anchor
samples), then the next epochs as if never interrupted; malformed or foreign states refused."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import build_shards, require_tiny_coco
from frcnn_shard import make_loader
from frcnn_shard.loader import LoaderError
from frcnn_shard.loader import decode as decode_mod
from frcnn_shard.loader import stream as stream_mod


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """tiny_coco (49 samples) in shards of 5: 10 shards, enough for several streams."""
    tiny = require_tiny_coco()
    return build_shards(tmp_path_factory.mktemp("resume"), f"coco:{tiny}", "train2017", rows_per_shard=5).out_dir


def fingerprint(batch) -> tuple:
    """What must repeat exactly: the keys in order, the flips, and the sampled anchors of each image."""
    _, targets = batch
    return tuple((t["key"], t["flipped"], int(np.flatnonzero(t["anchor_labels"].numpy() == 1).sum()),
                  int(np.flatnonzero(t["anchor_labels"].numpy() == 0).sum())) for t in targets)


def loader_of(shards, **kw):
    kw.setdefault("batch_size", 3)
    kw.setdefault("hflip", 0.5)
    kw.setdefault("shuffle_buffer", 8)
    kw.setdefault("num_workers", 0)
    return make_loader(shards, **kw)


def epochs(loader, first: int, n: int) -> list[list[tuple]]:
    out = []
    for e in range(first, first + n):
        loader.set_epoch(e)
        out.append([fingerprint(b) for b in loader])
    return out


def interrupted(shards, stop_after: int, workers_before: int, workers_after: int, **kw) -> list[list[tuple]]:
    """Epoch 1 cut after ``stop_after`` batches, saved through JSON, resumed by a new loader, then epoch 2."""
    first = loader_of(shards, num_workers=workers_before, **kw)
    first.set_epoch(1)
    it = iter(first)
    head = [fingerprint(next(it)) for _ in range(stop_after)]  # the state is taken after exactly these
    state = json.loads(json.dumps(first.state_dict()))
    again = loader_of(shards, num_workers=workers_after, **kw)
    again.load_state_dict(state)
    assert again.epoch == 1
    rest = [fingerprint(b) for b in again]
    return [head + rest] + epochs(again, 2, 1)


@pytest.mark.parametrize("before,after", [(0, 0), (2, 0), (0, 2), (2, 1), (1, 3)])
def test_resume_continues_the_epoch_exactly_with_any_worker_count(shards, before, after):
    want = epochs(loader_of(shards, num_workers=before), 1, 2)
    n = len(want[0])
    for stop in (1, n // 2, n - 1):
        assert interrupted(shards, stop, before, after) == want, (stop, before, after)


def test_resume_at_the_epochs_start_and_end(shards):
    want = epochs(loader_of(shards), 1, 2)
    assert interrupted(shards, 0, 0, 0) == want
    done = loader_of(shards)
    done.set_epoch(1)
    assert [fingerprint(b) for b in done] == want[0]
    again = loader_of(shards)
    again.load_state_dict(done.state_dict())
    assert list(again) == []  # the epoch was finished: nothing of it is left
    assert epochs(again, 2, 1) == want[1:]


@pytest.mark.parametrize("kw", [{"resampled": True, "world_size": 3, "rank": 1}, {"shuffle": False},
                                {"shuffle_buffer": 0}, {"drop_last": True, "batch_size": 4}])
def test_resume_is_exact_in_every_mode(shards, kw):
    want = epochs(loader_of(shards, num_workers=2, **kw), 1, 2)
    for stop in (1, len(want[0]) // 2):
        assert interrupted(shards, stop, 2, 0, **kw) == want, (kw, stop)


def test_resume_without_the_counts_replays_raw_and_is_exact(shards):
    """A state whose streams saw a shard off its count takes the raw replay: the same batches."""
    want = epochs(loader_of(shards, num_workers=2), 1, 1)[0]
    first = loader_of(shards, num_workers=2)
    first.set_epoch(1)
    it = iter(first)
    head = [fingerprint(next(it)) for _ in range(5)]
    state = first.state_dict()
    state["positions"] = [[raw, ended, False] for raw, ended, _ in state["positions"]]
    again = loader_of(shards, num_workers=0)
    again.load_state_dict(state)
    assert head + [fingerprint(b) for b in again] == want


def test_resume_decodes_only_what_is_left_and_skips_delivered_shards(shards, monkeypatch):
    full = loader_of(shards, shuffle_buffer=4)
    full.set_epoch(1)
    n = full.num_samples
    first = loader_of(shards, shuffle_buffer=4)
    first.set_epoch(1)
    it = iter(first)
    delivered = sum(len(next(it)[1]) for _ in range(10))
    state = first.state_dict()
    decoded, opened = [], []
    real_decode, real_open = decode_mod.decode_sample, stream_mod.iter_raw_samples
    monkeypatch.setattr(stream_mod, "decode_sample", lambda *a, **k: decoded.append(a[1].key) or real_decode(*a, **k))
    monkeypatch.setattr(stream_mod, "iter_raw_samples", lambda url, *a, **k: opened.append(url) or real_open(url, *a, **k))
    again = loader_of(shards, shuffle_buffer=4)
    again.load_state_dict(state)
    rest = sum(len(t) for _, t in again)
    assert delivered + rest == n
    assert len(decoded) == rest  # none of the delivered samples was decoded again
    assert len(opened) < len(first.urls)  # shards wholly delivered (and out of the buffer) were not opened


def test_the_state_is_small_and_json(shards):
    loader = loader_of(shards, num_workers=2)
    loader.set_epoch(3)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    text = json.dumps(state)
    assert len(text) < 1000 and json.loads(text) == state and state["epoch"] == 3 and state["streams"] == 2


def test_a_state_of_another_world_size_dataset_or_option_is_refused(shards, tiny_shards):
    state = loader_of(shards, world_size=2, rank=0).state_dict()
    with pytest.raises(LoaderError, match="world_size: saved 2, now 1"):
        loader_of(shards).load_state_dict(state)
    with pytest.raises(LoaderError, match="another dataset"):
        loader_of(tiny_shards, world_size=2, rank=0).load_state_dict(state)
    with pytest.raises(LoaderError, match="seed: saved 0, now 5"):
        loader_of(shards, world_size=2, rank=0, seed=5).load_state_dict(state)
    loader_of(shards, world_size=2, rank=0, num_workers=2).load_state_dict(state)  # workers may differ


@pytest.mark.parametrize("edit,message", [
    (lambda s: "not a dict", "is a dict"),
    (lambda s: {**s, "format": "x"}, "not a loader state"),
    (lambda s: {**s, "version": 99}, "version 99"),
    (lambda s: {**s, "epoch": -1}, "epoch must be"),
    (lambda s: {**s, "epoch": True}, "epoch must be"),
    (lambda s: {**s, "streams": 0}, "streams must be"),
    (lambda s: {**s, "positions": s["positions"][:1]}, "positions must be a list of 2"),
    (lambda s: {**s, "positions": [[1, "no", True], [0, False, True]]}, r"positions\[0\]"),
    (lambda s: {**s, "positions": [[-1, False, True], [0, False, True]]}, r"positions\[0\]"),
    (lambda s: {**s, "last": 2}, "last must be"),
    (lambda s: {**s, "positions": [[10 ** 6, False, True], [0, False, True]]}, "holds"),
])
def test_a_malformed_state_is_refused_with_a_clear_error(shards, edit, message):
    state = loader_of(shards, num_workers=2).state_dict()
    loader = loader_of(shards, num_workers=2)
    with pytest.raises(LoaderError, match=message):
        loader.load_state_dict(edit(state))
        list(loader)  # a count beyond the stream's is found when the stream starts


def test_classes_come_from_the_manifest(shards):
    loader = loader_of(shards)
    assert loader.classes == tuple(loader.manifest["classes"]) and len(loader.classes) == loader.dataset.num_classes
    bare = make_loader([f"pipe:cat {u}" for u in loader.urls], 2, num_anchors=loader.dataset.num_anchors)
    assert bare.manifest is None
    with pytest.raises(LoaderError, match="no manifest"):
        _ = bare.classes
