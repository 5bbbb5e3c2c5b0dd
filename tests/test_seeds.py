"""Every per-key random draw, pinned to values: moving or rewording a draw must not change one bit of it.

The epoch's shard order, the shuffle buffer, the resampled top-up, the horizontal flip, the anchor
sample and check --deep's pick are all functions of (seed, epoch, ...) and the sample key only; the
values below are what the shipped code draws, so an epoch, a flip or an anchor sample repeats across
versions of the code (and the loader tests' pinned epochs stay valid).
"""
from __future__ import annotations

from frcnn_shard import anchors as anc
from frcnn_shard import loader
from frcnn_shard import seeds

KEYS = ["000000000139", "000000000285", "a/b", "x"]


def test_the_anchor_samples_key_hash_and_generator_are_pinned():
    assert (anc.key_hash, anc.sample_rng) == (seeds.key_hash, seeds.sample_rng)
    assert [anc.key_hash(k) for k in KEYS] == [
        14932527426303285543, 14874259027555066173, 11569688667527244557, 5717441744405258058]
    assert [int(anc.sample_rng(3, 2, k).integers(1 << 62)) for k in KEYS] == [
        426516253102448726, 727113673038745947, 536137057295566460, 3616640539112449149]


def test_the_flip_decision_is_pinned():
    assert loader.hflip_decision is seeds.hflip_decision
    got = [seeds.hflip_decision(s, e, k, 0.5) for s in (0, 7) for e in (0, 3) for k in KEYS]
    assert got == [True, False, False, True, True, True, False, False,
                   False, True, True, False, False, True, False, True]
    assert not seeds.hflip_decision(0, 0, KEYS[0], 0.0) and seeds.hflip_decision(0, 0, KEYS[1], 1.0)


def test_check_deeps_pick_is_pinned():
    assert [seeds.deep_check_pick(k, s, 0.3) for s in (0, 5) for k in KEYS] == [False] * 5 + [True] * 3
    assert seeds.deep_check_pick("x", 0, 1.0) and not seeds.deep_check_pick("x", 0, 0.0)


def test_the_loaders_stream_generators_are_pinned():
    assert [int(v) for v in seeds.shard_order_rng(0, 1).permutation(10)] == [4, 1, 3, 7, 8, 6, 2, 9, 5, 0]
    assert [int(v) for v in seeds.buffer_rng(1, 2, 0, 1).integers(1 << 62, size=2)] == [
        3867118191547834137, 4128214109025688751]
    assert [int(v) for v in seeds.resample_rng(1, 2, 0, 1).integers(1 << 62, size=2)] == [
        1564508756306103568, 1412315789046290964]
