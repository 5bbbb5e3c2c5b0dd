"""Tar members of a sample: their names, their order, the rules each must follow, and how members
become samples.

A sample is the consecutive members sharing one key (WebDataset's rule: the key is the name up to
its first dot). Every reader of shards (the loader, check, stats, show, resume) turns its members into
samples with ``group_by_key``, so the member rules apply everywhere the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Iterator

from ..errors import FrcnnShardError

IMAGE_EXTS = ("jpg", "png")
JSON_EXT = "json"
TARGETS_EXT = "rpn.npz"
KNOWN_EXTS = IMAGE_EXTS + (JSON_EXT, TARGETS_EXT)
# Extensions of formats that unpickle when loaded: such a member is refused outright, never read.
UNSAFE_EXTS = ("pyd", "pickle", "pkl", "pth", "pt", "ckpt")
MAX_MEMBER_BYTES = 64 << 20  # a declared member size above this is refused before reading

# Rule names of the member rules (the check report uses them; docs/INSPECT.md explains each).
RULE_MEMBER_NAME = "member_name"  # unsafe name, not a regular file, or oversized
RULE_MEMBERS = "members"  # the sample's set of members: missing, unexpected or repeated


class ShardFormatError(FrcnnShardError, ValueError):
    """A shard breaks a rule of docs/FORMAT.md; the message names the shard, the key and the rule."""


def split_member_name(name: str) -> tuple[str, str]:
    """Split a member name into (key, extension) the way WebDataset does: at the first dot."""
    key, _, ext = name.partition(".")
    return key, ext


def member_name_problem(name: str) -> str | None:
    """Why a member name is unsafe (could escape a directory, hides a pickle, has no key.ext form), or None."""
    # Any "/" (absolute or nested paths, "../x" included) or backslash is refused; so is ".." alone.
    if not name or name == ".." or "/" in name or "\\" in name:
        return f"member name {name!r} is not a plain file name (path traversal refused)"
    key, ext = split_member_name(name)
    if not key or not ext:
        return f"member name {name!r} has no key.extension form"
    if ext.rsplit(".", 1)[-1].lower() in UNSAFE_EXTS:
        return f"member {name!r} is a pickle-type member; frcnn-shard never unpickles"
    return None


def sample_members(image_ext: str, image: bytes, record: bytes, targets: bytes) -> list[tuple[str, bytes]]:
    """The members of one sample in their fixed order: image, JSON record, anchor targets."""
    return [(image_ext, image), (JSON_EXT, record), (TARGETS_EXT, targets)]


def members_problems(exts: Collection[str], image_ext: str | None) -> list[str]:
    """Why a sample's set of member extensions is not a sound sample's ([] when it is).

    A sound sample has exactly one image (of ``image_ext`` when given: the manifest's format), the
    JSON record and the anchor targets.
    """
    images = [e for e in IMAGE_EXTS if e in exts]
    need = (JSON_EXT, TARGETS_EXT)
    missing = [e for e in need if e not in exts] + ([] if images else [f"image ({'/'.join(IMAGE_EXTS)})"])
    extra = sorted(set(exts) - set(need) - set(IMAGE_EXTS)) + images[1:]
    out = []
    if missing or extra:
        out.append("; ".join(p for p in (f"missing {', '.join(missing)}" if missing else "",
                                         f"unexpected {', '.join(extra)}" if extra else "") if p))
    if image_ext is not None and images and images[0] != image_ext:
        out.append(f"image member is .{images[0]}, the manifest says {image_ext}")
    return out


def image_member(exts: Collection[str]) -> str | None:
    """The extension of a sample's image member (the first of IMAGE_EXTS present), or None."""
    return next((e for e in IMAGE_EXTS if e in exts), None)


@dataclass(frozen=True)
class Member:
    """One tar member as a reader meets it; ``read()`` returns its bytes (call it before the next member)."""

    name: str
    size: int
    regular: bool
    read: Callable[[], bytes]


@dataclass
class RawSample:
    """The members of one sample, still encoded, and every member rule they break.

    ``key == ""`` marks members whose name has no key (such a name is unsafe: it is never read).
    ``exts`` lists every member seen, in order; ``members`` holds the bytes of those that were read.
    ``problems`` are (rule, detail) pairs; details do not name the shard (readers add where).
    """

    key: str
    index: int  # position of the sample in the shard
    exts: list[str] = field(default_factory=list)
    members: dict[str, bytes] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)


def member_problem(member: Member, seen_exts: Collection[str],
                   max_member_bytes: int = MAX_MEMBER_BYTES) -> tuple[str, str] | None:
    """(rule, detail) when a member must not be read (unsafe name, not a file, oversized, repeated), else None."""
    unsafe = member_name_problem(member.name)
    if unsafe is not None:
        return RULE_MEMBER_NAME, unsafe
    if not member.regular:
        return RULE_MEMBER_NAME, f"member {member.name!r} is not a regular file"
    if member.size > max_member_bytes:
        return RULE_MEMBER_NAME, f"member {member.name!r} declares {member.size} bytes (> {max_member_bytes} limit)"
    if split_member_name(member.name)[1] in seen_exts:
        return RULE_MEMBERS, f"member {member.name!r} appears twice in its sample"
    return None


def group_by_key(
    members: Iterable[Member],
    *,
    read_exts: Collection[str] | None = KNOWN_EXTS,
    select: Callable[[int, str], bool] | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    where: str | None = None,
) -> Iterator[RawSample]:
    """Group consecutive members into samples, applying the member rules; a broken member is never read.

    ``read_exts``: extensions whose bytes are read (None: all). ``select(index, key)``: read only the
    samples it accepts (the others are still grouped and checked, from their headers alone).
    ``where``: raise ShardFormatError naming it and the key at the first broken member, at once
    (before the stream moves past it); without it, problems are collected in each RawSample.
    """
    cur: RawSample | None = None
    index = -1
    wanted = True
    for m in members:
        key, ext = split_member_name(m.name)
        if where is not None and (unsafe := member_name_problem(m.name)) is not None:
            raise ShardFormatError(f"{where}: {unsafe}")  # before the sample it ends is handed on
        if cur is None or key != cur.key:
            if cur is not None:
                yield cur
            index += 1
            cur = RawSample(key, index)
            wanted = select is None or select(index, key)
        problem = member_problem(m, cur.exts, max_member_bytes)
        cur.exts.append(ext)
        if problem is not None:
            if where is not None:
                raise ShardFormatError(f"{where}: key {key!r}: {problem[1]}" if key else f"{where}: {problem[1]}")
            cur.problems.append(problem)
        elif wanted and (read_exts is None or ext in read_exts):
            cur.members[ext] = m.read()
    if cur is not None:
        yield cur
