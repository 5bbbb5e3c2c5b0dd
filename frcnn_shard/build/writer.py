"""The part writer: the ordered sample sink of one part. Shard i takes the samples of rows of shard i (an
empty tar when all were dropped); each shard is published atomically and then listed in the part record,
which is what makes an interrupted build resumable.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict

from ..faults import fault_point
from ..format.canvas import canvas_key
from ..format.layout import Layout
from ..format.members import sample_members
from ..format.names import PARTS_DIR, shard_name
from ..records import Dropped, Sample
from ..transform import KEEP_RATIO
from ..shards import ShardInfo, ShardWriter
from .parts import record_name, utc_now, write_record


class PartWriter:
    """Ordered sample sink of one part: shard i takes the rows of shard i, empty or not."""

    def __init__(self, store, layout: Layout, shards: range, record: dict, progress):
        self.store, self.layout, self.range, self.record, self.progress = store, layout, shards, record, progress
        self.keep_ratio = record["header"]["image"].get("resize") == KEEP_RATIO
        # Shards the record lists already (its own earlier runs, or taken over from a build split another
        # way: then not necessarily a prefix of the range); only the others are built.
        self.done = {e["index"] for e in record["shards"]}
        self.cur = shards.start - 1  # the shard being filled
        self._advance()
        self.writer: ShardWriter | None = None
        self.writing = store.url  # the file being written, for a message when a write fails
        self.samples = sum(e["samples"] for e in record["shards"])
        self.rows_done = sum(e["rows"][1] - e["rows"][0] for e in record["shards"])
        self.rows_total = sum(b - a for a, b in map(layout.shard_rows, shards))
        self._reset()

    def _advance(self) -> None:
        """Move to the next shard of the range that is not listed yet (range.stop when none is left)."""
        self.cur += 1
        while self.cur in self.done:
            self.cur += 1

    def missing_rows(self) -> list[tuple[int, int]]:
        """The row ranges [start, stop) of the shards still to build, contiguous shards joined."""
        spans: list[tuple[int, int]] = []
        for i in (i for i in self.range if i not in self.done):
            start, stop = self.layout.shard_rows(i)
            if spans and spans[-1][1] == start:
                start = spans.pop()[0]
            spans.append((start, stop))
        return spans

    def _reset(self) -> None:
        self.drops: Counter = Counter()
        self.box_drops: Counter = Counter()
        self.canvases: Counter = Counter()  # samples per canvas "HxW" (recorded for keep-ratio builds)
        self.dropped: list[dict] = []

    def _open(self) -> ShardWriter:
        if self.writer is None:
            name = shard_name(self.record["header"]["split"], self.cur)
            self.writing = self.store.location(name)
            self.writer = ShardWriter(self.store, name)
        return self.writer

    def _close(self) -> None:
        """Publish the current shard (an empty tar when all its rows were dropped) and record it."""
        info: ShardInfo = self._open().close()
        self.writer = None
        fault_point("published", self.cur)
        start, stop = self.layout.shard_rows(self.cur)
        self.record["shards"].append({
            **asdict(info), "index": self.cur, "rows": [start, stop], "drops": dict(sorted(self.drops.items())),
            "box_drops": dict(sorted(self.box_drops.items())), "dropped": self.dropped,
            **({"canvases": dict(sorted(self.canvases.items()))} if self.keep_ratio else {})})
        self.record["shards"].sort(key=lambda e: e["index"])  # listed in index order, taken-over ones too
        self.done.add(self.cur)
        self._write_record(fault_n=self.cur)
        fault_point("shard_done", self.cur)
        self._reset()
        self._advance()

    def _write_record(self, fault_n: int | None = None) -> None:
        self.writing = self.store.sub(PARTS_DIR).location(record_name(*self.record["part"]))
        write_record(self.store, self.record, fault_n=fault_n)

    def _to(self, row: int) -> None:
        """Close every shard before the one holding ``row``."""
        target = self.layout.shard_of(row)
        while self.cur < target:
            self._close()

    def drop(self, item: Dropped) -> None:
        """Count and record a dropped row."""
        self._to(item.index)
        self.drops[item.reason] += 1
        self.box_drops.update(item.box_drops)
        self.dropped.append(item.to_dict())
        self._step(item.index)

    def add(self, sample: Sample, targets: bytes) -> None:
        """Write one sample into its shard."""
        row = sample.record.source_index
        self._to(row)
        self.box_drops.update(sample.record.box_drops)
        self.canvases[canvas_key(sample.record.size)] += 1
        w = self._open()
        w.add(sample.key, sample_members(sample.image_ext, sample.image_bytes, sample.record.to_json(), targets))
        if w.samples == 1:
            fault_point("mid_shard", self.cur)
        self.samples += 1
        self._step(row)

    def _step(self, row: int) -> None:
        self.rows_done += 1
        if row + 1 == self.layout.shard_rows(self.cur)[1]:
            self._close()  # the shard's last row: publish it now, not when the next row arrives
        if self.progress is not None:
            self.progress({"rows": self.rows_done, "rows_total": self.rows_total, "samples": self.samples,
                           "shards": len(self.done), "shards_total": len(self.range)})

    def finish(self) -> None:
        """Publish the part's remaining shards and mark the part complete."""
        while self.cur < self.range.stop:
            self._close()
        self.record["complete"] = True
        self.record["run"]["finished"] = utc_now()
        self._write_record()

    def abort(self) -> None:
        """Drop the open shard; the part record lists exactly the published ones."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
