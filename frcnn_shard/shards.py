"""Shard and manifest I/O: reproducible tar writing published atomically, the manifest, tar reading.

What a sample is (its members and their rules) is ``frcnn_shard.format``; this module moves its bytes.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

from .format import FORMAT_VERSION
from .format.members import MAX_MEMBER_BYTES, Member, RawSample, ShardFormatError, group_by_key

MANIFEST_NAME = "manifest.json"
PARTIAL_SUFFIX = ".partial"
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")
FAULT_ENV = "FRCNN_SHARD_FAULT"  # test-only fault injection (see fault_point); unset in normal use


class ManifestError(ValueError):
    """The manifest is missing, unreadable or of an unknown format version."""


def fault_point(name: str, n: int) -> None:
    """Test-only hook: a no-op unless $FRCNN_SHARD_FAULT names this point.

    ``FRCNN_SHARD_FAULT="NAME:N"`` SIGKILLs this process at point NAME number N (a crash at a chosen
    moment); ``"NAME:N:sleep=S"`` sleeps S seconds there (so a test can send a signal at a known
    moment); ``"NAME:N:enospc"`` raises the OSError of a full disk there. The points are listed in
    docs/RELIABILITY.md. Off by default; never set it in real use.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, rest = spec.partition(":")
    num, _, action = rest.partition(":")
    if point != name or num != str(n):
        return
    if action.startswith("sleep="):
        time.sleep(float(action[len("sleep="):]))
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


@dataclass
class ShardInfo:
    """What the manifest records for one published shard."""

    name: str
    samples: int
    bytes: int
    sha256: str
    first_key: str | None
    last_key: str | None


class _HashingFile:
    """A write-only file wrapper that hashes and counts the bytes as they go out."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)


# USTAR member headers exactly as tarfile writes them for the fields ShardWriter sets (regular
# file, mode 0644, uid/gid 0, mtime 0, empty owner names, no link, no device numbers): built from a
# template, only the name, size and checksum vary. Anything the template cannot hold goes through
# tarfile itself (see member_header); tests/test_shards.py checks the two agree byte for byte.
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_NUL_BLOCK = bytes(_BLOCK)
_HDR_MODE_IDS = b"0000644\0" b"0000000\0" b"0000000\0"  # bytes 100..124: mode, uid, gid
_HDR_MTIME = b"00000000000\0"  # bytes 136..148
_HDR_TAIL = (tarfile.REGTYPE + bytes(100) + tarfile.POSIX_MAGIC  # type, linkname, magic + version
             + bytes(32 + 32 + 8 + 8 + 155 + 12))  # uname, gname, devmajor, devminor, prefix, padding
# The checksum is 256 (its own 8 bytes counted as spaces) plus every other byte of the header.
_HDR_FIXED_SUM = 256 + sum(_HDR_MODE_IDS) + sum(_HDR_MTIME) + sum(_HDR_TAIL)
_MAX_TEMPLATE_SIZE = 8 ** 11  # a 12-byte octal size field holds 11 digits


def _tarfile_header(name: str, size: int) -> bytes:
    """The header tarfile writes for one ShardWriter member (the general path)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")


def member_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header ShardWriter writes for a member: what tarfile writes, ~10x cheaper."""
    if not (name.isascii() and len(name) <= 100 and 0 <= size < _MAX_TEMPLATE_SIZE):
        return _tarfile_header(name, size)  # long (prefix-split) or non-ASCII names, huge or bad sizes
    name_b = name.encode("ascii")
    size_f = b"%011o\0" % size
    chksum = _HDR_FIXED_SUM + sum(name_b) + sum(size_f)
    return b"".join((name_b + bytes(100 - len(name_b)), _HDR_MODE_IDS, size_f, _HDR_MTIME,
                     b"%06o\0 " % chksum, _HDR_TAIL))


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Write one shard as ``<name>.partial``; ``close()`` publishes it under its final name atomically.

    Tars are reproducible: USTAR headers with mtime 0, uid/gid 0, empty owner names, mode 0644, and
    members written in the order given, so equal samples give byte-identical shards. The bytes are
    exactly what ``tarfile`` (USTAR format) writes for these members; the headers come from a template.
    """

    def __init__(self, final_path: str | os.PathLike):
        self.final_path = Path(final_path)
        self.partial_path = self.final_path.with_name(self.final_path.name + PARTIAL_SUFFIX)
        self._raw = open(self.partial_path, "wb")
        self._out = _HashingFile(self._raw)
        self.samples = 0
        self.first_key: str | None = None
        self.last_key: str | None = None

    @property
    def bytes_written(self) -> int:
        """Bytes written so far (headers and padding included, the end-of-archive blocks not)."""
        return self._out.size

    def add(self, key: str, members: Iterable[tuple[str, bytes]]) -> None:
        """Append one sample: ``members`` are (extension, bytes) pairs, written in that order."""
        parts = []
        for ext, data in members:
            parts.append(member_header(f"{key}.{ext}", len(data)))
            parts.append(data)
            if len(data) % _BLOCK:
                parts.append(_NUL_BLOCK[len(data) % _BLOCK:])
        self._out.write(b"".join(parts))  # one hash update and one write per sample
        self.samples += 1
        self.first_key = self.first_key or key
        self.last_key = key

    def close(self) -> ShardInfo:
        """Finish the archive, flush and fsync it, then rename it to its final name."""
        # End of archive as tarfile writes it: two zero blocks, then zeros up to a whole record.
        end = 2 * _BLOCK
        end += -(self._out.size + end) % _RECORD
        self._out.write(bytes(end))
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self.partial_path, self.final_path)
        _fsync_dir(self.final_path.parent)
        return ShardInfo(
            self.final_path.name, self.samples, self._out.size, self._out.sha.hexdigest(),
            self.first_key, self.last_key,
        )

    def abort(self) -> None:
        """Drop the unfinished shard: nothing partial is left behind."""
        try:
            self._raw.close()
        except OSError:
            pass  # flushing the buffer onto a full disk fails again; the file goes anyway
        finally:
            self.partial_path.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: dict, fault_n: int | None = None) -> None:
    """Write JSON to ``path`` through a fsync'ed temporary file and an atomic rename.

    On any failure (a full disk, say) the temporary file is removed and ``path`` is left as it was.
    ``fault_n`` numbers the write for the test-only fault point "manifest_write" (half the bytes written).
    """
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    data = (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()
    try:
        with open(tmp, "wb") as f:
            if fault_n is not None:
                f.write(data[: len(data) // 2])
                f.flush()
                fault_point("manifest_write", fault_n)
                data = data[len(data) // 2:]
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_manifest(shard_dir: str | os.PathLike) -> dict:
    """Read and validate ``shard_dir/manifest.json`` (raises ManifestError naming the problem)."""
    path = Path(shard_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest (is this a frcnn-shard output directory?)") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise ManifestError(f"{path}: not a frcnn-shard manifest (no format_version)")
    major = str(manifest["format_version"]).split(".")[0]
    if major != FORMAT_VERSION.split(".")[0]:
        raise ManifestError(
            f"{path}: format version {manifest['format_version']} is not readable by this version "
            f"(reads {FORMAT_VERSION.split('.')[0]}.x)"
        )
    return manifest


def file_sha256(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def tar_members(fileobj: IO[bytes], mode: str = "r|") -> Iterator[Member]:
    """The members of a tar as ``Member`` records; "r|" streams (read each member before the next), "r:" seeks."""
    tar = tarfile.open(fileobj=fileobj, mode=mode)
    for info in tar:
        yield Member(info.name, info.size, info.isreg(), lambda info=info: _extract(tar, info))


def _extract(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(info)
    return f.read() if f is not None else b""


def sample_error(raw: RawSample, where: str) -> ShardFormatError | None:
    """The error a reader raises for a sample that breaks a member rule (naming where and the key), or None."""
    if not raw.problems:
        return None
    at = f"{where}: key {raw.key!r}" if raw.key else where
    return ShardFormatError(f"{at}: {raw.problems[0][1]}")


def iter_tar_samples(
    fileobj: IO[bytes], where: str, select: Callable[[int, str], bool] | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) from a tar stream, in memory only; unknown extensions are ignored.

    Any member rule broken (``format.members``) raises ShardFormatError naming ``where`` and the key.
    ``select(index, key)`` reads only the samples it accepts (the others are yielded without members).
    """
    key = None
    try:
        members = tar_members(fileobj, "r|" if select is None else "r:")
        for raw in group_by_key(members, select=select, max_member_bytes=max_member_bytes, where=where):
            key = raw.key
            yield raw.key, raw.members
    except tarfile.TarError as e:
        raise ShardFormatError(f"{where}: unreadable tar after key {key!r}: {e}") from None


def iter_shard(path: str | os.PathLike, select: Callable[[int, str], bool] | None = None
               ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield the samples of one local shard file (see iter_tar_samples)."""
    with open(path, "rb") as f:
        yield from iter_tar_samples(f, str(path), select)


def list_shard_keys(path: str | os.PathLike) -> list[str]:
    """Keys of a shard from its tar headers alone, in order, without reading the member bytes."""
    return [key for key, _ in iter_shard(path, select=lambda index, key: False)]
