"""`check`'s rules for one shard file: its size and sha256 against the manifest entry, its tar as a whole
(readable, ending in the end-of-archive marker), its sample count and keys; each sample goes to
``sample_rules``. A shard is read once, whole, into memory (bounded by MAX_CHECK_SHARD_BYTES).
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from typing import Callable

from ..format.manifest import ShardEntry
from ..format.members import Member, group_by_key, member_name_problem, members_problems, split_member_name
from ..storage.base import Store
from ..storage.tar import END_OF_ARCHIVE, scan_plain
from .report import (
    RULE_KEY_DUPLICATE, RULE_SHARD_COUNT, RULE_SHARD_KEYS, RULE_SHARD_SHA256, RULE_SHARD_SIZE, RULE_SHARD_UNREADABLE,
    RULE_TAR_TRAILING, RULE_TAR_UNREADABLE, Problem,
)
from .sample_rules import Context, check_sample

PROGRESS_EVERY = 64  # samples between progress callbacks (the callback may be a tqdm bar)
# The most bytes of one shard a check holds in memory (it reads a shard whole, one ahead: two at most per
# process); a larger shard is reported under shard_size, unread. docs/RELIABILITY.md "Bounds".
MAX_CHECK_SHARD_BYTES = 1 << 30
ArchiveProblem = tuple[str, str, str]  # (key or "", rule, detail) of the archive as a whole


def _tail_problems(data: bytes, end: int, key: str | None) -> list[ArchiveProblem]:
    """What follows the archive's last member (``end``): zero blocks only, at least two of them."""
    rest = len(data) - end
    if data.count(0, end) != rest:
        if data.count(0, end, end + END_OF_ARCHIVE) == min(rest, END_OF_ARCHIVE):
            return [("", RULE_TAR_TRAILING, f"data after the end-of-archive marker ({rest} bytes from byte {end})")]
        # tarfile stops quietly at a damaged header in mid-archive; that is a broken tar
        return [("", RULE_TAR_UNREADABLE, f"unreadable tar header at byte {end} after key {key}: "
                                          f"the remaining {rest} bytes are not read")]
    if rest < END_OF_ARCHIVE:
        return [("", RULE_TAR_TRAILING, "the end-of-archive marker (two zero blocks) is missing")]
    return []


def _last_key(members: list[Member]) -> str | None:
    """The key of the last safely named member (the sample an archive problem follows)."""
    return next((split_member_name(m.name)[0] for m in reversed(members) if member_name_problem(m.name) is None), None)


def archive(data: bytes) -> tuple[list[Member], list[ArchiveProblem]]:
    """The members of in-memory tar bytes and the problems of the archive as a whole, (key, rule, detail).

    A plain archive (storage.tar.scan_plain) is read straight off the buffer; anything else goes through tarfile
    (archive_tarfile), with the same members wherever both can read it. Member bytes are slices of ``data``.
    """
    scanned = scan_plain(data)
    if scanned is None:
        return archive_tarfile(data)
    entries, end = scanned
    members = [Member(n, size, True, lambda a=start, z=size: data[a:a + z]) for n, start, size in entries]
    return members, _tail_problems(data, end, _last_key(members))


def _exts_of(members: list[Member], key: str) -> list[str]:
    """The member extensions of sample ``key`` among ``members``."""
    return [ext for k, ext in (split_member_name(m.name) for m in members) if k == key]


def archive_tarfile(data: bytes) -> tuple[list[Member], list[ArchiveProblem]]:
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
class ShardResult:
    """What checking one shard found; keys are returned so the caller can find duplicates across shards."""

    name: str
    problems: list[Problem] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    bytes: int = 0
    deep_samples: int = 0


@dataclass
class Loaded:
    """One shard file as the reader thread leaves it: its size and, when it was read, its bytes and sha256."""

    size: int
    data: bytes | None = None  # None: not read (larger than the manifest says, or than MAX_CHECK_SHARD_BYTES)
    sha256: str | None = None


def read_shard(store: Store, entry: ShardEntry) -> Loaded | OSError:
    """One shard read once, read-only (from disk or object storage), and the sha256 of those bytes; or the error.

    Bounded: the size is looked up first (fstat of the opened regular file, locally) and a file larger
    than the manifest's size or than MAX_CHECK_SHARD_BYTES is not read at all; at most that many bytes
    are read even if the file grows meanwhile. Both steps release the GIL, so _shard_results runs this
    in a thread for the next shard while the current one is walked.
    """
    name = entry.name
    try:
        with store.open_read(name) as f:
            size = os.fstat(f.fileno()).st_size if store.is_local else store.size(name)
            if size > entry.bytes or size > MAX_CHECK_SHARD_BYTES:
                return Loaded(size)
            data = f.read(size)  # a file shorter than the manifest's is read (to name the cut sample)
    except OSError as e:
        return e
    return Loaded(len(data), data, hashlib.sha256(data).hexdigest())


def _file_problems(name: str, entry: ShardEntry, loaded: Loaded) -> list[Problem]:
    """Size and sha256 of a shard file against its manifest entry ([] when both agree)."""
    out = []
    if loaded.size != entry.bytes:
        unread = "; not read" if loaded.data is None else ""
        out.append(Problem(name, "", RULE_SHARD_SIZE, f"{loaded.size} bytes, the manifest says {entry.bytes}"
                                                      f"{unread}"))
    elif loaded.data is None:
        out.append(Problem(name, "", RULE_SHARD_SIZE, f"{loaded.size} bytes, more than the {MAX_CHECK_SHARD_BYTES} "
                                                      "a check holds in memory; not read (build smaller shards)"))
    if loaded.data is not None and loaded.sha256 != entry.sha256:
        out.append(Problem(name, "", RULE_SHARD_SHA256, f"sha256 {loaded.sha256[:16]}... differs from the manifest's "
                                                        f"{entry.sha256[:16]}..."))
    return out


def check_shard(store: Store, entry: ShardEntry, ctx: Context, progress: Callable[[int], None] | None = None,
                loaded: Loaded | OSError | None = None) -> ShardResult:
    """Apply every file-, tar- and sample-level rule to one shard (``loaded``: read_shard(entry), done ahead)."""
    name = entry.name
    res = ShardResult(name)
    problems = res.problems
    if loaded is None:
        loaded = read_shard(store, entry)
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
    members, tail = archive(data)
    for raw in group_by_key(members, read_exts=None):
        if not raw.key:  # members whose names have no key belong to no sample
            problems.extend(Problem(name, "", r, d) for r, d in raw.problems)
            continue
        found, deep = check_sample(raw, ctx, full_decode)
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
    if len(keys) != entry.samples:
        problems.append(Problem(name, "", RULE_SHARD_COUNT,
                                f"{len(keys)} samples, the manifest says {entry.samples}"))
    first, last = (keys[0], keys[-1]) if keys else (None, None)
    if (first, last) != (entry.first_key, entry.last_key):
        problems.append(Problem(name, "", RULE_SHARD_KEYS, f"first/last key {first}/{last}, "
                                f"the manifest says {entry.first_key}/{entry.last_key}"))
    return res
