"""What a local folder given as a source holds, for the message that refuses one frcnn-shard cannot read.

A Hub-layout folder (parquet files) goes on to ``hub``; anything else is refused here, before ``datasets``
guesses a loader for it, with what was found and the source forms that exist.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import SourceFormError

VOC_PREFIX = "voc:"
SOURCE_FORMS = ("a Hub dataset id (owner/name); a folder in the Hub's layout (data/<split>-*.parquet); "
                "coco:DIR (official COCO: annotations/instances_<split>.json + <split>/); "
                "coco:FILE.json [--image-dir DIR] (any COCO-format file); voc:DIR (Pascal VOC)")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_MAX_SCAN = 10_000  # entries looked at: enough to describe a folder, bounded for a huge one


def _scan(root: Path) -> tuple[list[Path], bool]:
    """Up to _MAX_SCAN files under ``root`` (relative), and whether any is a parquet file."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            rel = Path(dirpath, name).relative_to(root)
            if name.endswith(".parquet"):
                return found, True
            found.append(rel)
            if len(found) >= _MAX_SCAN:
                return found, False
    return found, False


def describe(files: list[Path]) -> tuple[str, str]:
    """(what the files look like, the source form to use instead) for a folder without parquet files."""
    names = {f.as_posix() for f in files}
    if any(n.startswith("annotations/instances_") and n.endswith(".json") for n in names):
        return "an official COCO folder (annotations/instances_*.json)", "give it as coco:DIR"
    if any(f.suffix == ".xml" and f.parts[0] in ("Annotations", "annotations") for f in files):
        return "a Pascal VOC folder (Annotations/*.xml)", "give it as voc:DIR"
    if {"dataset_info.json", "state.json"} & names or any(f.suffix == ".arrow" for f in files):
        return ("a `datasets` save_to_disk folder (arrow files)",
                "write it as parquet first: `ds.to_parquet('DIR/data/<split>-00000-of-00001.parquet')`")
    jsons = [n for n in sorted(names) if n.endswith(".json")]
    if jsons:
        return f"JSON files ({', '.join(jsons[:3])})", f"if one is a COCO-format file, give it as coco:{jsons[0]}"
    images = [f for f in files if f.suffix.lower() in _IMAGE_EXTS]
    if images:
        return f"{len(images)} image files and no annotations", "frcnn-shard needs boxes: use one of the forms below"
    return (f"{len(files)} files, none of them parquet, COCO json or VOC xml" if files else "an empty folder"), \
        "use one of the forms below"


def refuse_non_hub_folder(path: str) -> None:
    """Return when ``path`` is a folder with parquet files (a Hub layout); else SourceFormError saying what it is."""
    p = Path(path)
    if not p.exists():
        raise SourceFormError(f"no such folder: {path}. Source forms: {SOURCE_FORMS}")
    if not p.is_dir():
        hint = f"for a COCO-format file, give it as coco:{path}" if p.suffix == ".json" else "a source is a folder"
        raise SourceFormError(f"{path} is a file, not a folder ({hint}). Source forms: {SOURCE_FORMS}")
    files, has_parquet = _scan(p)
    if has_parquet:
        return
    what, instead = describe(files)
    raise SourceFormError(f"{path}: not a source frcnn-shard can read: found {what}; {instead}. "
                          f"Source forms: {SOURCE_FORMS}")
