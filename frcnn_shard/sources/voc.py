"""Pascal VOC folders (``voc:DIR``): ``Annotations/*.xml`` + ``JPEGImages/`` (VOC2007/2012), or the lowercase
export layout ``annotations/*.xml`` + ``images/``; split lists ``ImageSets/Main/<split>.txt`` (one image stem
per line), or ``--split all`` for every xml.

Pixel convention. VOC's ``bndbox`` xmin, ymin, xmax, ymax are 1-based *inclusive* pixel indices: a box
covering only the image's first pixel column is xmin = xmax = 1. Our boxes are continuous 0-based xyxy,
where pixel column i spans [i, i + 1). So, as detectron2's ``pascal_voc.py`` does,
x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax: the rows carry these raw boxes and the bbox format is
fixed to xyxy (``--bbox-format xywh`` is refused).

Labels 1..K are the sorted object names of *every* xml of the folder (not only the split's), so every split
of one folder gets the same labels. ``<difficult>1</difficult>`` objects are ignore regions (iscrowd).
Every xml is refused over 1 MiB or when it holds ``<!DOCTYPE`` or ``<!ENTITY`` (no entity is ever
expanded); the split's xmls must also follow the annotation rules (``voc_image``), checked at open.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import stat
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np

from ..errors import SourceFormError
from ..format.classes import ClassMap
from ..labels import INVALID_LABEL, class_map_from_names, label_lookup
from ..records import SourceRow
from .base import Source, resolve_split
from .bbox_format import bbox_format_record
from .folder import VOC_PREFIX

LAYOUTS = (("Annotations", "JPEGImages"), ("annotations", "images"))  # (xml folder, image folder)
SPLIT_LISTS = ("ImageSets", "Main")
ALL_SPLIT = "all"
MAX_XML_BYTES = 1 << 20
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_NUMERIC_STEM = re.compile(r"[0-9]+(_[0-9]+)?")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")
_MAX_NUMERIC_ID = 10 ** 12  # numeric ids keep the record's 12-digit key
_SHOWN = 5  # offending files named in one error
_BOX_SLACK = 1.0  # pixels a box may reach past the image (rounding in annotation tools)


@dataclass(frozen=True)
class VocImage:
    """One xml of the split, parsed and checked: boxes already in 0-based continuous xyxy."""

    stem: str
    filename: str | None  # the xml's <filename>, when it is a safe relative path
    width: int
    height: int
    names: tuple[str, ...]
    boxes: np.ndarray  # float64 [N, 4]
    difficult: np.ndarray  # bool [N]


def voc_layout(root: Path) -> tuple[Path, Path]:
    """(xml folder, image folder) of a VOC folder; SourceFormError when neither layout is there."""
    for ann, img in LAYOUTS:
        if (root / ann).is_dir():
            if not (root / img).is_dir():
                raise SourceFormError(f"VOC folder {root}: {ann}/ is there but its image folder {img}/ is not")
            return root / ann, root / img
    raise SourceFormError(f"VOC folder {root}: no Annotations/ (with JPEGImages/) nor annotations/ (with images/)")


def xml_files(ann_dir: Path) -> dict[str, Path]:
    """{stem: path} of the folder's ``*.xml``, sorted by stem; SourceFormError when there is none."""
    found = {p.stem: p for p in ann_dir.glob("*.xml")}
    if not found:
        raise SourceFormError(f"{ann_dir}: no .xml annotation file found")
    return {stem: found[stem] for stem in sorted(found)}


def split_lists(root: Path, class_names: set[str]) -> dict[str, Path]:
    """{split: list file} of ``ImageSets/Main``; VOC's per-class lists (``<class>_<split>.txt``) are not splits."""
    main = root.joinpath(*SPLIT_LISTS)
    # Only names a manifest can hold as its split (letters, digits, _).
    lists = {p.stem: p for p in main.glob("*.txt") if _SPLIT_NAME.fullmatch(p.stem)} if main.is_dir() else {}
    per_class = {s for s in lists if "_" in s and s.split("_", 1)[0] in class_names and s.split("_", 1)[1] in lists}
    return {s: p for s, p in sorted(lists.items()) if s not in per_class}


def read_split_list(path: Path, xmls: dict[str, Path]) -> tuple[list[str], bytes]:
    """The stems a split list names, in order, and its bytes; SourceFormError names stems without an xml."""
    raw = path.read_bytes()
    try:
        lines = raw.decode("utf-8-sig").splitlines()  # -sig: a BOM from a Windows editor
    except UnicodeDecodeError as e:
        raise SourceFormError(f"{path}: not UTF-8 text ({e})") from e
    stems = []
    for n, line in enumerate(lines, 1):
        words = line.split()
        if len(words) > 1:
            raise SourceFormError(f"{path}, line {n}: a split list has one image stem per line (got {line.strip()!r})")
        stems.extend(words)
    missing = [s for s in stems if s not in xmls]
    if missing:
        raise SourceFormError(f"{path}: {len(missing)} stems have no xml in {next(iter(xmls.values())).parent} "
                              f"(first {min(len(missing), _SHOWN)}: {missing[:_SHOWN]})")
    return stems, raw


def select_split(root: Path, split: str, xmls: dict[str, Path], lists: dict[str, Path]) -> tuple[str, list[str], bytes]:
    """(split name, the split's stems, the split list's bytes) for a requested split."""
    if split == ALL_SPLIT:
        return ALL_SPLIT, list(xmls), b""
    if not lists:
        raise SourceFormError(f"VOC folder {root}: no split lists ({'/'.join(SPLIT_LISTS)}/<split>.txt), so there "
                              f"is no split {split!r}; use --split {ALL_SPLIT} for every xml")
    resolved = resolve_split(split, list(lists) + [ALL_SPLIT], f"VOC folder {root}")
    if resolved == ALL_SPLIT:
        return ALL_SPLIT, list(xmls), b""
    stems, raw = read_split_list(lists[resolved], xmls)
    return resolved, stems, raw


def read_xml(path: Path) -> bytes:
    """An xml file's bytes: a regular file of at most 1 MiB (a FIFO would block the open forever)."""
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise SourceFormError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        raw = f.read(MAX_XML_BYTES + 1)
    if len(raw) > MAX_XML_BYTES:
        raise SourceFormError(f"{path}: over {MAX_XML_BYTES} bytes; a VOC annotation is at most 1 MiB")
    return raw


def declares_dtd(raw: bytes) -> bool:
    """Whether the bytes hold ``<!DOCTYPE`` or ``<!ENTITY`` (any case)."""
    # NULs dropped: the same words in UTF-16 or UTF-32 (which expat reads from a BOM) are found too.
    folded = raw.replace(b"\x00", b"").lower()
    return b"<!doctype" in folded or b"<!entity" in folded


class _NoDoctype(ET.TreeBuilder):
    """A tree builder that refuses a document type declaration when the parser meets one."""

    def doctype(self, name: str, pubid: str | None, system: str | None) -> None:
        raise SourceFormError(f"<!DOCTYPE {name}>")


def parse_xml(path: Path, raw: bytes) -> ET.Element:
    """The root ``<annotation>`` element; SourceFormError for a DTD or entity declaration, or bad XML."""
    refused = (f"{path}: holds <!DOCTYPE or <!ENTITY; VOC annotations are refused with a DTD "
               "(entities are never expanded)")
    if declares_dtd(raw):
        raise SourceFormError(refused)
    parser = ET.XMLParser(target=_NoDoctype())  # and the parser refuses one in any encoding it reads
    try:
        parser.feed(raw)
        root = parser.close()
    except SourceFormError as e:
        raise SourceFormError(refused) from e
    except (ET.ParseError, LookupError, ValueError) as e:  # LookupError, ValueError: an encoding expat lacks
        raise SourceFormError(f"{path}: not well-formed XML ({e})") from e
    if root.tag != "annotation":
        raise SourceFormError(f"{path}: the root element is <{root.tag}>, not <annotation>")
    return root


def _positive_int(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if re.fullmatch(r"[0-9]+", text) and int(text) > 0 else None


def image_size(root: ET.Element, path: Path) -> tuple[int, int]:
    """(width, height) from ``<size>``; SourceFormError unless both are positive integers."""
    size = root.find("size")
    w = _positive_int(size.findtext("width")) if size is not None else None
    h = _positive_int(size.findtext("height")) if size is not None else None
    if w is None or h is None:
        raise SourceFormError(f"{path}: needs <size> with positive integer <width> and <height>")
    return w, h


def safe_filename(root: ET.Element) -> str | None:
    """``<filename>`` when it is a relative path that stays inside the image folder, else None."""
    name = (root.findtext("filename") or "").strip()
    p = PurePosixPath(name.replace("\\", "/"))
    if not name or p.is_absolute() or ".." in p.parts or ":" in name:
        return None  # never a path outside the folder: the stem rule finds the image instead
    return p.as_posix()


def parse_object(obj: ET.Element, index: int, path: Path) -> tuple[str, list[float], bool]:
    """(name, 0-based continuous xyxy box, difficult) of one ``<object>``; SourceFormError names the rule broken."""
    where = f"{path}: object {index}"
    name = (obj.findtext("name") or "").strip()
    if not name:
        raise SourceFormError(f"{where} has no <name>")
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise SourceFormError(f"{where} ({name}) has no <bndbox>")
    coords = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        try:
            value = float((bndbox.findtext(tag) or "").strip())
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise SourceFormError(f"{where} ({name}): <bndbox> needs a number in <{tag}>")
        coords.append(value)
    xmin, ymin, xmax, ymax = coords
    if xmax < xmin or ymax < ymin:
        raise SourceFormError(f"{where} ({name}): xmax < xmin or ymax < ymin in {coords}")
    difficult = (obj.findtext("difficult") or "0").strip()
    if difficult not in ("0", "1"):
        raise SourceFormError(f"{where} ({name}): <difficult> must be 0 or 1 (got {difficult!r})")
    # 1-based inclusive pixel indices -> continuous 0-based corners (detectron2's pascal_voc.py).
    return name, [xmin - 1.0, ymin - 1.0, xmax, ymax], difficult == "1"


def voc_image(stem: str, root: ET.Element, path: Path) -> VocImage:
    """One xml of the split, checked: size, every object's name and box, boxes inside the image (1 px slack)."""
    width, height = image_size(root, path)
    parsed = [parse_object(obj, i, path) for i, obj in enumerate(root.findall("object"))]
    boxes = np.array([b for _, b, _ in parsed], dtype=np.float64).reshape(-1, 4)
    outside = (boxes[:, 0] < -_BOX_SLACK) | (boxes[:, 1] < -_BOX_SLACK) | \
        (boxes[:, 2] > width + _BOX_SLACK) | (boxes[:, 3] > height + _BOX_SLACK)
    if outside.any():
        i = int(np.argmax(outside))
        raise SourceFormError(f"{path}: object {i} ({parsed[i][0]}) box {boxes[i].tolist()} (0-based xyxy) lies "
                              f"outside the {width}x{height} image by more than {_BOX_SLACK:g} pixel")
    return VocImage(stem, safe_filename(root), width, height, tuple(n for n, _, _ in parsed), boxes,
                    np.array([d for _, _, d in parsed], dtype=bool))


def object_names(root: ET.Element) -> list[str]:
    """The non-blank object names of an xml outside the split (for the class list only)."""
    return [n for n in ((o.findtext("name") or "").strip() for o in root.findall("object")) if n]


@dataclass
class _Folder:
    """Everything read from the xml files, in one pass over them."""

    images: dict[str, VocImage]  # by stem, every xml that follows the annotation rules
    broken: dict[str, str]  # stem -> the annotation rule its xml breaks: an error only when the split has it
    names: list[str]  # every object name of the folder
    digests: list[tuple[str, str]]  # (path relative to DIR, sha256) of every xml


def read_folder(root: Path, xmls: dict[str, Path]) -> _Folder:
    """Read and parse every xml once (the class list needs them all); SourceFormError names the first few
    that cannot be read or parsed safely, and how many there are.
    """
    out = _Folder({}, {}, [], [])
    problems: list[str] = []
    for stem, path in xmls.items():
        try:
            raw = read_xml(path)
            out.digests.append((path.relative_to(root).as_posix(), hashlib.sha256(raw).hexdigest()))
            tree = parse_xml(path, raw)
        except (SourceFormError, OSError) as e:
            problems.append(str(e) if isinstance(e, SourceFormError) else f"{path}: cannot be read ({e})")
            continue
        try:
            image = out.images[stem] = voc_image(stem, tree, path)
            out.names.extend(image.names)
        except SourceFormError as e:
            out.broken[stem] = str(e)
            out.names.extend(object_names(tree))
    _raise_first(root, problems)
    return out


def _raise_first(root: Path, problems: list[str]) -> None:
    if problems:
        raise SourceFormError(f"VOC folder {root}: {len(problems)} xml files break a rule; first "
                              f"{min(len(problems), _SHOWN)}: " + "; ".join(problems[:_SHOWN]))


def image_ids(stems: Sequence[str]) -> tuple[dict[str, int], str]:
    """{stem: image id} for every xml stem of the folder, and the rule that gave them.

    VOC's numeric stems (000005, 2008_000008) give their own number, so ids match the dataset's; any other
    naming gives the 1-based position in the sorted stems (the same for every split of the folder).
    """
    if all(_NUMERIC_STEM.fullmatch(s) for s in stems):
        ids = {s: int(s.replace("_", "")) for s in stems}
        if len(set(ids.values())) == len(ids) and max(ids.values(), default=0) < _MAX_NUMERIC_ID:
            return ids, "int(stem without '_')"
    return {s: i + 1 for i, s in enumerate(sorted(stems))}, "1-based position in the sorted xml stems"


def fingerprint(digests: list[tuple[str, str]], split: str, split_bytes: bytes) -> str:
    """sha256 over every xml (relative path and content hash, sorted), the split's name and its list's bytes."""
    h = hashlib.sha256(json.dumps(sorted(digests)).encode())
    h.update(b"\0" + split.encode() + b"\0" + split_bytes)
    return "sha256:" + h.hexdigest()


def find_image(img_dir: Path, image: VocImage) -> tuple[bytes | None, Path]:
    """The image's bytes and path: ``<filename>`` when it is there, else ``<stem>.jpg|.jpeg|.png``; None when none is."""
    candidates = ([img_dir / image.filename] if image.filename else []) + \
        [img_dir / (image.stem + s) for s in IMAGE_SUFFIXES]
    for path in candidates:
        try:
            return path.read_bytes(), path
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            continue
    return None, candidates[0]  # the transform drops it as missing_image, with this path as origin


def voc_row(image: VocImage, index: int, image_id: int, catmap: dict, img_dir: Path) -> SourceRow:
    """One split row: raw 0-based xyxy boxes, labels 1..K, difficult objects as crowd."""
    data, path = find_image(img_dir, image)
    return SourceRow(
        index=index,
        image_id=image_id,
        image=data,
        width=image.width,
        height=image.height,
        bbox_ids=np.arange(len(image.names), dtype=np.int64),  # the object's position in its xml
        labels=np.array([catmap.get(n, INVALID_LABEL) for n in image.names], dtype=np.int64),
        bboxes=image.boxes.copy(),
        iscrowd=image.difficult.copy(),
        origin=str(path),
    )


def _class_map(names: list[str], ann_dir: Path) -> ClassMap:
    if not names:
        raise SourceFormError(f"{ann_dir}: no <object> with a <name> in any xml; a build needs at least one class")
    return class_map_from_names(names, f"{ann_dir}: every xml's <object><name>")


def open_voc(source: str, split: str, bbox_format: str, detect_rows: int) -> Source:
    """Open one split of a Pascal VOC folder (``voc:DIR``)."""
    root = Path(source[len(VOC_PREFIX):]).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root} (source {source!r})")
    if bbox_format == "xywh":
        raise SourceFormError(f"{source}: VOC boxes are xmin, ymin, xmax, ymax (xyxy); bbox format xywh does not apply")
    ann_dir, img_dir = voc_layout(root)
    xmls = xml_files(ann_dir)
    folder = read_folder(root, xmls)
    # Per-class lists (<class>_<split>.txt) are told apart by the class names, hence after reading every xml.
    resolved, stems, split_bytes = select_split(root, split, xmls, split_lists(root, set(folder.names)))
    _raise_first(root, [folder.broken[s] for s in dict.fromkeys(stems) if s in folder.broken])
    classes = _class_map(folder.names, ann_dir)
    ids, id_rule = image_ids(list(xmls))
    images = [folder.images[s] for s in stems]
    catmap = label_lookup(classes)

    def rows_fn(start: int, stop: int) -> Iterator[SourceRow]:
        for i in range(start, stop):
            yield voc_row(images[i], i, ids[images[i].stem], catmap, img_dir)

    examined = [(im.boxes, im.width, im.height) for im in images[:detect_rows]]
    record = bbox_format_record(bbox_format, examined, str(ann_dir), fixed="xyxy")
    difficult = sum(int(im.difficult.sum()) for im in images)
    stats = {"images": len(images), "annotations": sum(len(im.names) for im in images),
             "difficult_annotations": difficult,
             "images_without_annotations": sum(1 for im in images if not im.names)}
    info = {"kind": "voc", "id": source, "revision": None, "split": resolved, "requested_split": split,
            "num_rows": len(images), "annotations_dir": str(ann_dir), "image_id_rule": id_rule}
    crowd = {"rule": "difficult", "evidence": f"{ann_dir}: the objects' <difficult> flag", "annotations": difficult}
    return Source(info, record, stats, len(images), fingerprint(folder.digests, resolved, split_bytes), rows_fn,
                  (ids[im.stem] for im in images), classes=classes, crowd=crowd)
