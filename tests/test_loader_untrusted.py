"""The loader on untrusted shard folders (issue 20): sample counts against the manifest, the record rules
check applies, and a split with no samples at all."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from frcnn_shard.format.members import TARGETS_EXT
from frcnn_shard.format.record import record_problems
from frcnn_shard.inspect.check import check_shards
from frcnn_shard.loader import LoaderError, make_loader
from frcnn_shard.shards import ShardFormatError, ShardWriter, iter_shard, read_manifest

BATCH = 4


def keys_of(loader) -> list[str]:
    return [t["key"] for _, targets in loader for t in targets]


def one_shard_split(src: Path, dst: Path, edit) -> tuple[Path, str, list[str]]:
    """shard 0 of ``src`` rewritten into ``dst`` as edit(samples) gives it, under shard 0's unchanged manifest entry.

    ``samples``: [(key, [(ext, bytes)])]; returns (folder, shard path, the original keys).
    """
    dst.mkdir()
    man = read_manifest(src)
    name = man["shards"][0]["name"]
    samples = [(key, [(e, m[e]) for e in ("jpg", "json", TARGETS_EXT)]) for key, m in iter_shard(src / name)]
    w = ShardWriter(dst / name)
    for key, members in edit(list(samples)):
        w.add(key, members)
    w.close()
    man["shards"] = man["shards"][:1]
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst, str(dst / name), [k for k, _ in samples]


# ------------------------------------------------------------------------------ counts


def test_a_shard_cut_at_a_sample_boundary_is_an_error_or_counted_loss(tiny_shards, tmp_path):
    d, shard, keys = one_shard_split(tiny_shards, tmp_path / "cut", lambda s: s[:-1])
    with pytest.raises(ShardFormatError) as e:
        keys_of(make_loader(d, BATCH, num_workers=0, shuffle=False))
    assert shard in str(e.value) and f"{len(keys) - 1} sample" in str(e.value) and str(len(keys)) in str(e.value)
    loader = make_loader(d, BATCH, num_workers=0, on_error="skip")
    assert sorted(keys_of(loader)) == sorted(keys[:-1])
    assert loader.skipped == 1 and shard in loader.skip_log[0]


def test_more_samples_than_the_manifest_says_is_an_error_or_counted_loss(tiny_shards, tmp_path):
    def edit(samples):
        key, members = samples[0]
        extra = [(f"{int(k) + 900000000000:012d}", m) for k, m in samples[:3]]
        return samples + extra

    d, shard, keys = one_shard_split(tiny_shards, tmp_path / "more", edit)
    with pytest.raises(ShardFormatError) as e:
        keys_of(make_loader(d, BATCH, num_workers=0, shuffle=False))
    assert shard in str(e.value) and "more samples than" in str(e.value) and str(len(keys)) in str(e.value)
    loader = make_loader(d, BATCH, num_workers=0, on_error="skip")
    assert sorted(keys_of(loader)) == sorted(keys)
    assert loader.skipped == 3 and shard in loader.skip_log[0]


# ------------------------------------------------------------------------------ records


def _edit_record(fn):
    """An edit that changes the JSON record of sample 5 (returns the sample's key through the closure)."""
    def edit(samples):
        key, members = samples[5]
        meta = json.loads(members[1][1])
        fn(meta)
        samples[5] = (key, [members[0], ("json", json.dumps(meta).encode()), members[2]])
        return samples
    return edit


def _first_label(value):
    def fn(meta):
        meta["labels"][0] = value
    return fn


def _box_outside(meta):
    meta["boxes"][0][2] = meta["size"][1] + 50.0


def _other_image_id(meta):
    meta["image_id"] += 1


RECORD_HOLES = {
    "label 81": (_first_label(81), "label_invalid"),
    "label 0": (_first_label(0), "label_invalid"),
    "label 1.5": (_first_label(1.5), "label_invalid"),
    "box outside the image": (_box_outside, "box_invalid"),
    "key not the image id": (_other_image_id, "key_mismatch"),
}


@pytest.mark.parametrize("hole", sorted(RECORD_HOLES))
def test_the_loader_refuses_the_records_check_flags(tiny_shards, tmp_path, hole):
    fn, rule = RECORD_HOLES[hole]
    d, shard, keys = one_shard_split(tiny_shards, tmp_path / "rec", _edit_record(fn))
    # check flags it under this rule ...
    assert {(p.key, p.rule) for p in check_shards(d).problems if p.key} == {(keys[5], rule)}
    # ... and the loader refuses it: an error naming shard, key and rule, or one counted skip.
    with pytest.raises(ShardFormatError) as e:
        keys_of(make_loader(d, BATCH, num_workers=0, shuffle=False))
    assert shard in str(e.value) and keys[5] in str(e.value) and rule in str(e.value)
    loader = make_loader(d, BATCH, num_workers=0, on_error="skip")
    assert sorted(keys_of(loader)) == sorted(keys[:5] + keys[6:])
    assert loader.skipped == 1 and keys[5] in loader.skip_log[0] and rule in loader.skip_log[0]


def test_record_problems_bounds_labels_by_the_class_count_given():
    meta = {"image_id": 1, "key": "000000000001", "size": [10, 10], "boxes": [[0, 0, 5, 5]], "labels": [3],
            "rpn": {}}
    assert record_problems(meta, (10, 10), 81, "000000000001") == ([], 1)
    assert [r for r, _ in record_problems(meta, (10, 10), 3, "000000000001")[0]] == ["label_invalid"]
    assert record_problems(meta, None, 81, "000000000001") == ([], 1)  # no manifest: the record's own size


# ------------------------------------------------------------------------------ empty split


def test_a_split_with_no_samples_is_refused_with_what_to_look_at(tiny_shards, tmp_path):
    d = tmp_path / "empty"
    shutil.copytree(tiny_shards, d)
    man = read_manifest(d)
    for s in man["shards"]:
        (d / s["name"]).unlink()
    man["shards"], man["totals"]["samples"], man["totals"]["shards"] = [], 0, 0
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(LoaderError) as e:
        make_loader(d, BATCH, num_workers=0)
    assert "0 samples" in str(e.value) and "drops.jsonl" in str(e.value) and "frcnn-shard info" in str(e.value)
    with pytest.raises(LoaderError, match="0 samples"):
        make_loader([str(tiny_shards / read_manifest(tiny_shards)["shards"][0]["name"])], BATCH, manifest=man)
