"""Sources: where rows come from. A Hub dataset id, a local folder in the Hub's layout (``hub``), or
an official COCO folder ``coco:DIR`` (``coco``); the box convention is decided from the data
(``bbox_format``). Every source yields ``SourceRow`` records with raw boxes and labels mapped to 1..80;
images stay encoded until the transform decodes them in our own workers.
"""
from __future__ import annotations

import os
import re

from .base import Source, resolve_split
from .bbox_format import BBOX_FORMAT_CHOICES, BboxFormatError, bbox_format_evidence, decide_bbox_format
from .coco import COCO_PREFIX, open_coco

DEFAULT_HUB_ID = "detection-datasets/coco"


def open_source(
    source: str,
    split: str,
    *,
    revision: str | None = None,
    bbox_format: str = "auto",
    detect_rows: int = 200,
) -> Source:
    """Open a Hub dataset id, a local Hub-layout folder, or ``coco:DIR`` for one split."""
    if bbox_format not in BBOX_FORMAT_CHOICES:
        raise ValueError(f"bbox format {bbox_format!r} is not one of {BBOX_FORMAT_CHOICES}")
    if detect_rows < 0:
        raise ValueError(f"detect_rows must be >= 0, got {detect_rows}")
    if source.startswith(COCO_PREFIX):
        if revision is not None:
            raise ValueError(f"{source}: revision applies to Hub datasets only, not to a coco: folder")
        return open_coco(source, split, bbox_format, detect_rows)
    kind = source_kind(source)
    if kind == "path" and not os.path.isdir(os.path.expanduser(source)):
        what = "a file, not a folder" if os.path.exists(os.path.expanduser(source)) else "no such folder"
        raise FileNotFoundError(f"{what}: {source} (a local source is a folder in the Hub's layout, or coco:DIR)")
    # `datasets` (and pandas behind it) takes ~0.7 s to import: only a Hub source pays for it.
    from .hub import open_hub

    return open_hub(os.path.expanduser(source) if kind == "path" else source, split, revision, bbox_format, detect_rows)


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def source_kind(source: str) -> str:
    """"coco" (coco:DIR), "path" (starts with ., / or ~, or names something that exists) or "hub" (an id).

    A value that is neither a path nor a well-formed Hub id (owner/name of letters, digits, -, _, .)
    raises ValueError at once, before anything tries the network.
    """
    if source.startswith(COCO_PREFIX):
        return "coco"
    if source.startswith((".", "/", "~")) or os.path.exists(source):
        return "path"
    if not _HUB_ID.match(source) or "--" in source or ".." in source:
        raise ValueError(f"{source!r} is not a folder here, and not a Hub dataset id (owner/name, of letters, "
                         "digits, '-', '_' and '.'); for a local folder, check the path")
    return "hub"


__all__ = [
    "BBOX_FORMAT_CHOICES", "BboxFormatError", "COCO_PREFIX", "DEFAULT_HUB_ID", "Source", "bbox_format_evidence",
    "decide_bbox_format", "open_source", "resolve_split",
]
