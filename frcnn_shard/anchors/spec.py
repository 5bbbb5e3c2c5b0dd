"""The anchor spec: everything needed to rebuild the anchor tensor bit for bit, its presets, the
manifest's "anchors" section, and the check that a model's anchors equal the shards'.

Coordinates are xyxy pixels of the stored (resized) image; anchors are float32 [A, 4] in a fixed order
(see ``AnchorSpec.order``).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

import numpy as np


PRESETS: tuple[str, ...] = ("frcnn-fpn", "detectron2-fpn", "torchvision-fpn", "c4")
DEFAULT_PRESET = "frcnn-fpn"

RATIO_CONVENTIONS = ("w/h", "h/w")
ORDERS = ("level,row,col,size,ratio", "level,row,col,ratio,size")


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
            if np.any(cell_anchors(self, level)[:, 2:] <= 0):
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

    def at(self, image_hw: Sequence[int]) -> "AnchorSpec":
        """This spec over another image size: a keep-ratio sample's anchors are the build's spec at its canvas."""
        hw = (int(image_hw[0]), int(image_hw[1]))
        return self if hw == self.image_hw else replace(self, image_hw=hw)

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
        return from_fields(cls, d)


def from_fields(cls: type, d: Mapping[str, Any]):
    """A dataclass from its to_dict() form; every field is required and unknown keys are refused."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{cls.__name__}: expected a dict, got {type(d).__name__}")
    expected = {f.name for f in fields(cls)}
    missing, unknown = expected - set(d), set(d) - expected
    if missing or unknown:
        raise ValueError(f"{cls.__name__}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    return cls(**{k: d[k] for k in d})


def cell_shapes(spec: AnchorSpec, level: int) -> list[tuple[float, float, float, float]]:
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


def cell_anchors(spec: AnchorSpec, level: int) -> np.ndarray:
    """Zero-centred cell anchors of a level as float32 [n, 4] xyxy (rounded when asked)."""
    cells = np.array([[-w / 2, -h / 2, w / 2, h / 2] for _, _, w, h in cell_shapes(spec, level)], dtype=np.float64)
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
        out.append((shifts + cell_anchors(spec, level)[None, None]).reshape(-1, 4))
    return np.ascontiguousarray(np.concatenate(out, axis=0), dtype=np.float32)


def anchors_sha256(anchors: Any) -> str:
    """sha256 hex of the anchors as C-contiguous little-endian float32 bytes."""
    arr = np.ascontiguousarray(as_numpy(anchors), dtype="<f4")
    return hashlib.sha256(arr.tobytes()).hexdigest()


def as_hw(image_hw: int | Sequence[int]) -> tuple[int, int]:
    """400 or (H, W) -> (H, W)."""
    if isinstance(image_hw, (int, np.integer)):
        return (int(image_hw), int(image_hw))
    return (int(image_hw[0]), int(image_hw[1]))


def _as_levels(sizes: Sequence, num_levels: int) -> tuple[tuple[float, ...], ...]:
    # A flat tuple means one size per level (torchvision's short form), or all sizes of the single
    # level of a one-level spec.
    if all(not isinstance(s, (list, tuple)) for s in sizes):
        return (tuple(sizes),) if num_levels == 1 else tuple((s,) for s in sizes)
    return tuple(tuple(level) for level in sizes)


def parse_numbers(text: str) -> tuple[float, ...]:
    """'0.5,1,2' -> (0.5, 1.0, 2.0) (ValueError on anything else)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def parse_sizes(text: str) -> tuple[tuple[float, ...], ...]:
    """'32,64' -> ((32.0,), (64.0,)); '32/40,64/80' gives several sizes per level."""
    try:
        return tuple(tuple(float(s) for s in level.split("/")) for level in text.split(","))
    except ValueError:
        raise ValueError(f"expected e.g. 32,64,128 or 32/40,64/80, got {text!r}") from None


def preset_spec(
    name: str,
    image_hw: int | Sequence[int],
    *,
    sizes: Sequence | None = None,
    ratios: Sequence[float] | None = None,
    strides: Sequence[int] | None = None,
) -> AnchorSpec:
    """The AnchorSpec of a named preset (see PRESETS) for an image size; given values override the preset's."""
    hw = as_hw(image_hw)
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
        # AnchorGenerator.generate_anchors lays a cell out ratio-major (ws = w_ratios[:, None] * scales),
        # which only shows with several sizes per level.
        base.update(strides=fpn_strides, sizes=fpn_sizes, ratio_convention="h/w", offset=0.0,
                    round_cells=True, pad_multiple=32, stride_from_padding=True, order="level,row,col,ratio,size")
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
# Model check (the manifest's anchors section is anchors/manifest.py)
# ----------------------------------------------------------------------------------------------


def as_numpy(x: Any) -> np.ndarray:
    """A NumPy array from a tensor (any device), detectron2 Boxes, a per-level list, or anything array-like."""
    if hasattr(x, "tensor") and not isinstance(x, np.ndarray):  # detectron2 Boxes
        x = x.tensor
    if hasattr(x, "detach"):  # torch tensor, any device
        x = x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)) and x and not np.isscalar(x[0]) and np.ndim(as_numpy(x[0])) == 2:
        return np.concatenate([as_numpy(p) for p in x], axis=0)  # per-level list
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
            size, ratio, _, _ = cell_shapes(spec, level)[cell]
            return {"level": level, "row": row, "col": col, "size": size, "ratio": ratio}
        start += count
    raise ValueError(f"anchor index {index} out of range (A = {start})")
