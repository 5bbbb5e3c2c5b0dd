"""The whole build and the merge: the engine that runs a build's parts, chosen from a table, then the merge,
the result and the bad-input limit. A part build (``opts.part``) runs its one part and merges nothing.
"""
from __future__ import annotations

import time
from typing import Callable

from ..format.manifest import Manifest
from ..format.names import MANIFEST_NAME
from ..shards import read_manifest
from ..sources import open_source
from ..storage import open_store
from ..transform import process_row
from .options import BuildOptions, resolve_device, validate_options
from .part import Collaborators, MatchBatch, PartRun
from .parts import merge
from .ray_engine import build_on_ray
from .results import BuildResult, check_bad_fraction, split_result


def _build_local(opts: BuildOptions, progress: Callable[[dict], None] | None, using: Collaborators) -> BuildResult:
    """Every part of the build as one part on this machine, then the merge (skipped when the split is complete)."""
    part_res = PartRun(opts, (0, 1), progress, using).run()
    store = open_store(part_res.out_dir, opts.storage_options)
    if part_res.status != "already complete" or not store.exists(MANIFEST_NAME):
        merge(store)
    res = split_result(store, read_manifest(store), part_res.status, part_res.device, 0.0, part_res.resumed_shards)
    res.seconds, res.rows_read = part_res.seconds, part_res.rows_read
    return res


def _build_on_ray(opts: BuildOptions, progress: Callable[[dict], None] | None, using: Collaborators) -> BuildResult:
    """The parts as Ray tasks on a cluster (each runs build_part with the real collaborators), then the merge."""
    return build_on_ray(opts, progress)


# What runs a whole build's parts, by BuildOptions.engine (options.ENGINES names these).
ENGINE_RUNNERS: dict[str, Callable[[BuildOptions, Callable | None, Collaborators], BuildResult]] = {
    "local": _build_local,
    "ray": _build_on_ray,
}


def build(opts: BuildOptions, progress: Callable[[dict], None] | None = None, *,
          open_source: Callable = open_source, process_row: Callable = process_row,
          resolve_device: Callable[[str], str] = resolve_device, match_batch: MatchBatch | None = None) -> BuildResult:
    """Run (or resume) a build, or one part of it; raises BuildError with a reason on failure.

    The whole build (no ``part``) runs its parts on its engine (this machine, or Ray), then merges: the
    manifest appears last. A part build writes its shards and part record only.
    ``open_source``, ``process_row``, ``resolve_device``, ``match_batch``: the collaborators (part.Collaborators),
    for tests and benchmarks; the Ray engine's tasks use the real ones.
    """
    validate_options(opts)
    using = Collaborators(open_source, process_row, resolve_device, match_batch)
    if opts.part is not None and opts.engine != "ray":
        return PartRun(opts, opts.part, progress, using).run()
    res = ENGINE_RUNNERS[opts.engine](opts, progress, using)
    check_bad_fraction(res, opts.max_bad_fraction)
    return res


def merge_split(location, storage_options: dict | None = None, max_bad_fraction: float | None = None) -> BuildResult:
    """Merge the parts of a built split (``<out>/<split>``): checks them, writes drops.jsonl and the manifest."""
    t0 = time.perf_counter()
    store = open_store(location, storage_options)
    manifest = Manifest.checked(merge(store), store.location(MANIFEST_NAME))
    res = split_result(store, manifest, "merged", "-", t0)
    limit = manifest.options["max_bad_fraction"] if max_bad_fraction is None else max_bad_fraction
    check_bad_fraction(res, limit)
    return res
