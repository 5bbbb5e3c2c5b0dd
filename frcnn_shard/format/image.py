"""The stored image of a sample (``<key>.jpg`` / ``<key>.png``): its header rules and its decode.

The header is checked before any pixel is decoded: the member must hold the format its extension
names, at exactly the manifest's canvas size, so a decompression bomb or a foreign image is refused
from a few header bytes. The pixels then come from ``codec.decode_jpeg`` (libjpeg-turbo into NumPy,
PIL's exact pixels) where it applies, from PIL otherwise.
"""
from __future__ import annotations

import io
import sys
import warnings

import numpy as np
from PIL import Image

from ..errors import FrcnnShardError
from ..codec import check_out, decode_jpeg

PIL_FORMATS = {"jpg": "JPEG", "png": "PNG"}  # member extension -> the format its bytes must hold
RULE_IMAGE_DECODE = "image_decode"
RULE_IMAGE_SIZE = "image_size"


class StoredImageError(FrcnnShardError, ValueError):
    """A stored image that breaks a rule; ``rule`` is RULE_IMAGE_DECODE or RULE_IMAGE_SIZE."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule


def open_stored_image(data: bytes, ext: str, canvas_hw: tuple[int, int] | None) -> Image.Image:
    """Open a stored image lazily after its header rules: format matches ``ext``, size equals the canvas."""
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # Pillow raises assorted exception types for broken data
        raise StoredImageError(RULE_IMAGE_DECODE, f"{type(e).__name__}: {e}") from None
    if img.format != PIL_FORMATS.get(ext):
        raise StoredImageError(RULE_IMAGE_DECODE, f"member .{ext} holds a {img.format} image")
    if canvas_hw is not None and (img.height, img.width) != tuple(canvas_hw):
        raise StoredImageError(RULE_IMAGE_SIZE, f"image is {img.height}x{img.width} (HxW), the manifest's canvas is "
                                                f"{canvas_hw[0]}x{canvas_hw[1]}")
    return img


def decode_stored_image(data: bytes, ext: str, canvas_hw: tuple[int, int] | None, *, mirror: bool = False,
                        out: np.ndarray | None = None) -> np.ndarray:
    """A stored image as uint8 [H, W, 3] RGB, after the header rules (StoredImageError on any problem).

    ``mirror``: flipped left-right (the loader's hflip), the same pixels as ``[:, ::-1]`` of the plain decode.
    ``out`` (optional: a writable uint8 [H, W, 3] array, e.g. a row of a batch) receives the pixels.
    """
    img = open_stored_image(data, ext, canvas_hw)
    pixels = decode_jpeg(img, data, None if mirror else out)
    if pixels is None:
        pixels = _decode_with_pil(img)
    if mirror:
        return _mirror_into(pixels, out)
    if out is None or pixels is out:
        return pixels
    check_out(out, pixels.shape[:2])
    out[...] = pixels
    return out


def _decode_with_pil(img: Image.Image) -> np.ndarray:
    try:
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
    except Exception as e:  # truncated or corrupt pixel data
        raise StoredImageError(RULE_IMAGE_DECODE, f"{type(e).__name__}: {e}") from None
    return np.asarray(img)


def _mirror_into(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``pixels[:, ::-1]`` (uint8 [H, W, 3]) written into ``out`` (or a new array)."""
    h, w = pixels.shape[:2]
    if out is not None:
        check_out(out, (h, w))
    src = np.ascontiguousarray(pixels)
    torch = sys.modules.get("torch")
    if torch is not None:  # the loader's processes have torch: its flip kernel is several times faster
        with warnings.catch_warnings():  # PIL's arrays are read-only; torch warns, though it only reads them
            warnings.simplefilter("ignore", UserWarning)
            flipped = torch.flip(torch.from_numpy(src), [1])
        if out is None:
            return flipped.numpy()
        torch.from_numpy(out).copy_(flipped)
        return out
    if out is None:
        out = np.empty((h, w, 3), np.uint8)
    # One 3-byte element per pixel: reversing those is ~2x faster than reversing a [H, W, 3] view.
    np.copyto(out.reshape(h, w * 3).view("V3"), src.reshape(h, w * 3).view("V3")[:, ::-1])
    return out
