"""What every source gives the build: ``Source`` (metadata, the bbox-format decision, stats, a
resumable row stream of ``SourceRow``) and the split-name rule."""
from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..format.classes import ClassMap
from ..labels import INVALID_LABEL, keep_classes
from ..records import SourceRow


def resolve_split(requested: str, available: Iterable[str], where: str = "source") -> str:
    """Map a requested split onto an available one ("validation" -> "val", "train" -> "train2017")."""
    available = list(available)
    candidates = [requested] + (["val"] if requested == "validation" else [])
    for cand in candidates:
        if cand in available:
            return cand
    for cand in candidates:
        dated = [a for a in available if re.fullmatch(re.escape(cand) + r"\d{4}", a)]
        if len(dated) == 1:
            return dated[0]
    raise ValueError(f"{where}: unknown split {requested!r}; available splits: {sorted(available)}")


class Source:
    """An opened source: metadata, the bbox-format decision, stats, its size, and rows by range.

    ``num_rows`` is the split's row count, known before any row is read; ``fingerprint`` identifies
    the split's content (every part of a build must see the same one); ``rows(start, stop)`` reads
    only that slice. A row whose image id already appeared at an earlier row of the split carries
    ``duplicate_of`` (the build drops it), decided from all the split's ids, so every part agrees.
    ``classes`` (a ``ClassMap``) numbers the labels the rows carry: 1..K, or INVALID_LABEL for a category
    outside the list; ``keep_classes`` narrows it. ``crowd`` records how crowd/ignore boxes were recognised:
    {"rule", "evidence"} and, where counted while opening, "annotations".
    """

    def __init__(self, info: dict, bbox_format: dict, stats: dict, num_rows: int, fingerprint: str,
                 rows_fn: Callable[[int, int], Iterator[SourceRow]], image_ids: Iterable[int], *,
                 classes: ClassMap, crowd: dict | None = None):
        self.info = info
        self.bbox_format = bbox_format
        self.stats = stats
        self.num_rows = int(num_rows)
        self.fingerprint = fingerprint
        self.classes = classes
        self.crowd = crowd if crowd is not None else {"rule": "none", "evidence": "the source has no crowd flag"}
        self._rows_fn = rows_fn
        self._remap: np.ndarray | None = None
        self.duplicates = first_occurrences(image_ids)

    def keep_classes(self, names: Sequence[str]) -> None:
        """Keep and order a subset of the classes (``--classes``); boxes of the others become EXCLUDED_LABEL."""
        self.classes, self._remap = keep_classes(self.classes, names, f"source {self.info.get('id')!r}")

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[SourceRow]:
        """Yield rows start..stop-1 (stop None: to the end); ``SourceRow.index`` is the row's position in the split."""
        stop = self.num_rows if stop is None else min(int(stop), self.num_rows)
        if int(start) != start or start < 0:
            raise ValueError(f"rows(start={start!r}): start must be an integer >= 0")
        return self._marked(self._rows_fn(int(start), stop))

    def _marked(self, rows: Iterator[SourceRow]) -> Iterator[SourceRow]:
        # Every source's labels pass here: one place bounds them to 1..K and applies --classes.
        k = len(self.classes.names) if self._remap is None else len(self._remap) - 1
        for row in rows:
            row.duplicate_of = self.duplicates.get(row.index)
            labels = np.asarray(row.labels, dtype=np.int64)
            labels = np.where((labels >= 1) & (labels <= k), labels, np.minimum(labels, INVALID_LABEL))
            if self._remap is not None:
                labels = np.where(labels >= 1, self._remap[np.clip(labels, 0, k)], labels)
            row.labels = labels
            yield row

    def __repr__(self) -> str:
        return f"Source({self.info!r}, bbox_format={self.bbox_format.get('decision')!r})"


def first_occurrences(image_ids: Iterable[int]) -> dict[int, int]:
    """{row: the earlier row with the same image id} for every repeated id."""
    first: dict[int, int] = {}
    repeated: dict[int, int] = {}
    for row, image_id in enumerate(image_ids):
        at = first.setdefault(int(image_id), row)
        if at != row:
            repeated[row] = at
    return repeated
