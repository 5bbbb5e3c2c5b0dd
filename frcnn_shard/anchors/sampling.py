"""What the RPN loss sees of the stored targets: the per-epoch anchor sample and the box deltas.

Sampling works on the sparse targets (positive and ignored indices): negatives, the tens of
thousands of other anchors, are never listed unless the sample needs them all. Its randomness is a
function of (seed, epoch, key) alone (``seeds.sample_rng``), so a sample's anchors do not depend on
workers, ranks or order.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..format.targets import SparseTargets
from ..seeds import key_hash, sample_rng  # noqa: F401 - the sample's generator, re-exported by anchors


def _draw(count: int, size: int, k: int, rng: np.random.Generator,
          is_member: Callable[[np.ndarray], np.ndarray], listing: Callable[[], np.ndarray]) -> np.ndarray:
    """Up to k distinct members of a set of ``count`` among 0..size-1, a uniform random subset (all when fewer).

    ``is_member`` tests candidate indices, ``listing`` gives the sorted members; it is called only
    when the set must be listed.
    """
    if count <= k:
        return listing()
    if 2 * count >= size and 4 * k <= count:
        # The bulk set (negatives): draw positions and reject the others instead of listing all
        # ~40k indices. The first k distinct hits of an i.i.d. uniform stream are a uniform k-subset.
        got = np.empty(0, dtype=np.int64)
        for _ in range(8):
            cand = rng.integers(0, size, size=2 * (k - len(got)) + 16)
            cand = np.concatenate([got, cand[is_member(cand)]])
            _, first = np.unique(cand, return_index=True)
            got = cand[np.sort(first)]
            if len(got) >= k:
                return got[:k]
    return rng.choice(listing(), size=k, replace=False)


def _not_in(sorted_idx: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Membership test of the complement of a sorted index array."""
    if not len(sorted_idx):
        return lambda cand: np.ones(len(cand), dtype=bool)

    def test(cand: np.ndarray) -> np.ndarray:
        at = np.minimum(np.searchsorted(sorted_idx, cand), len(sorted_idx) - 1)
        return sorted_idx[at] != cand

    return test


def sample_indices(
    targets: SparseTargets,
    num_anchors: int,
    rpn_batch_size: int = 256,
    positive_fraction: float = 0.5,
    *,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """The anchors kept for the RPN loss: (positive indices, negative indices), drawn uniformly without replacement."""
    if rpn_batch_size < 0 or not 0.0 <= positive_fraction <= 1.0:
        raise ValueError("sampling needs rpn_batch_size >= 0 and 0 <= positive_fraction <= 1")
    pos_set = targets.positive
    pos = _draw(len(pos_set), num_anchors, int(rpn_batch_size * positive_fraction), rng,
                lambda c: ~_not_in(pos_set)(c), lambda: pos_set)
    # The two are disjoint (SparseTargets' contract), so sorting their concatenation is their union,
    # at a twentieth of np.union1d's cost (numpy 2's hash-based unique).
    labelled = np.sort(np.concatenate([pos_set, targets.ignore])) if len(targets.ignore) else pos_set
    neg = _draw(num_anchors - len(labelled), num_anchors, rpn_batch_size - len(pos), rng, _not_in(labelled),
                lambda: np.setdiff1d(np.arange(num_anchors), labelled, assume_unique=True))
    return pos, neg


def sample_labels(
    labels: np.ndarray,
    rpn_batch_size: int = 256,
    positive_fraction: float = 0.5,
    *,
    rng: np.random.Generator,
) -> np.ndarray:
    """Dense form of sample_indices: int64 [A] with 1 / 0 on the sampled anchors and -1 elsewhere."""
    labels = np.asarray(labels)
    sparse = SparseTargets(np.flatnonzero(labels == 1), np.flatnonzero(labels == -1), np.empty(0, np.int64))
    pos, neg = sample_indices(sparse, labels.size, rpn_batch_size, positive_fraction, rng=rng)
    out = np.full(np.shape(labels), -1, dtype=np.int64)
    out[pos] = 1
    out[neg] = 0
    return out


def _wh_ctr(b: np.ndarray, what: str) -> tuple[np.ndarray, ...]:
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    if (w <= 0).any() or (h <= 0).any():
        raise ValueError(f"{what} must have positive width and height to encode deltas")
    return w, h, b[:, 0] + 0.5 * w, b[:, 1] + 0.5 * h


def encode_deltas(anchors: np.ndarray, boxes: np.ndarray, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> np.ndarray:
    """Faster R-CNN box deltas [N, 4] (dx, dy, dw, dh) of boxes relative to anchors, times weights."""
    dtype = np.result_type(np.asarray(anchors).dtype, np.asarray(boxes).dtype, np.float32)
    a, b = np.asarray(anchors, np.float64), np.asarray(boxes, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"anchors and boxes must both be [N, 4], got {a.shape} and {b.shape}")
    aw, ah, ax, ay = _wh_ctr(a, "anchors")
    bw, bh, bx, by = _wh_ctr(b, "boxes")
    wx, wy, ww, wh = (float(v) for v in weights)
    d = np.stack([wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * np.log(bw / aw), wh * np.log(bh / ah)], axis=1)
    return d.astype(dtype)
