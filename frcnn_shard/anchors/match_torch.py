"""Batched matching in torch (a GPU when there is one): the same rule as match_reference, for many
images at once, with float32 IoU chunked over the anchors and a float64 re-decision of near ties.

Codes carry one image's result in one int32 per anchor: >= 0 positive (the matched box), -1 negative,
-2 ignored. One host->device copy per batch (boxes, crowd boxes and counts packed in one tensor) and
one device->host copy (the codes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .match import CROWD_COVER, MatchConfig, as_boxes, inside_image
from .spec import anchors_sha256, as_numpy

_TIE_EPS = 1e-5  # float32 IoU is off by < 1e-6; anything this close to a threshold or tie is re-decided in float64
_DEVICE_ANCHORS: dict = {}  # (sha256, device) -> anchors already on that device
NEGATIVE, IGNORE = -1, -2  # codes; a code >= 0 is a positive's matched box


def _overlap_torch(a, b, b_valid):
    """(IoU, intersection, anchor area) of anchors a [..., 4] with boxes b [..., 4], broadcast over the
    leading axes, in numpy's op order; IoU is -1 where ``b_valid`` (broadcast likewise) is False."""
    iw = b[..., 2].minimum(a[..., 2]) - b[..., 0].maximum(a[..., 0])
    ih = b[..., 3].minimum(a[..., 3]) - b[..., 1].maximum(a[..., 1])
    inter = iw.clamp(min=0) * ih.clamp(min=0)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    iou = inter / (area_a + area_b - inter)
    return iou.masked_fill(~b_valid, -1.0), inter, area_a


def _iou_torch(a, b, b_valid):
    """[B, N, K] overlaps of anchors a [N, 4] with padded boxes b [B, K, 4] (b_valid [B, K]); area_a is [1, N, 1]."""
    return _overlap_torch(a[None, :, None], b[:, None], b_valid[:, None])


def _rows_torch(a, b, b_valid):
    """[M, K] overlaps of anchors a [M, 4] with their own boxes b [M, K, 4] (b_valid [M, K]); area_a is [M, 1]."""
    return _overlap_torch(a[:, None], b, b_valid)


def _code(maxv, arg, cfg: MatchConfig):
    """The code of anchors from their best IoU and best box: the thresholds of the rule."""
    import torch

    return torch.where(maxv >= cfg.pos_iou, arg.int(), torch.where(maxv < cfg.neg_iou, NEGATIVE, IGNORE).int())


def _anchors_on(anchors: Any, dev):
    """The anchors as a float32 tensor on ``dev``; host arrays are copied once per device, then cached."""
    import torch

    if isinstance(anchors, torch.Tensor) and anchors.device == dev and anchors.dtype == torch.float32:
        return anchors
    host = np.ascontiguousarray(as_numpy(anchors), dtype=np.float32)
    key = (anchors_sha256(host), str(dev))
    if key not in _DEVICE_ANCHORS:
        if len(_DEVICE_ANCHORS) >= 4:
            _DEVICE_ANCHORS.pop(next(iter(_DEVICE_ANCHORS)))
        _DEVICE_ANCHORS[key] = torch.from_numpy(host.copy()).to(dev)
    return _DEVICE_ANCHORS[key]


def _pad_batch(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    k = max((len(a) for a in arrays), default=0)
    out = np.zeros((len(arrays), k, 4), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out, np.array([len(a) for a in arrays], dtype=np.float32)


@dataclass
class _Boxes:
    """A batch's boxes and crowd boxes on the device, padded, with their validity masks."""

    boxes: Any  # float32 [B, K, 4]
    bvalid: Any  # bool [B, K]
    crowd: Any  # float32 [B, C, 4]
    cvalid: Any  # bool [B, C]

    @property
    def kmax(self) -> int:
        return int(self.boxes.shape[1])

    @property
    def cmax(self) -> int:
        return int(self.crowd.shape[1])


def _upload(boxes_list: Sequence, crowd_list: Sequence, cfg: MatchConfig, dev) -> _Boxes:
    """Pad and copy a batch's boxes to the device in one transfer."""
    import torch

    bpad, bcount = _pad_batch([as_boxes(b, "boxes") for b in boxes_list])
    cpad, ccount = _pad_batch([as_boxes(c, "crowd_boxes") if cfg.crowd_ignore else np.zeros((0, 4), np.float32)
                               for c in crowd_list])
    kmax, cmax = bpad.shape[1], cpad.shape[1]
    host = np.zeros((len(boxes_list), 1 + kmax + cmax, 4), dtype=np.float32)
    host[:, 0, 0], host[:, 0, 1] = bcount, ccount  # counts < 2**24 are exact in float32
    host[:, 1 : 1 + kmax] = bpad
    host[:, 1 + kmax :] = cpad
    packed = torch.from_numpy(host).to(dev, non_blocking=True)  # the one host->device copy
    counts = packed[:, 0, :2].long()
    return _Boxes(packed[:, 1 : 1 + kmax], torch.arange(kmax, device=dev)[None, :] < counts[:, :1],
                  packed[:, 1 + kmax :], torch.arange(cmax, device=dev)[None, :] < counts[:, 1:2])


@dataclass
class _State:
    """Per (image, anchor) results of the passes, and each box's best anchor so far."""

    code: Any  # int32 [B, A]
    argmax_all: Any  # int32 [B, A]: best box of every anchor
    crowd_hit: Any  # bool [B, A]
    unsure: Any  # bool [B, A]: to re-decide in float64
    best: Any  # float32 [B, K]: each box's best IoU over valid anchors
    best_idx: Any  # int64 [B, K]


def _first_pass(anc, bx: _Boxes, avalid, cfg: MatchConfig, chunk: int, refine64: bool, force: bool) -> _State:
    """Thresholds, best boxes, crowd cover and each box's best IoU, chunk by chunk over the anchors."""
    import torch

    dev, bsz, n = anc.device, bx.boxes.shape[0], int(anc.shape[0])
    st = _State(torch.empty((bsz, n), dtype=torch.int32, device=dev), torch.zeros((bsz, n), dtype=torch.int32, device=dev),
                torch.zeros((bsz, n), dtype=torch.bool, device=dev), torch.zeros((bsz, n), dtype=torch.bool, device=dev),
                torch.full((bsz, bx.kmax), -1.0, device=dev), torch.zeros((bsz, bx.kmax), dtype=torch.long, device=dev))
    eps = _TIE_EPS
    for a0 in range(0, n, chunk):
        a = anc[a0 : a0 + chunk]
        sl = slice(a0, a0 + a.shape[0])
        if bx.kmax:
            iou, _, _ = _iou_torch(a, bx.boxes, bx.bvalid)
            maxv, arg = iou.max(dim=2)  # first box on ties
            if refine64:
                second = iou.scatter(2, arg[..., None], -1.0).max(dim=2).values
                st.unsure[:, sl] |= ((maxv - cfg.pos_iou).abs() <= eps) | ((maxv - cfg.neg_iou).abs() <= eps)
                st.unsure[:, sl] |= (maxv >= cfg.pos_iou - eps) & (second >= maxv - eps)  # argmax tie
        else:
            maxv = torch.full((bsz, a.shape[0]), -1.0, device=dev)
            arg = torch.zeros((bsz, a.shape[0]), dtype=torch.long, device=dev)
        st.code[:, sl] = _code(maxv, arg, cfg)
        st.argmax_all[:, sl] = arg.int()
        if force:
            per_box, idx = iou.masked_fill(~avalid[sl][None, :, None], -1.0).max(dim=1)  # first anchor on ties
            better = per_box > st.best
            st.best = torch.where(better, per_box, st.best)
            st.best_idx = torch.where(better, idx + a0, st.best_idx)
        if bx.cmax:
            _, inter, area_a = _iou_torch(a, bx.crowd, bx.cvalid)
            half = CROWD_COVER * area_a
            st.crowd_hit[:, sl] = ((inter >= half) & bx.cvalid[:, None, :]).any(dim=2)
            if refine64:
                st.unsure[:, sl] |= (((inter - half).abs() <= eps * half) & bx.cvalid[:, None, :]).any(dim=2)
    return st


def _force_pass(anc, bx: _Boxes, avalid, cfg: MatchConfig, chunk: int, refine64: bool, st: _State):
    """Low-quality matches: each box's best anchors become positive.

    With refine64, returns the (image, anchor, box) triples whose float32 IoU is within eps of the box's
    best, for _refine to decide exactly; without it, applies float32 ties (or the first argmax) here.
    """
    import torch

    ok = (st.best > 0) & bx.bvalid
    near_pairs = []
    if refine64 or cfg.low_quality == "all":
        for a0 in range(0, int(anc.shape[0]), chunk):
            a = anc[a0 : a0 + chunk]
            sl = slice(a0, a0 + a.shape[0])
            iou = _iou_torch(a, bx.boxes, bx.bvalid)[0].masked_fill(~avalid[sl][None, :, None], -1.0)
            if refine64:
                near = (iou >= st.best[:, None, :] * (1 - _TIE_EPS)) & ok[:, None, :]
                bi, ai, ji = near.nonzero(as_tuple=True)
                near_pairs.append(torch.stack([bi, ai + a0, ji]))
            else:
                hit = ((iou == st.best[:, None, :]) & ok[:, None, :]).any(dim=2)
                st.code[:, sl] = torch.where(hit, st.argmax_all[:, sl], st.code[:, sl])
    if not refine64 and cfg.low_quality == "argmax":
        rows = torch.arange(st.best.shape[0], device=anc.device)[:, None].expand_as(st.best_idx)[ok]
        st.code[rows, st.best_idx[ok]] = st.argmax_all[rows, st.best_idx[ok]]
    if near_pairs:
        return torch.cat(near_pairs, dim=1)
    return torch.zeros((3, 0), dtype=torch.long, device=anc.device)


def _redecide_unsure(anc, bx: _Boxes, cfg: MatchConfig, st: _State) -> int:
    """Re-decide the unsure anchors exactly, in float64; returns how many there were."""
    import torch

    ub, ua = st.unsure.nonzero(as_tuple=True)
    step = max(1, (1 << 22) // max(bx.kmax, bx.cmax, 1))
    for s0 in range(0, len(ub), step):
        b_, a_ = ub[s0 : s0 + step], ua[s0 : s0 + step]
        a64 = anc[a_].double()
        if bx.kmax:
            iou, _, _ = _rows_torch(a64, bx.boxes[b_].double(), bx.bvalid[b_])
            maxv, arg = iou.max(dim=1)
        else:
            maxv = torch.full((len(a_),), -1.0, dtype=torch.float64, device=anc.device)
            arg = torch.zeros(len(a_), dtype=torch.long, device=anc.device)
        st.code[b_, a_] = _code(maxv, arg, cfg)
        st.argmax_all[b_, a_] = arg.int()
        if bx.cmax:
            _, inter, area_a = _rows_torch(a64, bx.crowd[b_].double(), bx.cvalid[b_])
            st.crowd_hit[b_, a_] = ((inter >= CROWD_COVER * area_a) & bx.cvalid[b_]).any(dim=1)
    return int(len(ub))


def _force_exact(anc, bx: _Boxes, cfg: MatchConfig, st: _State, pairs) -> None:
    """Apply low-quality matches from the near-best pairs, with each pair's IoU recomputed in float64."""
    import torch

    if not pairs.shape[1]:
        return
    bsz, kmax, n = st.code.shape[0], bx.kmax, int(anc.shape[0])
    pb, pa, pj = pairs
    iou = _overlap_torch(anc[pa].double(), bx.boxes[pb, pj].double(), bx.bvalid[pb, pj])[0]  # pairwise
    key = pb * kmax + pj
    exact = torch.full((bsz * kmax,), -1.0, dtype=torch.float64, device=anc.device)
    exact = exact.scatter_reduce(0, key, iou, reduce="amax")
    hit = (iou == exact[key]) & (exact[key] > 0)
    pb, pa, key = pb[hit], pa[hit], key[hit]
    if cfg.low_quality == "argmax":  # first anchor among the exact ties
        first = torch.full((bsz * kmax,), n, dtype=torch.long, device=anc.device).scatter_reduce(0, key, pa, reduce="amin")
        keys = torch.unique(key)
        pb, pa = keys // kmax, first[keys]
    st.code[pb, pa] = st.argmax_all[pb, pa]


def match_batch_torch(
    anchors: Any,
    boxes_list: Sequence[np.ndarray],
    crowd_list: Sequence[np.ndarray | None] | None,
    cfg: MatchConfig,
    image_hw: int | Sequence[int],
    device: str = "cuda",
    chunk_anchors: int | None = None,
    refine64: bool = True,
    stats: dict | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Match a batch of images with torch (float32 IoU, chunked over anchors): [(labels, matched)] per image.

    Anchors given as a host array are copied to the device once and cached (by sha256). With
    ``refine64`` (default) the few anchors whose float32 IoU is within 1e-5 of a threshold or of a
    tie are re-decided in float64, so the result equals match_reference exactly; without it the
    result is pure float32. ``stats``, when given, receives counts of the re-decided anchors.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("match_batch_torch: device 'cuda' requested but CUDA is not available")
    anc = _anchors_on(anchors, dev)
    bsz = len(boxes_list)
    if bsz == 0:
        return []
    crowd_list = list(crowd_list) if crowd_list is not None else [None] * bsz
    if len(crowd_list) != bsz:
        raise ValueError(f"match_batch_torch: {bsz} box arrays but {len(crowd_list)} crowd arrays")
    bx = _upload(boxes_list, crowd_list, cfg, dev)
    n = int(anc.shape[0])
    avalid = inside_image(anc, image_hw) if cfg.ignore_cross_boundary else torch.ones(n, dtype=torch.bool, device=dev)
    # Bound the [B, chunk, K] temporaries at ~2**22 elements whatever the box count.
    chunk = max(1, int(chunk_anchors if chunk_anchors is not None else (1 << 22) // (bsz * max(bx.kmax, bx.cmax, 1))))
    force = bx.kmax > 0 and cfg.low_quality != "none"
    st = _first_pass(anc, bx, avalid, cfg, chunk, refine64, force)
    pairs = _force_pass(anc, bx, avalid, cfg, chunk, refine64, st) if force else None
    if refine64:
        if pairs is not None:
            st.unsure[pairs[0], pairs[1]] = True
        refined = _redecide_unsure(anc, bx, cfg, st)
        if pairs is not None:
            _force_exact(anc, bx, cfg, st, pairs)
        if stats is not None:
            stats["refined_anchors"] = stats.get("refined_anchors", 0) + refined
            stats["near_best_pairs"] = stats.get("near_best_pairs", 0) + (int(pairs.shape[1]) if pairs is not None else 0)
    code = torch.where(st.crowd_hit & (st.code < 0), IGNORE, st.code)
    code = torch.where(avalid[None, :], code, IGNORE)
    out = code.cpu().numpy()  # the one device->host copy
    return [(np.where(row >= 0, 1, np.where(row == NEGATIVE, 0, -1)).astype(np.int8),
             np.where(row >= 0, row, -1).astype(np.int32)) for row in out]
