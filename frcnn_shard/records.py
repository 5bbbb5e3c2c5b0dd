"""The in-flight records of a build, passed between its stages (sources -> transform -> anchors -> shards).

The JSON record written into each sample is ``frcnn_shard.format.record.Record``; ``Sample`` carries it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .format.record import Record


@dataclass
class SourceRow:
    """One image as a source yields it, before any processing.

    ``bboxes`` are raw, in the source's own convention (see the bbox-format decision); ``labels``
    are already mapped to 1..80 (labels.INVALID_LABEL where the category was out of range).
    """

    index: int  # 0-based position in the source stream: rows consumed = index + 1
    image_id: int
    image: bytes | None  # encoded image bytes; None when the source could not provide them
    width: int  # as declared by the row / annotation file
    height: int
    bbox_ids: np.ndarray  # int64 [N]
    labels: np.ndarray  # int64 [N], 1..80 or INVALID_LABEL
    bboxes: np.ndarray  # float64 [N, 4], raw
    iscrowd: np.ndarray  # bool [N]
    origin: str = ""  # where the row came from, for error messages (file, row number)
    duplicate_of: int | None = None  # the earlier row with the same image id (set by Source.rows)


@dataclass
class Sample:
    """One processed image, ready for anchor matching and writing."""

    record: Record  # the JSON member; boxes in resized pixels
    image_bytes: bytes  # encoded resized image
    image_ext: str  # "jpg" or "png"

    @property
    def key(self) -> str:
        """The sample key."""
        return self.record.key


@dataclass
class Dropped:
    """A source row that produced no sample, with the rule that dropped it."""

    index: int
    image_id: int
    reason: str
    detail: str = ""
    box_drops: dict[str, int] = field(default_factory=dict)
    origin: str = ""  # the source row's origin (file, or dataset and row)

    def to_dict(self) -> dict:
        """The line of drops.jsonl that names this row."""
        return {"row": self.index, "image_id": self.image_id, "origin": self.origin, "reason": self.reason,
                "detail": self.detail, "box_drops": dict(self.box_drops)}
