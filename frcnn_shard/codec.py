"""Image pixels: libjpeg-turbo straight into NumPy (simplejpeg) where that gives PIL's exact pixels, PIL otherwise.

Every reader opens the bytes with PIL first, so PIL's header verdict (format, size, mode, the
decompression-bomb guard) stays the one rule; only then does ``decode_jpeg`` decode the pixels of
what was measured bit-identical to PIL's ``convert("RGB")``: 8-bit Huffman JPEGs (baseline,
extended, progressive) whose components libjpeg reads as YCbCr or grey, any chroma subsampling and
size, with or without EXIF or ICC (neither library applies them). It returns None for everything
else (PNG, CMYK/YCCK, Adobe RGB, arithmetic coding, 12-bit, lossless, MPO, anything its header walk
does not understand) and whenever libjpeg-turbo refuses the data: simplejpeg runs in strict mode,
which also refuses what libjpeg merely warns about (and PIL accepts). The caller then decodes with
PIL exactly as before, so verdicts and pixels are always PIL's. ``decode_pil`` is the plain
reference beside it; the tests compare the two.

Why arithmetic coding goes to PIL although simplejpeg decodes it: Pillow fails on arithmetic JPEGs
larger than its read block ("broken data stream"); decoding them here would change which source
images a build drops.
"""
from __future__ import annotations

import io
import struct
from typing import NamedTuple

import numpy as np
import simplejpeg
from PIL import Image

_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_FAST_SOF = frozenset({0xC0, 0xC1, 0xC2})  # 8-bit Huffman: baseline, extended sequential, progressive
_FAST_COLORSPACES = frozenset({"YCbCr", "Gray"})  # as simplejpeg's header names libjpeg's jpeg_color_space
_FAST_MODES = frozenset({"RGB", "L"})  # the PIL modes of such files


class JpegFrame(NamedTuple):
    """The first frame header (SOF) of a JPEG, found by walking its marker segments."""

    marker: int  # 0xC0 baseline, 0xC1 extended, 0xC2 progressive, 0xC9.. arithmetic, ...
    precision: int  # bits per sample
    height: int
    width: int
    components: int
    mpf: bool  # an APP2 "MPF" segment came before it: PIL may open the file as an MPO


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The SOF of ``data`` from its marker segments (a few microseconds); None for anything unexpected."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, mpf = 2, False
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None  # garbage between segments: PIL judges it
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD7:  # standalone markers
            i += 2
            continue
        if m in (0xD8, 0xD9, 0xDA):  # a second SOI, EOI, or a scan before any frame
            return None
        (length,) = struct.unpack_from(">H", data, i + 2)
        if length < 2 or i + 2 + length > n:
            return None
        if m in _SOF_MARKERS:
            if length < 8:
                return None
            precision, h, w, nc = struct.unpack_from(">BHHB", data, i + 4)
            return JpegFrame(m, precision, h, w, nc, mpf)
        if m == 0xE2 and data[i + 4:i + 8] == b"MPF\x00":
            mpf = True
        i += 2 + length
    return None


def fast_jpeg_hw(data: bytes) -> tuple[int, int] | None:
    """(H, W) when ``decode_jpeg`` may decode these bytes itself, None when they are PIL's to decode."""
    f = jpeg_frame(data)
    if (f is None or f.mpf or f.marker not in _FAST_SOF or f.precision != 8 or f.components not in (1, 3)
            or f.height == 0 or f.width == 0):  # height 0: defined later by a DNL marker
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if (h, w) != (f.height, f.width) or colorspace not in _FAST_COLORSPACES:
        return None  # "RGB" (Adobe transform 0, component ids R G B), CMYK, YCCK: PIL converts those
    return h, w


def check_out(out: np.ndarray, hw: tuple[int, int]) -> None:
    """Refuse an output buffer that is not a writable C-contiguous uint8 array of shape (H, W, 3)."""
    want = (int(hw[0]), int(hw[1]), 3)
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != want:
        raise ValueError(f"out must be a uint8 array of shape {want}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be C-contiguous and writable")


def decode_jpeg(img: Image.Image, data: bytes, out: np.ndarray | None = None) -> np.ndarray | None:
    """uint8 [H, W, 3] RGB pixels of ``data``, opened (not loaded) by PIL as ``img``; None: decode with PIL.

    ``out`` (optional, e.g. a row of a batch) receives the pixels and is returned; simplejpeg itself
    checks only its byte size, so its shape and dtype are checked here.
    """
    if img.format != "JPEG" or img.mode not in _FAST_MODES or fast_jpeg_hw(data) != (img.height, img.width):
        return None
    if out is not None:
        check_out(out, (img.height, img.width))
    try:
        return simplejpeg.decode_jpeg(data, "RGB", fastdct=False, fastupsample=False, strict=True, buffer=out)
    except ValueError:  # refused, or a mere libjpeg warning in strict mode: PIL gives the verdict
        return None


def decode_pil(data: bytes) -> np.ndarray:
    """The plain reference: PIL's open, load and convert("RGB") as uint8 [H, W, 3]."""
    img = Image.open(io.BytesIO(data))
    return np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
