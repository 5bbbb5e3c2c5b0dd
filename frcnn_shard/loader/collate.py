"""Decoded samples -> one Batch (as it travels from a worker), and its unpacking into (images, targets)
in the training process; ``normalize_batch`` for uint8 batches normalised later, on the device.

A batch carries sparse targets (the sampled anchor indices and the positives' boxes); ``Batch.unpack``
expands them to the dense per-anchor tensors the RPN loss takes, in the consumer.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..format.members import ShardFormatError
from .decode import Decoded, label_values
from .options import mean_std

Norm = tuple[Sequence[float], Sequence[float]]  # (mean, std) per RGB channel


def normalize_batch(
    images: torch.Tensor,
    device: torch.device | str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 (x/255 - mean)/std on ``device`` (default: where the images are)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"normalize_batch expects uint8 [B,3,H,W], got {images.dtype} {tuple(images.shape)}")
    scale, bias = norm_coeffs(mean, std)
    if device is not None:
        # Move the 4x smaller uint8 tensor, then convert on the device.
        images = images.to(device, non_blocking=True)
    out = images.to(torch.float32)
    return out.mul_(torch.from_numpy(scale).to(out.device)).add_(torch.from_numpy(bias).to(out.device))


def norm_coeffs(mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    """(scale, bias) float32 [1,3,1,1] with x * scale + bias == (x/255 - mean)/std."""
    mean, std = mean_std(mean, std)
    scale = np.array([1.0 / (255.0 * s) for s in std], dtype=np.float32).reshape(1, 3, 1, 1)
    bias = np.array([-m / s for m, s in zip(mean, std)], dtype=np.float32).reshape(1, 3, 1, 1)
    return scale, bias


class Batch:
    """A collated batch as it travels from a worker: the images (in shared memory) plus compact targets.

    Dense targets are ~1 MB per image (int64 labels and a float32 [A, 4] matched box per anchor), so
    they are not what travels: the worker sends the anchor index lists and the positives' boxes, and
    ``unpack`` in the consumer expands them. The image tensor is allocated straight in shared memory
    inside workers, so the DataLoader queue passes a handle instead of copying.
    """

    def __init__(self, images, num_anchors: int, fill: int, other_value: int, ones, ones_boxes, others,
                 boxes, labels, counts, metas, skipped=0, skip_log=()):
        self.images = images  # uint8 [B, H, W, 3] (channels last) or normalised float32 [B, 3, H, W]
        self.num_anchors, self.fill, self.other_value = num_anchors, fill, other_value
        # Small arrays stay NumPy: pickled by value through the queue, where each tensor would
        # cost a shared-memory segment of its own. Anchor indices are flat: b * A + a.
        self.ones, self.ones_boxes, self.others = ones, ones_boxes, others
        self.boxes = boxes  # float32 [sum K, 4]
        self.labels = labels  # int64 [sum K]
        self.counts = counts
        self.metas = metas
        self.skipped = skipped
        self.skip_log = list(skip_log)
        # Where the batch's stream stands after it (run_stream sets these): its index among the rank's
        # streams, the encoded samples it has handed to decoding, all shards so far held their counts,
        # and whether this item marks the stream's end (it then holds no images).
        self.stream, self.raw, self.exact, self.end = 0, 0, True, False
        self.pending: tuple[int, ...] = ()  # keep-ratio: the stream's samples waiting in its canvas buckets

    def dense_targets(self) -> tuple[np.ndarray, np.ndarray]:
        """anchor_labels int64 [B, A] and anchor_matched_gt float32 [B, A, 4] from the index lists."""
        b, a = len(self.counts), self.num_anchors
        labels = np.full((b, a), self.fill, dtype=np.int64)
        flat = labels.reshape(-1)
        flat[self.others] = self.other_value
        flat[self.ones] = 1
        # np.zeros maps zero pages lazily: only the pages holding a positive are ever written here.
        matched = np.zeros((b, a, 4), dtype=np.float32)
        matched.reshape(-1, 4)[self.ones] = self.ones_boxes
        return labels, matched

    def unpack(self, pin_memory: bool = False) -> tuple[torch.Tensor, list[dict]]:
        """(images, targets) with dense per-image targets; target tensors are views of batch tensors."""
        images = self.images.permute(0, 3, 1, 2) if self.images.dtype == torch.uint8 else self.images
        labels_np, matched_np = self.dense_targets()
        anchor_labels, matched_gt = torch.from_numpy(labels_np), torch.from_numpy(matched_np)
        boxes, labels = torch.from_numpy(self.boxes), torch.from_numpy(self.labels)
        if pin_memory:
            images, anchor_labels, matched_gt, boxes, labels = (
                t.pin_memory() for t in (images, anchor_labels, matched_gt, boxes, labels))
        targets = []
        start = 0
        for i, (k, meta) in enumerate(zip(self.counts, self.metas)):
            targets.append({
                "boxes": boxes[start:start + k],
                "labels": labels[start:start + k],
                "anchor_labels": anchor_labels[i],
                "anchor_matched_gt": matched_gt[i],
                **meta,
            })
            start += k
        return images, targets


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, allocated directly in shared memory when ``shared`` (as default_collate does)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return proto.new(storage).view(shape)


def _meta(s: Decoded, keep_ratio: bool = False) -> dict:
    """The per-image fields a target dict carries besides the tensors; a keep-ratio sample's ``size`` is its
    content (the image's own pixels, top-left of the batch), ``canvas`` the batch's (H, W)."""
    r = s.record
    if keep_ratio:
        return {"key": r.key, "image_id": r.image_id, "orig_size": r.orig_size, "size": r.content_size,
                "canvas": r.size, "scale": r.scale, "pad": r.pad, "flipped": s.flipped}
    return {"key": r.key, "image_id": r.image_id, "orig_size": r.orig_size, "size": r.size,
            "scale": r.scale, "pad": r.pad, "flipped": s.flipped}


def batch_rows(batch_size: int, image_hw: tuple[int, int], shared: bool) -> torch.Tensor:
    """The uint8 [B, H, W, 3] batch the next samples are decoded straight into (uint8 batches of a known canvas)."""
    return shared_empty((batch_size, *image_hw, 3), torch.uint8, shared)


def _images(samples: list[Decoded], norm: Norm | None, shared: bool) -> torch.Tensor:
    """The batch's image tensor, filled from the decoded images (normalised into float32 when ``norm``).

    Filling goes through NumPy views: torch's intra-op thread pool makes small copy kernels many
    times slower on a busy CPU, and the views write straight into the tensors' memory.
    """
    b = len(samples)
    h, w, _ = samples[0].image.shape
    if norm is not None:
        images = shared_empty((b, 3, h, w), torch.float32, shared)
        scale, bias = (c[0] for c in norm_coeffs(*norm))
    else:
        images = shared_empty((b, h, w, 3), torch.uint8, shared)
    img_np = images.numpy()
    for i, s in enumerate(samples):
        if s.image.shape != (h, w, 3):
            raise ShardFormatError(f"key {s.key!r}: image {s.image.shape[:2]} differs from the batch's {(h, w)}")
        if norm is not None:
            np.multiply(s.image.transpose(2, 0, 1), scale, out=img_np[i], dtype=np.float32)
            img_np[i] += bias
        else:
            img_np[i] = s.image
    return images


def collate(samples: list[Decoded], num_anchors: int, sampled: bool, norm: Norm | None = None,
            shared: bool = False, rows: torch.Tensor | None = None, keep_ratio: bool = False) -> Batch:
    """Write decoded samples into one batch (the image tensor in shared memory when ``shared``, i.e. in a worker).

    ``sampled``: the targets are an anchor sample (else the stored labels); ``norm``: (mean, std) to
    normalise the images into float32 [B, 3, H, W] (None: uint8 [B, H, W, 3]); ``rows``: the batch's
    images already written (row i holding sample i: uint8 from batch_rows, or a keep-ratio canvas batch);
    ``keep_ratio``: the samples' records are keep-ratio ones (``size`` is the content, ``canvas`` added).
    """
    b = len(samples)
    images = rows[:b] if rows is not None else _images(samples, norm, shared)
    a = num_anchors
    fill, other = label_values(sampled)
    return Batch(
        images, a, fill, other,
        np.concatenate([s.ones + i * a for i, s in enumerate(samples)]).astype(np.int64),
        np.concatenate([s.ones_boxes for s in samples]).astype(np.float32).reshape(-1, 4),
        np.concatenate([s.others + i * a for i, s in enumerate(samples)]).astype(np.int64),
        np.concatenate([s.record.boxes for s in samples]).astype(np.float32).reshape(-1, 4),
        np.concatenate([s.record.labels for s in samples]).astype(np.int64),
        [len(s.record.boxes) for s in samples], [_meta(s, keep_ratio) for s in samples],
    )


def stats_only(num_anchors: int) -> Batch:
    """An item with no samples, only skip counts (filled in by the stream)."""
    empty = np.zeros(0, np.int64)
    return Batch(None, num_anchors, 0, 0, empty, empty, empty, empty, empty, [], [])
