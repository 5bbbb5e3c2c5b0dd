"""The Pascal VOC source (``voc:DIR``) on real images: tiny_coco written as a VOC folder (xml + symlinked JPEGs)."""
from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from conftest import build_shards, require_tiny_coco
from frcnn_shard.errors import SourceFormError
from frcnn_shard.inspect.check import check_shards
from frcnn_shard.shards import read_manifest
from frcnn_shard.sources import open_source

N_TRAIN, N_VAL = 40, 10


def voc_box(bbox: list[float], width: int, height: int) -> list[int]:
    """A COCO [x, y, w, h] as VOC's 1-based inclusive xmin, ymin, xmax, ymax (rounded, inside the image)."""
    x, y, w, h = bbox
    xmin, ymin = min(max(round(x) + 1, 1), width), min(max(round(y) + 1, 1), height)
    xmax, ymax = min(max(round(x + w), xmin), width), min(max(round(y + h), ymin), height)
    return [xmin, ymin, xmax, ymax]


def annotation_xml(image: dict, objects: list[tuple[str, list[int], bool]]) -> bytes:
    """The VOC xml of one image: size and one <object> per (name, bndbox, difficult)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC"
    ET.SubElement(root, "filename").text = image["file_name"]
    size = ET.SubElement(root, "size")
    for tag, value in (("width", image["width"]), ("height", image["height"]), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for name, box, difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "1" if difficult else "0"
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bndbox, tag).text = str(value)
    return ET.tostring(root)


def write_voc(dst: Path, coco_dir: Path, layout: tuple[str, str] = ("Annotations", "JPEGImages"),
              n: int | None = None, splits: dict[str, int] | None = None) -> dict[str, dict]:
    """tiny_coco as a VOC folder in ``dst``; {stem: expected row} with boxes as the source must give them."""
    data = json.loads((coco_dir / "annotations" / "instances_train2017.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    images = sorted(data["images"], key=lambda im: im["file_name"])[:n]
    by_image: dict[int, list[dict]] = {im["id"]: [] for im in images}
    for ann in data["annotations"]:
        by_image.get(ann["image_id"], []).append(ann)
    ann_dir, img_dir = dst / layout[0], dst / layout[1]
    ann_dir.mkdir(parents=True)
    img_dir.mkdir()
    expected = {}
    for im in images:
        stem = Path(im["file_name"]).stem
        objects = [(names[a["category_id"]], voc_box(a["bbox"], im["width"], im["height"]), bool(a["iscrowd"]))
                   for a in by_image[im["id"]]]
        (ann_dir / f"{stem}.xml").write_bytes(annotation_xml(im, objects))
        (img_dir / im["file_name"]).symlink_to(coco_dir / "train2017" / im["file_name"])
        expected[stem] = {"id": im["id"], "size": (im["width"], im["height"]), "names": [o[0] for o in objects],
                          "boxes": [[b[0] - 1, b[1] - 1, b[2], b[3]] for _, b, _ in objects],
                          "difficult": [o[2] for o in objects]}
    if splits:
        main = dst / "ImageSets" / "Main"
        main.mkdir(parents=True)
        stems, at = list(expected), 0
        for split, count in splits.items():
            (main / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems[at:at + count]))
            at += count
    return expected


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """All 50 tiny_coco images as VOC2007 (Annotations/ + JPEGImages/), train 40 and val 10."""
    root = tmp_path_factory.mktemp("voc")
    return root, write_voc(root, require_tiny_coco(), splits={"train": N_TRAIN, "val": N_VAL})


def small_voc(tmp_path: Path, n: int = 6) -> tuple[Path, dict[str, dict]]:
    """The first n images, train = all of them: a folder each bad-input test may break."""
    return tmp_path, write_voc(tmp_path, require_tiny_coco(), n=n, splits={"train": n})


def assert_rows_match(src, expected: dict[str, dict], stems: list[str]) -> None:
    rows = list(src.rows())
    assert [r.image_id for r in rows] == [expected[s]["id"] for s in stems]
    names = src.classes.names
    for row, stem in zip(rows, stems):
        exp = expected[stem]
        assert (row.width, row.height) == exp["size"]
        assert row.image is not None and row.image[:2] == b"\xff\xd8", row.origin  # the real JPEG
        np.testing.assert_array_equal(row.bboxes, np.array(exp["boxes"], dtype=np.float64).reshape(-1, 4))
        assert [names[label - 1] for label in row.labels] == exp["names"]
        assert row.iscrowd.tolist() == exp["difficult"]


def test_train_split_rows_labels_boxes_and_difficult(voc):
    root, expected = voc
    src = open_source(f"voc:{root}", "train")
    stems = list(expected)[:N_TRAIN]
    assert src.num_rows == N_TRAIN
    all_names = sorted({n for e in expected.values() for n in e["names"]})
    assert list(src.classes.names) == all_names  # every xml's names, not only the split's
    assert src.classes.source_ids == tuple(all_names) and src.classes.ids == tuple(range(1, len(all_names) + 1))
    assert_rows_match(src, expected, stems)
    difficult = sum(sum(expected[s]["difficult"]) for s in stems)
    assert difficult > 0  # tiny_coco's crowd annotations became difficult objects
    assert src.crowd["rule"] == "difficult" and src.crowd["annotations"] == difficult
    assert src.stats == {"images": N_TRAIN, "annotations": sum(len(expected[s]["names"]) for s in stems),
                         "difficult_annotations": difficult,
                         "images_without_annotations": sum(1 for s in stems if not expected[s]["names"])}
    assert src.bbox_format["decision"] == "xyxy" and not src.bbox_format["contradicted_by_evidence"]
    assert src.info["kind"] == "voc" and src.info["split"] == "train" and src.info["num_rows"] == N_TRAIN
    assert src.info["image_id_rule"] == "int(stem without '_')"


def test_validation_maps_to_val_with_the_same_labels(voc):
    root, expected = voc
    train, val = open_source(f"voc:{root}", "train"), open_source(f"voc:{root}", "validation")
    assert val.info["split"] == "val" and val.info["requested_split"] == "validation" and val.num_rows == N_VAL
    assert val.classes == train.classes
    assert_rows_match(val, expected, list(expected)[N_TRAIN:])
    assert val.fingerprint != train.fingerprint
    assert open_source(f"voc:{root}", "all").num_rows == N_TRAIN + N_VAL
    with pytest.raises(ValueError, match="unknown split 'test'"):
        open_source(f"voc:{root}", "test")


def test_split_all_without_split_lists(tmp_path):
    expected = write_voc(tmp_path, require_tiny_coco())
    src = open_source(f"voc:{tmp_path}", "all")
    assert src.num_rows == 50 and src.info["split"] == "all"
    assert_rows_match(src, expected, sorted(expected))
    with pytest.raises(SourceFormError, match=r"no split lists.*--split all"):
        open_source(f"voc:{tmp_path}", "train")


def test_lowercase_export_layout(tmp_path):
    expected = write_voc(tmp_path, require_tiny_coco(), layout=("annotations", "images"), n=8)
    src = open_source(f"voc:{tmp_path}", "all")
    assert src.info["annotations_dir"] == str(tmp_path / "annotations")
    assert_rows_match(src, expected, sorted(expected))


def test_build_then_check_and_manifest_categories(voc, tmp_path):
    root, expected = voc
    res = build_shards(tmp_path / "out", f"voc:{root}", "train")
    assert check_shards(res.out_dir, workers=0).ok
    m = read_manifest(res.out_dir)
    names = sorted({n for e in expected.values() for n in e["names"]})
    assert m["categories"]["list"] == [{"label": i + 1, "name": n, "id": i + 1, "source_id": n}
                                       for i, n in enumerate(names)]
    assert m["source"]["kind"] == "voc" and m["bbox_format"]["decision"] == "xyxy"
    assert m["crowd"]["rule"] == "difficult" and m["totals"]["rows"] == N_TRAIN
    # Every train image with an object that is not difficult becomes a sample (tiny_coco's boxes are all >= 1 px).
    with_objects = sum(1 for s in list(expected)[:N_TRAIN] if not all(expected[s]["difficult"]))
    assert m["totals"]["samples"] == with_objects and res.samples == with_objects


def test_bbox_format_xywh_is_refused(voc):
    with pytest.raises(SourceFormError, match="xywh does not apply"):
        open_source(f"voc:{voc[0]}", "train", bbox_format="xywh")
    assert open_source(f"voc:{voc[0]}", "train", bbox_format="xyxy").bbox_format["decision"] == "xyxy"


def edit_xml(path: Path, edit) -> None:
    """Apply ``edit(root)`` to an xml file."""
    root = ET.fromstring(path.read_bytes())
    edit(root)
    path.write_bytes(ET.tostring(root))


def first_object(root: ET.Element) -> ET.Element:
    return root.find("object")


def set_box(i: int, value: str):
    return lambda root: first_object(root).find("bndbox")[i].__setattr__("text", value)


BAD_XML = {
    "no <size>": (lambda root: root.remove(root.find("size")), "needs <size>"),
    "zero width": (lambda root: root.find("size/width").__setattr__("text", "0"), "positive integer <width>"),
    "float height": (lambda root: root.find("size/height").__setattr__("text", "4.5"), "positive integer"),
    "xmax past the image": (lambda root: first_object(root).find("bndbox/xmax").__setattr__(
        "text", str(int(root.findtext("size/width")) + 2)), "outside the"),
    "ymin before the image": (set_box(1, "-1"), "outside the"),
    "xmax < xmin": (lambda root: first_object(root).find("bndbox/xmax").__setattr__(
        "text", str(int(first_object(root).findtext("bndbox/xmin")) - 1)), "xmax < xmin"),
    "coordinate not a number": (set_box(2, "ten"), "needs a number in <xmax>"),
    "no <name>": (lambda root: first_object(root).remove(first_object(root).find("name")), "has no <name>"),
    "no <bndbox>": (lambda root: first_object(root).remove(first_object(root).find("bndbox")), "has no <bndbox>"),
    "difficult 2": (lambda root: first_object(root).find("difficult").__setattr__("text", "2"), "<difficult>"),
}


@pytest.mark.parametrize("case", list(BAD_XML))
def test_each_annotation_rule_names_the_file(tmp_path, case):
    root, expected = small_voc(tmp_path)
    stem = next(s for s, e in expected.items() if e["names"])
    edit, message = BAD_XML[case]
    edit_xml(root / "Annotations" / f"{stem}.xml", edit)
    with pytest.raises(SourceFormError, match=message) as e:
        open_source(f"voc:{root}", "train")
    assert f"{stem}.xml" in str(e.value) and "1 xml files break a rule" in str(e.value)


def test_a_broken_xml_outside_the_split_only_breaks_the_splits_that_hold_it(tmp_path):
    root, expected = small_voc(tmp_path)
    stems = list(expected)
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(stems[:-1]) + "\n")
    edit_xml(root / "Annotations" / f"{stems[-1]}.xml", lambda r: r.remove(r.find("size")))
    assert open_source(f"voc:{root}", "train").num_rows == len(stems) - 1
    with pytest.raises(SourceFormError, match=f"{stems[-1]}.xml: needs <size>"):
        open_source(f"voc:{root}", "all")


def test_the_error_counts_and_names_the_first_offending_files(tmp_path):
    root, expected = small_voc(tmp_path)
    for stem in expected:
        edit_xml(root / "Annotations" / f"{stem}.xml", lambda r: r.remove(r.find("size")))
    with pytest.raises(SourceFormError, match=f"{len(expected)} xml files break a rule; first 5") as e:
        open_source(f"voc:{root}", "train")
    assert sum(f"{s}.xml" in str(e.value) for s in expected) == 5


@pytest.mark.parametrize("declaration", [
    '<!DOCTYPE annotation [<!ENTITY big "xxxxxxxx">]>',
    '<!DOCTYPE annotation SYSTEM "file:///etc/passwd">',
    '<!doctype annotation>',
])
def test_a_dtd_or_entity_is_refused(tmp_path, declaration):
    root, expected = small_voc(tmp_path)
    path = root / "Annotations" / f"{next(iter(expected))}.xml"
    path.write_bytes(declaration.encode() + path.read_bytes())
    with pytest.raises(SourceFormError, match=r"<!DOCTYPE or <!ENTITY") as e:
        open_source(f"voc:{root}", "train")
    assert path.name in str(e.value)


def test_a_utf16_dtd_is_refused(tmp_path):
    root, expected = small_voc(tmp_path)
    path = root / "Annotations" / f"{next(iter(expected))}.xml"
    text = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE a [<!ENTITY e "x">]>' + \
        path.read_text().replace("<folder>VOC</folder>", "<folder>&e;</folder>")
    path.write_bytes(text.encode("utf-16"))
    with pytest.raises(SourceFormError, match=f"{path.name}: holds <!DOCTYPE"):
        open_source(f"voc:{root}", "train")


def test_an_xml_over_1_mib_is_refused(tmp_path):
    root, expected = small_voc(tmp_path)
    path = root / "Annotations" / f"{next(iter(expected))}.xml"
    path.write_bytes(path.read_bytes() + b"<!--" + b"x" * (1 << 20) + b"-->")
    with pytest.raises(SourceFormError, match=f"{path.name}: over 1048576 bytes"):
        open_source(f"voc:{root}", "train")


def test_malformed_xml_names_the_file(tmp_path):
    root, expected = small_voc(tmp_path)
    path = root / "Annotations" / f"{next(iter(expected))}.xml"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SourceFormError, match=f"{path.name}: not well-formed XML"):
        open_source(f"voc:{root}", "train")


def test_no_xml_no_objects_and_a_stem_without_xml(tmp_path):
    root, expected = small_voc(tmp_path)
    stems = list(expected)
    train = root / "ImageSets" / "Main" / "train.txt"
    train.write_text(train.read_text() + "no_such_image\n")
    with pytest.raises(SourceFormError, match=r"train\.txt: 1 stems have no xml.*no_such_image"):
        open_source(f"voc:{root}", "train")
    train.write_text("\n".join(stems) + "\n")
    for stem in stems:
        edit_xml(root / "Annotations" / f"{stem}.xml", lambda r: [r.remove(o) for o in r.findall("object")])
    with pytest.raises(SourceFormError, match="Annotations: no <object> with a <name> in any xml"):
        open_source(f"voc:{root}", "train")
    for stem in stems:
        (root / "Annotations" / f"{stem}.xml").unlink()
    with pytest.raises(SourceFormError, match="Annotations: no .xml annotation file found"):
        open_source(f"voc:{root}", "all")


def test_not_a_voc_folder(tmp_path):
    with pytest.raises(SourceFormError, match="no Annotations/"):
        open_source(f"voc:{tmp_path}", "all")
    (tmp_path / "Annotations").mkdir()
    with pytest.raises(SourceFormError, match="JPEGImages/ is not"):
        open_source(f"voc:{tmp_path}", "all")
    with pytest.raises(FileNotFoundError):
        open_source(f"voc:{tmp_path / 'nowhere'}", "all")


@pytest.mark.parametrize("escape", ["../outside.jpg", "sub/../../outside.jpg", "ABSOLUTE"])
def test_image_file_rules_never_leave_the_folder(tmp_path, escape):
    root, expected = small_voc(tmp_path, n=3)
    a, b, c = expected
    outside = tmp_path / "outside.jpg"
    shutil.copyfile(next((root / "JPEGImages").iterdir()).resolve(), outside)
    escape = str(outside) if escape == "ABSOLUTE" else escape
    # a: <filename> leads out of the image folder: ignored, the stem's image is read instead.
    edit_xml(root / "Annotations" / f"{a}.xml", lambda r: r.find("filename").__setattr__("text", escape))
    # b: <filename> names another file of the folder, which is used; c: no image at all.
    (root / "JPEGImages" / f"{b}.jpg").rename(root / "JPEGImages" / "renamed.jpg")
    edit_xml(root / "Annotations" / f"{b}.xml", lambda r: r.find("filename").__setattr__("text", "renamed.jpg"))
    (root / "JPEGImages" / f"{c}.jpg").unlink()
    rows = {r.image_id: r for r in open_source(f"voc:{root}", "train").rows()}
    ra, rb, rc = (rows[expected[s]["id"]] for s in (a, b, c))
    assert ra.origin == str(root / "JPEGImages" / f"{a}.jpg") and ra.image is not None
    assert rb.origin == str(root / "JPEGImages" / "renamed.jpg") and rb.image is not None
    assert rc.image is None and rc.origin == str(root / "JPEGImages" / f"{c}.jpg")


def test_image_ids_fall_back_to_positions_for_other_stems(tmp_path):
    root, expected = small_voc(tmp_path, n=3)
    stems = list(expected)
    for i, stem in enumerate(stems):
        (root / "Annotations" / f"{stem}.xml").rename(root / "Annotations" / f"img_{'cba'[i]}.xml")
    (root / "ImageSets" / "Main" / "train.txt").write_text("img_a\nimg_c\n")
    src = open_source(f"voc:{root}", "train")
    assert src.info["image_id_rule"] == "1-based position in the sorted xml stems"
    assert [r.image_id for r in src.rows()] == [1, 3]
    assert all(r.image is not None for r in src.rows())  # found by <filename>, whatever the stem


def test_voc2012_stems_give_their_number_and_the_fingerprint_follows_the_xmls(tmp_path):
    root, expected = small_voc(tmp_path, n=2)
    for stem, new in zip(expected, ("2008_000008", "2008_000010")):
        (root / "Annotations" / f"{stem}.xml").rename(root / "Annotations" / f"{new}.xml")
    (root / "ImageSets" / "Main" / "train.txt").write_text("2008_000008\n2008_000010\n")
    src = open_source(f"voc:{root}", "train")
    assert [r.image_id for r in src.rows()] == [2008000008, 2008000010]
    assert open_source(f"voc:{root}", "train").fingerprint == src.fingerprint
    edit_xml(root / "Annotations" / "2008_000010.xml", lambda r: r.find("folder").__setattr__("text", "VOC2012"))
    assert open_source(f"voc:{root}", "train").fingerprint != src.fingerprint


def test_per_class_lists_are_not_splits(tmp_path):
    root, expected = small_voc(tmp_path)
    name = next(n for e in expected.values() for n in e["names"])
    main = root / "ImageSets" / "Main"
    (main / f"{name}_train.txt").write_text("".join(f"{s} -1\n" for s in expected))
    with pytest.raises(ValueError, match=r"available splits: \['all', 'train'\]"):
        open_source(f"voc:{root}", f"{name}_train")


def test_the_parser_itself_refuses_a_doctype(tmp_path):
    """Behind the byte check, the parser refuses a DTD too (an encoding the check would not see through)."""
    from frcnn_shard.sources import voc

    raw = b'<!DOCTYPE annotation [<!ENTITY e "x">]><annotation>&e;</annotation>'
    assert voc.declares_dtd(raw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(voc, "declares_dtd", lambda raw: False)  # the byte check sees nothing
        with pytest.raises(SourceFormError, match="a.xml: holds <!DOCTYPE"):
            voc.parse_xml(Path("a.xml"), raw)


@pytest.mark.parametrize("raw", [b'<?xml version="1.0" encoding="nonesuch"?><annotation/>',
                                 b'<?xml version="1.0" encoding="utf-7"?><annotation/>', b"<size/>"])
def test_unreadable_encodings_and_other_roots_name_the_file(tmp_path, raw):
    root, expected = small_voc(tmp_path, n=2)
    path = root / "Annotations" / f"{next(iter(expected))}.xml"
    path.write_bytes(raw)
    with pytest.raises(SourceFormError, match=f"{path.name}: (not well-formed XML|the root element is <size>)"):
        open_source(f"voc:{root}", "train")
