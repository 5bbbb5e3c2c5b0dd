"""Keep-ratio batching: a bucket per canvas. A batch holds samples of one canvas, so each stream sorts its
samples, still encoded, into buckets by the canvas their JSON record names (read before any pixel is
decoded), and a bucket that holds ``batch_size`` samples becomes a batch. What waits in the buckets is a
stream's state like its shuffle buffer: ``pending`` names it, and a resumed stream refills the buckets first.
"""
from __future__ import annotations

from typing import Iterator

from ..format.canvas import KeepRatioCanvas, canvas_of
from ..format.image import RULE_IMAGE_SIZE
from ..format.members import JSON_EXT, RawSample
from ..format.record import RecordError, parse_json

Canvas = tuple[int, int]
Entry = tuple[int, str, RawSample, Canvas]  # (input number, url, encoded sample, content (H, W))


def sample_canvas(raw: RawSample, rule: KeepRatioCanvas) -> tuple[Canvas, Canvas] | str:
    """(canvas, content) of a keep-ratio sample from its JSON record, or why its record cannot say
    ("rule: detail", as the record rules word it; decoding would refuse the sample for the same reason)."""
    data = raw.members.get(JSON_EXT)
    if data is None:
        return f"the sample has no .{JSON_EXT} member"
    try:
        meta = parse_json(data)
    except RecordError as e:
        return str(e)
    if not isinstance(meta, dict):
        return f"json_invalid: JSON member is a {type(meta).__name__}, expected an object"
    content, why = rule.content_of(meta)
    if content is None:
        return f"{RULE_IMAGE_SIZE}: {why}"
    return canvas_of(content), content


class CanvasBuckets:
    """The encoded samples of one stream waiting for a batch of their canvas, in arrival order.

    Buckets are kept in the order their oldest waiting sample arrived (a bucket emptied by a batch leaves
    that order), which is also the order ``drain`` empties them in at the stream's end.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.open: dict[Canvas, list[Entry]] = {}

    def add(self, canvas: Canvas, entry: Entry) -> list[Entry] | None:
        """Put a sample in its canvas's bucket; the bucket's samples when that makes it full (it is emptied)."""
        bucket = self.open.setdefault(canvas, [])
        bucket.append(entry)
        if len(bucket) < self.batch_size:
            return None
        return self.open.pop(canvas)

    def pending(self) -> tuple[int, ...]:
        """The waiting samples' input numbers, bucket by bucket: adding them back in this order rebuilds the
        same buckets in the same order."""
        return tuple(e[0] for bucket in self.open.values() for e in bucket)

    def drain(self) -> Iterator[tuple[Canvas, list[Entry]]]:
        """(canvas, samples) of each partial bucket, oldest first, each removed as it is handed out."""
        while self.open:
            canvas = next(iter(self.open))
            yield canvas, self.open.pop(canvas)

    def clear(self) -> None:
        """Forget every waiting sample (a resampled stream's quota is met)."""
        self.open.clear()
