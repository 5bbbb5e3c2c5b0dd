"""The small JSON files of a split folder: one writer (manifest, part records, locks, drops) and bounded readers.

Every JSON file this project writes goes through ``json_bytes`` (an object) or ``jsonl_bytes`` (one
compact object per line), so byte-identical builds write byte-identical records.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from ..format import FORMAT_VERSION
from ..format.manifest import MAX_JSON_BYTES, Manifest, ManifestError, parse_json
from ..format.names import MANIFEST_NAME, PARTS_DIR
from .base import Store
from .local import LocalStore
from .location import store_of


def json_bytes(obj: dict) -> bytes:
    """The bytes of a manifest, a part record or a lock: indented by one, key order kept, a final newline."""
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def jsonl_bytes(rows: Iterable[dict]) -> bytes:
    """JSON lines (drops.jsonl): one compact object per line, each ending in a newline."""
    return b"".join(json.dumps(row, separators=(",", ":")).encode() + b"\n" for row in rows)


def write_json_atomic(path: str | os.PathLike, obj: dict) -> None:
    """Write ``json_bytes(obj)`` to a local ``path`` atomically (fsync'ed temporary file, rename); the old file
    stays on failure."""
    path = Path(path)
    LocalStore(path.parent).write_atomic(path.name, json_bytes(obj))


def read_manifest(location: str | os.PathLike | Store, storage_options: dict | None = None) -> Manifest:
    """Read and validate ``<location>/manifest.json`` (local or a URL); ManifestError names the file and the rule.

    The file is read up to MAX_JSON_BYTES and its structure checked (``format.manifest.check_manifest``)
    before anything uses it.
    """
    store = store_of(location, storage_options)
    where = store.location(MANIFEST_NAME)
    try:
        data = read_bounded(store, MANIFEST_NAME, MAX_JSON_BYTES)
    except FileNotFoundError:
        parts = [n for n in store.sub(PARTS_DIR).names() if n.endswith(".json")]
        if parts:
            raise ManifestError(f"{where}: no manifest yet: the build is not finished ({len(parts)} part record(s) in "
                                f"{PARTS_DIR}/). Resume it with the same command, or, for a build run in parts, "
                                f"run `frcnn-shard merge {store.url}` once every part is done") from None
        raise ManifestError(f"{where}: no manifest (is this a frcnn-shard output directory?)") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"{where}: unreadable manifest: {e}") from None
    manifest = parse_json(data, where)
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise ManifestError(f"{where}: not a frcnn-shard manifest (no format_version)")
    major = str(manifest["format_version"]).split(".")[0]
    if major != FORMAT_VERSION.split(".")[0]:
        raise ManifestError(
            f"{where}: format version {str(manifest['format_version'])[:20]!r} is not readable by this version "
            f"(reads {FORMAT_VERSION.split('.')[0]}.x)"
        )
    return Manifest.checked(manifest, where)


def read_bounded(store: Store, name: str, limit: int) -> bytes:
    """The bytes of a small file of the store, refused (ValueError) beyond ``limit`` bytes without reading them all."""
    with store.open_read(name) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"over {limit} bytes, the most a {name} may hold")
    return data
