"""What every source gives the build: ``Source`` (metadata, the bbox-format decision, stats, a
resumable row stream of ``SourceRow``) and the split-name rule."""
from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator

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
    """An opened source: metadata, the bbox-format decision, stats, and a resumable row stream."""

    def __init__(self, info: dict, bbox_format: dict, stats: dict, rows_fn: Callable[[int], Iterator[SourceRow]]):
        self.info = info
        self.bbox_format = bbox_format
        self.stats = stats
        self._rows_fn = rows_fn

    def rows(self, skip: int = 0) -> Iterator[SourceRow]:
        """Yield rows from position ``skip`` on; ``SourceRow.index`` is the position in the full stream."""
        if int(skip) != skip or skip < 0:
            raise ValueError(f"rows(skip={skip!r}): skip must be an integer >= 0")
        return self._rows_fn(int(skip))

    def __repr__(self) -> str:
        return f"Source({self.info!r}, bbox_format={self.bbox_format.get('decision')!r})"
