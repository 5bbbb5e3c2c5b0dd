"""The batches of a rank's streams in the epoch's order, whichever worker processes ran them.

The order is the one a torch DataLoader with one worker per stream delivers: the streams take turns
(stream 0, 1, ..., S-1, 0, ...), each item in its turn, a stream leaving the turns after its end marker.
When each worker runs one stream, items arrive in that order and pass straight through; when a worker
runs several streams (a state resumed with fewer workers) or none, items that arrive early wait here.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator, Sequence

from .collate import Batch
from .options import LoaderError


def in_stream_order(items: Iterator[Batch], live: Sequence[int], first: int) -> Iterator[Batch]:
    """``items`` (each naming its stream, the last of each stream its end marker) reordered into turns over
    the ``live`` streams (ascending), starting with stream ``first``."""
    turns = list(live)
    if not turns:
        return
    waiting: dict[int, deque] = {v: deque() for v in turns}
    k = turns.index(first) if first in turns else 0
    while turns:
        k %= len(turns)
        v = turns[k]
        while not waiting[v]:
            item = next(items, None)
            if item is None:
                raise LoaderError(f"stream {v} stopped without its end marker (a worker ended early)")
            if item.stream not in waiting:
                raise LoaderError(f"an item of stream {item.stream}, which is not running")
            waiting[item.stream].append(item)
        item = waiting[v].popleft()
        yield item
        if item.end:
            del turns[k]
        else:
            k += 1
