"""Every per-key random draw of the project, in one place: each a function of (seed, epoch, ...) and a
sample key only, never of workers, ranks, order or the process (Python's hash() is salted per process).

Streams, each kept apart from the others by a domain tag even for equal numbers:

- the epoch's shard order (``shard_order_rng``), the shuffle buffer (``buffer_rng``) and the
  resampled top-up (``resample_rng``) of a (rank, worker) stream: numpy Generators seeded from
  (tag, seed, epoch, ...);
- the anchor sample of one sample (``sample_rng``): a Generator from (tag, seed, epoch, ``key_hash(key)``);
- the horizontal flip of one sample (``hflip_decision``): a uniform from a blake2b hash of
  (tag, seed, epoch, key), ~10x cheaper than a seeded Generator;
- check --deep's pick of one sample (``deep_check_pick``): a uniform from sha256 of "seed:key";
- the repeat-factor copies of one sample in an epoch (``repeat_copies``): floor(r), plus one with
  probability r - floor(r), the uniform from a blake2b hash of (tag, seed, epoch, key) like the flip's.

The three hash recipes differ for history only: each is pinned by tests (epochs, flips, samples and
check's picks repeat across versions), so none may change. This module is a leaf: numpy and hashlib only.
"""
from __future__ import annotations

import hashlib
import math
import struct

import numpy as np

# Domain tags: keep the streams independent for equal (seed, epoch) numbers.
TAG_SHARDS, TAG_BUFFER, TAG_RESAMPLE, TAG_FLIP, TAG_SAMPLE = 0x5348, 0x4255, 0x5245, 0x464C, 0x5341
TAG_REPEAT = 0x5250
_UNIT = 2.0 ** 64  # 8 hash bytes as an integer / _UNIT: a uniform in [0, 1)


def stream_rng(*entropy: int) -> np.random.Generator:
    """A numpy Generator seeded from a sequence of non-negative integers (a domain tag first)."""
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


def shard_order_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator that permutes the shards of an epoch (the same on every rank and worker)."""
    return stream_rng(TAG_SHARDS, seed, epoch)


def buffer_rng(seed: int, epoch: int, rank: int, worker: int) -> np.random.Generator:
    """The shuffle buffer's generator of one (rank, worker) stream."""
    return stream_rng(TAG_BUFFER, seed, epoch, rank, worker)


def resample_rng(seed: int, epoch: int, rank: int, worker: int) -> np.random.Generator:
    """The generator drawing extra shards (with replacement) for one resampled (rank, worker) stream."""
    return stream_rng(TAG_RESAMPLE, seed, epoch, rank, worker)


def key_hash(key: str) -> int:
    """A stable 64-bit integer for a sample key (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The anchor-sampling generator of one sample: a function of (seed, epoch, key) only."""
    return stream_rng(TAG_SAMPLE, seed, epoch, key_hash(key))


def hflip_decision(seed: int, epoch: int, key: str, p: float) -> bool:
    """Whether sample ``key`` is mirrored in this epoch: a stream of its own from (seed, epoch, key)."""
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    # Its own stream: turning hflip on never changes any sample's anchor sample (sample_rng).
    digest = hashlib.blake2b(struct.pack("<3Q", TAG_FLIP, seed, epoch) + key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / _UNIT < p


def _key_uniform(tag: int, seed: int, epoch: int, key: str) -> float:
    """A uniform in [0, 1) from a blake2b hash of (tag, seed, epoch, key): the recipe of hflip_decision."""
    digest = hashlib.blake2b(struct.pack("<3Q", tag, seed, epoch) + key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / _UNIT


def repeat_copies(seed: int, epoch: int, key: str, factor: float) -> int:
    """How many times sample ``key`` appears in this epoch under repeat-factor sampling (LVIS's rule).

    floor(factor) times, plus once more with probability factor - floor(factor): a stream of its own
    from (seed, epoch, key), so every rank and worker takes the same decision for the sample.
    """
    whole = math.floor(factor)
    frac = factor - whole
    if frac <= 0.0:
        return int(whole)
    return int(whole) + (1 if _key_uniform(TAG_REPEAT, seed, epoch, key) < frac else 0)


def deep_check_pick(key: str, seed: int, fraction: float) -> bool:
    """Whether check --deep --fraction re-matches sample ``key``: independent of order and shard layout."""
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _UNIT < fraction
