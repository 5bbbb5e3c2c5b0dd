"""A build in parts: the part records and locks beside the shards, the takeover of shards another part
count published, and the merge that writes the manifest once every part is done.

Which rows each shard covers and which shards each part builds is format.layout's rule (Layout, kept
importable from here): a shard's bytes are a function of its rows and the options alone, so one machine
with any number of workers, N parts on N machines, or Ray tasks all write the same shards. Each part
records each shard it publishes in ``_parts/part-<p>-of-<N>.json``. ``merge`` checks that the N records are complete and
consistent, then writes ``drops.jsonl`` and, last, ``manifest.json``.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time
from collections import Counter
from typing import Iterable

from ..errors import BuildError, LockedError, MergeError, PartRecordError
from ..faults import fault_point
from ..format.layout import Layout
from ..format.manifest import MAX_JSON_BYTES, header_problems, is_int, parse_json, shard_entries_problems
from ..format.names import DROPS_NAME, MANIFEST_NAME, PARTS_DIR
from ..shards import read_bounded
from ..storage import pid_alive
from ..storage.manifest_io import json_bytes, jsonl_bytes  # the one JSON writer of the split folder

LOCK_SUFFIX = ".lock"
MERGE_SHARDS = 1 << 31  # a merge's lock covers every shard a split can have
HASH_BLOCK = 1 << 20  # bytes per read while merge hashes a shard (memory stays at about this)


def record_name(part: int, parts: int) -> str:
    """The part record's file name (inside PARTS_DIR)."""
    return f"part-{part:06d}-of-{parts:06d}.json"


def _parse_record_name(name: str, suffix: str = ".json") -> tuple[int, int] | None:
    """(I, N) of ``part-IIIIII-of-NNNNNN<suffix>``; None for any other name."""
    bits = name.removesuffix(suffix).split("-")
    if not name.endswith(suffix) or len(bits) != 4 or bits[0] != "part" or bits[2] != "of" \
            or not all(b.isdigit() and len(b) == 6 for b in (bits[1], bits[3])):
        return None
    i, n = int(bits[1]), int(bits[3])
    return (i, n) if 0 <= i < n else None


def same_build(a: dict, b: dict) -> bool:
    """Whether two headers are of one build: equal apart from the split's name as the user typed it
    (``--split validation`` and ``--split val`` build the same split, named in ``split``)."""
    return _identity(a) == _identity(b)


def differing_keys(a: dict, b: dict) -> list[str]:
    """The top-level keys in which two headers differ (as same_build compares them)."""
    a, b = _identity(a), _identity(b)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _identity(header: dict) -> dict:
    source = header.get("source")
    if isinstance(source, dict):
        header = {**header, "source": {k: v for k, v in source.items() if k != "requested_split"}}
    return header


def _pair(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(is_int(x) for x in v) and v[0] <= v[1]


def record_problems(record, part: tuple[int, int]) -> list[str]:
    """What breaks the part record rules (docs/FORMAT.md): the fields' types, the header's rules (as the
    manifest's), shard entries named for their split and index, in order, each within ``shard_range``."""
    if not isinstance(record, dict):
        return [f"must be a JSON object (got a {type(record).__name__})"]
    problems = [f"{k}: missing" for k in ("part", "shard_range", "header", "shards", "complete", "run")
                if k not in record]
    if problems:
        return problems
    if record["part"] != list(part):
        problems.append(f"part: must be {list(part)}, as the file name says (got {str(record['part'])[:40]})")
    if not _pair(record["shard_range"]):
        problems.append("shard_range: must be [start, stop] with 0 <= start <= stop")
    if type(record["complete"]) is not bool:
        problems.append("complete: must be true or false")
    if not isinstance(record["run"], dict):
        problems.append("run: must be an object")
    problems += [f"header.{p}" for p in header_problems(record["header"])]
    if problems:
        return problems
    problems += shard_entries_problems(record["shards"], record["header"]["split"])
    if not problems:
        problems += _entry_problems(record["shards"], range(*record["shard_range"]))
    return problems


def _entry_problems(entries: list[dict], shards: range) -> list[str]:
    """A part record's own shard-entry rules: within its range, with a list of drop records."""
    problems = []
    for i, e in enumerate(entries):
        if e["index"] not in shards:
            problems.append(f"shards[{i}]: index {e['index']} is outside shard_range [{shards.start}, {shards.stop}]")
        if not isinstance(e.get("dropped"), list) or not all(isinstance(d, dict) for d in e["dropped"]):
            problems.append(f"shards[{i}].dropped: must be a list of drop records")
    return problems[:5]


def read_record(parts_store, name: str) -> dict:
    """One part record, read bounded and checked; PartRecordError naming the file and the rules it breaks."""
    where = parts_store.location(name)
    try:
        data = read_bounded(parts_store, name, MAX_JSON_BYTES)
    except (OSError, ValueError) as e:
        raise PartRecordError(f"{where}: unreadable part record: {e}") from None
    record = parse_json(data, where, PartRecordError)
    problems = record_problems(record, _parse_record_name(name))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise PartRecordError(f"{where}: malformed part record: {'; '.join(problems[:3])}{more}. Build that part "
                          "again with the overwrite option, or delete the record (its shards are then rebuilt)")
    return record


def read_records(store) -> dict[str, dict]:
    """The part records of a split, by file name, each checked (PartRecordError names a malformed one)."""
    parts = store.sub(PARTS_DIR)
    return {name: read_record(parts, name) for name in parts.names() if _parse_record_name(name) is not None}


def write_record(store, record: dict, fault_n: int | None = None) -> None:
    """Replace a part record atomically (the test-only fault point "record_write" cuts it in half)."""
    part, parts = record["part"]
    hook = None if fault_n is None else (lambda: fault_point("record_write", fault_n))
    store.sub(PARTS_DIR).write_atomic(record_name(part, parts), json_bytes(record), before_rest=hook)


# ---------------------------------------------------------------------------------------- locks


def utc_now() -> str:
    """The time now, as every record and lock of a build writes it (UTC, to the second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def holder() -> dict:
    """Who takes a lock: this host and process (and the Ray task, when run by one)."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": utc_now()}
    task = os.environ.get("FRCNN_SHARD_TASK")  # set by the Ray engine: a retried task takes its own lock back
    if task:
        me["task"] = task
    return me


def acquire_lock(store, part: int, parts: int, shards: range) -> str:
    """Take the lock of one part of a split, which builds ``shards``; LockedError naming the holder when
    another build has it, or holds a part of another split whose shards overlap these.

    A lock whose holder was a process of this host that no longer runs is stale and is taken over.
    Two builds of different part counts may take their locks at once: each looks at the other locks
    after taking its own, so at least one sees the other and backs off (both may). Returns the lock's
    name (for release_lock).
    """
    locks = store.sub(PARTS_DIR)
    locks.makedirs()
    name = record_name(part, parts).replace(".json", LOCK_SUFFIX)
    me = {**holder(), "part": [part, parts], "shards": [shards.start, shards.stop]}
    for _ in range(3):
        if _create_lock(locks, name, me):
            break
        other = _read_lock(store, locks, name)
        if other is not None and not _stale(other, me):
            raise _locked(store, locks, name, other)
        locks.remove(name)
    else:
        raise LockedError(f"could not take the lock {locks.location(name)}")
    try:
        _refuse_overlapping(store, locks, name, me)
    except BaseException:
        release_lock(store, name)
        raise
    return name


def _create_lock(locks, name: str, me: dict) -> bool:
    """create_exclusive of the lock; a failed write (full disk, ...) is a BuildError naming the file."""
    try:
        return locks.create_exclusive(name, json_bytes(me))
    except OSError as e:
        raise BuildError(f"{locks.location(name)}: could not write the lock: {e}. Nothing was written to the "
                         "split; fix the cause (space, permissions, the storage service) and run the same command "
                         "again") from None


def _read_lock(store, locks, name: str) -> dict | None:
    """A lock's holder; None when it is gone; LockedError naming the file when it is not a lock we write."""
    where = locks.location(name)
    try:
        other = parse_json(read_bounded(locks, name, 1 << 16), "its bytes", ValueError)
    except FileNotFoundError:
        return None  # released meanwhile
    except (OSError, ValueError) as e:
        other = str(e)
    ok = isinstance(other, dict) and isinstance(other.get("host"), str) and is_int(other.get("pid"), 1, 1 << 31) \
        and (other.get("shards") is None or _pair(other["shards"]))
    if not ok:
        why = other if isinstance(other, str) else "no host and pid of its holder"
        raise LockedError(f"{where}: not a lock this tool writes ({why}); a build may still be writing "
                          f"{store.url}. If none is, delete {where} and run the same command again")
    return other


def _stale(other: dict, me: dict) -> bool:
    """Whether a lock's holder is gone: a dead process of this host, or an earlier attempt of this Ray task."""
    return (other["host"] == me["host"] and not pid_alive(other["pid"])) or \
        bool(me.get("task") and other.get("task") == me["task"])


def _locked(store, locks, name: str, other: dict) -> LockedError:
    part, parts = _parse_record_name(name, LOCK_SUFFIX)
    return LockedError(
        f"another build is writing {store.url} (part {part} of {parts}): held by pid {other['pid']} "
        f"on {other['host']} since {str(other.get('since', '?'))[:40]}. Wait for it to finish; if that build is "
        f"gone, delete {locks.location(name)}")


def _refuse_overlapping(store, locks, mine: str, me: dict) -> None:
    """LockedError when a live lock of another part count covers a shard of ours (a stale one is removed)."""
    start, stop = me["shards"]
    for name in locks.names():
        bits = _parse_record_name(name, LOCK_SUFFIX)
        if bits is None or name == mine or bits[1] == me["part"][1]:
            continue  # parts of one count never overlap
        other = _read_lock(store, locks, name)
        if other is None:
            continue
        o_start, o_stop = other.get("shards") or (0, float("inf"))  # an older lock: it may cover any shard
        if o_start >= stop or start >= o_stop or o_start == o_stop or start == stop:
            continue
        if _stale(other, me):
            locks.remove(name)
            continue
        raise _locked(store, locks, name, other)


def release_lock(store, name: str) -> None:
    """Give a lock back."""
    store.sub(PARTS_DIR).remove(name)


# ---------------------------------------------------------------------------------------- merge


def sum_counts(dicts: Iterable[dict]) -> dict:
    """Add up {reason: count} dicts."""
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return dict(sorted(total.items()))


def _complete_records(store) -> tuple[int, list[dict]]:
    """The N part records of one split, in part order, all finished (MergeError naming what is not)."""
    records = read_records(store)
    if not records:
        raise MergeError(f"{store.url}: no part records in {PARTS_DIR}/: nothing was built here yet")
    counts = sorted({_parse_record_name(n)[1] for n in records})
    if len(counts) > 1:
        raise MergeError(f"{store.url}: part records of builds split {', '.join(map(str, counts))} ways are mixed "
                         f"in {PARTS_DIR}/: run every part of the split you mean to finish (each takes over the "
                         "shards the others published in its range), then merge again; or rebuild with the "
                         "overwrite option")
    n = counts[0]
    missing = [i for i in range(n) if record_name(i, n) not in records]
    if missing:
        raise MergeError(f"{store.url}: part(s) {', '.join(map(str, missing))} of {n} have not run "
                         f"(no {record_name(missing[0], n)}); run them, then merge again")
    ordered = [records[record_name(i, n)] for i in range(n)]
    unfinished = [r for r in ordered if not r.get("complete")]
    if unfinished:
        r = unfinished[0]
        raise MergeError(f"{store.url}: part {r['part'][0]} of {n} is not finished ({len(r['shards'])} of "
                         f"{len(range(*r['shard_range']))} shards); run it again, then merge")
    return n, ordered


def _check_consistent(store, n: int, records: list[dict]) -> Layout:
    """Every part built from the same source and options, and together they cover every shard once."""
    head = records[0]["header"]
    for r in records[1:]:
        if not same_build(r["header"], head):
            keys = differing_keys(head, r["header"])
            raise MergeError(f"{store.url}: part {r['part'][0]} of {n} differs from part 0 in {', '.join(keys)} "
                             "(different options, source or tool version); rebuild it with the same ones")
    layout = Layout(head["layout"]["rows"], head["layout"]["rows_per_shard"])
    for r in records:
        want = layout.part_shards(r["part"][0], n)
        got = [s["index"] for s in r["shards"]]
        if got != list(want):
            raise MergeError(f"{store.url}: part {r['part'][0]} of {n} lists shards {got[:3]}... but should cover "
                             f"{want.start}..{want.stop - 1}; rebuild it")
    return layout


def annotation_drops(stats: dict) -> dict:
    """Annotations the source could not attach to any row, by reason (dangling: unknown image_id)."""
    return {"dangling": int(stats["dangling_annotations"])} if stats.get("dangling_annotations") else {}


def merge(store, run: dict | None = None) -> dict:
    """Check the parts of a split, then write drops.jsonl and, last, manifest.json; returns the manifest.

    The merge holds the lock of a whole build (part 0 of 1, every shard) while it runs, so two merges never
    write the same temporary files, and none runs beside a part that is still building (LockedError).
    """
    lock = acquire_lock(store, 0, 1, range(MERGE_SHARDS))
    try:
        return _merged(store, run)
    finally:
        release_lock(store, lock)


def _merged(store, run: dict | None) -> dict:
    """The merge itself, under its lock: the records checked, every shard verified, drops.jsonl, the manifest."""
    n, records = _complete_records(store)
    _check_consistent(store, n, records)
    on_store = set(store.names())
    shards = [s for r in records for s in r["shards"]]
    absent = [s["name"] for s in shards if s["name"] not in on_store]
    if absent:
        raise MergeError(f"{store.url}: {len(absent)} shard(s) listed by the part records are missing "
                         f"({absent[0]}, ...); run their part(s) again")
    for r in records:
        for s in r["shards"]:
            why = shard_differs(store, s)
            if why:
                raise MergeError(f"{store.location(s['name'])} {why} ({PARTS_DIR}/{record_name(*r['part'])}); "
                                 f"build part {r['part'][0]} of {n} again with the overwrite option, then merge")
    dropped = [d for s in shards for d in s["dropped"]]
    entries = [{k: v for k, v in s.items() if k != "dropped"} for s in shards]
    head = records[0]["header"]
    manifest = dict(head)
    manifest["complete"] = True
    manifest["shards"] = entries
    manifest["totals"] = {"samples": sum(s["samples"] for s in entries), "shards": len(entries),
                          "bytes": sum(s["bytes"] for s in entries), "rows": head["layout"]["rows"]}
    manifest["drops"] = {"images": sum_counts(s["drops"] for s in entries),
                         "boxes": sum_counts(s["box_drops"] for s in entries),
                         "annotations": annotation_drops(head.get("source_stats") or {}),
                         "file": DROPS_NAME, "rows": len(dropped)}
    if any("canvases" in s for s in entries):  # keep-ratio: the samples of each canvas, over the split
        manifest["canvases"] = sum_counts(s.get("canvases", {}) for s in entries)
    manifest["run"] = {"parts": n, "merged_by": holder(), **(run or {}), "part_runs": [r["run"] for r in records]}
    _write_merged(store, DROPS_NAME, jsonl_bytes(dropped))
    fault_point("merge", 0)
    _write_merged(store, MANIFEST_NAME, json_bytes(manifest))
    return manifest


def _write_merged(store, name: str, data: bytes) -> None:
    """Write a file of the merge; a failure (full disk, ...) is a MergeError naming the file and what to do."""
    try:
        store.write_atomic(name, data, before_rest=lambda: fault_point("merge_write", int(name == MANIFEST_NAME)))
    except OSError as e:
        raise MergeError(f"{store.location(name)}: could not write it: {e}. The shards and part records are kept; "
                         f"fix the cause (space, permissions, the storage service), then run `frcnn-shard merge "
                         f"{store.url}` (or the same build command) again") from None


def stored_sha256(store, name: str) -> str:
    """sha256 hex digest of a file of the store, streamed in HASH_BLOCK reads (local disk or object storage)."""
    h = hashlib.sha256()
    with store.open_read(name, HASH_BLOCK) as f:
        while chunk := f.read(HASH_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def shard_differs(store, entry: dict, hash_it: bool = True) -> str | None:
    """How a shard on the store differs from its entry (missing, its size, its sha256), or None."""
    if not store.exists(entry["name"]):
        return "is missing"
    size = store.size(entry["name"])
    if size != entry["bytes"]:
        return f"has {size} bytes, its record says {entry['bytes']}"
    if hash_it:
        digest = stored_sha256(store, entry["name"])
        if digest != entry["sha256"]:
            return f"has sha256 {digest[:16]}..., its record says {entry['sha256'][:16]}..."
    return None


# ---------------------------------------------------------------------------------------- takeover


def _overlaps(record: dict, shards: range) -> bool:
    start, stop = record["shard_range"]
    return start < shards.stop and shards.start < stop


def take_over(store, records: dict[str, dict], part: tuple[int, int], shards: range, header: dict,
              adopt: bool = True) -> list[dict]:
    """Retire what part records of other part counts list in ``shards``; returns those entries when ``adopt``.

    A shard's bytes do not depend on how the build was split, so part ``part`` keeps them: each record
    of another count that overlaps ``shards`` is rewritten without them (deleted once it lists none),
    and the caller lists them in its own record. Retired first, listed second: a crash in between
    leaves a shard listed nowhere (rebuilt, to the same bytes), never listed twice. The caller holds the
    lock of ``part``, which excludes every live build of an overlapping part. A record of other options
    is refused (BuildError) unless ``adopt`` is False (overwrite: its entries in ``shards`` are dropped).
    """
    taken: list[dict] = []
    parts_store = store.sub(PARTS_DIR)
    for name, rec in sorted(records.items()):
        if rec["part"][1] == part[1] or not _overlaps(rec, shards):
            continue
        if adopt and not same_build(rec["header"], header):
            raise BuildError(f"{store.url}: {PARTS_DIR}/{name} (a build split {rec['part'][1]} ways) was built with "
                             f"different options or source; re-run it with its own options, or build with the "
                             "overwrite option")
        keep = [e for e in rec["shards"] if e["index"] not in shards]
        taken += [e for e in rec["shards"] if e["index"] in shards]
        if keep:
            write_record(store, {**rec, "shards": keep, "complete": False})
        else:
            parts_store.remove(name)
    return sorted(taken, key=lambda e: e["index"]) if adopt else []
