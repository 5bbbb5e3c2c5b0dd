"""A local cache of remote shards (``make_loader(..., cache_dir=DIR, cache_limit=BYTES)``).

A shard read from object storage (s3://, any fsspec URL) is fetched whole into DIR under its manifest
sha256 (``<sha256>.tar``), and every later read of it, by any epoch, worker, rank or process on the
machine, opens it there. Every byte of the cache folder is untrusted: a cached file is hashed through the
very file handle that is then read, and used only when its size and sha256 are the manifest's; a damaged,
foreign or non-regular file is removed and the shard fetched again. Writes go to a temporary file in DIR,
renamed over the final name once whole and verified, so a reader never sees a torn file; an open file
stays readable when another process evicts or replaces it. The limit is kept by evicting the least
recently used shards (a use touches the file's mtime). With the store unreachable, cached shards serve.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

from ..storage.base import open_regular

CACHED_NAME = re.compile(r"^[0-9a-f]{64}\.tar$")
TEMP_PREFIX = ".fetch-"
STALE_TEMP_S = 3600.0  # a temporary file this old is a crashed writer's: removed when evicting
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ShardCache:
    """The cache folder and its byte limit (None: no limit); shared safely by processes on one machine."""

    folder: str
    limit: int | None = None

    def path(self, sha256: str) -> Path:
        """Where the shard with this sha256 is cached."""
        return Path(self.folder) / f"{sha256}.tar"

    def open(self, sha256: str, size: int, fetch: Callable[[], IO[bytes]]) -> IO[bytes] | None:
        """The cached shard, verified, opened at its first byte; fetched first when missing or damaged.

        None when the shard alone exceeds the limit (the caller reads the store directly). OSError when
        fetching fails or what was fetched is not the manifest's bytes.
        """
        if not CACHED_NAME.match(f"{sha256}.tar"):
            raise OSError(f"not a sha256: {sha256!r:.80}")
        path = self.path(sha256)
        f = verified(path, sha256, size)
        if f is not None:
            _touch(path)
            return f
        if self.limit is not None and size > self.limit:
            return None
        fetch_into(path, sha256, size, fetch)
        if self.limit is not None:
            evict(Path(self.folder), self.limit, keep=path.name)
        f = verified(path, sha256, size)
        if f is None:  # replaced by something else between our rename and this open: refuse, never trust
            raise OSError(f"{path}: the cached shard changed under us")
        return f


def file_sha256(f: IO[bytes]) -> tuple[str, int]:
    """(sha256 hex, bytes) of an open file read from its current position to its end."""
    h, n = hashlib.sha256(), 0
    while chunk := f.read(_CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def verified(path: Path, sha256: str, size: int) -> IO[bytes] | None:
    """The file opened at byte 0 when it is a regular file of ``size`` bytes hashing to ``sha256``; else it is
    removed (damaged, foreign or not a file) and None. Hashing and reading share the handle: no swap between."""
    try:
        f = open_regular(path)
    except FileNotFoundError:
        return None
    except OSError:
        _remove(path)
        return None
    try:
        if os.fstat(f.fileno()).st_size == size and file_sha256(f) == (sha256, size):
            f.seek(0)
            return f
    except OSError:
        pass
    f.close()
    _remove(path)
    return None


def fetch_into(path: Path, sha256: str, size: int, fetch: Callable[[], IO[bytes]]) -> None:
    """Copy the shard from the store into a temporary file beside ``path``, check its size and sha256, then
    rename it into place (atomic: readers see the old file, none, or the whole new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        h, n = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, fetch() as src:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                n += len(chunk)
                out.write(chunk)
        if (h.hexdigest(), n) != (sha256, size):
            raise OSError(f"fetched {n} bytes with sha256 {h.hexdigest()[:12]}..., the manifest says {size} bytes, "
                          f"{sha256[:12]}...: the stored shard is not the manifest's")
        os.replace(tmp, path)
    except BaseException:
        _remove(Path(tmp))
        raise


def evict(folder: Path, limit: int, keep: str) -> None:
    """Remove the least recently used cached shards until the folder holds at most ``limit`` bytes of them
    (never ``keep``, the one in use); stale temporary files of crashed writers go too."""
    entries = []
    now = time.time()
    for entry in os.scandir(folder):
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if entry.name.startswith(TEMP_PREFIX) and now - st.st_mtime > STALE_TEMP_S:
            _remove(Path(entry.path))
        elif CACHED_NAME.match(entry.name):
            entries.append((st.st_mtime, entry.name, st.st_size))
    total = sum(size for _, _, size in entries)
    for _, name, size in sorted(entries):
        if total <= limit:
            break
        if name != keep:
            _remove(folder / name)
            total -= size


def _touch(path: Path) -> None:
    """Mark a use (the LRU order); a file evicted meanwhile is still open for us."""
    try:
        os.utime(path)
    except OSError:
        pass


def _remove(path: Path) -> None:
    """Remove a file another process may have removed already."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
