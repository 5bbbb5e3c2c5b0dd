"""`frcnn-shard check`: verify shards against their manifest, summarise a manifest.

The default check reads every shard file exactly once into memory, hashes those bytes and walks
the tar over the same bytes (a reader thread reads and hashes the next shard while this one is
walked); per sample it does only cheap work (tar headers, the image *header*,
the JSON, the anchor-target member). Full pixel decoding happens only where it can tell the user
something the sha256 cannot: in a shard whose sha256 or size does not match the manifest (to name
the damaged sample), and for the samples `--deep` selects. See docs/INSPECT.md.

Nothing here writes to the shard directory: files are opened read-only and never locked or touched.

This module orchestrates; the rules live in ``sample_rules`` (one sample), ``shard_rules`` (one shard
file and its tar, framed by ``storage.tar``) and ``folder_rules`` (the folder against its manifest),
and the report in ``report``.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from ..format.manifest import Manifest, ShardEntry
from ..format.names import MANIFEST_NAME
from ..storage.base import Store
from ..storage.local import LocalStore
from ..storage.location import store_of
from ..storage.manifest_io import read_manifest
from .folder_rules import check_directory, check_drops, check_totals
from .report import (  # noqa: F401 - the rule names and the report are check's public face (tests, docs)
    RULE_DROPS_FILE, RULE_KEY_DUPLICATE, RULE_MANIFEST_INCOMPLETE, RULE_MANIFEST_TOTALS, RULE_PARTIAL_FILE,
    RULE_SHARD_COUNT, RULE_SHARD_EXTRA, RULE_SHARD_KEYS, RULE_SHARD_MISSING, RULE_SHARD_SHA256, RULE_SHARD_SIZE,
    RULE_SHARD_UNREADABLE, RULE_SPLIT_EMPTY, RULE_TAR_TRAILING, RULE_TAR_UNREADABLE, RULE_TARGETS_COUNTS,
    RULE_TARGETS_DEEP, RULE_TARGETS_INVALID, RULES, CheckReport, Problem,
)
from .sample_rules import Context, make_context
from .shard_rules import MAX_CHECK_SHARD_BYTES, ShardResult, check_shard, read_shard  # noqa: F401 - re-exported

# Below this many shard bytes a check runs in-process: starting worker processes would cost more than it saves.
PARALLEL_MIN_BYTES = 256 << 20
MAX_WORKERS = 16


def _selected(key: str, seed: int, fraction: float) -> bool:
    """Deterministic per-key choice for --deep --fraction: independent of order and shard layout."""
    from ..seeds import deep_check_pick  # the one home of every per-key draw (a leaf module)

    return deep_check_pick(key, seed, fraction)


# Per worker process: the context, built once from the manifest (it holds functions, so it is not sent).
_WORKER_CTX: dict = {}


def _context(manifest: Manifest, deep: bool, fraction: float, seed: int) -> Context:
    """The sample rules' context, with --deep --fraction's per-key pick."""
    return make_context(manifest, deep, fraction, seed, pick=_selected)


def _init_worker(manifest: Manifest, deep: bool, fraction: float, seed: int) -> None:
    """Pool initializer: resolve the manifest once per worker."""
    _WORKER_CTX["ctx"] = _context(Manifest.checked(manifest, MANIFEST_NAME), deep, fraction, seed)


def _check_shard_job(job: tuple[str, ShardEntry]) -> ShardResult:
    """Pool task: check one shard file in a worker."""
    folder, entry = job
    return check_shard(LocalStore(folder), entry, _WORKER_CTX["ctx"])


def default_workers(manifest: Manifest, n_shards: int) -> int:
    """Workers for checking ``n_shards`` shards of a split: in-process for small splits (all its shards' bytes
    below PARALLEL_MIN_BYTES), where starting processes costs more than it saves."""
    workers = min(os.cpu_count() or 1, n_shards, MAX_WORKERS)
    return workers if workers > 1 and sum(e.bytes for e in manifest.shards) >= PARALLEL_MIN_BYTES else 0


def _shard_results(store: Store, manifest: Manifest, ctx: Context, entries: list[ShardEntry], workers: int,
                   progress: Callable[[int], None] | None) -> Iterator[ShardResult]:
    """Check the given shards in order, in this process or (local disk) in a pool of worker processes."""
    if workers <= 0 or not store.is_local:
        # One reader thread stays a shard ahead (read + sha256); this thread walks the shard before it.
        # At most two shards are in memory at once.
        with ThreadPoolExecutor(1, thread_name_prefix="check-read") as reader:
            ahead = reader.submit(read_shard, store, entries[0]) if entries else None
            for i, entry in enumerate(entries):
                loaded = ahead.result()
                ahead = reader.submit(read_shard, store, entries[i + 1]) if i + 1 < len(entries) else None
                yield check_shard(store, entry, ctx, progress, loaded)
                del loaded
        return
    import multiprocessing as mp

    # spawn, not fork: the caller may run threads (a progress bar's monitor, a loader) that fork would copy.
    jobs = [(str(store.path), e) for e in entries]
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                      initargs=(manifest, ctx.deep, ctx.fraction, ctx.seed)) as pool:
        for res in pool.imap(_check_shard_job, jobs):
            if progress is not None:
                progress(len(res.keys))
            yield res


def _running_total(progress: Callable[[int, int], None] | None,
                   entries: list[ShardEntry]) -> Callable[[int], None] | None:
    """The per-shard increments as progress(done, total) calls, total from the manifest entries."""
    if progress is None:
        return None
    total, done = sum(e.samples for e in entries), 0
    progress(0, total)  # the bar shows its total before the first shard is read

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    return advance


def _manifest_problems(manifest: Manifest) -> list[Problem]:
    """What the manifest says of itself: an unfinished build, totals that do not add up, an empty split."""
    problems = []
    if not manifest.complete:
        problems.append(Problem(MANIFEST_NAME, "", RULE_MANIFEST_INCOMPLETE,
                                "the build did not finish (resume it with the same command); "
                                "only the listed shards were checked"))
    problems.extend(check_totals(manifest))
    if manifest.samples == 0:
        problems.append(Problem(MANIFEST_NAME, "", RULE_SPLIT_EMPTY,
                                "the manifest lists no samples: a loader would yield nothing (every row dropped? "
                                "see drops.jsonl)"))
    return problems


def _add_shard(report: CheckReport, res: ShardResult, seen: dict[str, str]) -> None:
    """Count one checked shard into the report; a key met in an earlier shard is a duplicate."""
    report.shards += 1
    report.samples += len(res.keys)
    report.bytes += res.bytes
    report.deep_samples += res.deep_samples
    report.problems.extend(res.problems)
    for key in res.keys:
        if seen.setdefault(key, res.name) != res.name:
            report.problems.append(Problem(res.name, key, RULE_KEY_DUPLICATE, f"key also in {seen[key]}"))


def check_shards(shard_dir: str | os.PathLike | Store, *, deep: bool = False, fraction: float = 1.0, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None, workers: int | None = None,
                 storage_options: dict | None = None) -> CheckReport:
    """Verify a shard directory (local, or a URL such as s3://...) against its manifest.

    Raises ManifestError / OSError when it cannot run. ``progress(done, total)``: samples checked so
    far, of the samples the manifest lists for the shards present (known before the first one is read,
    so a bar can show a rate and an ETA). ``workers``: processes checking local shards in parallel (0:
    in this process; None: automatic, i.e. in-process below PARALLEL_MIN_BYTES, else one per CPU);
    object storage is read in this process, one shard ahead. The report is the same either way.
    """
    t0 = time.perf_counter()
    store = store_of(shard_dir, storage_options)
    manifest = read_manifest(store)
    ctx = _context(manifest, deep, fraction, seed)
    report = CheckReport(store.url, deep=deep, fraction=fraction)
    report.problems.extend(_manifest_problems(manifest))
    report.problems.extend(check_drops(store, manifest))
    on_store = set(store.names())
    report.problems.extend(check_directory(on_store, manifest))
    entries = [e for e in manifest.shards if e.name in on_store]  # missing ones are reported above
    if workers is None:
        workers = default_workers(manifest, len(entries))
    seen: dict[str, str] = {}
    for res in _shard_results(store, manifest, ctx, entries, workers, _running_total(progress, entries)):
        _add_shard(report, res, seen)
    report.seconds = time.perf_counter() - t0
    return report
