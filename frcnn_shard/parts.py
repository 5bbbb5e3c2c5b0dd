"""A build in parts: which source rows each shard covers, which shards each part builds, the part
records and locks beside the shards, and the merge that writes the manifest once every part is done.

Shard ``i`` covers the source rows ``[i * R, (i + 1) * R)`` (R = rows_per_shard), whatever ran it, so a
shard's bytes are a function of its rows and the options alone: one machine with any number of
workers, N parts on N machines, or Ray tasks all write the same shards. Part ``p`` of ``N`` builds
the contiguous shards ``[p * S // N, (p + 1) * S // N)`` of the S shards, and records each shard it
publishes in ``_parts/part-<p>-of-<N>.json``. ``merge`` checks that the N records are complete and
consistent, then writes ``drops.jsonl`` and, last, ``manifest.json``.
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

from .errors import BuildError, LockedError, MergeError
from .shards import MANIFEST_NAME, PARTS_DIR, fault_point
from .storage import pid_alive

DROPS_NAME = "drops.jsonl"
_PART_ENV = (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("RANK", "WORLD_SIZE"))


@dataclass(frozen=True)
class Layout:
    """How a split's rows map onto shards."""

    rows: int  # rows of the split the build covers
    rows_per_shard: int

    @property
    def shards(self) -> int:
        """Number of shards (0 for an empty split)."""
        return -(-self.rows // self.rows_per_shard)

    def shard_rows(self, index: int) -> tuple[int, int]:
        """The rows [start, stop) of shard ``index``."""
        start = index * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.rows)

    def shard_of(self, row: int) -> int:
        """The shard that holds row ``row``."""
        return row // self.rows_per_shard

    def part_shards(self, part: int, parts: int) -> range:
        """The shards part ``part`` of ``parts`` builds: a contiguous range (empty when parts > shards)."""
        return range(part * self.shards // parts, (part + 1) * self.shards // parts)


def parse_part(text: str, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """'3/16' -> (3, 16); 'auto' reads SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else RANK/WORLD_SIZE (ValueError)."""
    if text == "auto":
        for index_var, count_var in _PART_ENV:
            if index_var in env and count_var in env:
                return parse_part(f"{env[index_var]}/{env[count_var]}")
        raise ValueError("is auto, but neither SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT nor RANK/WORLD_SIZE is set")
    index, sep, count = str(text).partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"must be I/N (e.g. 3/16) or auto, got {text!r}") from None
    if not sep or n < 1 or not 0 <= i < n:
        raise ValueError(f"must be I/N with 0 <= I < N, got {text!r}")
    return i, n


def record_name(part: int, parts: int) -> str:
    """The part record's file name (inside PARTS_DIR)."""
    return f"part-{part:06d}-of-{parts:06d}.json"


def _parse_record_name(name: str) -> tuple[int, int] | None:
    stem = name.removesuffix(".json")
    bits = stem.split("-")
    if len(bits) != 4 or bits[0] != "part" or bits[2] != "of" or not name.endswith(".json"):
        return None
    return int(bits[1]), int(bits[3])


def dumps(obj: dict) -> bytes:
    """The JSON bytes of a manifest or a part record (indented, key order kept)."""
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def refuse_another_split(store, records: Iterable[str], parts: int) -> None:
    """BuildError when ``records`` (part record names) hold one of a build split into other than ``parts`` parts."""
    other = [n for n in records if _parse_record_name(n)[1] != parts]
    if other:
        raise BuildError(f"{store.url} holds part records of a build split another way ({other[0]}, ...); "
                         "finish that build (same parts, then merge), or build with the overwrite option")


def read_records(store) -> dict[str, dict]:
    """The part records of a split, by file name (unreadable ones raise MergeError naming them)."""
    parts = store.sub(PARTS_DIR)
    out = {}
    for name in parts.names():
        if _parse_record_name(name) is None:
            continue
        try:
            out[name] = json.loads(parts.read_bytes(name))
        except (OSError, ValueError) as e:
            raise MergeError(f"{parts.location(name)}: unreadable part record: {e}") from None
    return out


def write_record(store, record: dict, fault_n: int | None = None) -> None:
    """Replace a part record atomically (the test-only fault point "record_write" cuts it in half)."""
    part, parts = record["part"]
    hook = None if fault_n is None else (lambda: fault_point("record_write", fault_n))
    store.sub(PARTS_DIR).write_atomic(record_name(part, parts), dumps(record), before_rest=hook)


# ---------------------------------------------------------------------------------------- locks


def holder() -> dict:
    """Who takes a lock: this host and process (and the Ray task, when run by one)."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    task = os.environ.get("FRCNN_SHARD_TASK")  # set by the Ray engine: a retried task takes its own lock back
    if task:
        me["task"] = task
    return me


def acquire_lock(store, part: int, parts: int) -> str:
    """Take the lock of one part of a split; LockedError naming the holder when another build has it.

    A lock whose holder was a process of this host that no longer runs is stale and is taken over.
    Returns the lock's name (for release_lock).
    """
    locks = store.sub(PARTS_DIR)
    locks.makedirs()
    name = record_name(part, parts).replace(".json", ".lock")
    me = holder()
    for _ in range(3):
        if locks.create_exclusive(name, dumps(me)):
            return name
        try:
            other = json.loads(locks.read_bytes(name))
        except (OSError, ValueError):
            other = {}
        same_host = other.get("host") == me["host"]
        stale = (same_host and not pid_alive(int(other.get("pid", -1)))) or (me.get("task") and other.get("task") == me["task"])
        if not stale:
            raise LockedError(
                f"another build is writing {store.url} (part {part} of {parts}): held by pid {other.get('pid', '?')} "
                f"on {other.get('host', '?')} since {other.get('since', '?')}. Wait for it to finish; if that build is "
                f"gone, delete {locks.location(name)}")
        locks.remove(name)
    raise LockedError(f"could not take the lock {locks.location(name)}")


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
                         f"in {PARTS_DIR}/; rebuild with the overwrite option, or remove the stale records")
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
        if r["header"] != head:
            keys = sorted(k for k in set(head) | set(r["header"]) if head.get(k) != r["header"].get(k))
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
    """Check the parts of a split, then write drops.jsonl and, last, manifest.json; returns the manifest."""
    n, records = _complete_records(store)
    _check_consistent(store, n, records)
    on_store = set(store.names())
    shards = [s for r in records for s in r["shards"]]
    absent = [s["name"] for s in shards if s["name"] not in on_store]
    if absent:
        raise MergeError(f"{store.url}: {len(absent)} shard(s) listed by the part records are missing "
                         f"({absent[0]}, ...); run their part(s) again")
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
    manifest["run"] = {"parts": n, "merged_by": holder(), **(run or {}), "part_runs": [r["run"] for r in records]}
    store.write_atomic(DROPS_NAME, b"".join(json.dumps(d, separators=(",", ":")).encode() + b"\n" for d in dropped))
    fault_point("merge", 0)
    store.write_atomic(MANIFEST_NAME, dumps(manifest))
    return manifest
