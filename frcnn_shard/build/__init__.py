"""The build: COCO rows -> shards with precomputed anchor targets, on one machine, in parts, or on Ray.

The package, by concern (docs/ARCHITECTURE.md):

- ``options``: BuildOptions, their parsers and validation, the device choice;
- ``header``: the output-shaping options and header every part of a build agrees on;
- ``rows``: the source rows a part reads, retried after transient errors;
- ``worker``: what a worker does with a chunk of rows (transform, match, pack);
- ``pool``: the ordered worker pool, signals, teardown;
- ``writer``: the part writer (shards published in order, listed in the part record);
- ``part``: ``PartRun``, one part's run, and ``build_part``;
- ``resume``: resume, overwrite and takeover of what an earlier build left;
- ``parts``: part records, locks, takeover and the merge;
- ``results``: BuildResult and the bad-input limit;
- ``engines`` and ``ray_engine``: the whole build (the engine table) and the merge entry.

Everything public is importable from here: ``from frcnn_shard.build import BuildOptions, build``.
"""
from __future__ import annotations

from ..errors import (
    BuildError, BuildInterrupted, LockedError, MergeError, OptionError, PartRecordError, SourceError,
)
from .engines import ENGINE_RUNNERS, build, merge_split
from .header import output_options
from .options import (
    DEVICES, ENGINES, BuildOptions, anchor_spec, parse_part, parse_storage_options, resolve_device, validate_options,
)
from .part import Collaborators, PartRun, batch_matcher, build_part, open_output
from .pool import signum
from .results import BAD_INPUT_REASONS, DROPS_SHOWN, BuildResult, check_bad_fraction
from .resume import split_state
from ..storage.retry import is_transient  # the one transient rule (storage.retry), as build.is_transient
from .rows import MAX_RETRY_DELAY_S, resilient_rows
from .worker import DROP_DUPLICATE_IMAGE_ID, DROP_PROCESSING_ERROR

__all__ = [
    "BAD_INPUT_REASONS", "DEVICES", "DROPS_SHOWN", "DROP_DUPLICATE_IMAGE_ID", "DROP_PROCESSING_ERROR", "ENGINES",
    "ENGINE_RUNNERS", "MAX_RETRY_DELAY_S",
    "BuildError", "BuildInterrupted", "BuildOptions", "BuildResult", "Collaborators", "LockedError", "MergeError",
    "OptionError", "PartRecordError", "PartRun", "SourceError",
    "anchor_spec", "batch_matcher", "build", "build_part", "check_bad_fraction", "is_transient", "merge_split",
    "open_output", "output_options", "parse_part", "parse_storage_options", "resilient_rows", "resolve_device",
    "signum", "split_state", "validate_options",
]
