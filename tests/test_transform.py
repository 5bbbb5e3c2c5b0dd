"""Transform: geometry, box rules, drop reasons, image modes, determinism."""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from frcnn_shard import transform as T
from frcnn_shard.labels import INVALID_LABEL
from frcnn_shard.records import Dropped, Sample, SourceRow


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _row(image: bytes | None, w: int, h: int, boxes, labels=None, crowd=None, image_id: int = 7) -> SourceRow:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(b)
    return SourceRow(
        index=3,
        image_id=image_id,
        image=image,
        width=w,
        height=h,
        bbox_ids=np.arange(100, 100 + n, dtype=np.int64),
        labels=np.asarray(labels if labels is not None else [1] * n, dtype=np.int64),
        bboxes=b,
        iscrowd=np.asarray(crowd if crowd is not None else [False] * n, dtype=bool),
        origin="test row",
    )


def _grey(w: int, h: int, value: int = 90) -> bytes:
    return _png(Image.new("RGB", (w, h), (value, value, value)))


# ------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("text,expected", [("400", (400, 400)), ("480x640", (480, 640)), (" 32X16 ", (32, 16))])
def test_parse_image_size(text, expected):
    assert T.parse_image_size(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "abc", "4x0", "0x4", "", "4x", "x4", "4x4x4", "1.5"])
def test_parse_image_size_rejects_nonsense(text):
    with pytest.raises(ValueError):
        T.parse_image_size(text)


def test_config_to_dict_is_json_and_records_resample():
    d = T.TransformConfig(image_size=(480, 640), resize="letterbox").to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["image_size"] == [480, 640] and d["resize"] == "letterbox" and d["resample"] == "bilinear"
    for bad in ({"resize": "crop"}, {"image_format": "webp"}, {"bbox_format": "cxcywh"}, {"image_size": (0, 4)}):
        with pytest.raises(ValueError):
            T.TransformConfig(**bad)


# ----------------------------------------------------------------------------------- geometry


def test_to_xyxy_both_formats():
    raw = np.array([[10, 20, 30, 40]], dtype=np.float64)
    np.testing.assert_array_equal(T.to_xyxy(raw, "xywh"), [[10, 20, 40, 60]])
    np.testing.assert_array_equal(T.to_xyxy(raw, "xyxy"), [[10, 20, 30, 40]])
    assert T.to_xyxy(np.zeros((0, 4)), "xywh").shape == (0, 4)
    with pytest.raises(ValueError):
        T.to_xyxy(raw, "cxcywh")


def test_clip_boxes():
    b = np.array([[-5, -5, 50, 50], [90, 10, 120, 70]], dtype=np.float64)
    np.testing.assert_array_equal(T.clip_boxes(b, (60, 100)), [[0, 0, 50, 50], [90, 10, 100, 60]])


def test_resize_geometry_stretch_and_letterbox():
    scale, content, pad = T.resize_geometry((300, 600), (400, 400), "stretch")
    assert scale == pytest.approx((400 / 300, 400 / 600)) and content == (400, 400) and pad == (0, 0)
    scale, content, pad = T.resize_geometry((300, 600), (400, 400), "letterbox")
    assert content == (200, 400) and pad == (200, 0)
    assert scale == (200 / 300, 400 / 600)
    # Rounded content size: the per-axis scale is content / orig, not the nominal factor.
    scale, content, pad = T.resize_geometry((333, 517), (400, 400), "letterbox")
    assert content == (258, 400) and pad == (142, 0) and scale == (258 / 333, 400 / 517)


def _draw_rect_image(w, h, x0, y0, x1, y1) -> bytes:
    """Black image with a white filled rectangle covering pixels [x0, x1) x [y0, y1)."""
    img = Image.new("RGB", (w, h), (0, 0, 0))
    ImageDraw.Draw(img).rectangle([x0, y0, x1 - 1, y1 - 1], fill=(255, 255, 255))
    return _png(img)


@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
@pytest.mark.parametrize("out_hw", [(400, 400), (240, 320)])
def test_box_matches_pixels_after_resize(mode, out_hw):
    w, h, (x0, y0, x1, y1) = 517, 333, (101, 57, 389, 270)
    row = _row(_draw_rect_image(w, h, x0, y0, x1, y1), w, h, [[x0, y0, x1 - x0, y1 - y0]])
    cfg = T.TransformConfig(image_size=out_hw, resize=mode, image_format="png")
    s = T.process_row(row, cfg)
    assert isinstance(s, Sample)
    out = np.asarray(Image.open(io.BytesIO(s.image_bytes)))
    assert out.shape == (out_hw[0], out_hw[1], 3)
    ys, xs = np.nonzero(out[:, :, 0] >= 128)
    pixel_box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    np.testing.assert_allclose(s.record.boxes[0], pixel_box, atol=1.0)
    if mode == "letterbox":
        ch, cw = s.record.to_dict()["content_size"]
        assert s.record.to_dict()["pad"] == [out_hw[0] - ch, out_hw[1] - cw]
        assert (out[ch:, :, :] == 0).all() and (out[:, cw:, :] == 0).all()  # padding is bottom/right zeros


def test_boxes_are_clipped_to_content_and_meta_round_trips_float32():
    w, h = 200, 100
    row = _row(_grey(w, h), w, h, [[-20.3, -10.7, 100.1, 60.9], [150.25, 50.5, 80, 80]])
    s = T.process_row(row, T.TransformConfig(image_size=(300, 300), resize="letterbox"))
    assert isinstance(s, Sample)
    ch, cw = s.record.to_dict()["content_size"]
    assert (s.record.boxes >= 0).all() and (s.record.boxes[:, [0, 2]] <= cw).all() and (s.record.boxes[:, [1, 3]] <= ch).all()
    assert s.record.boxes[1, 2] == cw and s.record.boxes[1, 3] == ch  # clipped at the content edge, not the canvas
    meta = json.loads(json.dumps(s.record.to_dict()))
    assert s.record.boxes.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(meta["boxes"], dtype=np.float32), s.record.boxes)
    assert meta["bbox_ids"] == [100, 101] and meta["source_index"] == 3 and meta["image_id"] == 7
    assert meta["orig_size"] == [h, w] and meta["size"] == [300, 300]
    assert s.key == "000000000007" == meta["key"]


def test_labels_are_kept_as_int64_and_an_invalid_one_drops_its_box():
    labels = np.array([1, 80, INVALID_LABEL])
    row = _row(_grey(100, 100), 100, 100, [[0, 0, 50, 50], [10, 10, 50, 50], [20, 20, 50, 50]], labels=labels)
    s = T.process_row(row, T.TransformConfig())
    assert s.record.labels.dtype == np.int64
    assert s.record.labels.tolist() == [1, 80] and s.record.to_dict()["labels"] == [1, 80]
    assert s.record.box_drops == {"bad_category": 1}


# ---------------------------------------------------------------------------------- box drops


def test_every_box_drop_reason_and_crowd():
    w, h = 400, 200
    boxes = [
        [10, 10, 100, 100],  # kept
        [np.nan, 10, 10, 10],  # non_finite
        [10, 10, 50, 50],  # bad_category (label below)
        [10, 10, 0, 30],  # degenerate: zero width
        [10, 10, 30, -5],  # degenerate: negative height
        [500, 10, 30, 30],  # outside_image: right of the image
        [-50, -50, 20, 20],  # outside_image: ends before the image starts
        [10, 10, 1.5, 40],  # too_small: 1.5 px wide, 0.75 px after halving
        [20, 20, 60, 60],  # crowd, kept
        [20, 20, 0, 60],  # crowd, degenerate
    ]
    labels = [5, 5, INVALID_LABEL, 5, 5, 5, 5, 5, 1, 1]
    crowd = [False] * 8 + [True, True]
    s = T.process_row(_row(_grey(w, h), w, h, boxes, labels, crowd), T.TransformConfig(image_size=(100, 200)))
    assert isinstance(s, Sample)
    assert s.record.box_drops == {
        "bad_category": 1, "crowd_degenerate": 1, "degenerate": 2, "non_finite": 1, "outside_image": 2, "too_small": 1,
    }
    np.testing.assert_allclose(s.record.boxes, [[5, 5, 55, 55]])
    np.testing.assert_allclose(s.record.crowd_boxes, [[10, 10, 40, 40]])
    assert s.record.to_dict()["bbox_ids"] == [100] and s.record.to_dict()["crowd_bbox_ids"] == [108]
    assert s.record.to_dict()["crowd_boxes"] == [[10.0, 10.0, 40.0, 40.0]]


def test_min_box_size_uses_resized_pixels_either_side():
    w, h = 400, 400
    boxes = [[0, 0, 100, 7], [0, 0, 7, 100], [0, 0, 8, 8]]  # after /4: 1.75, 1.75, 2.0 px
    row = _row(_grey(w, h), w, h, boxes)
    s = T.process_row(row, T.TransformConfig(image_size=(100, 100), min_box_size=2.0))
    assert s.record.box_drops == {"too_small": 2} and len(s.record.boxes) == 1
    # Even with min_box_size 0, a box that is empty once written as float32 is never kept.
    row = _row(_grey(w, h), w, h, [[100, 100, 1e-6, 50], [0, 0, 8, 8]])
    s = T.process_row(row, T.TransformConfig(image_size=(100, 100), min_box_size=0.0))
    assert s.record.box_drops == {"too_small": 1} and (s.record.boxes[:, 2:] > s.record.boxes[:, :2]).all()


def test_xyxy_degenerate_after_conversion():
    row = _row(_grey(100, 100), 100, 100, [[50, 10, 40, 60], [10, 10, 60, 60]])
    s = T.process_row(row, T.TransformConfig(bbox_format="xyxy", image_size=(100, 100)))
    assert s.record.box_drops == {"degenerate": 1}
    np.testing.assert_allclose(s.record.boxes, [[10, 10, 60, 60]])


# -------------------------------------------------------------------------------- image drops


def _huge_png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels but carries no pixel data: refusing it must not need decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_every_image_drop_reason():
    cfg = T.TransformConfig()
    box = [[10, 10, 50, 50]]
    jpeg = _jpeg(Image.new("RGB", (120, 100), (200, 10, 10)))
    cases = {
        "missing_image": _row(None, 120, 100, box),
        "corrupt_image": _row(b"this is not an image", 120, 100, box),
        "size_mismatch": _row(jpeg, 100, 120, box),
        "no_boxes": _row(jpeg, 120, 100, np.zeros((0, 4))),
    }
    for reason, row in cases.items():
        out = T.process_row(row, cfg)
        assert isinstance(out, Dropped), reason
        assert out.reason == reason and out.index == 3 and out.image_id == 7
        assert "test row" in out.detail
    for data in (b"", jpeg[: len(jpeg) // 2]):  # empty, truncated
        assert T.process_row(_row(data, 120, 100, box), cfg).reason == "corrupt_image"
    # Too many pixels, decided from the header alone (the file has no pixel data at all).
    huge = _row(_huge_png_header(9000, 8000), 9000, 8000, box)
    assert T.process_row(huge, cfg).reason == "too_many_pixels"
    assert T.process_row(_row(jpeg, 120, 100, box), T.TransformConfig(max_pixels=120 * 100 - 1)).reason == "too_many_pixels"
    # Boxes all dropped -> no_boxes, with the box drops still counted.
    bad = T.process_row(_row(jpeg, 120, 100, [[np.inf, 0, 1, 1]]), cfg)
    assert bad.reason == "no_boxes" and bad.box_drops == {"non_finite": 1}
    assert set(T.DROP_REASONS) == {"missing_image", "corrupt_image", "too_many_pixels", "size_mismatch", "no_boxes"}


def test_keep_empty_keeps_images_without_boxes():
    s = T.process_row(_row(_grey(50, 40), 50, 40, np.zeros((0, 4))), T.TransformConfig(keep_empty=True))
    assert isinstance(s, Sample)
    assert s.record.boxes.shape == (0, 4) and s.record.labels.shape == (0,) and s.record.to_dict()["boxes"] == []


def test_crowd_only_image_counts_as_empty():
    row = _row(_grey(50, 40), 50, 40, [[5, 5, 20, 20]], crowd=[True])
    assert T.process_row(row, T.TransformConfig()).reason == "no_boxes"


# -------------------------------------------------------------------------------- image modes


def _tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


def _mode_cases():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p_transparent = p.copy()
    p_transparent.info["transparency"] = 1
    rgba = Image.new("RGBA", (4, 4), (200, 100, 50, 255))
    rgba.putpixel((0, 0), (200, 100, 50, 0))
    la = Image.new("LA", (4, 4), (80, 255))
    i16 = Image.fromarray(np.full((4, 4), 100 * 256 + 77, dtype=np.uint16))
    assert i16.mode.startswith("I;16")
    i32 = Image.fromarray(np.full((4, 4), 200 * 256, dtype=np.int32))
    f32 = Image.fromarray(np.full((4, 4), 42.0, dtype=np.float32))
    rgb_trns = Image.new("RGB", (4, 4), (10, 20, 30))
    rgb_trns.putpixel((0, 0), (1, 2, 3))
    buf = io.BytesIO()
    rgb_trns.save(buf, format="PNG", transparency=(1, 2, 3))
    return [
        ("RGB+tRNS", buf.getvalue(), (10, 20, 30), (0, 0, 0)),
        ("L", _png(Image.new("L", (4, 4), 77)), (77, 77, 77), None),
        ("1", _png(Image.new("1", (4, 4), 1)), (255, 255, 255), None),
        ("P", _png(p), (10, 200, 30), None),
        ("P+transparency", _png(p_transparent), (0, 0, 0), None),
        ("RGBA", _png(rgba), (200, 100, 50), (0, 0, 0)),
        ("LA", _png(la), (80, 80, 80), None),
        ("CMYK", _jpeg(Image.new("CMYK", (4, 4), (0, 255, 255, 0))), (255, 0, 0), None),
        ("I;16", _png(i16), (100, 100, 100), None),
        ("I", _tiff(i32), (200, 200, 200), None),
        ("F", _tiff(f32), (42, 42, 42), None),
        ("YCbCr", _jpeg(Image.new("RGB", (4, 4), (0, 0, 255)).convert("YCbCr")), (0, 0, 255), None),
    ]


@pytest.mark.parametrize("name,data,pixel,corner", _mode_cases(), ids=[c[0] for c in _mode_cases()])
def test_every_image_mode_decodes_to_rgb(name, data, pixel, corner):
    img = T.decode_image(data)
    assert img.mode == "RGB" and img.size == (4, 4)
    np.testing.assert_allclose(img.getpixel((2, 2)), pixel, atol=6)
    if corner is not None:  # fully transparent pixel: composited onto black
        assert img.getpixel((0, 0)) == corner


def test_exif_orientation_is_not_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _jpeg(img, exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == 6
    out = T.decode_image(data)
    assert out.size == (40, 20)
    assert out.getpixel((5, 10))[0] > 200 and out.getpixel((35, 10))[2] > 200
    # And a box given in stored pixels stays valid: the row's 40x20 matches, no size_mismatch.
    s = T.process_row(_row(data, 40, 20, [[0, 0, 20, 20]]), T.TransformConfig(image_size=(20, 40), image_format="png"))
    assert isinstance(s, Sample)


def test_decode_errors_are_typed():
    with pytest.raises(T.CorruptImageError):
        T.decode_image(b"")
    with pytest.raises(T.CorruptImageError):
        T.decode_image(b"GIF89a garbage")
    with pytest.raises(T.TooManyPixelsError):
        T.decode_image(_huge_png_header(9000, 8000))


# ---------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_encode_writes_no_metadata(fmt):
    img = Image.new("RGB", (16, 16), (1, 2, 3))
    exif = Image.Exif()
    exif[0x0112] = 3
    img.info["exif"] = exif.tobytes()
    img.info["icc_profile"] = b"fake icc profile"
    out = Image.open(io.BytesIO(T.encode_image(img, fmt, 90)))
    assert "exif" not in out.info and "icc_profile" not in out.info
    assert out.format == {"jpg": "JPEG", "png": "PNG"}[fmt]


@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_process_row_is_deterministic(mode, fmt):
    rng = np.random.default_rng(0)
    data = _jpeg(Image.fromarray(rng.integers(0, 255, (150, 230, 3), dtype=np.uint8)))
    row = _row(data, 230, 150, [[10.5, 20.25, 100, 80], [50, 60, 30.3, 40.7]], labels=[3, 9], crowd=[False, True])
    cfg = T.TransformConfig(image_size=(128, 96), resize=mode, image_format=fmt, quality=85)
    a, b = T.process_row(row, cfg), T.process_row(row, cfg)
    assert a.image_bytes == b.image_bytes
    assert a.record.to_json() == b.record.to_json()
    assert Image.open(io.BytesIO(a.image_bytes)).size == (96, 128)
    assert a.image_ext == fmt
