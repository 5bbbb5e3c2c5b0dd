"""Sources: where rows come from. A Hub dataset id, a local folder in the Hub's layout (``hub``), or
an official COCO folder ``coco:DIR`` (``coco``); the box convention is decided from the data
(``bbox_format``). Every source yields ``SourceRow`` records with raw boxes and labels mapped to 1..80;
images stay encoded until the transform decodes them in our own workers.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

from .base import Source, resolve_split
from .bbox_format import BBOX_FORMAT_CHOICES, BboxFormatError, bbox_format_evidence, decide_bbox_format
from ..errors import SourceFormError
from .coco import COCO_PREFIX, open_coco
from .folder import VOC_PREFIX, refuse_non_hub_folder

DEFAULT_HUB_ID = "detection-datasets/coco"
HUB_CROWD_CHOICES = ("auto", "off")


def open_source(
    source: str,
    split: str,
    *,
    revision: str | None = None,
    bbox_format: str = "auto",
    detect_rows: int = 200,
    image_dir: str | None = None,
    classes: Sequence[str] | None = None,
    hub_crowd: str = "auto",
) -> Source:
    """Open one split of a source: a Hub dataset id, a local Hub-layout folder, ``coco:DIR``, ``coco:FILE.json``
    or ``voc:DIR``.

    Args:
        source: the source spec (README, *Your own dataset*).
        split: the split to read (``all``: every image of a VOC folder without split lists).
        revision: a Hub revision (Hub ids only).
        bbox_format: auto, xywh or xyxy (sources.bbox_format).
        detect_rows: rows examined to decide the bbox format.
        image_dir: the image folder of a ``coco:FILE.json`` source (default: the json's folder).
        classes: keep and order these classes as labels 1..K (None: every class of the source).
        hub_crowd: auto or off: whether a Hub source's COCO crowd ids become crowd boxes.
    """
    source = _opened(source, split, revision=revision, bbox_format=bbox_format, detect_rows=detect_rows,
                     image_dir=image_dir, hub_crowd=hub_crowd)
    if classes is not None:
        source.keep_classes(classes)
    return source


def _opened(source: str, split: str, *, revision: str | None, bbox_format: str, detect_rows: int,
            image_dir: str | None, hub_crowd: str) -> Source:
    if hub_crowd not in HUB_CROWD_CHOICES:
        raise ValueError(f"hub_crowd {hub_crowd!r} is not one of {HUB_CROWD_CHOICES}")
    if bbox_format not in BBOX_FORMAT_CHOICES:
        raise ValueError(f"bbox format {bbox_format!r} is not one of {BBOX_FORMAT_CHOICES}")
    if detect_rows < 0:
        raise ValueError(f"detect_rows must be >= 0, got {detect_rows}")
    kind = source_kind(source)
    if kind != "hub" and revision is not None:
        raise ValueError(f"{source}: revision applies to Hub datasets only")
    if kind != "coco" and image_dir is not None:
        raise ValueError(f"{source}: --image-dir applies to coco:FILE.json sources only")
    if kind == "coco":
        return open_coco(source, split, bbox_format, detect_rows, image_dir=image_dir)
    if kind == "voc":
        from .voc import open_voc

        return open_voc(source, split, bbox_format, detect_rows)
    if kind == "path":
        source = os.path.expanduser(source)
        refuse_non_hub_folder(source)  # says what the folder holds, and which source forms exist
    # `datasets` (and pandas behind it) takes ~0.7 s to import: only a Hub source pays for it.
    from .hub import open_hub

    return open_hub(source, split, revision, bbox_format, detect_rows, hub_crowd=hub_crowd)


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def source_kind(source: str) -> str:
    """"coco" (coco:DIR or coco:FILE.json), "voc" (voc:DIR), "path" (starts with ., / or ~, or names something that exists) or "hub" (an id).

    A value that is neither a path nor a well-formed Hub id (owner/name of letters, digits, -, _, .)
    raises ValueError at once, before anything tries the network.
    """
    if source.startswith(COCO_PREFIX):
        return "coco"
    if source.startswith(VOC_PREFIX):
        return "voc"
    if source.startswith((".", "/", "~")) or os.path.exists(source):
        return "path"
    if not _HUB_ID.match(source) or "--" in source or ".." in source:
        raise SourceFormError(f"{source!r} is not a folder here, and not a Hub dataset id (owner/name, of letters, "
                         "digits, '-', '_' and '.'); for a local folder, check the path")
    return "hub"


__all__ = [
    "BBOX_FORMAT_CHOICES", "BboxFormatError", "COCO_PREFIX", "DEFAULT_HUB_ID", "HUB_CROWD_CHOICES", "Source", "bbox_format_evidence",
    "decide_bbox_format", "open_source", "resolve_split",
]
