"""Resume, overwrite and takeover: what a part finds of an earlier build of its split, and the record it
goes on from. A split built with other options is refused unless overwrite, which cleans up first.
"""
from __future__ import annotations

from ..errors import BuildError
from ..format.names import DROPS_NAME, MANIFEST_NAME, PARTS_DIR
from ..shards import PARTIAL_SUFFIX, SHARD_RE, read_manifest
from .options import BuildOptions
from .parts import differing_keys, read_records, record_name, same_build, shard_differs, take_over, write_record


def _differing(a: dict, b: dict) -> str:
    return ", ".join(differing_keys(a, b))


def split_state(store, header: dict, opts: BuildOptions, shards: range | None, part: tuple[int, int]) -> bool:
    """Clean up for overwrite, or check what an earlier build left; True when the split is complete already.

    Refuses (BuildError) a split whose manifest was built with other options or source.
    ``shards``: the part's shards, whose files (with its record) overwrite removes; None: the whole split.
    """
    if opts.overwrite:
        _clean(store, shards, part)
        return False
    if not store.exists(MANIFEST_NAME):
        return False
    built = read_manifest(store)
    if not same_build({k: built.get(k) for k in header}, header):
        raise BuildError(f"{store.url} was built with different options or source (differing: "
                         f"{_differing({k: built.get(k) for k in header}, header)}); re-run with the same "
                         "options, or build with the overwrite option to start again")
    return True


def prepare_part(store, header: dict, part: tuple[int, int], shards: range, opts: BuildOptions) -> dict | None:
    """The part record to continue from (a fresh one when there is none); None when the split is already complete.

    Refuses (BuildError) a split built with other options, unless overwrite. The shards that records of
    a build split another way list in this part's range are taken over (parts.take_over): their bytes
    do not depend on the split.
    """
    whole = opts.part is None
    if split_state(store, header, opts, None if whole else shards, part) and whole:
        return None
    records = read_records(store)
    record = records.get(record_name(*part))
    if record is not None and not same_build(record["header"], header):
        raise BuildError(f"{store.url}: part {part[0]} of {part[1]} was built with different options or source "
                         f"(differing: {_differing(record['header'], header)}); re-run with the same options, or "
                         "build with the overwrite option")
    if record is None:
        record = {"part": list(part), "shard_range": [shards.start, shards.stop], "header": header, "shards": [],
                  "complete": False, "run": {}}
    _verify_listed(store, record)
    taken = take_over(store, records, part, shards, header, adopt=not opts.overwrite)
    # A taken-over shard that is missing or changed is simply built again (same bytes).
    taken = [e for e in taken if shard_differs(store, e, hash_it=store.is_local) is None]
    if taken:
        record["shards"] = sorted(record["shards"] + taken, key=lambda e: e["index"])
        record["complete"] = len(record["shards"]) == len(shards)
        write_record(store, record)
    return record


def _verify_listed(store, record: dict) -> None:
    """Every shard a part record lists is there, with its size (and, on local disk, its sha256)."""
    for e in record["shards"]:
        if shard_differs(store, e, hash_it=store.is_local):
            raise BuildError(f"{store.location(e['name'])}: listed in {PARTS_DIR}/{record_name(*record['part'])} but "
                             "missing or changed since; build with the overwrite option to rebuild")


def _clean(store, shards: range | None, part: tuple[int, int]) -> None:
    """Remove what an earlier build left: everything of the split, or (for one part) its shards and record."""
    store.remove(MANIFEST_NAME)
    store.remove(DROPS_NAME)
    names = store.names()
    for n in names:
        m = SHARD_RE.match(n.removesuffix(PARTIAL_SUFFIX))
        if m and (shards is None or int(m.group("index")) in shards):
            store.remove(n)
    records = store.sub(PARTS_DIR)
    for n in records.names():
        if n.endswith(".json") and (shards is None or n == record_name(*part)):
            records.remove(n)


def remove_dead_partials(store, shards: range | None) -> None:
    """Remove the ``*.partial`` shards of ``shards`` (None: all). The caller holds the lock of a part that
    covers them, which excludes every live writer of these shards: each is a dead writer's."""
    for n in store.names():
        m = SHARD_RE.match(n.removesuffix(PARTIAL_SUFFIX))
        if n.endswith(PARTIAL_SUFFIX) and m and (shards is None or int(m.group("index")) in shards):
            store.remove(n)
