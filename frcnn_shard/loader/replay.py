"""Resuming a stream mid-epoch without decoding what it already delivered.

The shuffle buffer's draws depend only on how many items it holds, never on their bytes. So, when every
shard so far held its manifest count, the buffer can be replayed on item *numbers* alone
(``simulate_buffer``): that says which items the buffer held at the resume point and where reading stands.
Only the shards holding those items are read (raw bytes, no decoding), and whole shards already
delivered are not opened at all. Without the counts (no manifest, or a shard that held another count:
a damaged one skipped with on_error="skip"), the stream is replayed raw instead, in the stream itself.
"""
from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate, chain, islice
from typing import Callable, Iterator, Sequence

import numpy as np

EMPTY_DRAWS_LIMIT = 8  # resampled draws of empty shards in a row (plus 2 per shard) before giving up


def shuffle_buffer(items: Iterator, size: int, rng: np.random.Generator, buf: list | None = None) -> Iterator:
    """Reservoir-style shuffle: keep ``size`` items, emit a random one for each new item.

    ``buf``: the buffer's contents to start from (a resumed stream's, from ``simulate_buffer``).
    """
    buf = [] if buf is None else buf
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], item = item, buf[j]
        yield item
    while buf:
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


def simulate_buffer(total: int, size: int, rng: np.random.Generator, emitted: int) -> tuple[list[int], int]:
    """(the buffer's item numbers, the next item number to read) after ``shuffle_buffer`` over ``total``
    items has emitted ``emitted`` of them; ``rng`` is left where the real buffer's would be."""
    buf: list[int] = []
    cursor = done = 0
    while done < emitted:
        if cursor < total:
            if len(buf) < size:
                buf.append(cursor)
            else:
                buf[int(rng.integers(len(buf)))] = cursor  # the item it replaces is emitted
                done += 1
            cursor += 1
            continue
        if not buf:
            raise ValueError(f"{emitted} item(s) emitted of {total}")
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        buf.pop()
        done += 1
    return buf, cursor


def stream_sequence(own: Sequence[int], items_of: Callable[[int], int], quota: int | None,
                    draw: Callable[[], int], n_shards: int) -> list[tuple[int, int]] | None:
    """The (shard, items) a stream reads in order, as ``stream._raw_stream`` reads them: its own shards, and
    with a quota (resampled) shards drawn with ``draw`` until the quota is met; the last one cut to the quota.

    None when the resampled draws would find nothing to read (the stream itself raises then).
    """
    seq: list[tuple[int, int]] = []
    if quota is None:
        return [(i, items_of(i)) for i in own]
    n, empty_in_a_row, mine = 0, 0, iter(own)
    while n < quota:
        i = next(mine, None)
        if i is None:
            i = draw()
        got = min(items_of(i), quota - n)
        seq.append((i, got))
        n += got
        empty_in_a_row = 0 if got else empty_in_a_row + 1
        if empty_in_a_row > 2 * n_shards + EMPTY_DRAWS_LIMIT:
            return None
    return seq


def resumed_input(seq: list[tuple[int, int]], cursor: int, needed: Sequence[int],
                  read: Callable[[int], Iterator], dropped: Callable[[], None]) -> tuple[dict[int, object], Iterator]:
    """(item number -> item for the ``needed`` numbers, an iterator of the items from ``cursor`` on).

    ``read(k)``: the items of the k-th entry of ``seq``. Entries wholly before the cursor are read only when
    they hold a needed item; they and the cursor's entry up to the cursor are read now, after which
    ``dropped()`` forgets what that reading logged (it was reported before the state was saved).
    """
    ends = list(accumulate(n for _, n in seq))
    want = set(needed)
    got: dict[int, object] = {}
    first = bisect_right(ends, cursor)  # the entry holding the cursor (len(seq): none)
    for k in sorted({bisect_right(ends, w) for w in want if w < cursor} - {first}):
        items = read(k)
        for pos, item in zip(range(ends[k] - seq[k][1], ends[k]), items):
            if pos in want:
                got[pos] = item
        _close(items)
    head: Iterator = iter(())
    if first < len(seq):
        head = iter(read(first))
        start = ends[first] - seq[first][1]
        for pos, item in zip(range(start, cursor), head):  # zip stops before taking the item at the cursor
            if pos in want:
                got[pos] = item
        head = _cut(head, ends[first] - cursor)
    dropped()
    return got, chain(head, chain.from_iterable(_cut(read(k), seq[k][1]) for k in range(first + 1, len(seq))))


def _cut(items: Iterator, n: int) -> Iterator:
    """The first ``n`` items (a resampled entry cut to the quota), the reading closed after them."""
    items = iter(items)
    yield from islice(items, n)
    _close(items)


def _close(items: object) -> None:
    """Close a shard's generator left early, so that its stream is closed now, not when collected."""
    close = getattr(items, "close", None)
    if close is not None:
        close()
