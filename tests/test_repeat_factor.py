"""Repeat-factor sampling (issue 24, LVIS's rule): r(c) = max(1, sqrt(t / f(c))), r(I) = max over I's classes,
each epoch floor(r(I)) copies plus one with probability r(I) - floor(r(I)), drawn from (seed, epoch, key)."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from conftest import build_shards, require_tiny_coco
from frcnn_shard import make_loader
from frcnn_shard.loader import LoaderError
from frcnn_shard.seeds import repeat_copies
from frcnn_shard.storage.samples import iter_shard

T = 0.1  # on 49 images: a class in one image gets r = sqrt(0.1 * 49) = 2.21, one in 5 images 1.0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tiny = require_tiny_coco()
    return build_shards(tmp_path_factory.mktemp("rfs"), f"coco:{tiny}", "train2017", rows_per_shard=5).out_dir


@pytest.fixture(scope="module")
def brute(shards) -> dict[str, float]:
    """r(I) per key, counted by brute force from the records read straight off the tars."""
    images: dict[str, set[int]] = {}
    for tar in sorted(shards.glob("*.tar")):
        for key, members in iter_shard(tar):
            images[key] = set(json.loads(members["json"])["labels"])
    n = len(images)
    r_class = {c: max(1.0, math.sqrt(T / (sum(c in ls for ls in images.values()) / n)))
               for c in set().union(*images.values())}
    return {k: max((r_class[c] for c in ls), default=1.0) for k, ls in images.items()}


def keys_of(loader, epoch: int) -> Counter:
    loader.set_epoch(epoch)
    return Counter(t["key"] for _, targets in loader for t in targets)


def test_the_frequencies_and_factors_match_a_brute_force_count(shards, brute):
    loader = make_loader(shards, 4, num_workers=0, repeat_factor_threshold=T)
    table = {k: r for shard in loader.repeat.factors for k, r in shard.items()}
    assert table == pytest.approx({k: r for k, r in brute.items() if r > 1.0})
    assert 0 < len(table) < len(brute)  # tiny_coco has both rare and common classes at this threshold


def test_each_epochs_counts_follow_the_rule(shards, brute):
    loader = make_loader(shards, 4, num_workers=0, repeat_factor_threshold=T, seed=3)
    for epoch in (0, 1):
        want = Counter({k: repeat_copies(3, epoch, k, r) for k, r in brute.items()})
        loader.set_epoch(epoch)
        assert loader.num_samples == sum(want.values())
        assert keys_of(loader, epoch) == want
    assert sum(want.values()) > len(brute)


def test_the_fractional_part_is_drawn_with_its_probability():
    draws = [repeat_copies(0, e, f"{k:012d}", 2.3) for e in range(50) for k in range(200)]
    assert set(draws) == {2, 3} and abs(sum(draws) / len(draws) - 2.3) < 0.02
    assert repeat_copies(0, 0, "x", 1.0) == 1 and repeat_copies(0, 0, "x", 3.0) == 3


def test_the_same_copies_across_worker_counts_and_ranks_sum_to_the_whole(shards):
    whole = keys_of(make_loader(shards, 4, num_workers=0, repeat_factor_threshold=T), 2)
    assert keys_of(make_loader(shards, 4, num_workers=2, repeat_factor_threshold=T), 2) == whole
    ranks = [keys_of(make_loader(shards, 4, num_workers=0, repeat_factor_threshold=T, rank=r, world_size=2), 2)
             for r in (0, 1)]
    assert ranks[0] + ranks[1] == whole and not set(ranks[0]) & set(ranks[1])


def test_resume_with_repeat_factors_is_exact(shards):
    def run(loader, epoch):
        loader.set_epoch(epoch)
        return [t["key"] for _, targets in loader for t in targets]

    want = run(make_loader(shards, 3, num_workers=2, repeat_factor_threshold=T, shuffle_buffer=6), 1)
    first = make_loader(shards, 3, num_workers=2, repeat_factor_threshold=T, shuffle_buffer=6)
    first.set_epoch(1)
    it = iter(first)
    head = [t["key"] for _ in range(6) for t in next(it)[1]]
    again = make_loader(shards, 3, num_workers=0, repeat_factor_threshold=T, shuffle_buffer=6)
    again.load_state_dict(first.state_dict())
    assert head + [t["key"] for _, targets in again for t in targets] == want
    plain = make_loader(shards, 3, num_workers=2, shuffle_buffer=6)
    with pytest.raises(LoaderError, match="repeat_factor_threshold"):
        plain.load_state_dict(first.state_dict())


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, True, "0.1"])
def test_a_bad_threshold_is_refused(shards, bad):
    with pytest.raises(LoaderError, match="repeat_factor_threshold"):
        make_loader(shards, 4, repeat_factor_threshold=bad)
