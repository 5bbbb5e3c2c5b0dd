"""A shard's samples as (key, {ext: bytes}): the one way to iterate a shard, local or remote, held to the
member rules (``format.members``), and a sample's record and targets held to the loader's and check's rules.
"""
from __future__ import annotations

import os
import tarfile
from typing import IO, Callable, Iterator

from ..format.members import JSON_EXT, MAX_MEMBER_BYTES, TARGETS_EXT, RawSample, ShardFormatError, group_by_key
from ..format.record import Record, RecordError, checked_record
from ..format.targets import SparseTargets, unpack_targets
from .base import Store, open_regular
from .tar import tar_members


def sample_error(raw: RawSample, where: str) -> ShardFormatError | None:
    """The error a reader raises for a sample that breaks a member rule (naming where and the key), or None."""
    if not raw.problems:
        return None
    at = f"{where}: key {raw.key!r}" if raw.key else where
    return ShardFormatError(f"{at}: {raw.problems[0][1]}")


def sample_record(members: dict[str, bytes], key: str, where: str, canvas_hw: tuple[int, int], num_classes: int
                  ) -> Record:
    """The checked record of a sample read from ``where`` (format.record.checked_record: the loader's and check's
    rules); ShardFormatError naming ``where``, the key and the rule when it breaks one."""
    if JSON_EXT not in members:
        raise ShardFormatError(f"{where}: key {key!r}: no {JSON_EXT} member (run frcnn-shard check)")
    try:
        return checked_record(members[JSON_EXT], canvas_hw, num_classes, key)
    except RecordError as e:
        raise ShardFormatError(f"{where}: key {key!r}: {e}") from None


def sample_targets(members: dict[str, bytes], key: str, where: str, num_anchors: int, flipped: bool = False
                   ) -> SparseTargets:
    """The sample's unpacked anchor targets (format.targets.unpack_targets); ShardFormatError naming ``where``,
    the key and the rule when the member is missing or breaks a rule."""
    if TARGETS_EXT not in members:
        raise ShardFormatError(f"{where}: key {key!r}: no {TARGETS_EXT} member (run frcnn-shard check)")
    try:
        return unpack_targets(members[TARGETS_EXT], num_anchors, flipped=flipped)
    except ValueError as e:
        raise ShardFormatError(f"{where}: key {key!r}: corrupt anchor targets: {e}") from None


def iter_tar_samples(
    fileobj: IO[bytes], where: str, select: Callable[[int, str], bool] | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES, seekable: bool = True,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) from a tar stream, in memory only; unknown extensions are ignored.

    Any member rule broken (``format.members``) raises ShardFormatError naming ``where`` and the key.
    ``select(index, key)`` reads only the samples it accepts (the others are yielded without members);
    on a ``seekable`` file it seeks past them, otherwise it reads past them.
    """
    key = None
    try:
        members = tar_members(fileobj, "r|" if select is None or not seekable else "r:")
        for raw in group_by_key(members, select=select, max_member_bytes=max_member_bytes, where=where):
            key = raw.key
            yield raw.key, raw.members
    except tarfile.TarError as e:
        raise ShardFormatError(f"{where}: unreadable tar after key {key!r}: {e}") from None


def iter_shard(path: str | os.PathLike, select: Callable[[int, str], bool] | None = None
               ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield the samples of one local shard file, a regular file only (see iter_tar_samples)."""
    with open_regular(path) as f:
        yield from iter_tar_samples(f, str(path), select)


def iter_store_shard(store: Store, name: str, select: Callable[[int, str], bool] | None = None
                     ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield the samples of shard ``name`` of a store: a local file, or a remote object (streamed).

    A remote shard is streamed with ``select`` too (the samples passed over are read past in bounded
    chunks): memory stays at a member, never a whole shard.
    """
    f = store.open_read(name)
    try:
        yield from iter_tar_samples(f, store.location(name), select, seekable=store.is_local)
    finally:
        f.close()


def list_shard_keys(path: str | os.PathLike) -> list[str]:
    """Keys of a shard from its tar headers alone, in order, without reading the member bytes."""
    return [key for key, _ in iter_shard(path, select=lambda index, key: False)]
