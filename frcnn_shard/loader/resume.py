"""A loader's place in an epoch as a small JSON-able dict (``ShardLoader.state_dict``), and the checks that a
state given back (``load_state_dict``) belongs to this loader: the same dataset, the same options that shape
the order, and well-formed (a state is untrusted input, like every byte the loader reads).

The order of an epoch is a function of (seed, epoch, streams per rank) and the options below, never of the
worker processes that run the streams: so a state records the stream count, and per stream how many
encoded samples its shuffle buffer has handed to decoding (``raw``), whether the stream has ended, and
whether every shard so far held its manifest count (``exact``: the cheap replay needs the counts); for a
keep-ratio loader also which of the samples already drawn wait in the stream's canvas buckets (``pending``:
their numbers in the stream's input, bucket by bucket in arrival order).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..format.manifest import Manifest
from .options import MAX_STREAMS, LoaderError, LoaderOptions

STATE_FORMAT = "frcnn_shard.loader_state"
STATE_VERSION = 1
MAX_COUNT = 1 << 48  # any count in a state (samples, batches): bounds a hostile state
MAX_PENDING = 1 << 20  # samples one stream's canvas buckets may hold in a state: bounds a hostile state


@dataclass
class StreamPosition:
    """Where one stream of this rank stands: encoded samples handed to decoding, ended, counts held so far."""

    raw: int = 0
    ended: bool = False
    exact: bool = True
    pending: tuple[int, ...] = ()  # keep-ratio: the samples waiting in the canvas buckets (input numbers)


@dataclass
class Progress:
    """This rank's place in an epoch: the streams' positions and the last stream that delivered an item."""

    epoch: int
    positions: list[StreamPosition]
    last: int = -1  # the stream of the last item taken; the next turn is the first live stream after it
    skipped: int = 0
    skipped_total: int = 0
    started: bool = field(default=False)  # any item taken (a fresh epoch's state says so, for the record)

    def take(self, stream: int, raw: int, exact: bool, end: bool, pending: tuple[int, ...] = ()) -> None:
        """Record an item of ``stream`` taken by the consumer (a batch, or the stream's end marker)."""
        pos = self.positions[stream]
        pos.raw, pos.exact, pos.ended, pos.pending = raw, exact, pos.ended or end, tuple(pending)
        self.last, self.started = stream, True

    def first_turn(self) -> int:
        """The stream whose item comes next: the first live one after ``last``, cyclically (-1: none left)."""
        n = len(self.positions)
        for step in range(1, n + 1):
            v = (self.last + step) % n
            if not self.positions[v].ended:
                return v
        return -1


def dataset_identity(manifest: Manifest | None, urls: Sequence[str]) -> str:
    """sha256 of what the epoch's order is made of: every shard's name, count and sha256 (else the URLs)."""
    if manifest is not None:
        what: Any = [[s.name, s.samples, s.sha256] for s in manifest.shards]
    else:
        what = list(urls)
    return hashlib.sha256(json.dumps(what, separators=(",", ":")).encode()).hexdigest()


def order_options(o: LoaderOptions, repeat_threshold: float | None) -> dict:
    """The options that shape an epoch's order and draws: a state is only valid for a loader with these."""
    return {
        "seed": int(o.seed), "shuffle": bool(o.shuffle), "shuffle_buffer": int(o.shuffle_buffer) if o.shuffle else 0,
        "batch_size": int(o.batch_size), "drop_last": bool(o.drop_last), "resampled": bool(o.resampled),
        "rank": int(o.rank or 0), "world_size": int(o.world_size or 1), "hflip": float(o.hflip),
        "rpn_batch_size": o.rpn_batch_size if o.rpn_batch_size is None else int(o.rpn_batch_size),
        "positive_fraction": float(o.positive_fraction), "on_error": o.on_error,
        "repeat_factor_threshold": repeat_threshold,
    }


def to_state(progress: Progress, dataset: str, options: dict) -> dict:
    """The JSON-able state: format tag, version, the dataset's identity, the order's options, the positions."""
    return {
        "format": STATE_FORMAT, "version": STATE_VERSION, "dataset": dataset, "options": dict(options),
        "epoch": progress.epoch, "streams": len(progress.positions), "last": progress.last,
        "skipped": progress.skipped, "skipped_total": progress.skipped_total,
        "positions": [[p.raw, p.ended, p.exact] + ([list(p.pending)] if p.pending else [])
                      for p in progress.positions],
    }


def _is_count(v: Any) -> bool:
    """A JSON integer in 0..MAX_COUNT (bool is not one)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT


def _position(v: Any, i: int) -> StreamPosition:
    """One stream's [raw, ended, exact] (keep-ratio: [raw, ended, exact, pending]) from a state, or LoaderError."""
    if (not isinstance(v, (list, tuple)) or len(v) not in (3, 4) or not _is_count(v[0])
            or not isinstance(v[1], bool) or not isinstance(v[2], bool)):
        raise LoaderError(f"malformed loader state: positions[{i}] must be [samples >= 0, ended, exact] "
                          f"(and the pending samples), got {v!r:.80}")
    pending = v[3] if len(v) == 4 else []
    if (not isinstance(pending, list) or len(pending) > MAX_PENDING or not all(_is_count(n) for n in pending)
            or len(set(pending)) != len(pending)):
        raise LoaderError(f"malformed loader state: positions[{i}][3] must be a list of distinct sample numbers "
                          f"(at most {MAX_PENDING}), got {pending!r:.80}")
    return StreamPosition(v[0], v[1], v[2], tuple(pending))


def _shape_problem(state: Any) -> str | None:
    """What is wrong with a state's outer shape, or None."""
    if not isinstance(state, Mapping):
        return f"a loader state is a dict (from ShardLoader.state_dict), got {type(state).__name__}"
    if state.get("format") != STATE_FORMAT:
        return f"not a loader state (format {state.get('format')!r:.60}, expected {STATE_FORMAT!r})"
    if state.get("version") != STATE_VERSION:
        return f"loader state version {state.get('version')!r:.20} is not {STATE_VERSION} (written by another version)"
    for name in ("epoch", "skipped", "skipped_total"):
        if not _is_count(state.get(name)):
            return f"{name} must be an integer >= 0, got {state.get(name)!r:.40}"
    streams, positions = state.get("streams"), state.get("positions")
    if not _is_count(streams) or not 1 <= streams <= MAX_STREAMS:
        return f"streams must be an integer in 1..{MAX_STREAMS}, got {streams!r:.40}"
    if not isinstance(positions, list) or len(positions) != streams:
        return f"positions must be a list of {streams} stream position(s)"
    last = state.get("last")
    if not isinstance(last, int) or isinstance(last, bool) or not -1 <= last < streams:
        return f"last must be an integer in -1..{streams - 1}, got {last!r:.40}"
    if not isinstance(state.get("options"), Mapping) or not isinstance(state.get("dataset"), str):
        return "options must be a dict and dataset a string"
    return None


def from_state(state: Any, dataset: str, options: dict) -> Progress:
    """The Progress of a state given back, refused (LoaderError) when malformed or made for another loader."""
    problem = _shape_problem(state)
    if problem is not None:
        raise LoaderError(f"malformed loader state: {problem}")
    if state["dataset"] != dataset:
        raise LoaderError("the loader state was saved for another dataset (its shards' names, counts or sha256s "
                          "differ from this loader's manifest): resume with the shards it was saved with")
    saved = dict(state["options"])
    changed = sorted(k for k in set(saved) | set(options) if saved.get(k, "<absent>") != options.get(k, "<absent>"))
    if changed:
        diff = ", ".join(f"{k}: saved {saved.get(k, '<absent>')!r}, now {options.get(k, '<absent>')!r}"
                         for k in changed)
        raise LoaderError(f"the loader state was saved by a loader made differently ({diff}); these options shape "
                          "the epoch's order, so resuming needs the same ones (num_workers may differ)")
    positions = [_position(v, i) for i, v in enumerate(state["positions"])]
    return Progress(state["epoch"], positions, state["last"], state["skipped"], state["skipped_total"], True)
