"""The names of a split folder's files: the one rule every writer and reader applies.

A reader takes a shard, manifest or drops file name only when it is one of these names inside the split
folder: a name from a file (manifest, part record) is never a path, URL or ``pipe:`` command.
"""
from __future__ import annotations

import os
import re

MANIFEST_NAME = "manifest.json"
DROPS_NAME = "drops.jsonl"  # every dropped row, beside the manifest (written by the merge)
PARTS_DIR = "_parts"  # part records and locks of a build in progress (see parts.py)
SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")


def split_folder_of(path: str | os.PathLike) -> str:
    """The split folder (path or URL) of a split folder or of its manifest.json: the one rule every reader takes."""
    text = os.fspath(path)
    if not text.rstrip("/").endswith(MANIFEST_NAME):
        return text
    return text.rstrip("/").rpartition("/")[0] or "."


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


def shard_name_problem(name: object, split: str, index: int | None = None) -> str | None:
    """Why ``name`` is not the name of a shard of ``split`` (of shard ``index`` when given), or None."""
    m = SHARD_RE.match(name) if isinstance(name, str) else None
    if m is None or m["split"] != split:
        return f"{name!r} is not a shard name of split {split!r} ({shard_name(split, 0)}, ...)"
    if index is not None and int(m["index"]) != index:
        return f"{name!r} is not the name of shard {index} ({shard_name(split, index)})"
    return None
