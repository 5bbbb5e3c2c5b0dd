"""The plan of a split on disk: which source rows each shard covers, which shards each part builds.

Shard ``i`` covers the source rows ``[i * R, (i + 1) * R)`` (R = rows_per_shard), whatever ran it, so a
shard's bytes are a function of its rows and the options alone. Part ``p`` of ``N`` builds the contiguous
shards ``[p * S // N, (p + 1) * S // N)`` of the S shards. The build writes by this rule; check reads drops
against it; neither owns it (docs/FORMAT.md, "Plan").
"""
from __future__ import annotations

from dataclasses import dataclass


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
