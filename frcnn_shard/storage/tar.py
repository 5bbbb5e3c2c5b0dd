"""The tar framing of a shard, in one place: the reproducible writer and the one reader.

``ShardWriter`` writes USTAR exactly as tarfile does for its members (headers from a template);
``plain_header`` is the one rule for reading a header block (the streaming reader here and check's
in-memory scan both use it); ``tar_members`` streams the members of any tar, straight off the bytes
while headers are plain and through tarfile otherwise; ``scan_plain`` walks a plain tar held in memory.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np

from ..format.members import Member
from .base import Store
from .local import LocalStore

BLOCK = tarfile.BLOCKSIZE  # a header, and the unit member data is padded to
RECORD = tarfile.RECORDSIZE  # the archive's total size is a multiple of this
NUL_BLOCK = bytes(BLOCK)
END_OF_ARCHIVE = 2 * BLOCK  # the two zero blocks that end an archive
_CHKSUM = slice(148, 156)  # a header's checksum field, counted as 8 spaces in its own sum


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


class ShardWriter:
    """Write one shard; ``close()`` publishes it under its final name at once, whole (see storage.base.Upload).

    Tars are reproducible: USTAR headers with mtime 0, uid/gid 0, empty owner names, mode 0644, and
    members written in the order given, so equal samples give byte-identical shards. The bytes are
    exactly what ``tarfile`` (USTAR format) writes for these members; the headers come from a template.
    ``target`` is a local path, or a store with ``name``.
    """

    def __init__(self, target: str | os.PathLike | Store, name: str | None = None):
        if name is None:
            target, name = LocalStore(Path(target).parent), Path(target).name
        self.name = name
        self._up = target.open_upload(name)
        self._out = _HashingFile(self._up.file)
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
            if len(data) % BLOCK:
                parts.append(NUL_BLOCK[len(data) % BLOCK:])
        self._out.write(b"".join(parts))  # one hash update and one write per sample
        self.samples += 1
        self.first_key = self.first_key or key
        self.last_key = key

    def close(self) -> ShardInfo:
        """Finish the archive and publish it (local: fsync and rename; object storage: upload it whole)."""
        # End of archive as tarfile writes it: two zero blocks, then zeros up to a whole record.
        end = END_OF_ARCHIVE
        end += -(self._out.size + end) % RECORD
        self._out.write(bytes(end))
        self._up.publish()
        return ShardInfo(self.name, self.samples, self._out.size, self._out.sha.hexdigest(), self.first_key, self.last_key)

    def abort(self) -> None:
        """Drop the unfinished shard: nothing partial is left behind."""
        self._up.abort()


# Header fields tarfile parses as numbers besides size and checksum (mode, uid, gid, mtime, devmajor,
# devminor): a header whose bytes there were once parsed without error is plain in that respect.
_NUMERIC_FIELDS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))
_numeric_ok: set[bytes] = set()


def _numbers_parse(head: bytes) -> bool:
    """Would tarfile parse every numeric field of this header (other than size and checksum)?"""
    sig = head[100:124] + head[136:148] + head[329:345]
    if sig in _numeric_ok:
        return True
    try:
        for a, b in _NUMERIC_FIELDS:
            tarfile.nti(head[a:b])
    except (tarfile.TarError, ValueError):
        return False
    if len(_numeric_ok) < 64:  # ShardWriter writes one signature; bound the set for odd archives
        _numeric_ok.add(sig)
    return True


def plain_header(head: bytes) -> tuple[str, int, int] | None:
    """(name, size, stored checksum) of a plain tar header block, None when it is not plain.

    "Plain" is what ShardWriter writes and what tarfile reads without a word: type regular file, no
    ustar prefix, parseable number fields, a size >= 0 and a name that is not a directory's. The
    checksum is returned, not verified: callers compare it with ``header_checksum`` (one at a time or,
    in ``check``, all of a shard's at once). On plain headers tarfile gives the same name and size.
    """
    if len(head) != BLOCK:
        return None
    kind = head[156]
    if head[345] or kind not in (48, 0) or not _numbers_parse(head):  # b"0" / b"\0": a regular file
        return None
    name = head[:100]
    if (z := name.find(0)) >= 0:
        name = name[:z]
    try:
        size, stored = tarfile.nti(head[124:136]), tarfile.nti(head[_CHKSUM])
    except (tarfile.TarError, ValueError):
        return None
    name = name.decode(tarfile.ENCODING, "surrogateescape")
    if size < 0 or (kind == 0 and name.endswith("/")):  # tarfile makes an old-style "x/" a directory
        return None
    return name, size, stored


def header_checksum(head: bytes) -> int:
    """The unsigned checksum of a tar header block: its bytes summed, the checksum field counted as spaces."""
    return sum(head) - sum(head[_CHKSUM]) + 8 * 32


class _Prepended:
    """A read-only stream: ``head`` first, then the rest of ``f`` (hands a header already read on to tarfile)."""

    def __init__(self, head: bytes, f: IO[bytes]):
        self._head, self._f = head, f

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._f.read(n)
        if n is None or n < 0:
            out, self._head = self._head + self._f.read(), b""
            return out
        out, self._head = self._head[:n], self._head[n:]
        return out + (self._f.read(n - len(out)) if len(out) < n else b"")


_SKIP_CHUNK = 1 << 20


def _read_full(f: IO[bytes], n: int) -> bytes:
    """Up to n bytes of ``f``, fewer only at its end (pipes and sockets may return short reads)."""
    data = f.read(n)
    if len(data) in (0, n):
        return data
    parts = [data]
    got = len(data)
    while got < n and (more := f.read(n - got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _read_exactly(f: IO[bytes], n: int) -> bytes:
    """n bytes of ``f``; tarfile's ReadError ("unexpected end of data") when the stream ends first."""
    data = _read_full(f, n)
    if len(data) != n:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _skip(f: IO[bytes], n: int) -> None:
    """Read past n bytes of ``f`` in bounded chunks (a huge member refused unread is never held in memory)."""
    while n > 0:
        n -= len(_read_exactly(f, min(n, _SKIP_CHUNK)))


def _tarfile_members(fileobj: IO[bytes], mode: str) -> Iterator[Member]:
    tar = tarfile.open(fileobj=fileobj, mode=mode)
    for info in tar:
        yield Member(info.name, info.size, info.isreg(), lambda info=info: _extract(tar, info))


def _stream_members(f: IO[bytes]) -> Iterator[Member]:
    """tarfile's "r|" members, read straight off the stream while the headers are plain.

    The first header that is not plain (a pax or GNU long-name header, a link, a directory) hands the
    rest of the stream to tarfile itself; a header tarfile would refuse ends the archive as tarfile's
    reader does (an error at the very start, silently later). So every archive gives tarfile's members,
    bytes and errors, at a fraction of the cost (no TarInfo objects, no stream seeks).
    """
    first = True
    while True:
        head = _read_full(f, BLOCK)
        if head == NUL_BLOCK:
            return  # end of archive: tarfile stops at the first zero block
        plain = plain_header(head)
        if plain is None or header_checksum(head) != plain[2]:
            if not first and _tarfile_refuses(head):
                return
            yield from _tarfile_members(_Prepended(head, f), "r|")
            return
        first = False
        name, size, _ = plain
        pending = [size]  # data bytes of this member not yet read

        def read(size: int = size, pending: list = pending) -> bytes:
            data, pending[0] = _read_exactly(f, pending[0]), 0
            return data

        yield Member(name, size, True, read)
        _skip(f, pending[0] + -size % BLOCK)  # the data left unread, then the padding to the block


def _tarfile_refuses(head: bytes) -> bool:
    """Would tarfile refuse this header block (bad checksum, unparseable fields)?"""
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return True
    return False


def tar_members(fileobj: IO[bytes], mode: str = "r|") -> Iterator[Member]:
    """The members of a tar as ``Member`` records; "r|" streams (read each member before the next), "r:" seeks.

    Streaming reads plain headers itself (``_stream_members``), with tarfile's results on every archive.
    """
    return _stream_members(fileobj) if mode == "r|" else _tarfile_members(fileobj, mode)


def _extract(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(info)
    return f.read() if f is not None else b""


def scan_plain(data: bytes) -> tuple[list[tuple[str, int, int]], int] | None:
    """The regular-file members of a plain tar held in memory: ([(name, data offset, size)], offset of the
    end-of-archive block); None as soon as anything is not plain.

    Plain: every header is ``plain_header``'s with a valid (unsigned) checksum, the data lies inside the
    buffer, and the archive ends at an all-zero block. On exactly these archives tarfile yields the same
    names, offsets and sizes and stops at the same offset, at a fraction of the cost; on anything else
    the caller walks the archive with tarfile, which names the problem (``check`` does).
    """
    n = len(data)
    off = 0
    found: list[tuple[str, int, int]] = []
    heads: list[int] = []
    sums: list[int] = []
    while True:
        if n - off < BLOCK:
            return None
        head = data[off:off + BLOCK]
        if head == NUL_BLOCK:
            break
        plain = plain_header(head)
        if plain is None or off + BLOCK + plain[1] > n:
            return None
        name, size, stored = plain
        heads.append(off)
        sums.append(stored)
        found.append((name, off + BLOCK, size))
        off += BLOCK + -(-size // BLOCK) * BLOCK
    if heads and not _checksums_agree(data, off, heads, sums):
        return None
    return found, off


def _checksums_agree(data: bytes, end: int, heads: list[int], sums: list[int]) -> bool:
    """``header_checksum`` of every header at once (offsets ``heads``) against the stored ones: a shard has
    thousands of headers, and summing them in NumPy costs a fraction of one call per header."""
    blocks = np.frombuffer(data, np.uint8, count=end).reshape(-1, BLOCK)[np.asarray(heads) // BLOCK]
    computed = blocks.sum(axis=1, dtype=np.int64) - blocks[:, _CHKSUM].sum(axis=1, dtype=np.int64) + 8 * 32
    return bool(np.array_equal(computed, np.asarray(sums, dtype=np.int64)))
