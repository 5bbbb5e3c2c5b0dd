"""Per-image transform: decode, resize, convert boxes to resized-pixel xyxy, drop what breaks the rules.

Everything here is a pure function of its inputs (no global state, no I/O), so the same row and
config always give byte-identical image bytes and an identical ``meta`` dict.
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from .errors import FrcnnShardError
from .labels import EXCLUDED_LABEL
from .format.canvas import box_ratio, canvas_of, keep_ratio_size, resize_boxes_f32
from .format.record import Record, key_of
from .records import Dropped, Sample, SourceRow

# Single source of truth for input normalisation; the loader and the manifest read these.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

RESIZE_MODES = ("stretch", "letterbox", "keep-ratio")
KEEP_RATIO = "keep-ratio"
IMAGE_FORMATS = ("jpg", "png")
BBOX_FORMATS = ("xywh", "xyxy")
MAX_KEEP_RATIO_SIDE = 8192  # keep-ratio sides: far above any recipe (detectron2's largest is 1333)
DEFAULT_MAX_PIXELS = 64_000_000  # 64 Mpx: far above any COCO image, far below a decompression bomb
RESAMPLE = Image.Resampling.BILINEAR
RESAMPLE_NAME = "bilinear"

# Image-level drop reasons (Dropped.reason), in the order the rules are checked.
DROP_MISSING_IMAGE = "missing_image"
DROP_CORRUPT_IMAGE = "corrupt_image"
DROP_TOO_MANY_PIXELS = "too_many_pixels"
DROP_SIZE_MISMATCH = "size_mismatch"
DROP_NO_BOXES = "no_boxes"
DROP_REASONS = (DROP_MISSING_IMAGE, DROP_CORRUPT_IMAGE, DROP_TOO_MANY_PIXELS, DROP_SIZE_MISMATCH, DROP_NO_BOXES)

# Box-level drop reasons (box_drops keys), in the order the rules are checked; a box counts once,
# under the first rule it breaks. Dropped crowd boxes are counted as CROWD_PREFIX + reason.
BOX_NON_FINITE = "non_finite"
BOX_BAD_CATEGORY = "bad_category"
BOX_EXCLUDED_CLASS = "excluded_class"
BOX_DEGENERATE = "degenerate"
BOX_OUTSIDE_IMAGE = "outside_image"
BOX_TOO_SMALL = "too_small"
CROWD_PREFIX = "crowd_"


class ImageError(FrcnnShardError, ValueError):
    """An image that cannot be used; ``reason`` is one of DROP_REASONS."""

    reason = DROP_CORRUPT_IMAGE


class CorruptImageError(ImageError):
    """Bytes that are empty, truncated, or not a decodable image."""

    reason = DROP_CORRUPT_IMAGE


class TooManyPixelsError(ImageError):
    """An image whose header declares more pixels than allowed (decompression-bomb guard)."""

    reason = DROP_TOO_MANY_PIXELS


# ----------------------------------------------------------------------------------------- config


def parse_image_size(text: str) -> tuple[int, int]:
    """Parse "400" (square) or "480x640" (H x W) into (H, W); ValueError on anything else."""
    s = str(text).strip().lower()
    m = re.fullmatch(r"(\d+)(?:\s*[x×]\s*(\d+))?", s)
    if not m:
        raise ValueError(f"image size {text!r}: expected N or HxW with positive integers, e.g. 400 or 480x640")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) is not None else h
    if h <= 0 or w <= 0:
        raise ValueError(f"image size {text!r}: height and width must be > 0")
    return h, w


@dataclass(frozen=True)
class TransformConfig:
    """Everything that decides how a source row becomes a sample (recorded in the manifest)."""

    image_size: tuple[int, int] = field(default=(400, 400), metadata={  # (H, W) of the output canvas
        "help": "Output size: 400 or HxW.", "parse": parse_image_size})
    resize: str = field(default="stretch", metadata={
        "help": "stretch: fill the canvas (aspect not kept, as the reference model); "
                "letterbox: keep the aspect, pad bottom and right with zeros; keep-ratio: torchvision's "
                "--min-size/--max-size sizes, a canvas per sample (docs/FORMAT.md).", "choices": RESIZE_MODES})
    min_size: int = field(default=800, metadata={
        "help": "keep-ratio: the shortest edge (torchvision's min_size)."})
    max_size: int = field(default=1333, metadata={
        "help": "keep-ratio: the longest edge at most (torchvision's max_size)."})
    min_box_size: float = field(default=1.0, metadata={"help": "Drop boxes narrower or lower than this (resized px)."})
    image_format: str = field(default="jpg", metadata={
        "help": "How the resized images are stored: jpg (small, re-encoded) or png (lossless, ~10x larger).",
        "choices": IMAGE_FORMATS})
    quality: int = field(default=90, metadata={"help": "JPEG quality, 1..100 (png ignores it)."})
    keep_empty: bool = field(default=False, metadata={"help": "Keep images left with no boxes (all anchors negative)."})
    bbox_format: str = "xywh"  # the source's box convention (the source's decision)
    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse images whose header declares more pixels

    def __post_init__(self) -> None:
        h, w = self.image_size
        if int(h) != h or int(w) != w or h <= 0 or w <= 0:
            raise ValueError(f"TransformConfig.image_size must be two positive integers (H, W), got {self.image_size!r}")
        object.__setattr__(self, "image_size", (int(h), int(w)))
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"TransformConfig.resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if not (int(self.min_size) == self.min_size and int(self.max_size) == self.max_size
                and 0 < self.min_size <= MAX_KEEP_RATIO_SIDE and 0 < self.max_size <= MAX_KEEP_RATIO_SIDE):
            raise ValueError(f"TransformConfig.min_size and max_size must be integers in 1..{MAX_KEEP_RATIO_SIDE}, "
                             f"got {self.min_size!r}, {self.max_size!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"TransformConfig.image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.bbox_format not in BBOX_FORMATS:
            raise ValueError(f"TransformConfig.bbox_format must be one of {BBOX_FORMATS}, got {self.bbox_format!r}")
        if not 1 <= int(self.quality) <= 100:
            raise ValueError(f"TransformConfig.quality must be in 1..100, got {self.quality!r}")
        if not (math.isfinite(self.min_box_size) and self.min_box_size >= 0):
            raise ValueError(f"TransformConfig.min_box_size must be a finite number >= 0, got {self.min_box_size!r}")
        if int(self.max_pixels) <= 0:
            raise ValueError(f"TransformConfig.max_pixels must be > 0, got {self.max_pixels!r}")

    def to_dict(self) -> dict:
        """JSON-able description, including the fixed choices (resampling filter, channel order)."""
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["resample"] = RESAMPLE_NAME
        d["color"] = "RGB"
        return d


# ------------------------------------------------------------------------------------------ boxes


def to_xyxy(bboxes: np.ndarray, fmt: str) -> np.ndarray:
    """Return float64 [N, 4] boxes as [x1, y1, x2, y2] from the given convention ("xywh" | "xyxy")."""
    b = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    if fmt == "xyxy":
        return b.copy()
    if fmt == "xywh":
        return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
    raise ValueError(f"unknown bbox format {fmt!r}; expected one of {BBOX_FORMATS}")


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding; sizes should not depend on parity.
    return int(math.floor(x + 0.5))


def resize_geometry(
    orig_hw: tuple[int, int], out_hw: tuple[int, int], mode: str
) -> tuple[tuple[float, float], tuple[int, int], tuple[int, int]]:
    """Return (scale (sy, sx), content (h, w), pad (pad_h, pad_w)) mapping an image onto the canvas."""
    h, w = int(orig_hw[0]), int(orig_hw[1])
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if h <= 0 or w <= 0 or oh <= 0 or ow <= 0:
        raise ValueError(f"resize_geometry: sizes must be positive, got orig {orig_hw} -> out {out_hw}")
    if mode == "stretch":
        return (oh / h, ow / w), (oh, ow), (0, 0)
    if mode == "letterbox":
        s = min(oh / h, ow / w)
        ch = min(oh, max(1, _round_half_up(h * s)))
        cw = min(ow, max(1, _round_half_up(w * s)))
        # Per-axis scale from the rounded content size, so box coordinates land on the pixels.
        return (ch / h, cw / w), (ch, cw), (oh - ch, ow - cw)
    raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")


def geometry(orig_hw: tuple[int, int], cfg: TransformConfig
             ) -> tuple[tuple[float, float], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(scale (sy, sx), content (h, w), pad (pad_h, pad_w), canvas (H, W)) of an image under ``cfg``.

    keep-ratio: the content is torchvision's size (format.canvas.keep_ratio_size), the canvas that rounded up
    to a multiple of 32, the scale torchvision's float32 box ratio; otherwise the canvas is ``image_size``.
    """
    if cfg.resize == KEEP_RATIO:
        content = keep_ratio_size(orig_hw, cfg.min_size, cfg.max_size)
        canvas = canvas_of(content)
        return box_ratio(orig_hw, content), content, (canvas[0] - content[0], canvas[1] - content[1]), canvas
    scale, content, pad = resize_geometry(orig_hw, cfg.image_size, cfg.resize)
    return scale, content, pad, cfg.image_size


def scale_boxes(boxes: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Scale xyxy boxes by (sy, sx)."""
    sy, sx = scale
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * np.array([sx, sy, sx, sy])


def clip_boxes(boxes: np.ndarray, hw: tuple[float, float]) -> np.ndarray:
    """Clip xyxy boxes to [0, W] x [0, H]."""
    h, w = hw
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.clip(b, 0.0, np.array([w, h, w, h], dtype=np.float64))


def box_drop_reasons(
    bboxes: np.ndarray,
    labels: np.ndarray,
    fmt: str,
    orig_hw: tuple[int, int],
    scale: tuple[float, float],
    content_hw: tuple[int, int],
    min_box_size: float,
    float32_resize: bool = False,
) -> tuple[np.ndarray, list[str | None]]:
    """Return (xyxy boxes in resized pixels clipped to the content, per-box drop reason or None).

    ``float32_resize``: scale as torchvision's ``resize_boxes`` does (float32 boxes times the float32 ratio
    content / orig; keep-ratio), instead of by ``scale`` in float64.
    """
    raw = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(raw):
        raise ValueError(f"{len(raw)} boxes but {len(labels)} labels")
    n = len(raw)
    reasons: list[str | None] = [None] * n
    finite = np.isfinite(raw).all(axis=1)
    safe = np.where(finite[:, None], raw, 0.0)
    xyxy = to_xyxy(safe, fmt)
    # One test for both conventions: in xywh, w <= 0 already gives x + w <= x in floating point.
    degenerate = (xyxy[:, 2] <= xyxy[:, 0]) | (xyxy[:, 3] <= xyxy[:, 1])
    clipped = clip_boxes(xyxy, orig_hw)
    outside = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if float32_resize:
        resized = resize_boxes_f32(clipped, orig_hw, content_hw).astype(np.float64)
    else:
        resized = scale_boxes(clipped, scale)
    # Clip again after scaling: x2 * (cw / w) can overshoot cw by one ulp.
    resized = clip_boxes(resized, content_hw)
    # Judge size on the float32 values that will be written, so a kept box is never empty.
    r32 = resized.astype(np.float32).astype(np.float64)
    bw, bh = r32[:, 2] - r32[:, 0], r32[:, 3] - r32[:, 1]
    small = (bw < min_box_size) | (bh < min_box_size) | (bw <= 0) | (bh <= 0)
    # Sources bound labels to 1..K (sources.base.Source); anything below 1 is not a class of the build.
    bad_cat = labels < 1
    for i in range(n):
        if labels[i] == EXCLUDED_LABEL:
            reasons[i] = BOX_EXCLUDED_CLASS
        elif not finite[i]:
            reasons[i] = BOX_NON_FINITE
        elif bad_cat[i]:
            reasons[i] = BOX_BAD_CATEGORY
        elif degenerate[i]:
            reasons[i] = BOX_DEGENERATE
        elif outside[i]:
            reasons[i] = BOX_OUTSIDE_IMAGE
        elif small[i]:
            reasons[i] = BOX_TOO_SMALL
    return resized, reasons


# ----------------------------------------------------------------------------------------- images


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open encoded bytes lazily, refusing (by header size) images over ``max_pixels``; no pixels decoded."""
    if not data:
        raise CorruptImageError("image bytes are empty")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise TooManyPixelsError(f"image refused by Pillow's decompression-bomb guard: {e}") from e
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises assorted exception types for hostile or broken headers
        raise CorruptImageError(f"not a decodable image ({type(e).__name__}: {e})") from e
    w, h = img.size
    if w <= 0 or h <= 0:
        raise CorruptImageError(f"image header declares size {w}x{h}")
    if w * h > max_pixels:
        raise TooManyPixelsError(f"image header declares {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    return img


_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _uint16_to_uint8(a: np.ndarray) -> np.ndarray:
    # Keep the top 8 bits: full 16-bit range maps onto full 8-bit range.
    return (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode pixels and convert any mode to 8-bit RGB; alpha is composited onto black; no EXIF rotation."""
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as e:  # truncated or corrupt pixel data; Pillow raises assorted types
        raise CorruptImageError(f"image data could not be decoded ({type(e).__name__}: {e})") from e
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit (and 32-bit integer, which Pillow may use for 16-bit files) grey: treat as 16-bit.
        g = _uint16_to_uint8(np.asarray(img))
        out = Image.fromarray(np.repeat(g[:, :, None], 3, axis=2), "RGB")
    elif mode == "F":
        g = np.clip(np.nan_to_num(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        out = Image.fromarray(np.repeat(g[:, :, None], 3, axis=2), "RGB")
    elif mode in _ALPHA_MODES or "transparency" in img.info:
        # Alpha channel or a transparent colour (tRNS): composite onto black, a fixed documented rule.
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        out = Image.alpha_composite(black, rgba).convert("RGB")
    elif mode == "RGB":
        out = img
    else:
        # L, 1, P, CMYK (naive conversion, no ICC), YCbCr, LAB, HSV, ...
        try:
            out = img.convert("RGB")
        except MemoryError:
            raise
        except Exception as e:
            raise CorruptImageError(f"image mode {mode!r} cannot be converted to RGB ({e})") from e
    if out is img:
        out = img.copy()  # detach from the source file object
    out.info = {}
    return out


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded bytes to an 8-bit RGB PIL image (raises CorruptImageError / TooManyPixelsError)."""
    return to_rgb(open_image(data, max_pixels))


def resize_image(img: Image.Image, out_hw: tuple[int, int], mode: str) -> Image.Image:
    """Resize to the canvas (H, W): stretch, or letterbox with content top-left and zero padding."""
    _, (ch, cw), (ph, pw) = resize_geometry((img.height, img.width), out_hw, mode)
    content = img if img.size == (cw, ch) else img.resize((cw, ch), RESAMPLE)
    if ph == 0 and pw == 0:
        return content
    canvas = Image.new(img.mode, (int(out_hw[1]), int(out_hw[0])), 0)
    canvas.paste(content, (0, 0))
    return canvas


def encode_image(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """Encode to "jpg" | "png" with fixed settings and no metadata (no EXIF, no ICC): deterministic bytes."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.info:
        img = img.copy()
        img.info = {}
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=int(quality), subsampling="4:2:0", optimize=False, progressive=False)
    elif fmt == "png":
        img.save(buf, format="PNG", compress_level=6, optimize=False)
    else:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {IMAGE_FORMATS}")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- rows


def _count(reasons: list[str | None], mask: np.ndarray, prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    for r, m in zip(reasons, mask):
        if m and r is not None:
            out[prefix + r] = out.get(prefix + r, 0) + 1
    return out


def _row_arrays(row: SourceRow) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(raw boxes float64 [N, 4], labels, iscrowd, bbox_ids) of a row, checked to be parallel."""
    raw = np.asarray(row.bboxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(row.labels, dtype=np.int64).reshape(-1)
    crowd = np.asarray(row.iscrowd, dtype=bool).reshape(-1)
    bbox_ids = np.asarray(row.bbox_ids, dtype=np.int64).reshape(-1)
    if not len(raw) == len(labels) == len(crowd) == len(bbox_ids):
        # A broken record from our own source code, not bad data: fail loudly.
        raise ValueError(
            f"row {row.index} ({row.origin}): {len(raw)} boxes, {len(labels)} labels, {len(bbox_ids)} bbox_ids "
            f"and {len(crowd)} iscrowd flags; they must be parallel arrays"
        )
    return raw, labels, crowd, bbox_ids


def process_row(row: SourceRow, cfg: TransformConfig) -> Sample | Dropped:
    """Turn one source row into a Sample, or a Dropped naming the rule that removed it."""

    def dropped(reason: str, detail: str, box_drops: dict | None = None) -> Dropped:
        where = f" ({row.origin})" if row.origin else ""
        return Dropped(row.index, int(row.image_id), reason, detail + where, dict(box_drops or {}), row.origin)

    if row.image is None:
        return dropped(DROP_MISSING_IMAGE, "source provided no image bytes")
    try:
        img = open_image(row.image, cfg.max_pixels)
    except ImageError as e:
        return dropped(e.reason, str(e))
    if (img.width, img.height) != (int(row.width), int(row.height)):
        return dropped(
            DROP_SIZE_MISMATCH,
            f"decoded image is {img.width}x{img.height} (WxH) but the row declares {row.width}x{row.height}",
        )

    raw, labels, crowd, bbox_ids = _row_arrays(row)
    orig_hw = (img.height, img.width)
    scale, content_hw, pad, canvas_hw = geometry(orig_hw, cfg)
    boxes, reasons = box_drop_reasons(raw, labels, cfg.bbox_format, orig_hw, scale, content_hw, cfg.min_box_size,
                                      float32_resize=cfg.resize == KEEP_RATIO)
    keep = np.array([r is None for r in reasons], dtype=bool)
    box_drops = _count(reasons, ~crowd)
    box_drops.update(_count(reasons, crowd, CROWD_PREFIX))
    box_drops = {k: box_drops[k] for k in sorted(box_drops)}

    sel, crowd_sel = keep & ~crowd, keep & crowd
    out_boxes = boxes[sel].astype(np.float32).reshape(-1, 4)
    out_labels = labels[sel]
    crowd_boxes = boxes[crowd_sel].astype(np.float32).reshape(-1, 4)
    if len(out_boxes) == 0 and not cfg.keep_empty:
        return dropped(DROP_NO_BOXES, f"no boxes left ({len(boxes)} in the source)", box_drops)

    # Only now decode pixels: rows dropped above never pay for it.
    try:
        rgb = to_rgb(img)
    except ImageError as e:
        return dropped(e.reason, str(e), box_drops)
    # keep-ratio stores the content alone: the loader pads it to the canvas (fewer bytes, less to decode).
    resized = (resize_image(rgb, content_hw, "stretch") if cfg.resize == KEEP_RATIO
               else resize_image(rgb, cfg.image_size, cfg.resize))
    image_bytes = encode_image(resized, cfg.image_format, cfg.quality)

    record = Record(
        key=key_of(row.image_id), image_id=int(row.image_id), orig_size=orig_hw, size=canvas_hw,
        content_size=content_hw, scale=scale, pad=pad, boxes=out_boxes, labels=out_labels,
        bbox_ids=bbox_ids[sel], crowd_boxes=crowd_boxes, crowd_labels=labels[crowd_sel],
        crowd_bbox_ids=bbox_ids[crowd_sel], box_drops=box_drops, source_index=int(row.index),
    )
    return Sample(record, image_bytes, cfg.image_format)
