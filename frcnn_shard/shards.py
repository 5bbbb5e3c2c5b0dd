"""Shard and manifest I/O: reproducible tar writing published atomically, the manifest, safe reading.

The format version lives here and only here; build, loader and check all read it from this module.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Container, Iterable, Iterator

FORMAT_VERSION = "1.0"  # major.minor: readers refuse an unknown major, accept any minor
MANIFEST_NAME = "manifest.json"
PARTIAL_SUFFIX = ".partial"
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")
# Members a reader decodes; anything else is ignored, and pickle-like members are refused outright.
IMAGE_EXTS = ("jpg", "png")
KNOWN_EXTS = IMAGE_EXTS + ("json", "rpn.npz")
UNSAFE_EXTS = ("pyd", "pickle", "pkl", "pth", "pt", "ckpt")
MAX_MEMBER_BYTES = 64 << 20  # a declared member size above this is refused before reading
FAULT_ENV = "FRCNN_SHARD_FAULT"  # test-only fault injection (see fault_point); unset in normal use


class ManifestError(ValueError):
    """The manifest is missing, unreadable or of an unknown format version."""


class ShardFormatError(ValueError):
    """A shard breaks a rule of docs/FORMAT.md; the message names the shard, the key and the rule."""


def fault_point(name: str, n: int) -> None:
    """Test-only hook: a no-op unless $FRCNN_SHARD_FAULT names this point.

    ``FRCNN_SHARD_FAULT="NAME:N"`` SIGKILLs this process at point NAME number N (a crash at a chosen
    moment); ``"NAME:N:sleep=S"`` sleeps S seconds there (so a test can send a signal at a known
    moment). The points are listed in docs/RELIABILITY.md. Off by default; never set it in real use.
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
# tarfile itself (see _member_header); tests/test_shards.py checks the two agree byte for byte.
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


def _member_header(name: str, size: int) -> bytes:
    """512-byte USTAR header of a member, identical to _tarfile_header but ~10x cheaper."""
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
            parts.append(_member_header(f"{key}.{ext}", len(data)))
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


def split_member_name(name: str) -> tuple[str, str]:
    """Split a member name into (key, extension) the way WebDataset does: at the first dot."""
    key, dot, ext = name.partition(".")
    return key, ext


def check_member_name(name: str, where: str) -> None:
    """Refuse member names that could escape a directory or hide a pickle (raises ShardFormatError)."""
    # Any "/" (absolute or nested paths, "../x" included) or backslash is refused; so is ".." alone.
    if not name or name == ".." or "/" in name or "\\" in name:
        raise ShardFormatError(f"{where}: member name {name!r} is not a plain file name (path traversal refused)")
    key, ext = split_member_name(name)
    if not key or not ext:
        raise ShardFormatError(f"{where}: member name {name!r} has no key.extension form")
    if ext.rsplit(".", 1)[-1].lower() in UNSAFE_EXTS:
        raise ShardFormatError(f"{where}: member {name!r} is a pickle-type member; frcnn-shard never unpickles")


def member_problem(info: tarfile.TarInfo, where: str, seen_exts: Container[str] = (),
                   max_member_bytes: int = MAX_MEMBER_BYTES) -> str | None:
    """Why a tar member must not be read (None when it may): unsafe name, not a regular file, a declared
    size over the limit, or an extension its sample already has. Every reader of shards applies this."""
    try:
        check_member_name(info.name, where)
    except ShardFormatError as e:
        return str(e)
    if not info.isreg():
        return f"{where}: member {info.name!r} is not a regular file"
    if info.size > max_member_bytes:
        return f"{where}: member {info.name!r} declares {info.size} bytes (> {max_member_bytes} limit)"
    if split_member_name(info.name)[1] in seen_exts:
        return f"{where}: member {info.name!r} appears twice in its sample"
    return None


def iter_tar_samples(
    fileobj: IO[bytes], where: str, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) from a tar stream, in memory only; unknown extensions are ignored.

    Member names are checked, never used as paths; non-regular members and oversized declared sizes
    are refused. Consecutive members with the same key form one sample (WebDataset's rule).
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|")
        for info in tar:
            k, ext = split_member_name(info.name)
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            problem = member_problem(info, where, members, max_member_bytes)
            if problem is not None:
                raise ShardFormatError(problem)
            if ext in KNOWN_EXTS:
                f = tar.extractfile(info)
                members[ext] = f.read() if f is not None else b""
        if key is not None:
            yield key, members
    except tarfile.TarError as e:
        raise ShardFormatError(f"{where}: unreadable tar after key {key!r}: {e}") from None


def iter_shard(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield the samples of one local shard file (see iter_tar_samples)."""
    with open(path, "rb") as f:
        yield from iter_tar_samples(f, str(path))


def list_shard_keys(path: str | os.PathLike) -> list[str]:
    """Keys of a shard from its tar headers alone, in order, without reading the member bytes."""
    keys: list[str] = []
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            k, _ = split_member_name(info.name)
            if not keys or keys[-1] != k:
                keys.append(k)
    return keys


def shard_paths(manifest: dict, shard_dir: str | os.PathLike) -> list[Path]:
    """Paths of the shards a manifest lists, in order."""
    return [Path(shard_dir) / s["name"] for s in manifest.get("shards", [])]
