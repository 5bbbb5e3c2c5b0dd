"""The RPN matching rule: its parameters, the float64 brute-force reference that defines it, and the
fast CPU matcher that must agree with it exactly.

The rule (docs/FORMAT.md, "Anchors and RPN targets"): IoU >= pos_iou is positive, < neg_iou negative,
in between ignored; each box's best anchors are forced positive (low_quality); optionally anchors
covered by a crowd box, or crossing the image boundary, are ignored.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .spec import AnchorSpec, as_hw, as_numpy, cell_anchors, from_fields, make_anchors

LOW_QUALITY_MODES = ("all", "argmax", "none")
CROWD_COVER = 0.5  # an anchor is "covered" by a crowd box when intersection >= this x anchor area

# Slack used only to *enlarge* the fast matcher's candidate sets, never to decide a label: anchors
# are float32, so their widths drift by a few ULPs across the grid while the search geometry uses the
# nominal cell shape. The exact float64 IoU of every candidate decides.
_SEARCH_IOU_SLACK = 1e-5
_SEARCH_PX_SLACK = 0.05


@dataclass(frozen=True)
class MatchConfig:
    """The RPN matching rule's parameters (see match_reference and docs/FORMAT.md)."""

    # "help" documents a field and makes it a command-line option (see cli.py).
    pos_iou: float = field(default=0.7, metadata={"help": "An anchor whose best IoU with a box is at least this is positive."})
    neg_iou: float = field(default=0.3, metadata={
        "help": "An anchor whose best IoU is below this is negative; in between it is ignored."})
    low_quality: str = field(default="all", metadata={
        "help": "Forced positives per box: all ties (paper), argmax (tutorial), none.", "choices": LOW_QUALITY_MODES})
    crowd_ignore: bool = field(default=False, metadata={"help": "Anchors covered >= half by a crowd box become ignore."})
    ignore_cross_boundary: bool = field(default=False, metadata={
        "help": "Anchors leaving the image become ignore (paper's training rule)."})

    def __post_init__(self) -> None:
        pos, neg = float(self.pos_iou), float(self.neg_iou)
        if not 0.0 < neg <= pos <= 1.0:
            raise ValueError(f"MatchConfig needs 0 < neg_iou <= pos_iou <= 1, got neg_iou={neg}, pos_iou={pos}")
        if self.low_quality not in LOW_QUALITY_MODES:
            raise ValueError(f"MatchConfig.low_quality must be one of {LOW_QUALITY_MODES}, got {self.low_quality!r}")
        if not isinstance(self.crowd_ignore, bool) or not isinstance(self.ignore_cross_boundary, bool):
            raise ValueError("MatchConfig.crowd_ignore and ignore_cross_boundary must be bools")
        object.__setattr__(self, "pos_iou", pos)
        object.__setattr__(self, "neg_iou", neg)

    def to_dict(self) -> dict:
        """JSON-able dict; ``MatchConfig.from_dict(cfg.to_dict()) == cfg``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MatchConfig":
        """Inverse of ``to_dict``; every field is required and unknown keys are refused."""
        return from_fields(cls, d)


def as_boxes(boxes: Any, name: str) -> np.ndarray:
    """Boxes (array, tensor or None) as float32 [K, 4] xyxy; ValueError when not finite xyxy."""
    if boxes is None:
        return np.zeros((0, 4), dtype=np.float32)
    b = np.asarray(as_numpy(boxes), dtype=np.float32)
    if b.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name} must be [K, 4] xyxy, got shape {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError(f"{name} contain non-finite coordinates")
    if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise ValueError(f"{name} must be xyxy with x2 >= x1 and y2 >= y1")
    return b


def inside_image(anchors: np.ndarray, image_hw: int | Sequence[int]) -> np.ndarray:
    """bool [A] (a torch mask for a tensor): the anchor lies within the image (x1 >= 0, y1 >= 0, x2 <= W, y2 <= H)."""
    h, w = as_hw(image_hw)
    a = anchors if hasattr(anchors, "shape") else np.asarray(anchors)  # NumPy or torch, any device
    return (a[:, 0] >= 0) & (a[:, 1] >= 0) & (a[:, 2] <= w) & (a[:, 3] <= h)


def overlap64(anchors: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 (intersection, IoU, anchor area) of anchors [..., 4] with boxes [..., 4], broadcast over the
    leading axes; the same elementwise ops whatever the shapes, so pair and matrix entries are bit-identical."""
    a = anchors.astype(np.float64)
    b = boxes.astype(np.float64)
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = np.maximum(b[..., 2] - b[..., 0], 0.0) * np.maximum(b[..., 3] - b[..., 1], 0.0)
    union = area_a + area_b - inter
    # Anchors have positive area, so union > 0; zero-area boxes give inter = 0 -> IoU 0.
    return inter, inter / union, area_a


def iou_matrix64(anchors: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """float64 IoU [N, K] of anchors against boxes."""
    return overlap64(anchors[:, None], boxes[None])[1]


def _iou_pairs64(anchors: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """float64 IoU [N] of anchors[i] with boxes[i] (bit-identical to the matrix entries)."""
    return overlap64(anchors, boxes)[1]


def _crowd_covered64(anchors: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """bool, broadcast like _overlap64: intersection(anchor, crowd box) >= CROWD_COVER x anchor area."""
    inter, _, area_a = overlap64(anchors, crowd)
    return inter >= CROWD_COVER * area_a


def match_reference(
    anchors: np.ndarray,
    boxes: np.ndarray,
    crowd_boxes: np.ndarray | None,
    cfg: MatchConfig,
    image_hw: int | Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force float64 matching (the rule's definition): labels int8 {1,0,-1} [A], matched int32 [A]."""
    a = np.asarray(as_numpy(anchors), dtype=np.float32)
    boxes = as_boxes(boxes, "boxes")
    crowd = as_boxes(crowd_boxes, "crowd_boxes")
    n = a.shape[0]
    valid = inside_image(a, image_hw) if cfg.ignore_cross_boundary else np.ones(n, dtype=bool)
    labels = np.zeros(n, dtype=np.int8)
    matched = np.full(n, -1, dtype=np.int32)
    if len(boxes):
        iou = iou_matrix64(a, boxes)  # [A, K]
        best_box = iou.argmax(axis=1)  # first box on ties
        best_iou = iou.max(axis=1)
        labels[best_iou >= cfg.neg_iou] = -1
        labels[best_iou >= cfg.pos_iou] = 1
        if cfg.low_quality != "none":
            # Per-box maximum over the anchors that may be labelled at all; a box no anchor
            # overlaps (maximum 0) forces nothing.
            iou_valid = np.where(valid[:, None], iou, -1.0)
            per_box = iou_valid.max(axis=0)
            if cfg.low_quality == "all":
                forced = ((iou_valid == per_box[None, :]) & (per_box[None, :] > 0)).any(axis=1)
            else:
                forced = np.zeros(n, dtype=bool)
                forced[iou_valid.argmax(axis=0)[per_box > 0]] = True  # first anchor on ties
            labels[forced] = 1
        matched[labels == 1] = best_box[labels == 1]
    if cfg.crowd_ignore and len(crowd):
        labels[_crowd_covered64(a[:, None], crowd[None]).any(axis=1) & (labels != 1)] = -1
    labels[~valid] = -1
    matched[labels != 1] = -1
    return labels, matched


@dataclass(frozen=True)
class _Groups:
    """One group per (level, cell anchor): all anchors of one shape on one grid."""

    base: np.ndarray  # first anchor index of the level
    fh: np.ndarray
    fw: np.ndarray
    ncell: np.ndarray  # anchors per location on the level
    cell: np.ndarray  # index of the cell anchor within the location
    sy: np.ndarray
    sx: np.ndarray
    oy: np.ndarray  # centre of row 0 / col 0
    ox: np.ndarray
    w: np.ndarray  # nominal anchor width / height of the group
    h: np.ndarray


def _groups(spec: AnchorSpec) -> _Groups:
    cols: dict[str, list] = {k: [] for k in _Groups.__dataclass_fields__}
    base = 0
    for level in range(spec.num_levels):
        fh, fw = spec.feature_hw(level)
        sy, sx = spec.level_strides(level)
        cells = cell_anchors(spec, level).astype(np.float64)
        for k, c in enumerate(cells):
            for key, v in (("base", base), ("fh", fh), ("fw", fw), ("ncell", len(cells)), ("cell", k),
                           ("sy", sy), ("sx", sx), ("oy", spec.offset * sy), ("ox", spec.offset * sx),
                           ("w", c[2] - c[0]), ("h", c[3] - c[1])):
                cols[key].append(v)
        base += fh * fw * len(cells)
    ints = {"base", "fh", "fw", "ncell", "cell"}
    return _Groups(**{k: np.asarray(v, dtype=np.int64 if k in ints else np.float64) for k, v in cols.items()})


def _box_geometry(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(width, height, centre x, centre y) of float64 xyxy boxes [K, 4], as the matcher's search uses them."""
    return b[:, 2] - b[:, 0], b[:, 3] - b[:, 1], (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2


def _expand_rects(g: _Groups, gi, r0, r1, c0, c1) -> tuple[np.ndarray, np.ndarray]:
    """Anchor indices of the cell rectangles [r0, r1] x [c0, c1] of groups gi, and each one's rectangle."""
    nc = c1 - c0 + 1
    counts = (r1 - r0 + 1) * nc
    owner = np.repeat(np.arange(len(gi)), counts)
    local = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    row, col = np.divmod(local, nc[owner])
    # Per rectangle: index of its first anchor, the step between rows and between columns.
    ncell = g.ncell[gi]
    start = g.base[gi] + (r0 * g.fw[gi] + c0) * ncell + g.cell[gi]
    idx = start[owner] + row * (g.fw[gi] * ncell)[owner] + col * ncell[owner]
    return idx, owner


class AnchorMatcher:
    """Fast CPU matcher for one (spec, cfg): exact IoU only for anchors near each box, same labels as match_reference."""

    def __init__(self, spec: AnchorSpec, cfg: MatchConfig | None = None) -> None:
        self.spec = spec
        self.cfg = cfg if cfg is not None else MatchConfig()
        self.anchors = make_anchors(spec)
        self.num_anchors = int(self.anchors.shape[0])
        self._g = _groups(spec)
        self._g_area = self._g.w * self._g.h
        self._g_last_col = (self._g.fw - 1).astype(np.float64)
        self._g_last_row = (self._g.fh - 1).astype(np.float64)
        self._valid = (inside_image(self.anchors, spec.image_hw) if self.cfg.ignore_cross_boundary
                       else np.ones(self.num_anchors, dtype=bool))
        self._invalid = np.flatnonzero(~self._valid)
        self._some_invalid = bool(len(self._invalid))

    def _rects(self, bw, bh, bcx, bcy, need_frac, need_area_of_anchor: bool):
        """Cell rectangles per (box, group) holding every anchor whose overlap can reach the target.

        The target is ``iw * ih >= need`` with need = need_frac * (anchor area + box area) for IoU
        (need_frac = t / (1 + t)) or need_frac * anchor area for crowd cover. Since iw <= min(wa, wb)
        and ih <= min(ha, hb), iw must be >= need / min(ha, hb), which bounds the centre distance:
        iw <= (wa + wb) / 2 - |dx|. Boxes must have positive width and height (callers pass only those).
        Returns (anchor indices, box of each), box-major.
        """
        g = self._g
        wa, ha = g.w, g.h
        bw, bh = bw[:, None], bh[:, None]
        mw, mh = np.minimum(wa, bw), np.minimum(ha, bh)
        area = self._g_area if need_area_of_anchor else self._g_area + bw * bh
        need = np.asarray(need_frac, dtype=np.float64).reshape(-1, 1) * area
        feasible = mw * mh >= need  # the upper bound on the group's overlap reaches the target
        rx = (wa + bw) / 2 - need / mh + _SEARCH_PX_SLACK  # mh, mw > 0: positive-size boxes and anchors
        ry = (ha + bh) / 2 - need / mw + _SEARCH_PX_SLACK
        # Clamp only the side that can reach into the grid: a rectangle whose other side lies beyond
        # the grid comes out empty (c0 > c1), and only non-empty ones are cast to int (no overflow).
        bcx, bcy = bcx[:, None], bcy[:, None]
        c0 = np.maximum(np.ceil((bcx - rx - g.ox) / g.sx), 0.0)
        c1 = np.minimum(np.floor((bcx + rx - g.ox) / g.sx), self._g_last_col)
        r0 = np.maximum(np.ceil((bcy - ry - g.oy) / g.sy), 0.0)
        r1 = np.minimum(np.floor((bcy + ry - g.oy) / g.sy), self._g_last_row)
        ok = feasible & (c0 <= c1) & (r0 <= r1)
        bi, gi = np.nonzero(ok)  # box-major order
        r0, r1, c0, c1 = (v[bi, gi].astype(np.int64) for v in (r0, r1, c0, c1))
        idx, owner = _expand_rects(g, gi, r0, r1, c0, c1)
        return idx, bi[owner]

    def _nearest(self, bcx, bcy) -> np.ndarray:
        """[K, G] index of the anchor of each group whose centre is nearest each box centre."""
        g = self._g
        col = np.clip(np.rint((bcx[:, None] - g.ox) / g.sx), 0, g.fw - 1).astype(np.int64)
        row = np.clip(np.rint((bcy[:, None] - g.oy) / g.sy), 0, g.fh - 1).astype(np.int64)
        return g.base + (row * g.fw + col) * g.ncell + g.cell

    def _force_search(self, boxes64: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best anchors of boxes whose best IoU is below neg_iou: (anchor indices, box of each)."""
        b = boxes64[which]
        bw, bh, bcx, bcy = _box_geometry(b)
        # A lower bound on each box's best IoU (nearest anchor of every shape) shrinks the search
        # to the anchors that can beat it; shapes whose IoU upper bound is below it drop out.
        near = self._nearest(bcx, bcy)
        near_iou = _iou_pairs64(self.anchors[near.ravel()], np.repeat(b, near.shape[1], axis=0)).reshape(near.shape)
        lower = np.where(self._valid[near], near_iou, 0.0).max(axis=1)
        t = np.maximum(lower - _SEARCH_IOU_SLACK, 0.0)
        idx, owner = self._rects(bw, bh, bcx, bcy, t / (1 + t), False)
        iou = _iou_pairs64(self.anchors[idx], b[owner])
        iou[~self._valid[idx]] = -1.0
        best = np.full(len(b), -1.0)
        np.maximum.at(best, owner, iou)
        hit = (iou == best[owner]) & (best[owner] > 0)
        idx, owner = idx[hit], owner[hit]
        if self.cfg.low_quality == "argmax":
            first = np.full(len(b), self.num_anchors, dtype=np.int64)
            np.minimum.at(first, owner, idx)
            keep = first < self.num_anchors
            return first[keep], np.flatnonzero(keep)
        return idx, owner

    def _label_boxes(self, labels: np.ndarray, b64: np.ndarray) -> None:
        """Threshold and low-quality labels from the boxes, written into ``labels``.

        Only (anchor, box) pairs whose IoU can reach neg_iou are scored (``_rects`` gives a superset
        of them, box-major), in float64 with the reference's own operations, so every IoU that can
        decide a label is bit-identical to the reference's. An anchor's best IoU is >= a threshold
        exactly when one of its pairs is, and a box whose best pair reaches neg_iou has every anchor
        at that maximum among its pairs; boxes whose best IoU stays below neg_iou go to _force_search.
        """
        cfg = self.cfg
        bw, bh, bcx, bcy = _box_geometry(b64)
        real = (bw > 0) & (bh > 0)  # zero-area boxes have IoU 0 with everything
        ri = np.flatnonzero(real)
        t = cfg.neg_iou - _SEARCH_IOU_SLACK
        idx, owner = self._rects(bw[ri], bh[ri], bcx[ri], bcy[ri], t / (1 + t), False)
        box = ri[owner]  # box-major, like owner
        if self._some_invalid:
            ok = self._valid[idx]
            idx, box = idx[ok], box[ok]
        iou = _iou_pairs64(self.anchors[idx], b64[box])
        labels[idx[iou >= cfg.neg_iou]] = -1
        labels[idx[iou >= cfg.pos_iou]] = 1
        if cfg.low_quality == "none":
            return
        per_box = np.zeros(len(b64))  # IoU >= 0, so 0 stands for "no pair"
        np.maximum.at(per_box, box, iou)
        # Boxes whose best anchor has IoU >= neg_iou: every anchor at that maximum is a pair.
        done = per_box >= cfg.neg_iou
        hit = (iou == per_box[box]) & done[box]
        if cfg.low_quality == "all":
            labels[idx[hit]] = 1
        elif hit.any():
            first = np.full(len(b64), self.num_anchors, dtype=np.int64)
            np.minimum.at(first, box[hit], idx[hit])  # first anchor on ties
            labels[first[done]] = 1
        needy = np.flatnonzero(~done & real)
        if len(needy):
            labels[self._force_search(b64, needy)[0]] = 1

    def _crowd_covered(self, crowd: np.ndarray) -> np.ndarray:
        """Indices of the anchors a crowd box covers (intersection >= CROWD_COVER x anchor area)."""
        c64 = crowd.astype(np.float64)
        cw, ch, ccx, ccy = _box_geometry(c64)
        real = (cw > 0) & (ch > 0)
        c64 = c64[real]
        # Relaxed by a hair so the rectangle is a superset; the exact test decides below.
        idx, owner = self._rects(cw[real], ch[real], ccx[real], ccy[real], CROWD_COVER * (1 - 1e-6), True)
        return idx[_crowd_covered64(self.anchors[idx], c64[owner])]

    def match(self, boxes: np.ndarray, crowd_boxes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Labels int8 [A] and matched int32 [A] for one image (same result as match_reference)."""
        boxes = as_boxes(boxes, "boxes")
        crowd = as_boxes(crowd_boxes, "crowd_boxes")
        labels = np.zeros(self.num_anchors, dtype=np.int8)
        matched = np.full(self.num_anchors, -1, dtype=np.int32)
        b64 = boxes.astype(np.float64)
        if len(boxes):
            self._label_boxes(labels, b64)
        if self.cfg.crowd_ignore and len(crowd):
            covered = self._crowd_covered(crowd)
            labels[covered[labels[covered] != 1]] = -1
        if self._some_invalid:
            labels[self._invalid] = -1
        pos = np.flatnonzero(labels == 1)
        if len(pos):
            # Each positive's own argmax over all boxes (first on ties), as the reference.
            matched[pos] = iou_matrix64(self.anchors[pos], b64).argmax(axis=1)
        return labels, matched
