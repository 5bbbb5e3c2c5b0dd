"""`frcnn-shard check` and `info`: verify shards against their manifest, summarise a manifest.

The default check reads every shard file exactly once into memory, hashes those bytes and walks
the tar over the same bytes (a reader thread reads and hashes the next shard while this one is
walked); per sample it does only cheap work (tar headers, the image *header*,
the JSON, the anchor-target member). Full pixel decoding happens only where it can tell the user
something the sha256 cannot: in a shard whose sha256 or size does not match the manifest (to name
the damaged sample), and for the samples `--deep` selects. See docs/INSPECT.md.

Nothing here writes to the shard directory: files are opened read-only and never locked or touched.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .. import anchors as anc
from ..format.image import (
    RULE_IMAGE_DECODE, RULE_IMAGE_SIZE, StoredImageError, decode_stored_image, open_stored_image,
)
from ..format.members import (
    IMAGE_EXTS, JSON_EXT, RULE_MEMBER_NAME, RULE_MEMBERS, TARGETS_EXT, Member, RawSample, group_by_key,
    image_member, member_name_problem, members_problems, split_member_name,
)
from ..format.record import (
    RULE_BOX_INVALID, RULE_JSON_INVALID, RULE_KEY_MISMATCH, RULE_LABEL_INVALID, RecordError, box_array, flip_boxes,
    num_classes_of, parse_json, record_problems,
)
from ..format.targets import ORIENTATIONS, SparseTargets, unpack_all_targets
from ..labels import NUM_CLASSES
from ..format.layout import Layout
from ..shards import (
    MANIFEST_NAME, PARTIAL_SUFFIX, SHARD_RE, ManifestError, plain_header, read_bounded, read_manifest,
    store_of,
)
from ..storage import LocalStore
from ..words import human_bytes, plural
from .info import listed_samples

# Rule names, as printed in reports and matched by tests; docs/INSPECT.md explains each one.
RULE_MANIFEST_INCOMPLETE = "manifest_incomplete"
RULE_MANIFEST_TOTALS = "manifest_totals"
RULE_SHARD_MISSING = "shard_missing"
RULE_SHARD_EXTRA = "shard_extra"
RULE_PARTIAL_FILE = "partial_file"
RULE_SHARD_UNREADABLE = "shard_unreadable"
RULE_SHARD_SIZE = "shard_size"
RULE_SHARD_SHA256 = "shard_sha256"
RULE_TAR_UNREADABLE = "tar_unreadable"
RULE_TAR_TRAILING = "tar_trailing"
RULE_SHARD_COUNT = "shard_count"
RULE_SHARD_KEYS = "shard_keys"
RULE_KEY_DUPLICATE = "key_duplicate"
RULE_TARGETS_INVALID = "targets_invalid"
RULE_TARGETS_COUNTS = "targets_counts"
RULE_TARGETS_DEEP = "targets_deep"
RULE_DROPS_FILE = "drops_file"
RULE_SPLIT_EMPTY = "split_empty"

RULES: tuple[str, ...] = (
    RULE_MANIFEST_INCOMPLETE, RULE_MANIFEST_TOTALS, RULE_SHARD_MISSING, RULE_SHARD_EXTRA,
    RULE_PARTIAL_FILE, RULE_SHARD_UNREADABLE, RULE_SHARD_SIZE, RULE_SHARD_SHA256, RULE_TAR_UNREADABLE,
    RULE_TAR_TRAILING, RULE_MEMBER_NAME, RULE_MEMBERS, RULE_SHARD_COUNT, RULE_SHARD_KEYS,
    RULE_KEY_DUPLICATE, RULE_KEY_MISMATCH, RULE_JSON_INVALID, RULE_IMAGE_DECODE, RULE_IMAGE_SIZE,
    RULE_BOX_INVALID, RULE_LABEL_INVALID, RULE_TARGETS_INVALID, RULE_TARGETS_COUNTS, RULE_TARGETS_DEEP,
    RULE_DROPS_FILE, RULE_SPLIT_EMPTY,
)

PROGRESS_EVERY = 64  # samples between progress callbacks (the callback may be a tqdm bar)
# Below this many shard bytes a check runs in-process: starting worker processes would cost more than it saves.
PARALLEL_MIN_BYTES = 256 << 20
MAX_WORKERS = 16
# The most bytes of one shard a check holds in memory (it reads a shard whole, one ahead: two at most per
# process); a larger shard is reported under shard_size, unread. docs/RELIABILITY.md "Bounds".
MAX_CHECK_SHARD_BYTES = 1 << 30
# The most bytes one line of drops.jsonl may take (a record is {"row": ..., "reason": ...}, under 100 bytes),
# and the file as a whole (about 4 million dropped rows).
MAX_DROP_LINE_BYTES = 1024
MAX_DROPS_BYTES = 256 << 20
_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)
Found = list[tuple[str, str]]  # (rule, detail) pairs found for one sample


@dataclass(frozen=True)
class Problem:
    """One broken rule: where (shard file name, sample key or '-') and what."""

    shard: str
    key: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.shard} {self.key or '-'}: {self.rule}: {self.detail}"

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {"shard": self.shard, "key": self.key, "rule": self.rule, "detail": self.detail}


@dataclass
class CheckReport:
    """The outcome of check_shards: what was read and every problem found."""

    shard_dir: str
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    deep: bool = False
    fraction: float = 1.0
    deep_samples: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no rule was broken."""
        return not self.problems

    def rule_counts(self) -> dict[str, int]:
        """Problems per rule, in the order of RULES."""
        c = Counter(p.rule for p in self.problems)
        return {r: c[r] for r in RULES if c[r]} | {r: n for r, n in c.items() if r not in RULES}

    def summary_line(self) -> str:
        """One line: what was checked and how many problems, by rule."""
        what = f"checked {plural(self.samples, 'sample')} in {plural(self.shards, 'shard')} ({human_bytes(self.bytes)})"
        if self.deep:
            what += f", {self.deep_samples} deep-checked (fraction {self.fraction:g})"
        if self.ok:
            return f"{what}: 0 problems"
        by_rule = ", ".join(f"{r} {n}" for r, n in self.rule_counts().items())
        return f"{what}: {plural(len(self.problems), 'problem')} ({by_rule})"

    def to_dict(self) -> dict:
        """JSON-able form (for `check --json`)."""
        return {
            "shard_dir": self.shard_dir, "ok": self.ok, "samples": self.samples, "shards": self.shards,
            "bytes": self.bytes, "deep": self.deep, "fraction": self.fraction if self.deep else None,
            "deep_samples": self.deep_samples, "seconds": round(self.seconds, 3),
            "problem_counts": self.rule_counts(), "problems": [p.to_dict() for p in self.problems],
        }


# ------------------------------------------------------------------------------- context


@dataclass
class _Context:
    """What every sample check needs from the manifest, resolved once."""

    image_hw: tuple[int, int]
    image_ext: str
    num_anchors: int
    deep: bool
    fraction: float
    seed: int
    flip_targets: bool = False  # the manifest says every member also holds the mirrored image's targets
    deep_fn: Callable | None = None  # (meta, flipped) -> recomputed labels, built lazily
    expected_members: frozenset = frozenset()  # {image ext, json, targets ext}: the members of a sound sample
    num_classes: int = NUM_CLASSES  # background included: labels lie in 1..num_classes-1 (the manifest's classes)


def _require(manifest: dict, *path: str):
    """manifest[path...] or ManifestError naming the missing field (the check cannot run without it)."""
    node = manifest
    for i, k in enumerate(path):
        if not isinstance(node, dict) or k not in node:
            raise ManifestError(f"manifest has no {'.'.join(path[: i + 1])}")
        node = node[k]
    return node


def _make_context(manifest: dict, deep: bool, fraction: float, seed: int) -> _Context:
    """Resolve manifest fields once; raises ManifestError when a required one is missing."""
    size = _require(manifest, "image", "size")
    shards = _require(manifest, "shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s for s in shards):
        raise ManifestError("manifest 'shards' is not a list of shard entries")
    try:
        image_hw = (int(size[0]), int(size[1]))
        num_anchors = int(_require(manifest, "anchors", "count"))
    except (TypeError, ValueError, IndexError) as e:
        raise ManifestError(f"manifest image size or anchor count unreadable: {e}") from None
    ext = str(manifest.get("image", {}).get("format", "jpg"))
    ctx = _Context(image_hw, ext, num_anchors, deep, fraction, seed, anc.has_flip_targets(manifest))
    ctx.num_classes = num_classes_of(manifest)
    if ext in IMAGE_EXTS:
        ctx.expected_members = frozenset((ext, JSON_EXT, TARGETS_EXT))
    if deep:
        ctx.deep_fn = _deep_matcher(manifest, image_hw)
    return ctx


def _deep_matcher(manifest: dict, image_hw: tuple[int, int]) -> Callable[[dict, bool], np.ndarray]:
    """A function (meta, flipped) -> labels recomputed with the reference matcher and the manifest's config;
    flipped: for the mirrored boxes (format.record.flip_boxes, the build's own definition)."""
    try:
        anchors = anc.anchors_from_manifest(manifest)
        cfg = anc.MatchConfig.from_dict(_require(manifest, "anchors", "matching"))
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"manifest anchors section cannot be used for a deep check: {e}") from None

    def recompute(meta: dict, flipped: bool) -> np.ndarray:
        boxes, crowd = box_array(meta.get("boxes"), "boxes"), box_array(meta.get("crowd_boxes"), "crowd_boxes")
        if flipped:
            boxes, crowd = flip_boxes(boxes, image_hw[1]), flip_boxes(crowd, image_hw[1])
        labels, _ = anc.match_reference(anchors, boxes, crowd, cfg, image_hw)
        return np.asarray(labels)

    return recompute


def _selected(key: str, seed: int, fraction: float) -> bool:
    """Deterministic per-key choice for --deep --fraction: independent of order and shard layout."""
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < fraction


# ------------------------------------------------------------------------------- per sample


def _check_image(data: bytes, ext: str, ctx: _Context, full: bool) -> Found:
    """Image header (always) and full pixel decode (when asked): [(rule, detail)]."""
    try:  # header rules first, before any pixel is decoded
        (decode_stored_image if full else open_stored_image)(data, ext, ctx.image_hw)
    except StoredImageError as e:
        return [(e.rule, str(e))]
    return []


def _check_meta(key: str, meta, ctx: _Context) -> tuple[Found, int | None]:
    """JSON member rules (format.record.record_problems, the loader's own): key, size, boxes, labels.
    Returns ([(rule, detail)], number of boxes or None)."""
    return record_problems(meta, ctx.image_hw, ctx.num_classes, key)


def _check_targets(data: bytes, meta, num_boxes: int | None, ctx: _Context
                   ) -> tuple[Found, tuple[SparseTargets, ...] | None]:
    """Anchor-target member rules, for every orientation it holds. Returns ([(rule, detail)], the sparse
    targets per orientation, or None).

    The sparse form is validated by format.targets.unpack_all_targets (index ranges, order, overlap, box
    indices against the header), so no dense array of all A anchors is built unless --deep needs one.
    """
    try:
        orientations = unpack_all_targets(data, ctx.num_anchors)
    except Exception as e:  # unpack raises ValueError by contract; a damaged npz can raise zip/zlib errors too
        return [(RULE_TARGETS_INVALID, f"cannot unpack: {type(e).__name__}: {e}")], None
    out: list[tuple[str, str]] = []
    want = 2 if ctx.flip_targets else 1
    if len(orientations) != want:
        out.append((RULE_TARGETS_INVALID, f"the member holds {len(orientations)} orientation(s), the manifest's "
                                          f"anchors.flip_targets={ctx.flip_targets} says {want}"))
    for name, targets in zip(ORIENTATIONS, orientations):
        if num_boxes is not None and len(targets.matched) and int(targets.matched.max()) >= num_boxes:
            out.append((RULE_TARGETS_INVALID, f"{name}: positive anchors matched to boxes outside 0..{num_boxes - 1}"))
    rpn = meta.get("rpn") if isinstance(meta, dict) else None
    if isinstance(rpn, dict):
        diff = {k: (rpn.get(k), v) for k, v in orientations[0].counts(ctx.num_anchors).items() if rpn.get(k) != v}
        if diff:
            out.append((RULE_TARGETS_COUNTS, "JSON rpn counts differ from the member (json, member): "
                        + ", ".join(f"{k} {j}/{m}" for k, (j, m) in diff.items())))
    return out, orientations


def _check_deep(meta, orientations: tuple[SparseTargets, ...] | None, ctx: _Context) -> Found:
    """Recompute the anchor labels of every stored orientation from the boxes and compare them anchor by anchor."""
    if orientations is None or not isinstance(meta, dict) or ctx.deep_fn is None:
        return []
    out: list[tuple[str, str]] = []
    for name, targets in zip(ORIENTATIONS, orientations):
        stored = targets.dense(ctx.num_anchors)[0]
        try:
            ref = ctx.deep_fn(meta, name != ORIENTATIONS[0])
        except Exception as e:  # boxes already reported as broken make the matcher fail; say so, do not crash
            return [(RULE_TARGETS_DEEP, f"reference matcher failed: {type(e).__name__}: {e}")]
        differ = np.flatnonzero(ref != stored)
        if len(differ):
            i = int(differ[0])
            out.append((RULE_TARGETS_DEEP, f"{name}: {len(differ)} of {len(stored)} anchor labels differ from the "
                                           f"reference matcher (first: anchor {i} stored {int(stored[i])}, "
                                           f"recomputed {int(ref[i])})"))
    return out


def _check_sample(raw: RawSample, ctx: _Context, full_decode: bool) -> tuple[Found, bool]:
    """All per-sample rules for one sample: ([(rule, detail)], deep-checked?)."""
    members = raw.members
    out: list[tuple[str, str]] = list(raw.problems)
    if members.keys() == ctx.expected_members:  # the sound case: image in the manifest's format, JSON, targets
        image = ctx.image_ext
    else:
        out += [(RULE_MEMBERS, p) for p in members_problems(members.keys(), ctx.image_ext)]
        image = image_member(members)
    deep = ctx.deep and _selected(raw.key, ctx.seed, ctx.fraction)
    if image is not None:
        out += _check_image(members[image], image, ctx, full_decode or deep)
    meta, num_boxes = None, None
    if JSON_EXT in members:
        try:
            meta = parse_json(members[JSON_EXT])
        except RecordError as e:
            out.append((RULE_JSON_INVALID, str(e)))
        else:
            found, num_boxes = _check_meta(raw.key, meta, ctx)
            out += found
    if TARGETS_EXT in members:
        found, orientations = _check_targets(members[TARGETS_EXT], meta, num_boxes, ctx)
        out += found
        if deep and meta is not None:
            out += _check_deep(meta, orientations, ctx)
    return out, deep


# ------------------------------------------------------------------------------- per shard


def _scan_tar(data: bytes) -> tuple[list[tuple[str, int, int]], int] | None:
    """The regular-file members of a plain tar, read straight off the buffer: ([(name, data offset, size)],
    offset of the end-of-archive block); None as soon as anything is not plain.

    Plain: every header is ``shards.plain_header``'s with a valid (unsigned) checksum, the data lies
    inside the buffer, and the archive ends at an all-zero block. On exactly these archives tarfile
    yields the same names, offsets and sizes and stops at the same offset, at a fraction of the cost;
    on anything else the caller walks the archive with tarfile, which names the problem.
    """
    n = len(data)
    off = 0
    found: list[tuple[str, int, int]] = []
    heads: list[int] = []
    sums: list[int] = []
    while True:
        if n - off < _BLOCK:
            return None
        head = data[off:off + _BLOCK]
        if head == _ZERO_BLOCK:
            break
        plain = plain_header(head)
        if plain is None or off + _BLOCK + plain[1] > n:
            return None
        name, size, stored = plain
        heads.append(off)
        sums.append(stored)
        found.append((name, off + _BLOCK, size))
        off += _BLOCK + -(-size // _BLOCK) * _BLOCK
    if heads:  # every header's checksum at once: the header bytes summed, the checksum field as spaces
        blocks = np.frombuffer(data, np.uint8, count=off).reshape(-1, _BLOCK)[np.asarray(heads) // _BLOCK]
        computed = blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
        if not np.array_equal(computed, np.asarray(sums, dtype=np.int64)):
            return None
    return found, off


def _tail_problems(data: bytes, end: int, key: str | None) -> list[tuple[str, str, str]]:
    """What follows the archive's last member (``end``): zero blocks only, at least two of them."""
    rest = len(data) - end
    if data.count(0, end) != rest:
        if data.count(0, end, end + 1024) == min(rest, 1024):
            return [("", RULE_TAR_TRAILING, f"data after the end-of-archive marker ({rest} bytes from byte {end})")]
        # tarfile stops quietly at a damaged header in mid-archive; that is a broken tar
        return [("", RULE_TAR_UNREADABLE, f"unreadable tar header at byte {end} after key {key}: "
                                          f"the remaining {rest} bytes are not read")]
    if rest < 1024:
        return [("", RULE_TAR_TRAILING, "the end-of-archive marker (two zero blocks) is missing")]
    return []


def _last_key(members: list[Member]) -> str | None:
    """The key of the last safely named member (the sample an archive problem follows)."""
    return next((split_member_name(m.name)[0] for m in reversed(members) if member_name_problem(m.name) is None), None)


def _archive(data: bytes) -> tuple[list[Member], list[tuple[str, str, str]]]:
    """The members of in-memory tar bytes and the problems of the archive as a whole, (key, rule, detail).

    A plain archive (_scan_tar) is read straight off the buffer; anything else goes through tarfile
    (_archive_tarfile), with the same members wherever both can read it. Member bytes are slices of ``data``.
    """
    scanned = _scan_tar(data)
    if scanned is None:
        return _archive_tarfile(data)
    entries, end = scanned
    members = [Member(n, size, True, lambda a=start, z=size: data[a:a + z]) for n, start, size in entries]
    return members, _tail_problems(data, end, _last_key(members))


def _exts_of(members: list[Member], key: str) -> list[str]:
    """The member extensions of sample ``key`` among ``members``."""
    return [ext for k, ext in (split_member_name(m.name) for m in members) if k == key]


def _archive_tarfile(data: bytes) -> tuple[list[Member], list[tuple[str, str, str]]]:
    """_archive through tarfile: for archives that are not plain (damaged, truncated, special members)."""
    members: list[Member] = []
    end = 0
    cut = None  # the member whose data the archive breaks off in, when its header was read
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        for info in tar:
            stop = info.offset_data + info.size
            if info.isreg() and member_name_problem(info.name) is None:
                if stop > len(data):
                    cut = info.name
                    raise tarfile.ReadError(f"member {info.name!r} ends at byte {stop}, "
                                            f"past the end of the file ({len(data)})")
                end = stop
            members.append(Member(info.name, info.size, info.isreg(), lambda a=info.offset_data, b=stop: data[a:b]))
        # The archive must end with zero blocks only: anything else is junk the loader never sees.
        return members, _tail_problems(data, max(end, tar.offset), _last_key(members))
    except tarfile.TarError as e:
        # The sample being read is cut off: it is not counted as a sample; the problem names it. Without the
        # cut member's name (a broken header) that is the last sample begun, unless it is whole already.
        key = split_member_name(cut)[0] if cut is not None else _last_key(members)
        if cut is None and key is not None and not members_problems(_exts_of(members, key), None):
            return members, [(key, RULE_TAR_UNREADABLE, f"the archive breaks off after this sample: {e}")]
        if key is None:
            return members, [("", RULE_TAR_UNREADABLE, f"not a readable tar: {e}")]
        while members and split_member_name(members[-1].name)[0] == key:
            members.pop()
        return members, [(key, RULE_TAR_UNREADABLE, f"the archive breaks off here, this sample is not counted: {e}")]


@dataclass
class _ShardResult:
    """What checking one shard found; keys are returned so the caller can find duplicates across shards."""

    name: str
    problems: list[Problem] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    bytes: int = 0
    deep_samples: int = 0


@dataclass
class _Loaded:
    """One shard file as the reader thread leaves it: its size and, when it was read, its bytes and sha256."""

    size: int
    data: bytes | None = None  # None: not read (larger than the manifest says, or than MAX_CHECK_SHARD_BYTES)
    sha256: str | None = None


def _read_shard(store, entry: dict) -> _Loaded | OSError:
    """One shard read once, read-only (from disk or object storage), and the sha256 of those bytes; or the error.

    Bounded: the size is looked up first (fstat of the opened regular file, locally) and a file larger
    than the manifest's size or than MAX_CHECK_SHARD_BYTES is not read at all; at most that many bytes
    are read even if the file grows meanwhile. Both steps release the GIL, so _shard_results runs this
    in a thread for the next shard while the current one is walked.
    """
    name = entry["name"]
    try:
        with store.open_read(name) as f:
            size = os.fstat(f.fileno()).st_size if store.is_local else store.size(name)
            listed = entry.get("bytes")
            if not isinstance(listed, int) or size > listed or size > MAX_CHECK_SHARD_BYTES:
                return _Loaded(size)
            data = f.read(size)  # a file shorter than the manifest's is read (to name the cut sample)
    except OSError as e:
        return e
    return _Loaded(len(data), data, hashlib.sha256(data).hexdigest())


def _file_problems(name: str, entry: dict, loaded: _Loaded) -> list[Problem]:
    """Size and sha256 of a shard file against its manifest entry ([] when both agree)."""
    out = []
    if loaded.size != entry.get("bytes"):
        unread = "; not read" if loaded.data is None else ""
        out.append(Problem(name, "", RULE_SHARD_SIZE, f"{loaded.size} bytes, the manifest says {entry.get('bytes')}"
                                                      f"{unread}"))
    elif loaded.data is None:
        out.append(Problem(name, "", RULE_SHARD_SIZE, f"{loaded.size} bytes, more than the {MAX_CHECK_SHARD_BYTES} "
                                                      "a check holds in memory; not read (build smaller shards)"))
    if loaded.data is not None and loaded.sha256 != entry.get("sha256"):
        out.append(Problem(name, "", RULE_SHARD_SHA256, f"sha256 {loaded.sha256[:16]}... differs from the manifest's "
                                                        f"{str(entry.get('sha256'))[:16]}..."))
    return out


def _check_shard(store, entry: dict, ctx: _Context, progress: Callable[[int], None] | None = None,
                 loaded: _Loaded | OSError | None = None) -> _ShardResult:
    """Apply every file-, tar- and sample-level rule to one shard (``loaded``: _read_shard(entry), done ahead)."""
    name = entry["name"]
    res = _ShardResult(name)
    problems = res.problems
    if loaded is None:
        loaded = _read_shard(store, entry)
    if isinstance(loaded, OSError):
        problems.append(Problem(name, "", RULE_SHARD_UNREADABLE, str(loaded)))
        return res
    problems.extend(_file_problems(name, entry, loaded))
    if loaded.data is None:
        return res
    data = loaded.data
    res.bytes = len(data)
    intact = not problems
    # A shard whose bytes are not the published ones gets its pixels decoded, to name the damaged sample.
    full_decode = not intact
    keys = res.keys
    local: set[str] = set()
    pending = 0
    members, tail = _archive(data)
    for raw in group_by_key(members, read_exts=None):
        if not raw.key:  # members whose names have no key belong to no sample
            problems.extend(Problem(name, "", r, d) for r, d in raw.problems)
            continue
        found, deep = _check_sample(raw, ctx, full_decode)
        if raw.key in local:
            found.append((RULE_KEY_DUPLICATE, "key appears twice in this shard"))
        local.add(raw.key)
        keys.append(raw.key)
        problems.extend(Problem(name, raw.key, r, d) for r, d in found)
        res.deep_samples += deep
        pending += 1
        if progress is not None and pending >= PROGRESS_EVERY:
            progress(pending)
            pending = 0
    problems.extend(Problem(name, k, r, d) for k, r, d in tail)
    if progress is not None and pending:
        progress(pending)
    if len(keys) != entry.get("samples"):
        problems.append(Problem(name, "", RULE_SHARD_COUNT,
                                f"{len(keys)} samples, the manifest says {entry.get('samples')}"))
    first, last = (keys[0], keys[-1]) if keys else (None, None)
    if (first, last) != (entry.get("first_key"), entry.get("last_key")):
        problems.append(Problem(name, "", RULE_SHARD_KEYS, f"first/last key {first}/{last}, "
                                f"the manifest says {entry.get('first_key')}/{entry.get('last_key')}"))
    return res


# Per worker process: the context, built once from the manifest (it holds functions, so it is not sent).
_WORKER_CTX: dict = {}


def _init_worker(manifest: dict, deep: bool, fraction: float, seed: int) -> None:
    """Pool initializer: resolve the manifest once per worker."""
    _WORKER_CTX["ctx"] = _make_context(manifest, deep, fraction, seed)


def _check_shard_job(job: tuple[str, dict]) -> _ShardResult:
    """Pool task: check one shard file in a worker."""
    folder, entry = job
    return _check_shard(LocalStore(folder), entry, _WORKER_CTX["ctx"])


def _default_workers(manifest: dict, n_shards: int) -> int:
    """Workers for a check: in-process for small splits, where starting processes costs more than it saves."""
    total = sum(int(s.get("bytes") or 0) for s in manifest["shards"])
    workers = min(os.cpu_count() or 1, n_shards, MAX_WORKERS)
    return workers if workers > 1 and total >= PARALLEL_MIN_BYTES else 0


def _shard_results(store, manifest: dict, ctx: _Context, entries: list[dict], workers: int,
                   progress: Callable[[int], None] | None) -> Iterator[_ShardResult]:
    """Check the given shards in order, in this process or (local disk) in a pool of worker processes."""
    if workers <= 0 or not store.is_local:
        # One reader thread stays a shard ahead (read + sha256); this thread walks the shard before it.
        # At most two shards are in memory at once.
        with ThreadPoolExecutor(1, thread_name_prefix="check-read") as reader:
            ahead = reader.submit(_read_shard, store, entries[0]) if entries else None
            for i, entry in enumerate(entries):
                loaded = ahead.result()
                ahead = reader.submit(_read_shard, store, entries[i + 1]) if i + 1 < len(entries) else None
                yield _check_shard(store, entry, ctx, progress, loaded)
                del loaded
        return
    import multiprocessing as mp

    # spawn, not fork: the caller may run threads (a progress bar's monitor, a loader) that fork would copy.
    jobs = [(str(store.path), e) for e in entries]
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                      initargs=(manifest, ctx.deep, ctx.fraction, ctx.seed)) as pool:
        for res in pool.imap(_check_shard_job, jobs):
            if progress is not None:
                progress(len(res.keys))
            yield res


def _check_directory(on_disk: set[str], manifest: dict) -> list[Problem]:
    """Files vs manifest: listed shards present, nothing unlisted or partial next to them."""
    listed = [s["name"] for s in manifest["shards"]]
    out = [Problem(n, "", RULE_SHARD_MISSING, "listed in the manifest but not on disk")
           for n in listed if n not in on_disk]
    for n in sorted(on_disk - set(listed)):
        if n.endswith(PARTIAL_SUFFIX):
            out.append(Problem(n, "", RULE_PARTIAL_FILE,
                               "unfinished write (interrupted build?); not part of the split"))
        elif SHARD_RE.match(n):
            out.append(Problem(n, "", RULE_SHARD_EXTRA,
                               "shard file not listed in the manifest (loaders would skip or include it)"))
    return out


def _check_totals(manifest: dict) -> list[Problem]:
    """The manifest's totals must add up from its own shard entries."""
    shards = manifest["shards"]
    totals = manifest.get("totals") or {}
    want = {
        "samples": listed_samples(manifest),
        "shards": len(shards),
        "bytes": sum(int(s.get("bytes") or 0) for s in shards),
    }
    return [Problem(MANIFEST_NAME, "", RULE_MANIFEST_TOTALS,
                    f"totals.{k} is {totals.get(k)!r}, the shard entries add up to {v}")
            for k, v in want.items() if totals.get(k) != v]


def _drop_lines(data: bytes, name: str) -> tuple[list[tuple[int, str]], list[Problem]]:
    """(row, reason) of every line of a drops file, and a problem for each line that is not a drop record."""
    rows, problems = [], []
    for i, line in enumerate(data.splitlines(), 1):
        try:
            d = json.loads(line)
            row, reason = d["row"], d["reason"]
            if type(row) is not int or not isinstance(reason, str):
                raise TypeError("row must be an integer and reason a string")
        except (ValueError, KeyError, TypeError) as e:
            problems.append(Problem(name, "", RULE_DROPS_FILE, f"line {i} is not a dropped row's record "
                                                               f"({type(e).__name__}: {e})"))
            continue
        rows.append((row, reason))
    return rows, problems


def _check_drops(store, manifest: dict) -> list[Problem]:
    """The dropped rows' file against the manifest: as many records as ``drops.rows``, each row once and in
    order, within the split's rows, and per shard the reasons its manifest entry counts."""
    drops = manifest.get("drops") or {}
    name = drops.get("file")
    if not name:
        return []  # a manifest that names no such file
    listed = drops.get("rows") if type(drops.get("rows")) is int else 0
    limit = min(max(listed, 0) * MAX_DROP_LINE_BYTES, MAX_DROPS_BYTES) + MAX_DROP_LINE_BYTES
    try:
        data = read_bounded(store, name, limit)  # a regular file only, never more than its rows can take
    except FileNotFoundError:
        return [Problem(name, "", RULE_DROPS_FILE, f"the manifest lists its {drops.get('rows')} dropped row(s) in "
                                                   f"{name}, which is not in the folder")]
    except (OSError, ValueError) as e:
        return [Problem(name, "", RULE_DROPS_FILE, f"cannot be read: {e}")]
    rows, problems = _drop_lines(data, name)
    if len(rows) + len(problems) != drops.get("rows"):
        problems.append(Problem(name, "", RULE_DROPS_FILE, f"{len(rows) + len(problems)} line(s), the manifest's "
                                                           f"drops.rows is {drops.get('rows')}"))
    given = manifest.get("layout") or {}
    n_rows, per = given.get("rows"), given.get("rows_per_shard")
    if not (isinstance(n_rows, int) and isinstance(per, int) and per > 0):
        return problems  # no layout to place the rows in
    layout = Layout(n_rows, per)
    found: dict[int, Counter] = {}
    for i, (row, reason) in enumerate(rows):
        if i and row <= rows[i - 1][0]:
            problems.append(Problem(name, "", RULE_DROPS_FILE, f"row {row} follows row {rows[i - 1][0]}: "
                                                               "each dropped row is listed once, in row order"))
        if not 0 <= row < n_rows:
            problems.append(Problem(name, "", RULE_DROPS_FILE, f"row {row} is outside the split's rows 0..{n_rows - 1}"))
        found.setdefault(layout.shard_of(row), Counter())[reason] += 1
    for entry in manifest["shards"]:
        m = SHARD_RE.match(entry["name"])
        listed = Counter(found.pop(int(m["index"]), {})) if m else Counter()
        if m and listed != Counter(entry.get("drops") or {}):
            problems.append(Problem(name, "", RULE_DROPS_FILE, f"lists {dict(sorted(listed.items()))} for the rows of "
                                                               f"{entry['name']}, whose manifest entry counts "
                                                               f"{dict(sorted((entry.get('drops') or {}).items()))}"))
    return problems


def _running_total(progress: Callable[[int, int], None] | None,
                   entries: list[dict]) -> Callable[[int], None] | None:
    """The per-shard increments as progress(done, total) calls, total from the manifest entries."""
    if progress is None:
        return None
    total, done = listed_samples({"shards": entries}), 0
    progress(0, total)  # the bar shows its total before the first shard is read

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    return advance


def check_shards(shard_dir, *, deep: bool = False, fraction: float = 1.0, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None, workers: int | None = None,
                 storage_options: dict | None = None) -> CheckReport:
    """Verify a shard directory (local, or a URL such as s3://...) against its manifest.

    Raises ManifestError / OSError when it cannot run. ``progress(done, total)``: samples checked so
    far, of the samples the manifest lists for the shards present (known before the first one is read,
    so a bar can show a rate and an ETA). ``workers``: processes checking local shards in parallel (0:
    in this process; None: automatic, i.e. in-process below PARALLEL_MIN_BYTES, else one per CPU);
    object storage is read in this process, one shard ahead. The report is the same either way.
    """
    t0 = time.perf_counter()
    store = store_of(shard_dir, storage_options)
    manifest = read_manifest(store)
    ctx = _make_context(manifest, deep, fraction, seed)
    report = CheckReport(store.url, deep=deep, fraction=fraction)
    problems = report.problems
    if not manifest.get("complete"):
        problems.append(Problem(MANIFEST_NAME, "", RULE_MANIFEST_INCOMPLETE,
                                "the build did not finish (resume it with the same command); "
                                "only the listed shards were checked"))
    problems.extend(_check_totals(manifest))
    if listed_samples(manifest) == 0:
        problems.append(Problem(MANIFEST_NAME, "", RULE_SPLIT_EMPTY,
                                "the manifest lists no samples: a loader would yield nothing (every row dropped? "
                                "see drops.jsonl)"))
    problems.extend(_check_drops(store, manifest))
    on_store = set(store.names())
    problems.extend(_check_directory(on_store, manifest))
    entries = [e for e in manifest["shards"] if e["name"] in on_store]  # missing ones are reported above
    if workers is None:
        workers = _default_workers(manifest, len(entries))
    seen: dict[str, str] = {}
    for res in _shard_results(store, manifest, ctx, entries, workers, _running_total(progress, entries)):
        report.shards += 1
        report.samples += len(res.keys)
        report.bytes += res.bytes
        report.deep_samples += res.deep_samples
        problems.extend(res.problems)
        for key in res.keys:
            if seen.setdefault(key, res.name) != res.name:
                problems.append(Problem(res.name, key, RULE_KEY_DUPLICATE, f"key also in {seen[key]}"))
    report.seconds = time.perf_counter() - t0
    return report
