"""The fast JPEG decode (codec.decode_jpeg: libjpeg-turbo via simplejpeg) against PIL, the plain reference.

Same pixels and same verdicts as PIL alone, through the stored-image reader that uses it
(format.image.decode_stored_image: the loader, check --deep, show), on the real COCO images, the
stored 400 px JPEGs, odd images generated here, the bad rows of the fault tests and a seeded fuzz;
and the fast path is really taken where it should be, so the comparisons are not vacuous.
"""
from __future__ import annotations

import io
import random
import sys

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from frcnn_shard import codec
from frcnn_shard.format.image import StoredImageError, decode_stored_image
from frcnn_shard.shards import iter_shard, read_manifest
from test_faults import BAD_ROWS


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """Photo-like content: smooth gradients, a few flat shapes, mild noise (JPEG's usual diet)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255.0 / max(w, 1), y * 255.0 / max(h, 1), (x + y) * 127.0 / max(w + h, 1)], axis=2)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        a[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 255, 3)
    a += rng.normal(0, 6, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **{"quality": 90, **kw})
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def mpo(a: Image.Image, b: Image.Image) -> bytes:
    buf = io.BytesIO()
    a.save(buf, format="MPO", save_all=True, append_images=[b])
    return buf.getvalue()


def stored_pil(data: bytes):
    """A stored .jpg member decoded by PIL alone, as the readers did before the fast path."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "JPEG":
            return "error", None
        return "ok", np.asarray(img.convert("RGB"))
    except Exception:  # noqa: BLE001 - any PIL failure is the verdict "error"
        return "error", None


def stored_fast(data: bytes):
    """The stored-image reader as it runs: (verdict, pixels)."""
    try:
        return "ok", decode_stored_image(data, "jpg", None)
    except StoredImageError:
        return "error", None


def fast_path_taken(data: bytes) -> bool:
    """Whether decode_jpeg decodes these bytes itself (True) or leaves them to PIL (False)."""
    try:
        img = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001
        return False
    return codec.decode_jpeg(img, data) is not None


def assert_same(got, want, what: str) -> None:
    assert got[0] == want[0], (what, got[0], want[0])
    if want[1] is not None:
        assert got[1].dtype == np.uint8 and got[1].shape == want[1].shape, what
        assert np.array_equal(got[1], want[1]), what


def odd_images() -> list[tuple[str, bytes, bool]]:
    """(name, bytes, whether the fast path should decode them)."""
    pic, small = picture(403, 301, 1), picture(96, 64, 2)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: neither library applies it
    base = jpeg(pic)
    mid = len(base) // 2
    cases = [
        ("baseline 4:2:0 q90", base, True),
        ("q75", jpeg(pic, quality=75), True),
        ("q100", jpeg(pic, quality=100), True),
        ("4:4:4", jpeg(pic, subsampling="4:4:4"), True),
        ("4:2:2", jpeg(pic, subsampling="4:2:2"), True),
        ("4:4:0", simplejpeg.encode_jpeg(np.asarray(pic), 90, "RGB", "440"), True),
        ("4:1:1", simplejpeg.encode_jpeg(np.asarray(pic), 90, "RGB", "411"), True),
        ("progressive", jpeg(pic, progressive=True), True),
        ("optimized Huffman", jpeg(pic, optimize=True), True),
        ("restart markers", jpeg(pic, restart_marker_blocks=4), True),
        ("grey", jpeg(pic.convert("L")), True),
        ("grey progressive", jpeg(pic.convert("L"), progressive=True), True),
        ("YCbCr mode", jpeg(pic.convert("YCbCr")), True),
        ("EXIF orientation 6", jpeg(pic, exif=exif.tobytes()), True),
        ("ICC profile", jpeg(pic, icc_profile=b"\0" * 700), True),
        ("comment", jpeg(pic, comment=b"hello"), True),
        ("1x1", jpeg(picture(1, 1)), True),
        ("7x3", jpeg(picture(7, 3)), True),
        ("17x9 4:4:4", jpeg(picture(17, 9), subsampling="4:4:4"), True),
        ("trailing bytes after EOI", base + b"\0garbage" * 10, True),
        ("CMYK (PIL's conversion differs by 1)", jpeg(pic.convert("CMYK")), False),
        ("Adobe RGB, no YCbCr transform", jpeg(pic, keep_rgb=True), False),
        ("MPO, two frames", mpo(small, picture(96, 64, 3)), False),
        ("PNG", png(small), False),
        ("PNG RGBA", png(small.convert("RGBA")), False),
        ("PNG palette", png(small.convert("P")), False),
        ("truncated half", base[:mid], False),
        ("EOI missing", base[:-2], False),
        ("scan bytes overwritten", base[:mid] + bytes(range(64)) + base[mid + 64:], False),
        ("garbage between segments", base[:2] + b"\x00" * 9 + base[2:], False),
        ("header zeroed", base[:20] + b"\0" * 50 + base[70:], False),
        ("empty", b"", False),
    ]
    return cases


ODD = odd_images()


@pytest.mark.parametrize("name,data,fast", ODD, ids=[c[0] for c in ODD])
def test_odd_images_decode_as_pil(name, data, fast):
    assert fast_path_taken(data) == fast, name
    assert_same(stored_fast(data), stored_pil(data), name)


WITH_BYTES = [i for i, row in enumerate(BAD_ROWS) if (row[0]["image"] or {}).get("bytes") is not None]


@pytest.mark.parametrize("index", WITH_BYTES)
def test_fault_test_images_decode_as_pil(index):
    data = BAD_ROWS[index][0]["image"]["bytes"]
    assert_same(stored_fast(data), stored_pil(data), f"BAD_ROWS[{index}]")


def test_coco_originals_take_the_fast_path_with_pil_pixels(tiny_coco):
    paths = sorted((tiny_coco / "train2017").glob("*.jpg"))
    assert len(paths) == 50
    for p in paths:
        data = p.read_bytes()
        assert fast_path_taken(data), p.name
        assert_same(stored_fast(data), stored_pil(data), p.name)
        assert np.array_equal(stored_fast(data)[1], codec.decode_pil(data)), p.name


def test_stored_jpegs_take_the_fast_path_with_pil_pixels(tiny_shards):
    man = read_manifest(tiny_shards)
    hw = tuple(man["image"]["size"])
    n = 0
    for s in man["shards"]:
        for key, members in iter_shard(tiny_shards / s["name"]):
            data = members["jpg"]
            assert fast_path_taken(data), key
            assert np.array_equal(decode_stored_image(data, "jpg", hw), codec.decode_pil(data)), key
            n += 1
    assert n == man["totals"]["samples"]


def _mutations(seed: int, n: int) -> list[bytes]:
    """Seeded damage to small JPEGs: header bytes, scan bytes, truncation, inserted bytes."""
    rng = random.Random(seed)
    pics = [picture(96, 64, s) for s in range(3)]
    bases = [jpeg(pics[0]), jpeg(pics[1], progressive=True), jpeg(pics[2].convert("L"))]
    out = []
    for _ in range(n):
        b = bytearray(rng.choice(bases))
        kind = rng.choice(["header", "scan", "truncate", "insert"])
        if kind == "header":
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(2, 600)] = rng.randrange(256)
        elif kind == "scan":
            start = rng.randrange(620, len(b) - 2)
            for _ in range(rng.choice([1, 8, 64])):
                b[min(len(b) - 3, start + rng.randrange(128))] = rng.randrange(256)
        elif kind == "truncate":
            b = b[:rng.randrange(2, len(b))]
        else:
            at = rng.randrange(2, len(b))
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        out.append(bytes(b))
    return out


def test_damaged_jpegs_get_pils_verdict_and_pixels():
    fast = refused = 0
    for i, data in enumerate(_mutations(15, 600)):
        assert_same(stored_fast(data), stored_pil(data), f"mutation {i}")
        if fast_path_taken(data):
            fast += 1
        elif codec.fast_jpeg_hw(data) is not None:
            refused += 1  # eligible by its header, refused by strict libjpeg-turbo: PIL decided
    assert fast > 100 and refused > 20, (fast, refused)  # both branches were exercised


def test_decode_into_a_given_array():
    data = jpeg(picture(40, 30))
    out = np.full((30, 40, 3), 7, np.uint8)
    got = decode_stored_image(data, "jpg", (30, 40), out=out)
    assert np.shares_memory(got, out) and np.array_equal(out, codec.decode_pil(data))
    batch = np.zeros((2, 30, 40, 3), np.uint8)  # a batch row, as the loader passes it
    decode_stored_image(data, "jpg", (30, 40), out=batch[1])
    assert np.array_equal(batch[1], out) and not batch[0].any()
    png_out = np.zeros((30, 40, 3), np.uint8)  # the PIL path fills it too
    assert decode_stored_image(png(picture(40, 30)), "png", (30, 40), out=png_out) is png_out
    assert np.array_equal(png_out, np.asarray(picture(40, 30)))
    for bad in (np.zeros((30, 40, 3), np.float32), np.zeros((40, 30, 3), np.uint8), np.zeros((30, 40, 4), np.uint8),
                np.zeros((30, 80, 3), np.uint8)[:, ::2], np.zeros(30 * 40 * 3, np.uint8)):
        with pytest.raises(ValueError, match="out must be"):
            decode_stored_image(data, "jpg", (30, 40), out=bad)
    with pytest.raises(ValueError, match="out must be"):
        decode_stored_image(png(picture(40, 30)), "png", (30, 40), out=np.zeros((40, 30, 3), np.uint8))


@pytest.mark.parametrize("with_torch", [True, False])
def test_a_mirrored_decode_is_the_plain_decode_reversed(tiny_shards, with_torch, monkeypatch):
    """mirror=True (the loader's hflip) on either decoder, into a new array or a batch row; with torch
    loaded (the loader) and without (check, show)."""
    if with_torch:
        import torch  # noqa: F401 - loaded, as in the loader's processes
    else:
        monkeypatch.setitem(sys.modules, "torch", None)
    man = read_manifest(tiny_shards)
    hw = tuple(man["image"]["size"])
    key, members = next(iter_shard(tiny_shards / man["shards"][0]["name"]))
    pictures = {"jpg": members["jpg"], "png": png(picture(hw[1], hw[0], 3))}
    for ext, data in pictures.items():
        plain = decode_stored_image(data, ext, hw)
        want = plain[:, ::-1]
        assert np.array_equal(decode_stored_image(data, ext, hw, mirror=True), want), ext
        batch = np.zeros((2, *hw, 3), np.uint8)
        got = decode_stored_image(data, ext, hw, mirror=True, out=batch[1])
        assert np.shares_memory(got, batch) and np.array_equal(batch[1], want) and not batch[0].any(), ext
        assert not np.array_equal(want, plain), ext  # the picture is not symmetric: the test can fail
