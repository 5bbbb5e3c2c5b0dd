"""The build on a Ray cluster: its parts as Ray tasks (retried when they fail or their worker is lost),
then the merge; with ``device="cuda"`` the batched anchor matching runs in Ray actors, a GPU each.

The tasks run the same ``build_part`` (part.PartRun) as one machine or a job array, with our own writer: Ray's own
``write_webdataset`` is not used (random file names, members stamped with the current time, writes
straight to the final name), so a Ray build writes the same bytes as any other.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..errors import BuildError
from ..format.layout import Layout
from ..shards import read_manifest
from .options import anchor_spec
from .part import batch_matcher, build_part, open_output
from .parts import merge, read_records
from .results import split_result
from .resume import split_state

# Set before Ray starts: read by the driver and inherited by every Ray process, so that nothing of
# Ray's tries to reach outside this machine: no usage report, no token file, the node on loopback.
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
TASK_RETRIES = 3  # a part whose task failed or whose worker was lost runs again (it resumes)
PARTS_PER_CPU = 2  # parts per cluster CPU: small enough to balance, large enough to amortise start-up
_POLL_S = 1.0


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to ``address`` (or $RAY_ADDRESS); without either, start a private local cluster, quietly."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return ray
    common = dict(log_to_driver=False, logging_level=logging.ERROR)
    addr = address or os.environ.get("RAY_ADDRESS")
    if addr:
        ray.init(address=addr, **common)
        return ray
    # The head asks a cloud metadata service unless ~/ray_bootstrap_config.yaml exists: it sees a
    # HOME that has one while it starts; the tasks get the real HOME back.
    real_home = os.environ.get("HOME", "/")
    fake = Path(tempfile.mkdtemp(prefix="frcnn-ray-home-"))
    (fake / "ray_bootstrap_config.yaml").write_text("{}\n")
    os.environ["HOME"] = str(fake)
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": {"HOME": real_home}}, **common)
    finally:
        os.environ["HOME"] = real_home
    return ray


def _run_part(opts, part: tuple[int, int], matcher=None) -> dict:
    """A Ray task: build one part (resuming what an earlier attempt published); returns its summary."""
    import ray

    # A retried attempt of this part may find its own lock from the attempt that was lost.
    os.environ["FRCNN_SHARD_TASK"] = f"ray:{ray.get_runtime_context().get_job_id()}:{part[0]}/{part[1]}"
    match_batch = None
    if matcher is not None:
        def match_batch(boxes, crowd, canvases):
            return ray.get(matcher.match.remote(boxes, crowd, canvases))
    res = build_part(opts, part, match_batch=match_batch)
    return {"part": part, "samples": res.samples, "shards": res.shards, "rows": res.rows, "status": res.status,
            "rows_read": res.rows_read}


class MatchActor:
    """Batched anchor matching on one device (a GPU of the cluster); the anchors stay on it."""

    def __init__(self, spec, cfg, device: str = "cuda"):
        self._match = batch_matcher(spec, cfg, device)

    def match(self, boxes: list, crowd: list, canvases: list) -> list:
        """[(labels, matched)] for a batch of images (part.batch_matcher: anchors.match_batch_torch per canvas)."""
        return self._match(boxes, crowd, canvases)


def _actors(ray, opts, device: str) -> list:
    """One matching actor per cluster GPU when matching on cuda; none otherwise (matching in the tasks)."""
    if device != "cuda":
        return []
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        raise BuildError("device cuda was asked for, but the Ray cluster has no GPU")
    actor = ray.remote(num_gpus=1)(MatchActor)
    return [actor.remote(anchor_spec(opts), opts.matching) for _ in range(gpus)]


def plan_parts(num_shards: int, cpus: float) -> int:
    """How many parts a Ray build runs: PARTS_PER_CPU per CPU, at most one per shard, at least one."""
    return max(1, min(num_shards, int(math.ceil(cpus)) * PARTS_PER_CPU))


def build_on_ray(opts, progress: Callable[[dict], None] | None = None):
    """The whole build as parts on Ray, then the merge; returns the BuildResult of the merged split."""
    t0 = time.perf_counter()
    ray = init_ray(opts.ray_address)
    _, store, layout, header = open_output(opts, anchor_spec(opts))
    n = plan_parts(layout.shards, ray.cluster_resources().get("CPU", 1))
    if split_state(store, header, opts, None, (0, 1)):
        return split_result(store, read_manifest(store), "already complete", opts.device, t0)
    device = "cuda" if opts.device == "cuda" or (opts.device == "auto" and ray.cluster_resources().get("GPU")) else "cpu"
    actors = _actors(ray, opts, device)
    task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=[OSError, ConnectionError])(_run_part)
    part_opts = replace(opts, engine="local", overwrite=False, workers=0, device="cpu")
    pending = [task.remote(replace(part_opts, part=(i, n)), (i, n), actors[i % len(actors)] if actors else None)
               for i in range(n)]
    rows_read = _wait(ray, pending, store, layout, progress)
    merge(store, run={"engine": "ray", "parts": n, "matching": device})
    res = split_result(store, read_manifest(store), "built", device, t0)
    res.rows_read = rows_read
    return res


def _wait(ray, pending: list, store, layout: Layout, progress) -> int:
    """Wait for every task, reporting progress from the part records; a task that fails for good raises.
    Returns the source rows the tasks read."""
    left, rows_read = list(pending), 0
    while left:
        done, left = ray.wait(left, num_returns=len(left), timeout=_POLL_S)
        for ref in done:
            try:
                rows_read += ray.get(ref)["rows_read"]
            except Exception as e:  # noqa: BLE001 - Ray wraps the task's own exception
                # Ray retries a task TASK_RETRIES times only for a lost worker or an OSError; others end it at once.
                raise BuildError(f"a part of the build failed on Ray: {e}. Every shard "
                                 f"published so far is kept in {store.url}; run the same command again to "
                                 "resume") from None
        if progress is not None:
            records = read_records(store).values()
            shards = [s for r in records for s in r["shards"]]
            progress({"rows": sum(s["rows"][1] - s["rows"][0] for s in shards), "rows_total": layout.rows,
                      "samples": sum(s["samples"] for s in shards), "shards": len(shards),
                      "shards_total": layout.shards})
    return rows_read
