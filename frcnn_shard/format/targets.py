"""The packed anchor targets of a sample (``<key>.rpn.npz``): encode and decode, sparse.

One image's RPN targets are sparse: a few hundred positive and ignored anchors among tens of
thousands of negatives. The member stores the positive and ignored indices (delta-coded, split into
byte planes, deflated) and the matched box of each positive; negatives are implicit. It holds one or
two orientations: the targets of the image as stored and, unless built with ``--no-flip-targets``,
those of the horizontally mirrored image, in the same array (one zip entry, one overhead). The layout
is docs/FORMAT.md's "rpn.npz"; readers get ``SparseTargets`` and expand to dense arrays only when they must.
"""
from __future__ import annotations

import io
import re
import struct
import zipfile
import zlib
from typing import NamedTuple

import numpy as np


class SparseTargets(NamedTuple):
    """One image's stored targets: sorted positive and ignored anchor indices, the box of each positive."""

    positive: np.ndarray  # int64 [P], strictly increasing
    ignore: np.ndarray  # int64 [I], strictly increasing, disjoint from positive
    matched: np.ndarray  # int64 [P]: index into the sample's boxes

    def counts(self, num_anchors: int) -> dict[str, int]:
        """{"positive", "ignore", "negative"} as the JSON record's ``rpn`` holds them."""
        p, i = len(self.positive), len(self.ignore)
        return {"positive": p, "ignore": i, "negative": num_anchors - p - i}

    def dense(self, num_anchors: int) -> tuple[np.ndarray, np.ndarray]:
        """Dense labels int8 [A] (1 positive, -1 ignored, 0 negative) and matched int32 [A] (-1 off positives)."""
        labels = np.zeros(num_anchors, dtype=np.int8)
        labels[self.ignore] = -1
        labels[self.positive] = 1
        matched = np.full(num_anchors, -1, dtype=np.int32)
        matched[self.positive] = self.matched
        return labels, matched


def label_counts(labels: np.ndarray) -> dict[str, int]:
    """{"positive", "ignore", "negative"} of dense labels, in the order the JSON record writes them."""
    labels = np.asarray(labels)
    # count_nonzero on the bool masks: ~8x cheaper than .sum() over 40k anchors
    return {"positive": int(np.count_nonzero(labels == 1)), "ignore": int(np.count_nonzero(labels == -1)),
            "negative": int(np.count_nonzero(labels == 0))}


_UNSIGNED = tuple((int(np.iinfo(t).max), np.dtype(t)) for t in (np.uint8, np.uint16, np.uint32))


def _index_dtype(upper: int) -> np.dtype:
    """Smallest unsigned dtype holding values 0..upper."""
    for top, dt in _UNSIGNED:
        if upper <= top:
            return dt
    return np.dtype(np.uint64)


def _delta_encode(sorted_idx: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # First value absolute, then gaps: runs of neighbouring anchors become runs of small numbers.
    return np.diff(sorted_idx, prepend=0).astype(dtype)


def _byte_planes(values: np.ndarray) -> np.ndarray:
    # Little-endian bytes split into planes (all low bytes, then the next byte...): the high
    # planes of small gaps are long zero runs that deflate to almost nothing.
    le = values.astype(values.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(le.view(np.uint8).reshape(-1, values.dtype.itemsize).T).reshape(-1)


def _from_byte_planes(planes: np.ndarray, dtype: np.dtype, count: int) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    if planes.size != count * size:
        raise ValueError(f"packed targets: {planes.size} bytes cannot hold {count} values of {size} bytes")
    return np.ascontiguousarray(planes.reshape(size, count).T).view(np.dtype(dtype).newbyteorder("<")).reshape(-1)


# Header, uint32 values: num_anchors, orientations, then (num_pos, num_ignore, max_box_index + 1) per orientation.
_HEAD_FIXED, _HEAD_PER = 2, 3
ORIENTATIONS = ("stored", "hflip")  # the orientations a member can hold, in their order in the member
_NPZ_MEMBER = "t.npy"  # the one array of the npz, named "t"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so equal targets give byte-identical members
_NPY_HEADER_RE = re.compile(rb"\{'descr': '\|u1', 'fortran_order': False, 'shape': \((\d+),\), \} *\n")


def _npy_uint8(body: np.ndarray) -> bytes:
    """A .npy (format 1.0) of a 1-D uint8 array, header padded to 64 bytes as NumPy writes it."""
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (%d,), }" % body.size
    pad = 64 - (10 + len(header) + 1) % 64
    header_bytes = (header + " " * (pad % 64) + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(header_bytes).to_bytes(2, "little") + header_bytes + body.tobytes()


def _write_npz(body: np.ndarray) -> bytes:
    """An npz holding the one array 't' (deflated), readable by np.load; written directly for speed."""
    buf = io.BytesIO()
    info = zipfile.ZipInfo(_NPZ_MEMBER, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(info, _npy_uint8(body))
    return buf.getvalue()


_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header, before its name
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # a central directory entry, before its name
_END = struct.Struct("<4sHHHHIIH")  # the end of central directory record
_NAME = _NPZ_MEMBER.encode()
_ZIP_VERSION = 20  # "version needed" of a deflated entry, as zipfile writes it


def _plain_npz_member(data: bytes, limit: int) -> bytes | None:
    """The member 't.npy' of a zip laid out exactly as _write_npz writes it, None for any other zip.

    Plain: one deflated entry named t.npy (zip version 2.0), no flags, extras or comments, the local header, central
    directory and end record agreeing, the inflated bytes of the declared size and CRC. On exactly
    these zipfile reads the same bytes, at a fraction of the cost; anything else goes to zipfile,
    which gives the verdict. ``limit``: the most bytes the member may inflate to (ValueError beyond);
    the inflate never produces more than the declared size, which is held to it first.
    """
    n_name = len(_NAME)
    if len(data) < _LOCAL.size + n_name + _CENTRAL.size + n_name + _END.size:
        return None
    sig, version, flags, method, _, _, crc, csize, usize, nlen, xlen = _LOCAL.unpack_from(data, 0)
    start = _LOCAL.size + n_name
    cd = start + csize
    if (sig != b"PK\x03\x04" or version != _ZIP_VERSION or flags or method != zipfile.ZIP_DEFLATED or nlen != n_name or xlen
            or data[_LOCAL.size:start] != _NAME or len(data) != cd + _CENTRAL.size + n_name + _END.size):
        return None
    c = _CENTRAL.unpack_from(data, cd)
    e = _END.unpack_from(data, len(data) - _END.size)
    if (c[0] != b"PK\x01\x02" or c[2:5] != (version, 0, method) or c[7:11] != (crc, csize, usize, n_name) or any(c[11:14])
            or c[16] != 0 or data[cd + _CENTRAL.size:cd + _CENTRAL.size + n_name] != _NAME
            or e != (b"PK\x05\x06", 0, 0, 1, 1, _CENTRAL.size + n_name, cd, 0)):
        return None
    _check_inflated_size(usize, limit)  # before any byte is inflated: the declared size is the attacker's
    inflate = zlib.decompressobj(-15)
    try:
        # max_length: a stream that goes on past the declared size stops there (zipfile then gives the verdict)
        raw = inflate.decompress(data[start:cd], usize)
    except zlib.error:
        return None
    whole = inflate.eof and not inflate.unconsumed_tail
    return raw if whole and len(raw) == usize and zlib.crc32(raw) == crc else None


_NPY_HEAD_MAX = 256  # .npy magic, version, header length and header: NumPy writes 64 or 128 bytes
_ZIP_OVERHEAD_MAX = 64 << 10  # headers, names, extras and comments a zip may add around its one member


def max_inflated_bytes(num_anchors: int) -> int:
    """The most bytes the array member of a sound ``rpn.npz`` for ``num_anchors`` anchors inflates to.

    Per orientation at most ``num_anchors`` positive plus ignored indices (they are distinct anchors) of
    the index dtype, and one box index (at most 4 bytes: the header's uint32) per positive; two
    orientations at most, the header and the .npy header on top. docs/RELIABILITY.md "Bounds".
    """
    n = max(int(num_anchors), 0)
    per_orientation = n * (_index_dtype(max(n - 1, 0)).itemsize + 4)
    return _NPY_HEAD_MAX + 4 * (_HEAD_FIXED + _HEAD_PER * len(ORIENTATIONS)) + len(ORIENTATIONS) * per_orientation


def max_member_bytes(num_anchors: int) -> int:
    """The most bytes a sound ``rpn.npz`` member for ``num_anchors`` anchors holds (deflate never grows
    data by more than 5 bytes per 16 KiB block), zip headers included."""
    inflated = max_inflated_bytes(num_anchors)
    return inflated + inflated // 1024 + _ZIP_OVERHEAD_MAX


def _check_inflated_size(size: int, limit: int) -> None:
    """ValueError when a member declares (or reaches) more inflated bytes than ``limit`` allows."""
    if size > limit:
        raise ValueError(f"'t' inflates to more than {limit} bytes, the most its anchor count allows "
                         f"(a zip bomb is refused before it is inflated)")


def _zip_member(data: bytes, limit: int) -> bytes:
    """The member 't.npy' through zipfile, inflated at most to ``limit`` bytes whatever the zip declares."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        if names != [_NPZ_MEMBER]:
            raise ValueError(f"expected exactly one array 't', found {[n.removesuffix('.npy') for n in names]}")
        info = zf.getinfo(_NPZ_MEMBER)
        # zipfile inflates bzip2 and lzma chunks without an output limit: only stored and deflated are read
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ValueError(f"'t' uses zip compression method {info.compress_type}; only stored (0) and "
                             f"deflated (8) are read")
        # No verdict from the declared file_size: zipfile reads a member whose central size is damaged, and so
        # must we; read(n) inflates in steps of at most n bytes, so the cap holds while inflating whatever it says.
        with zf.open(info) as f:
            raw = f.read(limit + 1)
    _check_inflated_size(len(raw), limit)
    return raw


def _read_npz(data: bytes, num_anchors: int) -> np.ndarray:
    """The array 't' of a pack_targets npz; anything else (other members, dtypes, pickles) is refused.

    Parses the one .npy header against the exact uint8 form instead of np.load's generic (and
    slower) path; a pickle can never be loaded because only raw uint8 bytes are accepted. Memory is
    bounded by ``num_anchors``: a member larger than max_member_bytes is refused unread, and no path
    inflates more than max_inflated_bytes.
    """
    if len(data) > (most := max_member_bytes(num_anchors)):
        raise ValueError(f"the member holds {len(data)} bytes, more than the {most} its {num_anchors} anchors allow")
    limit = max_inflated_bytes(num_anchors)
    raw = _plain_npz_member(data, limit)
    if raw is None:
        raw = _zip_member(data, limit)
    if raw[:6] != b"\x93NUMPY" or raw[6:8] not in (b"\x01\x00", b"\x02\x00", b"\x03\x00"):
        raise ValueError("member 't' is not a .npy array")
    hlen_size = 2 if raw[6] == 1 else 4
    hlen = int.from_bytes(raw[8:8 + hlen_size], "little")
    start = 8 + hlen_size + hlen
    m = _NPY_HEADER_RE.fullmatch(raw[8 + hlen_size:start])
    if m is None:
        raise ValueError(f"'t' must be a 1-D uint8 array (object arrays and pickles are never loaded), "
                         f"header {raw[8 + hlen_size:start][:80]!r}")
    count = int(m.group(1))
    if len(raw) - start != count:
        raise ValueError(f"'t' declares {count} bytes but holds {len(raw) - start}")
    return np.frombuffer(raw, dtype=np.uint8, offset=start)


def _block(labels: np.ndarray, matched: np.ndarray, idt: np.dtype) -> tuple[tuple[int, int, int], list[np.ndarray]]:
    """One orientation's (P, I, NB) and its three byte-planed arrays."""
    labels, matched = np.asarray(labels), np.asarray(matched)
    if labels.ndim != 1 or matched.shape != labels.shape:
        raise ValueError(f"labels and matched must be 1-D and the same length, got {labels.shape} and {matched.shape}")
    if labels.size and (labels.min() < -1 or labels.max() > 1):
        raise ValueError("labels must be in {1, 0, -1}")
    pos = np.flatnonzero(labels == 1)
    ign = np.flatnonzero(labels == -1)
    box = matched[pos].astype(np.int64)
    if len(box) and box.min() < 0:
        raise ValueError("every positive anchor needs a matched box index >= 0")
    nbox = int(box.max()) + 1 if len(box) else 0
    bdt = _index_dtype(max(nbox - 1, 0))
    planes = [_byte_planes(_delta_encode(pos, idt)), _byte_planes(_delta_encode(ign, idt)), _byte_planes(box.astype(bdt))]
    return (len(pos), len(ign), nbox), planes


def pack_targets(labels: np.ndarray, matched: np.ndarray,
                 flipped: tuple[np.ndarray, np.ndarray] | None = None) -> bytes:
    """Encode one image's RPN targets compactly (npz, see docs/FORMAT.md); negatives are implicit.

    ``flipped``: the (labels, matched) of the horizontally mirrored image, stored after the first
    orientation in the same array, so both share one zip entry and its overhead.
    """
    n = np.shape(labels)[0] if np.ndim(labels) == 1 else -1  # _block refuses anything not 1-D
    if flipped is not None and np.shape(flipped[0]) != np.shape(labels):
        raise ValueError(f"flipped labels have shape {np.shape(flipped[0])}, the stored ones {np.shape(labels)}")
    if n > np.iinfo(np.uint32).max:
        raise ValueError("packed targets support at most 2**32 - 1 anchors")
    idt = _index_dtype(max(n - 1, 0))
    blocks = [_block(labels, matched, idt)] + ([_block(*flipped, idt)] if flipped is not None else [])
    head = np.array([n, len(blocks)] + [v for counts, _ in blocks for v in counts], dtype="<u4")
    return _write_npz(np.concatenate([head.view(np.uint8)] + [p for _, planes in blocks for p in planes]))


def _layout(data: bytes, num_anchors: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """The body of a packed member and, per orientation, (P, I, NB, offset); the lengths checked against the header."""
    try:
        body = _read_npz(data, num_anchors)
    except (OSError, EOFError, KeyError, NotImplementedError, RuntimeError, struct.error, zipfile.BadZipFile,
            zlib.error) as e:  # what zipfile raises for a damaged or unsupported (encrypted, newer) zip
        raise ValueError(f"packed targets: not a readable npz without pickles ({e})") from e
    except ValueError as e:
        raise ValueError(f"packed targets: {e}") from e
    if body.size < 4 * (_HEAD_FIXED + _HEAD_PER):
        raise ValueError(f"packed targets: 't' must be 1-D uint8 with a header, got {body.size} bytes")
    n, count = (int(v) for v in body[: 4 * _HEAD_FIXED].view("<u4"))
    if n != num_anchors:
        raise ValueError(f"packed targets were made for {n} anchors, expected {num_anchors}")
    if not 1 <= count <= len(ORIENTATIONS):
        raise ValueError(f"packed targets: the header says {count} orientations, expected 1 (stored) or 2 (stored, hflip)")
    off = 4 * (_HEAD_FIXED + _HEAD_PER * count)
    if body.size < off:
        raise ValueError(f"packed targets: a header for {count} orientations needs {off} bytes, the body has {body.size}")
    idt = _index_dtype(max(n - 1, 0))
    blocks = []
    for npos, nign, nbox in body[4 * _HEAD_FIXED: off].view("<u4").reshape(count, _HEAD_PER).tolist():
        blocks.append((npos, nign, nbox, off))
        off += (npos + nign) * idt.itemsize + npos * _index_dtype(max(nbox - 1, 0)).itemsize
    if off != body.size:
        counts = "; ".join(f"{ORIENTATIONS[i]}: {p} positives, {g} ignored" for i, (p, g, _, _) in enumerate(blocks))
        raise ValueError(f"packed targets: header says {counts} ({off} bytes) but the body has {body.size} bytes")
    return body, blocks


def _decode_block(body: np.ndarray, n: int, block: tuple[int, int, int, int], name: str) -> SparseTargets:
    """One orientation's sparse targets, with the index rules checked (ValueError names the orientation)."""
    npos, nign, nbox, off = block
    idt, bdt = _index_dtype(max(n - 1, 0)), _index_dtype(max(nbox - 1, 0))
    parts = []
    for count, dt in ((npos, idt), (nign, idt), (npos, bdt)):
        size = count * dt.itemsize
        parts.append(_from_byte_planes(body[off: off + size], dt, count).astype(np.int64))
        off += size
    pos, ign = np.cumsum(parts[0]), np.cumsum(parts[1])
    box = parts[2]
    where = f"packed targets ({name})"
    for what, gaps, idx in (("positive", parts[0], pos), ("ignored", parts[1], ign)):
        # The gaps are unsigned: the indices increase strictly exactly when no gap after the first is 0.
        if len(idx) and (idx[-1] >= n or not gaps[1:].all()):
            raise ValueError(f"{where}: {what} indices must be strictly increasing and < {n}")
    if len(pos) and len(ign):
        # Both are sorted: each positive's insertion point in the ignored list tells whether it is there.
        at = np.minimum(np.searchsorted(ign, pos), len(ign) - 1)
        if (ign[at] == pos).any():
            raise ValueError(f"{where}: an anchor is both positive and ignored")
    if len(box) and int(box.max()) + 1 != nbox:
        raise ValueError(f"{where}: matched box indices disagree with the header (max + 1 != {nbox})")
    return SparseTargets(pos, ign, box)


def unpack_targets(data: bytes, num_anchors: int, flipped: bool = False) -> SparseTargets:
    """Decode and validate one orientation of ``pack_targets`` output; ValueError names the rule it breaks.

    ``flipped``: the targets of the horizontally mirrored image (ValueError when the member has none).
    The layout of the whole member is checked; the indices of the orientation returned.
    """
    body, blocks = _layout(data, num_anchors)
    i = int(bool(flipped))
    if i >= len(blocks):
        raise ValueError("packed targets: no flipped (hflip) targets stored (the shards were built with --no-flip-targets)")
    return _decode_block(body, num_anchors, blocks[i], ORIENTATIONS[i])


def unpack_all_targets(data: bytes, num_anchors: int) -> tuple[SparseTargets, ...]:
    """Every orientation a member holds (stored, then hflip when present), each validated as unpack_targets does."""
    body, blocks = _layout(data, num_anchors)
    return tuple(_decode_block(body, num_anchors, b, ORIENTATIONS[i]) for i, b in enumerate(blocks))
