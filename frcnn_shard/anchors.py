"""RPN anchors: the anchor spec and its presets, the matching rule (three implementations that must
agree), the compact on-disk encoding of per-image targets, sampling and box deltas.

Everything here works on plain arrays. Coordinates are xyxy pixels of the resized image the shards
store; anchors are float32 [A, 4] in a fixed order (see ``AnchorSpec.order``). The matching rule is
documented in docs/FORMAT.md (section "Anchors and RPN targets") and in ``match_reference``.
"""
from __future__ import annotations

import hashlib
import io
import math
import re
import zipfile
import zlib
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np

TARGETS_EXT = "rpn.npz"  # the per-sample member extension holding packed RPN targets

PRESETS: tuple[str, ...] = ("frcnn-fpn", "detectron2-fpn", "torchvision-fpn", "c4")
DEFAULT_PRESET = "frcnn-fpn"

RATIO_CONVENTIONS = ("w/h", "h/w")
ORDERS = ("level,row,col,size,ratio", "level,row,col,ratio,size")
LOW_QUALITY_MODES = ("all", "argmax", "none")

CROWD_COVER = 0.5  # an anchor is "covered" by a crowd box when intersection >= this x anchor area

# Slack used only to *enlarge* the fast matcher's candidate sets, never to decide a label: anchors
# are float32, so their widths drift by a few ULPs across the grid while the search geometry uses the
# nominal cell shape. The exact float64 IoU of every candidate decides.
_SEARCH_IOU_SLACK = 1e-5
_SEARCH_PX_SLACK = 0.05


# ----------------------------------------------------------------------------------------------
# Spec
# ----------------------------------------------------------------------------------------------


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"AnchorSpec.{name} must be an integer, got {value!r}")
    return int(value)


def _pos_float(value: Any, name: str) -> float:
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"AnchorSpec.{name} values must be finite and > 0, got {value!r}")
    return v


@dataclass(frozen=True)
class AnchorSpec:
    """Everything needed to rebuild the anchor tensor bit for bit.

    Per level l the feature map is ceil(Hp / strides[l]) x ceil(Wp / strides[l]) cells, where Hp, Wp
    are the image size padded up to a multiple of ``pad_multiple`` (1 = no padding). The stride
    used to place centres is ``strides[l]``, or ``Hp // fh`` and ``Wp // fw`` when
    ``stride_from_padding`` (torchvision). The centre of cell (row, col) is
    ((col + offset) * stride_x, (row + offset) * stride_y). Each cell holds one anchor per
    (size, ratio); ``ratio_convention`` says whether a ratio is w/h or h/w; ``round_cells`` rounds
    the zero-centred cell anchors to integers (half to even) before they are shifted.
    """

    image_hw: tuple[int, int]
    strides: tuple[int, ...]
    sizes: tuple[tuple[float, ...], ...]
    ratios: tuple[float, ...]
    ratio_convention: str = "w/h"
    offset: float = 0.5
    round_cells: bool = False
    pad_multiple: int = 1
    stride_from_padding: bool = False
    order: str = ORDERS[0]

    def __post_init__(self) -> None:
        # Normalise types so that equality, hashing and to_dict/from_dict round-trips are exact.
        hw = tuple(self.image_hw)
        if len(hw) != 2:
            raise ValueError(f"AnchorSpec.image_hw must be (H, W), got {self.image_hw!r}")
        hw = (_int(hw[0], "image_hw"), _int(hw[1], "image_hw"))
        if min(hw) <= 0:
            raise ValueError(f"AnchorSpec.image_hw must be positive, got {hw}")
        strides = tuple(_int(s, "strides") for s in self.strides)
        if not strides or min(strides) <= 0:
            raise ValueError(f"AnchorSpec.strides must be a non-empty tuple of positive ints, got {self.strides!r}")
        sizes = tuple(tuple(_pos_float(s, "sizes") for s in level) for level in self.sizes)
        if len(sizes) != len(strides) or any(len(level) == 0 for level in sizes):
            raise ValueError(
                f"AnchorSpec.sizes must give a non-empty tuple of sizes for each of the {len(strides)} "
                f"levels, got {self.sizes!r}"
            )
        ratios = tuple(_pos_float(r, "ratios") for r in self.ratios)
        if not ratios:
            raise ValueError("AnchorSpec.ratios must not be empty")
        if self.ratio_convention not in RATIO_CONVENTIONS:
            raise ValueError(f"AnchorSpec.ratio_convention must be one of {RATIO_CONVENTIONS}, got {self.ratio_convention!r}")
        offset = float(self.offset)
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"AnchorSpec.offset must be in [0, 1) (a fraction of the stride), got {self.offset!r}")
        if not isinstance(self.round_cells, bool) or not isinstance(self.stride_from_padding, bool):
            raise ValueError("AnchorSpec.round_cells and stride_from_padding must be bools")
        pad = _int(self.pad_multiple, "pad_multiple")
        if pad < 1:
            raise ValueError(f"AnchorSpec.pad_multiple must be >= 1, got {pad}")
        if self.order not in ORDERS:
            raise ValueError(f"AnchorSpec.order must be one of {ORDERS}, got {self.order!r}")
        for name, value in (("image_hw", hw), ("strides", strides), ("sizes", sizes), ("ratios", ratios),
                            ("offset", offset), ("pad_multiple", pad)):
            object.__setattr__(self, name, value)
        for level in range(len(strides)):
            sy, sx = self.level_strides(level)
            if sy < 1 or sx < 1:
                raise ValueError(f"AnchorSpec: level {level} has a derived stride below 1")
            if np.any(_cell_anchors(self, level)[:, 2:] <= 0):
                raise ValueError(f"AnchorSpec: level {level} has a cell anchor of zero width or height (round_cells?)")

    @property
    def num_levels(self) -> int:
        """Number of feature levels."""
        return len(self.strides)

    def padded_hw(self) -> tuple[int, int]:
        """Image size after padding up to a multiple of ``pad_multiple``."""
        p = self.pad_multiple
        return (-(-self.image_hw[0] // p) * p, -(-self.image_hw[1] // p) * p)

    def feature_hw(self, level: int) -> tuple[int, int]:
        """Feature-map size (rows, cols) of one level: ceil(padded size / nominal stride)."""
        hp, wp = self.padded_hw()
        s = self.strides[level]
        return (-(-hp // s), -(-wp // s))

    def level_strides(self, level: int) -> tuple[int, int]:
        """Stride (y, x) used to place centres on one level."""
        if not self.stride_from_padding:
            return (self.strides[level], self.strides[level])
        hp, wp = self.padded_hw()
        fh, fw = self.feature_hw(level)
        return (hp // fh, wp // fw)

    def cells_per_location(self, level: int) -> int:
        """Anchors per feature-map cell on one level."""
        return len(self.sizes[level]) * len(self.ratios)

    def num_anchors(self) -> int:
        """Total anchor count A."""
        return sum(int(np.prod(self.feature_hw(l))) * self.cells_per_location(l) for l in range(self.num_levels))

    def to_dict(self) -> dict:
        """JSON-able dict; ``AnchorSpec.from_dict(spec.to_dict()) == spec``."""
        return {
            "image_hw": list(self.image_hw),
            "strides": list(self.strides),
            "sizes": [list(level) for level in self.sizes],
            "ratios": list(self.ratios),
            "ratio_convention": self.ratio_convention,
            "offset": self.offset,
            "round_cells": self.round_cells,
            "pad_multiple": self.pad_multiple,
            "stride_from_padding": self.stride_from_padding,
            "order": self.order,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AnchorSpec":
        """Inverse of ``to_dict``; every field is required and unknown keys are refused."""
        _check_keys(d, {f.name for f in fields(cls)}, "AnchorSpec")
        return cls(**{k: d[k] for k in d})


def _check_keys(d: Mapping[str, Any], expected: set[str], what: str) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{what}: expected a dict, got {type(d).__name__}")
    missing, unknown = expected - set(d), set(d) - expected
    if missing or unknown:
        raise ValueError(f"{what}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")


def _cell_shapes(spec: AnchorSpec, level: int) -> list[tuple[float, float, float, float]]:
    """(size, ratio, w, h) per cell anchor of a level, in the spec's within-cell order (float64)."""
    pairs = [(s, r) for s in spec.sizes[level] for r in spec.ratios]
    if spec.order == "level,row,col,ratio,size":
        pairs = [(s, r) for r in spec.ratios for s in spec.sizes[level]]
    out = []
    for s, r in pairs:
        if spec.ratio_convention == "w/h":
            w, h = s * math.sqrt(r), s / math.sqrt(r)
        else:  # h/w, with detectron2's algebra: w*h = s*s and h = r*w
            w = math.sqrt(s * s / r)
            h = r * w
        out.append((s, r, w, h))
    return out


def _cell_anchors(spec: AnchorSpec, level: int) -> np.ndarray:
    """Zero-centred cell anchors of a level as float32 [n, 4] xyxy (rounded when asked)."""
    cells = np.array([[-w / 2, -h / 2, w / 2, h / 2] for _, _, w, h in _cell_shapes(spec, level)], dtype=np.float64)
    if spec.round_cells:
        cells = np.round(cells)  # half to even, as torch.round
    return cells.astype(np.float32)


def make_anchors(spec: AnchorSpec) -> np.ndarray:
    """All anchors of a spec as float32 [A, 4] xyxy, ordered level, row, col, then within-cell order."""
    out = []
    for level in range(spec.num_levels):
        fh, fw = spec.feature_hw(level)
        sy, sx = spec.level_strides(level)
        # Centres are exact in float32 (integers or halves); the sum with the float32 cell anchor
        # is done in float32, exactly as torchvision and detectron2 do it.
        cx = ((np.arange(fw, dtype=np.float64) + spec.offset) * sx).astype(np.float32)
        cy = ((np.arange(fh, dtype=np.float64) + spec.offset) * sy).astype(np.float32)
        shifts = np.zeros((fh, fw, 1, 4), dtype=np.float32)
        shifts[..., 0] = shifts[..., 2] = cx[None, :, None]
        shifts[..., 1] = shifts[..., 3] = cy[:, None, None]
        out.append((shifts + _cell_anchors(spec, level)[None, None]).reshape(-1, 4))
    return np.ascontiguousarray(np.concatenate(out, axis=0), dtype=np.float32)


def anchors_sha256(anchors: Any) -> str:
    """sha256 hex of the anchors as C-contiguous little-endian float32 bytes."""
    arr = np.ascontiguousarray(_to_numpy(anchors), dtype="<f4")
    return hashlib.sha256(arr.tobytes()).hexdigest()


def _as_hw(image_hw: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_hw, (int, np.integer)):
        return (int(image_hw), int(image_hw))
    return (int(image_hw[0]), int(image_hw[1]))


def _as_levels(sizes: Sequence, num_levels: int) -> tuple[tuple[float, ...], ...]:
    # A flat tuple means one size per level (torchvision's short form), or all sizes of the single
    # level of a one-level spec.
    if all(not isinstance(s, (list, tuple)) for s in sizes):
        return (tuple(sizes),) if num_levels == 1 else tuple((s,) for s in sizes)
    return tuple(tuple(level) for level in sizes)


def preset_spec(
    name: str,
    image_hw: int | Sequence[int],
    *,
    sizes: Sequence | None = None,
    ratios: Sequence[float] | None = None,
    strides: Sequence[int] | None = None,
) -> AnchorSpec:
    """The AnchorSpec of a named preset (see PRESETS) for an image size; given values override the preset's."""
    hw = _as_hw(image_hw)
    fpn_strides = (4, 8, 16, 32, 64)
    fpn_sizes = ((32.0,), (64.0,), (128.0,), (256.0,), (512.0,))
    base = {"ratios": (0.5, 1.0, 2.0)}
    if name == "frcnn-fpn":
        base.update(strides=fpn_strides, sizes=fpn_sizes)
    elif name == "detectron2-fpn":
        # Base-RCNN-FPN: P2..P6 with nominal strides, ANCHOR_GENERATOR.OFFSET = 0.0, ratio = h/w,
        # cell anchors not rounded; the batch is padded to a multiple of 32 (FPN size_divisibility).
        base.update(strides=fpn_strides, sizes=fpn_sizes, ratio_convention="h/w", offset=0.0, pad_multiple=32)
    elif name == "torchvision-fpn":
        # fasterrcnn_resnet50_fpn: ratio = h/w, cell anchors rounded, offset 0, batch padded to a
        # multiple of 32 (size_divisible) and strides = padded size // feature size (P6: 416 // 7 = 59).
        base.update(strides=fpn_strides, sizes=fpn_sizes, ratio_convention="h/w", offset=0.0,
                    round_cells=True, pad_multiple=32, stride_from_padding=True)
    elif name == "c4":
        # The paper's single conv feature map (stride 16), 3 sizes x 3 ratios per cell, with our
        # conventions: ratio = w/h, centres at half-stride, order row, col, size, ratio.
        base.update(strides=(16,), sizes=((128.0, 256.0, 512.0),))
    else:
        raise ValueError(f"unknown anchor preset {name!r}; known presets: {', '.join(PRESETS)}")
    if strides is not None:
        base["strides"] = tuple(strides)
        if sizes is None and len(base["strides"]) != len(base["sizes"]):
            raise ValueError(
                f"preset {name!r}: {len(base['strides'])} strides given but the preset has "
                f"{len(base['sizes'])} levels of sizes; pass sizes too"
            )
    if sizes is not None:
        base["sizes"] = _as_levels(sizes, len(base["strides"]))
    if ratios is not None:
        base["ratios"] = tuple(ratios)
    return AnchorSpec(image_hw=hw, **base)


# ----------------------------------------------------------------------------------------------
# Manifest section and model check
# ----------------------------------------------------------------------------------------------


def anchors_manifest_section(preset_name: str | None, spec: AnchorSpec, match_cfg: "MatchConfig") -> dict:
    """The manifest's "anchors" section describing the anchors and the matching rule used."""
    anchors = make_anchors(spec)
    return {
        "preset": preset_name,
        "spec": spec.to_dict(),
        "count": int(anchors.shape[0]),
        "sha256": anchors_sha256(anchors),
        "matching": match_cfg.to_dict(),
        "member": TARGETS_EXT,
    }


def _anchors_section(manifest: Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(manifest, Mapping):
        raise ValueError(f"expected a manifest dict, got {type(manifest).__name__}")
    section = manifest.get("anchors", manifest) if "spec" not in manifest else manifest
    if not isinstance(section, Mapping) or "spec" not in section:
        raise ValueError("manifest has no 'anchors' section with a 'spec'")
    return section


def anchors_from_manifest(manifest: Mapping[str, Any]) -> np.ndarray:
    """Rebuild the anchors from a manifest (or its "anchors" section), checking count and sha256."""
    section = _anchors_section(manifest)
    spec = AnchorSpec.from_dict(section["spec"])
    anchors = make_anchors(spec)
    if "count" in section and int(section["count"]) != anchors.shape[0]:
        raise ValueError(
            f"anchors: manifest count {section['count']} != {anchors.shape[0]} anchors rebuilt from its spec"
        )
    digest = anchors_sha256(anchors)
    if "sha256" in section and section["sha256"] != digest:
        raise ValueError(
            f"anchors: manifest sha256 {section['sha256']} != {digest} of the anchors rebuilt from its spec "
            "(different anchor code or float behaviour)"
        )
    return anchors


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "tensor") and not isinstance(x, np.ndarray):  # detectron2 Boxes
        x = x.tensor
    if hasattr(x, "detach"):  # torch tensor, any device
        x = x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)) and x and not np.isscalar(x[0]) and np.ndim(_to_numpy(x[0])) == 2:
        return np.concatenate([_to_numpy(p) for p in x], axis=0)  # per-level list
    return np.asarray(x)


def locate_anchor(spec: AnchorSpec, index: int) -> dict:
    """Where anchor ``index`` sits: level, row, col, size, ratio."""
    start = 0
    for level in range(spec.num_levels):
        fh, fw = spec.feature_hw(level)
        n = spec.cells_per_location(level)
        count = fh * fw * n
        if index < start + count:
            loc, cell = divmod(index - start, n)
            row, col = divmod(loc, fw)
            size, ratio, _, _ = _cell_shapes(spec, level)[cell]
            return {"level": level, "row": row, "col": col, "size": size, "ratio": ratio}
        start += count
    raise ValueError(f"anchor index {index} out of range (A = {start})")


def check_anchors(model_anchors: Any, manifest_or_spec: Any, atol: float = 1e-4) -> None:
    """Assert a model's anchors equal the shards' anchors (AssertionError names the first bad index)."""
    if isinstance(manifest_or_spec, AnchorSpec):
        spec = manifest_or_spec
        expected = make_anchors(spec)
    elif isinstance(manifest_or_spec, Mapping) and "strides" in manifest_or_spec:
        spec = AnchorSpec.from_dict(manifest_or_spec)
        expected = make_anchors(spec)
    else:
        expected = anchors_from_manifest(manifest_or_spec)
        spec = AnchorSpec.from_dict(_anchors_section(manifest_or_spec)["spec"])
    got = _to_numpy(model_anchors).astype(np.float64)
    if got.ndim != 2 or got.shape[1] != 4:
        raise ValueError(f"model anchors must be [A, 4], got shape {tuple(got.shape)}")
    if got.shape[0] != expected.shape[0]:
        raise ValueError(
            f"model has {got.shape[0]} anchors but the shards have {expected.shape[0]} "
            f"(spec: {spec.to_dict()})"
        )
    bad = ~(np.abs(got - expected) <= atol).all(axis=1)  # NaN counts as a mismatch
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AssertionError(
            f"anchor {i} differs ({int(bad.sum())} of {len(bad)} differ beyond atol={atol}): "
            f"model {got[i].tolist()} vs shards {expected[i].astype(np.float64).tolist()} at {locate_anchor(spec, i)}"
        )


# ----------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatchConfig:
    """The RPN matching rule's parameters (see match_reference and docs/FORMAT.md)."""

    pos_iou: float = 0.7
    neg_iou: float = 0.3
    low_quality: str = "all"
    crowd_ignore: bool = False
    ignore_cross_boundary: bool = False

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
        return {
            "pos_iou": self.pos_iou,
            "neg_iou": self.neg_iou,
            "low_quality": self.low_quality,
            "crowd_ignore": self.crowd_ignore,
            "ignore_cross_boundary": self.ignore_cross_boundary,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MatchConfig":
        """Inverse of ``to_dict``; every field is required and unknown keys are refused."""
        _check_keys(d, {f.name for f in fields(cls)}, "MatchConfig")
        return cls(**{k: d[k] for k in d})


def _as_boxes(boxes: Any, name: str) -> np.ndarray:
    if boxes is None:
        return np.zeros((0, 4), dtype=np.float32)
    b = np.asarray(_to_numpy(boxes), dtype=np.float32)
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
    """bool [A]: the anchor lies within the image (x1 >= 0, y1 >= 0, x2 <= W, y2 <= H)."""
    h, w = _as_hw(image_hw)
    a = np.asarray(anchors)
    return (a[:, 0] >= 0) & (a[:, 1] >= 0) & (a[:, 2] <= w) & (a[:, 3] <= h)


def _overlap64(anchors: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _iou_matrix64(anchors: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """float64 IoU [N, K] of anchors against boxes."""
    return _overlap64(anchors[:, None], boxes[None])[1]


def _iou_pairs64(anchors: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """float64 IoU [N] of anchors[i] with boxes[i] (bit-identical to the matrix entries)."""
    return _overlap64(anchors, boxes)[1]


def _crowd_covered64(anchors: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """bool, broadcast like _overlap64: intersection(anchor, crowd box) >= CROWD_COVER x anchor area."""
    inter, _, area_a = _overlap64(anchors, crowd)
    return inter >= CROWD_COVER * area_a


def match_reference(
    anchors: np.ndarray,
    boxes: np.ndarray,
    crowd_boxes: np.ndarray | None,
    cfg: MatchConfig,
    image_hw: int | Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force float64 matching (the rule's definition): labels int8 {1,0,-1} [A], matched int32 [A]."""
    a = np.asarray(_to_numpy(anchors), dtype=np.float32)
    boxes = _as_boxes(boxes, "boxes")
    crowd = _as_boxes(crowd_boxes, "crowd_boxes")
    n = a.shape[0]
    valid = inside_image(a, image_hw) if cfg.ignore_cross_boundary else np.ones(n, dtype=bool)
    labels = np.zeros(n, dtype=np.int8)
    matched = np.full(n, -1, dtype=np.int32)
    if len(boxes):
        iou = _iou_matrix64(a, boxes)  # [A, K]
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
        cells = _cell_anchors(spec, level).astype(np.float64)
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

    def match(self, boxes: np.ndarray, crowd_boxes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Labels int8 [A] and matched int32 [A] for one image (same result as match_reference).

        Only (anchor, box) pairs whose IoU can reach neg_iou are scored (``_rects`` gives a superset
        of them, box-major), in float64 with the reference's own operations, so every IoU that can
        decide a label is bit-identical to the reference's. An anchor's best IoU is >= a threshold
        exactly when one of its pairs is, and a box whose best pair reaches neg_iou has every anchor
        at that maximum among its pairs; boxes whose best IoU stays below neg_iou go to _force_search.
        """
        cfg = self.cfg
        boxes = _as_boxes(boxes, "boxes")
        crowd = _as_boxes(crowd_boxes, "crowd_boxes")
        n = self.num_anchors
        labels = np.zeros(n, dtype=np.int8)
        matched = np.full(n, -1, dtype=np.int32)
        b64 = None
        if len(boxes):
            b64 = boxes.astype(np.float64)
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
            if cfg.low_quality != "none":
                per_box = np.zeros(len(boxes))  # IoU >= 0, so 0 stands for "no pair"
                np.maximum.at(per_box, box, iou)
                # Boxes whose best anchor has IoU >= neg_iou: every anchor at that maximum is a pair.
                done = per_box >= cfg.neg_iou
                hit = (iou == per_box[box]) & done[box]
                if cfg.low_quality == "all":
                    labels[idx[hit]] = 1
                elif hit.any():
                    first = np.full(len(boxes), n, dtype=np.int64)
                    np.minimum.at(first, box[hit], idx[hit])  # first anchor on ties
                    labels[first[done]] = 1
                needy = np.flatnonzero(~done & real)
                if len(needy):
                    labels[self._force_search(b64, needy)[0]] = 1
        if cfg.crowd_ignore and len(crowd):
            c64 = crowd.astype(np.float64)
            cw, ch, ccx, ccy = _box_geometry(c64)
            real = (cw > 0) & (ch > 0)
            c64 = c64[real]
            # Relaxed by a hair so the rectangle is a superset; the exact test decides below.
            idx, owner = self._rects(cw[real], ch[real], ccx[real], ccy[real], CROWD_COVER * (1 - 1e-6), True)
            covered = idx[_crowd_covered64(self.anchors[idx], c64[owner])]
            covered = covered[labels[covered] != 1]
            labels[covered] = -1
        if self._some_invalid:
            labels[self._invalid] = -1
        if b64 is not None:
            pos = np.flatnonzero(labels == 1)
            if len(pos):
                # Each positive's own argmax over all boxes (first on ties), as the reference.
                matched[pos] = _iou_matrix64(self.anchors[pos], b64).argmax(axis=1)
        return labels, matched


@lru_cache(maxsize=8)
def _cached_matcher(spec: AnchorSpec, cfg: MatchConfig) -> AnchorMatcher:
    return AnchorMatcher(spec, cfg)


def match_fast(
    spec: AnchorSpec, boxes: np.ndarray, crowd_boxes: np.ndarray | None, cfg: MatchConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Fast CPU matching for make_anchors(spec) (a cached AnchorMatcher); same result as match_reference."""
    return _cached_matcher(spec, cfg).match(boxes, crowd_boxes)


def _pad_batch(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    k = max((len(a) for a in arrays), default=0)
    out = np.zeros((len(arrays), k, 4), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out, np.array([len(a) for a in arrays], dtype=np.float32)


_TIE_EPS = 1e-5  # float32 IoU is off by < 1e-6; anything this close to a threshold or tie is re-decided in float64


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


_DEVICE_ANCHORS: dict = {}  # (sha256, device) -> anchors already on that device


def _anchors_on(anchors: Any, dev):
    """The anchors as a float32 tensor on ``dev``; host arrays are copied once per device, then cached."""
    import torch

    if isinstance(anchors, torch.Tensor) and anchors.device == dev and anchors.dtype == torch.float32:
        return anchors
    host = np.ascontiguousarray(_to_numpy(anchors), dtype=np.float32)
    key = (anchors_sha256(host), str(dev))
    if key not in _DEVICE_ANCHORS:
        if len(_DEVICE_ANCHORS) >= 4:
            _DEVICE_ANCHORS.pop(next(iter(_DEVICE_ANCHORS)))
        _DEVICE_ANCHORS[key] = torch.from_numpy(host.copy()).to(dev)
    return _DEVICE_ANCHORS[key]


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

    One host->device copy (boxes, crowd boxes and counts packed in one tensor) and one
    device->host copy (labels and matches packed in one int32 code) per batch; anchors given as a
    host array are copied to the device once and cached (by sha256). With ``refine64`` (default)
    the few anchors whose float32 IoU is within 1e-5 of a threshold or of a tie are re-decided in
    float64, so the result equals match_reference exactly; without it the result is pure float32.
    ``stats``, when given, receives counts of the re-decided anchors.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("match_batch_torch: device 'cuda' requested but CUDA is not available")
    anc = _anchors_on(anchors, dev)
    n = int(anc.shape[0])
    bsz = len(boxes_list)
    if bsz == 0:
        return []
    crowd_list = list(crowd_list) if crowd_list is not None else [None] * bsz
    if len(crowd_list) != bsz:
        raise ValueError(f"match_batch_torch: {bsz} box arrays but {len(crowd_list)} crowd arrays")
    bpad, bcount = _pad_batch([_as_boxes(b, "boxes") for b in boxes_list])
    cpad, ccount = _pad_batch([_as_boxes(c, "crowd_boxes") if cfg.crowd_ignore else np.zeros((0, 4), np.float32)
                               for c in crowd_list])
    kmax, cmax = bpad.shape[1], cpad.shape[1]
    host = np.zeros((bsz, 1 + kmax + cmax, 4), dtype=np.float32)
    host[:, 0, 0], host[:, 0, 1] = bcount, ccount  # counts < 2**24 are exact in float32
    host[:, 1 : 1 + kmax] = bpad
    host[:, 1 + kmax :] = cpad
    packed = torch.from_numpy(host).to(dev, non_blocking=True)  # the one host->device copy
    counts = packed[:, 0, :2].long()
    boxes = packed[:, 1 : 1 + kmax]
    crowd = packed[:, 1 + kmax :]
    bvalid = torch.arange(kmax, device=dev)[None, :] < counts[:, :1]  # [B, K]
    cvalid = torch.arange(cmax, device=dev)[None, :] < counts[:, 1:2]
    h, w = _as_hw(image_hw)
    if cfg.ignore_cross_boundary:
        avalid = (anc[:, 0] >= 0) & (anc[:, 1] >= 0) & (anc[:, 2] <= w) & (anc[:, 3] <= h)
    else:
        avalid = torch.ones(n, dtype=torch.bool, device=dev)
    width = max(kmax, cmax, 1)
    if chunk_anchors is None:
        # Bound the [B, chunk, K] temporaries at ~2**22 elements whatever the box count.
        chunk_anchors = (1 << 22) // (bsz * width)
    chunk_anchors = max(1, int(chunk_anchors))
    eps = _TIE_EPS
    force = kmax > 0 and cfg.low_quality != "none"

    # Codes: >= 0 positive (matched box), -1 negative, -2 ignore.
    code = torch.empty((bsz, n), dtype=torch.int32, device=dev)
    argmax_all = torch.zeros((bsz, n), dtype=torch.int32, device=dev)
    crowd_hit = torch.zeros((bsz, n), dtype=torch.bool, device=dev)
    unsure = torch.zeros((bsz, n), dtype=torch.bool, device=dev)  # to re-decide in float64
    best = torch.full((bsz, kmax), -1.0, device=dev)
    best_idx = torch.zeros((bsz, kmax), dtype=torch.long, device=dev)
    for a0 in range(0, n, chunk_anchors):
        a = anc[a0 : a0 + chunk_anchors]
        sl = slice(a0, a0 + a.shape[0])
        if kmax:
            iou, _, _ = _iou_torch(a, boxes, bvalid)
            maxv, arg = iou.max(dim=2)  # first box on ties
            if refine64:
                second = iou.scatter(2, arg[..., None], -1.0).max(dim=2).values
                unsure[:, sl] |= ((maxv - cfg.pos_iou).abs() <= eps) | ((maxv - cfg.neg_iou).abs() <= eps)
                unsure[:, sl] |= (maxv >= cfg.pos_iou - eps) & (second >= maxv - eps)  # argmax tie
        else:
            maxv = torch.full((bsz, a.shape[0]), -1.0, device=dev)
            arg = torch.zeros((bsz, a.shape[0]), dtype=torch.long, device=dev)
        c = torch.where(maxv >= cfg.pos_iou, arg.int(), torch.where(maxv < cfg.neg_iou, -1, -2).int())
        code[:, sl] = c
        argmax_all[:, sl] = arg.int()
        if force:
            per_box, idx = iou.masked_fill(~avalid[sl][None, :, None], -1.0).max(dim=1)  # first anchor on ties
            better = per_box > best
            best = torch.where(better, per_box, best)
            best_idx = torch.where(better, idx + a0, best_idx)
        if cmax:
            _, inter, area_a = _iou_torch(a, crowd, cvalid)
            half = CROWD_COVER * area_a
            crowd_hit[:, sl] = ((inter >= half) & cvalid[:, None, :]).any(dim=2)
            if refine64:
                unsure[:, sl] |= (((inter - half).abs() <= eps * half) & cvalid[:, None, :]).any(dim=2)

    near_pairs = []  # (image, anchor, box) whose IoU is within eps of the box's maximum
    if force and (refine64 or cfg.low_quality == "all"):
        ok = (best > 0) & bvalid
        for a0 in range(0, n, chunk_anchors):  # second pass: anchors (nearly) tying a box's maximum
            a = anc[a0 : a0 + chunk_anchors]
            sl = slice(a0, a0 + a.shape[0])
            iou = _iou_torch(a, boxes, bvalid)[0].masked_fill(~avalid[sl][None, :, None], -1.0)
            if refine64:
                near = (iou >= best[:, None, :] * (1 - eps)) & ok[:, None, :]
                bi, ai, ji = near.nonzero(as_tuple=True)
                near_pairs.append(torch.stack([bi, ai + a0, ji]))
            else:
                hit = ((iou == best[:, None, :]) & ok[:, None, :]).any(dim=2)
                code[:, sl] = torch.where(hit, argmax_all[:, sl], code[:, sl])
    if force and not refine64 and cfg.low_quality == "argmax":
        ok = (best > 0) & bvalid
        rows = torch.arange(bsz, device=dev)[:, None].expand_as(best_idx)[ok]
        code[rows, best_idx[ok]] = argmax_all[rows, best_idx[ok]]

    if refine64:
        pairs = torch.cat(near_pairs, dim=1) if near_pairs else torch.zeros((3, 0), dtype=torch.long, device=dev)
        unsure[pairs[0], pairs[1]] = True
        ub, ua = unsure.nonzero(as_tuple=True)
        step = max(1, (1 << 22) // width)
        for s0 in range(0, len(ub), step):  # re-decide unsure anchors exactly, in float64
            b_, a_ = ub[s0 : s0 + step], ua[s0 : s0 + step]
            a64 = anc[a_].double()
            if kmax:
                iou, _, _ = _rows_torch(a64, boxes[b_].double(), bvalid[b_])
                maxv, arg = iou.max(dim=1)
            else:
                maxv = torch.full((len(a_),), -1.0, dtype=torch.float64, device=dev)
                arg = torch.zeros(len(a_), dtype=torch.long, device=dev)
            code[b_, a_] = torch.where(maxv >= cfg.pos_iou, arg.int(), torch.where(maxv < cfg.neg_iou, -1, -2).int())
            argmax_all[b_, a_] = arg.int()
            if cmax:
                _, inter, area_a = _rows_torch(a64, crowd[b_].double(), cvalid[b_])
                crowd_hit[b_, a_] = ((inter >= CROWD_COVER * area_a) & cvalid[b_]).any(dim=1)
        if pairs.shape[1]:
            pb, pa, pj = pairs
            a64 = anc[pa].double()
            iou = _overlap_torch(a64, boxes[pb, pj].double(), bvalid[pb, pj])[0]  # pairwise
            key = pb * kmax + pj
            exact = torch.full((bsz * kmax,), -1.0, dtype=torch.float64, device=dev)
            exact = exact.scatter_reduce(0, key, iou, reduce="amax")
            hit = (iou == exact[key]) & (exact[key] > 0)
            pb, pa, key = pb[hit], pa[hit], key[hit]
            if cfg.low_quality == "argmax":  # first anchor among the exact ties
                first = torch.full((bsz * kmax,), n, dtype=torch.long, device=dev).scatter_reduce(0, key, pa, reduce="amin")
                keys = torch.unique(key)
                pb, pa = keys // kmax, first[keys]
            code[pb, pa] = argmax_all[pb, pa]
        if stats is not None:
            stats["refined_anchors"] = stats.get("refined_anchors", 0) + int(len(ub))
            stats["near_best_pairs"] = stats.get("near_best_pairs", 0) + int(pairs.shape[1])

    code = torch.where(crowd_hit & (code < 0), -2, code)
    code = torch.where(avalid[None, :], code, -2)
    out = code.cpu().numpy()  # the one device->host copy
    results = []
    for row in out:
        labels = np.where(row >= 0, 1, np.where(row == -1, 0, -1)).astype(np.int8)
        matched = np.where(row >= 0, row, -1).astype(np.int32)
        results.append((labels, matched))
    return results


# ----------------------------------------------------------------------------------------------
# Packed targets
# ----------------------------------------------------------------------------------------------


def _index_dtype(upper: int) -> np.dtype:
    """Smallest unsigned dtype holding values 0..upper."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if upper <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _delta_encode(sorted_idx: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # First value absolute, then gaps: runs of neighbouring anchors become runs of small numbers.
    return np.diff(sorted_idx, prepend=0).astype(dtype)


def _byte_planes(values: np.ndarray) -> np.ndarray:
    # Little-endian bytes split into planes (all low bytes, then the next byte...): the high
    # planes of small gaps are long zero runs that deflate to almost nothing.
    le = values.astype(values.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(le.view(np.uint8).reshape(-1, values.dtype.itemsize).T).reshape(-1)


def _from_byte_planes(planes: np.ndarray, dtype: np.dtype, count: int) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    if planes.size != count * size:
        raise ValueError(f"packed targets: {planes.size} bytes cannot hold {count} values of {size} bytes")
    return np.ascontiguousarray(planes.reshape(size, count).T).view(np.dtype(dtype).newbyteorder("<")).reshape(-1)


_PACK_HEADER = 4  # uint32 values: num_anchors, num_pos, num_ignore, max_box_index + 1
_NPZ_MEMBER = "t.npy"  # the one array of the npz, named "t"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so equal targets give byte-identical members
_NPY_HEADER_RE = re.compile(rb"\{'descr': '\|u1', 'fortran_order': False, 'shape': \((\d+),\), \} *\n")


def _npy_uint8(body: np.ndarray) -> bytes:
    """A .npy (format 1.0) of a 1-D uint8 array, header padded to 64 bytes as NumPy writes it."""
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (%d,), }" % body.size
    pad = 64 - (10 + len(header) + 1) % 64
    header_bytes = (header + " " * (pad % 64) + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(header_bytes).to_bytes(2, "little") + header_bytes + body.tobytes()


def _write_npz(body: np.ndarray) -> bytes:
    """An npz holding the one array 't' (deflated), readable by np.load; written directly for speed."""
    buf = io.BytesIO()
    info = zipfile.ZipInfo(_NPZ_MEMBER, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(info, _npy_uint8(body))
    return buf.getvalue()


def _read_npz(data: bytes) -> np.ndarray:
    """The array 't' of a pack_targets npz; anything else (other members, dtypes, pickles) is refused.

    Parses the one .npy header against the exact uint8 form instead of np.load's generic (and
    slower) path; a pickle can never be loaded because only raw uint8 bytes are accepted.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        if names != [_NPZ_MEMBER]:
            raise ValueError(f"expected exactly one array 't', found {[n.removesuffix('.npy') for n in names]}")
        raw = zf.read(_NPZ_MEMBER)
    if raw[:6] != b"\x93NUMPY" or raw[6:8] not in (b"\x01\x00", b"\x02\x00", b"\x03\x00"):
        raise ValueError("member 't' is not a .npy array")
    hlen_size = 2 if raw[6] == 1 else 4
    hlen = int.from_bytes(raw[8:8 + hlen_size], "little")
    start = 8 + hlen_size + hlen
    m = _NPY_HEADER_RE.fullmatch(raw[8 + hlen_size:start])
    if m is None:
        raise ValueError(f"'t' must be a 1-D uint8 array (object arrays and pickles are never loaded), "
                         f"header {raw[8 + hlen_size:start][:80]!r}")
    count = int(m.group(1))
    if len(raw) - start != count:
        raise ValueError(f"'t' declares {count} bytes but holds {len(raw) - start}")
    return np.frombuffer(raw, dtype=np.uint8, offset=start)


def pack_targets(labels: np.ndarray, matched: np.ndarray) -> bytes:
    """Encode one image's RPN targets compactly (npz, see docs/FORMAT.md); negatives are implicit."""
    labels = np.asarray(labels)
    matched = np.asarray(matched)
    if labels.ndim != 1 or matched.shape != labels.shape:
        raise ValueError(f"labels and matched must be 1-D and the same length, got {labels.shape} and {matched.shape}")
    if labels.size and (labels.min() < -1 or labels.max() > 1):
        raise ValueError("labels must be in {1, 0, -1}")
    n = labels.shape[0]
    pos = np.flatnonzero(labels == 1)
    ign = np.flatnonzero(labels == -1)
    box = matched[pos].astype(np.int64)
    if len(box) and box.min() < 0:
        raise ValueError("every positive anchor needs a matched box index >= 0")
    nbox = int(box.max()) + 1 if len(box) else 0
    if n > np.iinfo(np.uint32).max:
        raise ValueError("packed targets support at most 2**32 - 1 anchors")
    idt, bdt = _index_dtype(max(n - 1, 0)), _index_dtype(max(nbox - 1, 0))
    head = np.array([n, len(pos), len(ign), nbox], dtype="<u4")
    body = np.concatenate([
        head.view(np.uint8),
        _byte_planes(_delta_encode(pos, idt)),
        _byte_planes(_delta_encode(ign, idt)),
        _byte_planes(box.astype(bdt)),
    ])
    return _write_npz(body)


def unpack_sparse(data: bytes, num_anchors: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode ``pack_targets`` output sparsely: (positive indices, ignored indices, matched box per positive), validated."""
    try:
        body = _read_npz(data)
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"packed targets: not a readable npz without pickles ({e})") from e
    except ValueError as e:
        raise ValueError(f"packed targets: {e}") from e
    if body.size < 4 * _PACK_HEADER:
        raise ValueError(f"packed targets: 't' must be 1-D uint8 with a header, got {body.size} bytes")
    n, npos, nign, nbox = (int(v) for v in body[: 4 * _PACK_HEADER].view("<u4"))
    if n != num_anchors:
        raise ValueError(f"packed targets were made for {n} anchors, expected {num_anchors}")
    idt, bdt = _index_dtype(max(n - 1, 0)), _index_dtype(max(nbox - 1, 0))
    off = 4 * _PACK_HEADER
    sizes = (npos * idt.itemsize, nign * idt.itemsize, npos * bdt.itemsize)
    if off + sum(sizes) != body.size:
        raise ValueError(
            f"packed targets: header says {npos} positives, {nign} ignored ({off + sum(sizes)} bytes) "
            f"but the body has {body.size} bytes"
        )
    parts = []
    for count, dt, size in ((npos, idt, sizes[0]), (nign, idt, sizes[1]), (npos, bdt, sizes[2])):
        parts.append(_from_byte_planes(body[off : off + size], dt, count).astype(np.int64))
        off += size
    pos, ign = np.cumsum(parts[0]), np.cumsum(parts[1])
    box = parts[2]
    for name, idx in (("positive", pos), ("ignored", ign)):
        if len(idx) and (idx[-1] >= n or (len(idx) > 1 and (np.diff(idx) <= 0).any()) or (idx[0] < 0)):
            raise ValueError(f"packed targets: {name} indices must be strictly increasing and < {n}")
    if len(pos) and len(ign):
        # Both are sorted: each positive's insertion point in the ignored list tells whether it is there.
        at = np.minimum(np.searchsorted(ign, pos), len(ign) - 1)
        if (ign[at] == pos).any():
            raise ValueError("packed targets: an anchor is both positive and ignored")
    if len(box) and int(box.max()) + 1 != nbox:
        raise ValueError(f"packed targets: matched box indices disagree with the header (max + 1 != {nbox})")
    return pos, ign, box


def dense_labels(num_anchors: int, pos: np.ndarray, ign: np.ndarray) -> np.ndarray:
    """int8 [A] labels from the sparse form: 1 at pos, -1 at ign, 0 elsewhere."""
    labels = np.zeros(num_anchors, dtype=np.int8)
    labels[ign] = -1
    labels[pos] = 1
    return labels


def unpack_targets(data: bytes, num_anchors: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``pack_targets`` output: labels int8 [A] and matched int32 [A] (-1 where not positive)."""
    pos, ign, box = unpack_sparse(data, num_anchors)
    matched = np.full(num_anchors, -1, dtype=np.int32)
    matched[pos] = box
    return dense_labels(num_anchors, pos, ign), matched


# ----------------------------------------------------------------------------------------------
# Sampling and deltas
# ----------------------------------------------------------------------------------------------


def _draw(labels: np.ndarray, value: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Up to k distinct indices i with labels[i] == value, a uniform random subset (all when fewer)."""
    count = int(np.count_nonzero(labels == value))
    if count <= k:
        return np.flatnonzero(labels == value)
    if 2 * count >= labels.size and 4 * k <= count:
        # The bulk value (negatives): draw positions and reject the others instead of listing all
        # ~40k indices. The first k distinct hits of an i.i.d. uniform stream are a uniform k-subset.
        got = np.empty(0, dtype=np.int64)
        for _ in range(8):
            cand = rng.integers(0, labels.size, size=2 * (k - len(got)) + 16)
            cand = np.concatenate([got, cand[labels[cand] == value]])
            _, first = np.unique(cand, return_index=True)
            got = cand[np.sort(first)]
            if len(got) >= k:
                return got[:k]
    return rng.choice(np.flatnonzero(labels == value), size=k, replace=False)


def sample_indices(
    labels: np.ndarray,
    rpn_batch_size: int = 256,
    positive_fraction: float = 0.5,
    *,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """The anchors kept for the RPN loss: (positive indices, negative indices), drawn uniformly without replacement."""
    labels = np.asarray(labels)
    if rpn_batch_size < 0 or not 0.0 <= positive_fraction <= 1.0:
        raise ValueError("sample_labels needs rpn_batch_size >= 0 and 0 <= positive_fraction <= 1")
    pos = _draw(labels, 1, int(rpn_batch_size * positive_fraction), rng)
    neg = _draw(labels, 0, rpn_batch_size - len(pos), rng)
    return pos, neg


def sample_labels(
    labels: np.ndarray,
    rpn_batch_size: int = 256,
    positive_fraction: float = 0.5,
    *,
    rng: np.random.Generator,
) -> np.ndarray:
    """Subsample labels for the RPN loss: <= rpn_batch_size labelled, <= the positive fraction positive; rest -1."""
    pos, neg = sample_indices(labels, rpn_batch_size, positive_fraction, rng=rng)
    out = np.full(np.shape(labels), -1, dtype=np.int64)
    out[pos] = 1
    out[neg] = 0
    return out


def _wh_ctr(b: np.ndarray, what: str) -> tuple[np.ndarray, ...]:
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    if (w <= 0).any() or (h <= 0).any():
        raise ValueError(f"{what} must have positive width and height to encode/decode deltas")
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


def decode_deltas(
    anchors: np.ndarray,
    deltas: np.ndarray,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    max_log_scale: float | None = math.log(1000.0 / 16),
) -> np.ndarray:
    """Inverse of encode_deltas: boxes [N, 4] xyxy; dw, dh are clamped at max_log_scale as torchvision does."""
    dtype = np.result_type(np.asarray(anchors).dtype, np.asarray(deltas).dtype, np.float32)
    a, d = np.asarray(anchors, np.float64), np.asarray(deltas, np.float64)
    if a.shape != d.shape or a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"anchors and deltas must both be [N, 4], got {a.shape} and {d.shape}")
    aw, ah, ax, ay = _wh_ctr(a, "anchors")
    wx, wy, ww, wh = (float(v) for v in weights)
    dw, dh = d[:, 2] / ww, d[:, 3] / wh
    if max_log_scale is not None:
        dw, dh = np.minimum(dw, max_log_scale), np.minimum(dh, max_log_scale)
    cx, cy = d[:, 0] / wx * aw + ax, d[:, 1] / wy * ah + ay
    w, h = np.exp(dw) * aw, np.exp(dh) * ah
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=1).astype(dtype)
