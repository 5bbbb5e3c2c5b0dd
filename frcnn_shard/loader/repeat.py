"""Repeat-factor sampling (LVIS, Gupta et al. 2019): images holding rare classes appear more often per epoch.

r(c) = max(1, sqrt(t / f(c))), f(c) the fraction of images holding class c; r(I) = the largest r(c) over the
classes of image I (1 for an image without boxes). In each epoch image I appears floor(r(I)) times, plus
once more with probability r(I) - floor(r(I)), drawn from (seed, epoch, key) (``seeds.repeat_copies``): every
rank and worker takes the same decision, and the copies stay in the stream that reads the image's shard.

The classes of each image come from the shards' own JSON records (``image_classes``: one pass over the
shards when the loader is made, through the shard cache when there is one); the record's ``labels`` count,
crowd regions do not (they are not training targets).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

from ..format.canvas import KeepRatioCanvas
from ..format.members import JSON_EXT, RawSample
from ..format.record import checked_record
from ..seeds import repeat_copies


def class_frequencies(image_labels: Iterable[Iterable[int]]) -> dict[int, float]:
    """f(c): the fraction of images whose labels hold class c (each image counted once per class)."""
    images, holding = 0, Counter()
    for labels in image_labels:
        images += 1
        holding.update(set(int(v) for v in labels))
    return {c: n / images for c, n in sorted(holding.items())} if images else {}


def class_factors(freq: Mapping[int, float], threshold: float) -> dict[int, float]:
    """r(c) = max(1, sqrt(t / f(c))) for every class with a frequency."""
    return {c: max(1.0, math.sqrt(threshold / f)) for c, f in freq.items()}


def image_factor(labels: Iterable[int], factors: Mapping[int, float]) -> float:
    """r(I): the largest r(c) over the image's classes; 1 for an image with none."""
    return max((factors[int(c)] for c in labels), default=1.0)


@dataclass(frozen=True)
class RepeatTable:
    """Per shard, the images whose factor exceeds 1 (key -> r(I)); every other image appears once per epoch."""

    seed: int
    factors: tuple[Mapping[str, float], ...]  # index = the shard's position in the loader's URL list
    threshold: float = 0.0
    canvases: tuple[Mapping[str, tuple[int, int]], ...] = ()  # keep-ratio: each repeated image's canvas

    def copies(self, shard: int, key: str, epoch: int) -> int:
        """How many times sample ``key`` of ``shard`` appears in ``epoch``."""
        r = self.factors[shard].get(key)
        return 1 if r is None else repeat_copies(self.seed, epoch, key, r)

    def items(self, shard: int, count: int, epoch: int) -> int:
        """The items a shard of ``count`` samples yields in ``epoch``, copies included."""
        return count + sum(repeat_copies(self.seed, epoch, k, r) - 1 for k, r in self.factors[shard].items())

    def canvas_items(self, shard: int, per_canvas: Mapping[tuple[int, int], int], epoch: int
                     ) -> dict[tuple[int, int], int]:
        """A keep-ratio shard's items per canvas in ``epoch`` (its manifest counts ``per_canvas``, copies included)."""
        out = dict(per_canvas)
        for key, r in self.factors[shard].items():
            canvas = self.canvases[shard][key]
            out[canvas] = out.get(canvas, 0) + repeat_copies(self.seed, epoch, key, r) - 1
        return out

    def expand(self, shard: int, items: Iterator[tuple[str, RawSample]], epoch: int) -> Iterator[tuple[str, RawSample]]:
        """Each encoded sample of ``shard`` as many times as it appears in ``epoch`` (copies side by side)."""
        for url, raw in items:
            for _ in range(self.copies(shard, raw.key, epoch)):
                yield url, raw


def repeat_table(per_shard: Sequence[Sequence[tuple[str, tuple[int, ...]]]], threshold: float, seed: int,
                 canvases: Sequence[Mapping[str, tuple[int, int]]] | None = None) -> RepeatTable:
    """The table of a split from each shard's (key, labels) pairs and the threshold t; ``canvases``: for a
    keep-ratio split, each shard's key -> canvas (the table keeps those of the repeated images)."""
    factors = class_factors(class_frequencies(labels for shard in per_shard for _, labels in shard), threshold)
    table = []
    for shard in per_shard:
        table.append({key: r for key, labels in shard if (r := image_factor(labels, factors)) > 1.0})
    kept = tuple({k: canvases[i][k] for k in t} for i, t in enumerate(table)) if canvases is not None else ()
    return RepeatTable(seed, tuple(table), threshold, kept)


def record_labels(raw: RawSample, canvas_hw: tuple[int, int] | KeepRatioCanvas | None, num_classes: int
                  ) -> tuple[int, ...]:
    """The labels of a sample's JSON record, held to the record rules (ShardFormatError's cause otherwise)."""
    return record_facts(raw, canvas_hw, num_classes)[0]


def record_facts(raw: RawSample, canvas_hw: tuple[int, int] | KeepRatioCanvas | None, num_classes: int
                 ) -> tuple[tuple[int, ...], tuple[int, int]]:
    """(labels, canvas) of a sample's JSON record, held to the record rules (ShardFormatError's cause otherwise)."""
    record = checked_record(raw.members[JSON_EXT], canvas_hw, num_classes, raw.key)
    return tuple(int(v) for v in record.labels), (int(record.size[0]), int(record.size[1]))
