#!/usr/bin/env python
"""Long-run loader benchmark (issue 24): resuming mid-epoch, and the local cache of remote shards.

- resume: the time from ``make_loader`` to the first batch when starting an epoch (the baseline) against
  the same after ``load_state_dict`` of a state saved at 50 % and at 90 % of that epoch (goal: within 2x of
  starting an epoch, whatever the position). The state is made beforehand, untimed.
- cache: a whole epoch (images/s) read from the local disk (the baseline), from ``s3://`` (SeaweedFS on
  loopback, tests/s3server.py) without a cache, and from ``s3://`` with ``cache_dir`` after one epoch
  filled it (goal: the cached epoch >= 0.95x the local disk).

Every variant runs ``--rounds`` times, interleaved, best kept; the ratios come from one run.
Run:  python scripts/bench_resume.py          # ~2 minutes on 2 cores
The markdown report goes to stdout and replaces the "resume" section of --out-md (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import bench_common as bc  # noqa: E402

from frcnn_shard import make_loader  # noqa: E402

GOAL_RESUME = 2.0  # resuming at any position within 2x the time to start an epoch
GOAL_CACHE = 0.95  # a cached epoch from S3 against the local disk


def first_batch_s(shards: str, args: argparse.Namespace, state: dict | None) -> float:
    """Seconds from make_loader to the first batch: of epoch 1, or of the rest of it after ``state``."""
    t0 = time.perf_counter()
    loader = make_loader(shards, args.batch_size, num_workers=args.workers, hflip=0.5)
    if state is None:
        loader.set_epoch(1)
    else:
        loader.load_state_dict(state)
    it = iter(loader)
    next(it)
    s = time.perf_counter() - t0
    del it
    return s


def state_at(shards: str, args: argparse.Namespace, fraction: float) -> dict:
    """The state after ``fraction`` of epoch 1's batches (made untimed)."""
    loader = make_loader(shards, args.batch_size, num_workers=args.workers, hflip=0.5)
    loader.set_epoch(1)
    n = max(1, int(len(loader) * fraction))
    it = iter(loader)
    for _ in range(n):
        next(it)
    return loader.state_dict()


def epoch_ips(location: str, args: argparse.Namespace, **kw) -> float:
    """Images/s of one whole epoch, make_loader included."""
    t0 = time.perf_counter()
    loader = make_loader(location, args.batch_size, num_workers=args.workers, **kw)
    n = sum(len(t) for _, t in loader)
    return n / (time.perf_counter() - t0)


def bench_resume(shards: str, args: argparse.Namespace) -> dict[str, float]:
    """Best seconds to the first batch: starting epoch 1, and resuming it at 50 % and 90 %."""
    states = {f"resume at {int(f * 100)} %": state_at(shards, args, f) for f in (0.5, 0.9)}
    best: dict[str, float] = {}
    for r in range(args.rounds):
        for name, state in (("start the epoch", None), *states.items()):
            bc.log(f"resume: {name} (round {r + 1} of {args.rounds})")
            s = first_batch_s(shards, args, state)
            best[name] = min(best.get(name, s), s)
    return best


def bench_cache(shards: Path, args: argparse.Namespace) -> dict[str, float]:
    """Best images/s of an epoch: local disk, s3:// uncached, s3:// from a warm cache."""
    import s3server

    work = bc.BENCH_DATA / "resume_cache"
    shutil.rmtree(work, ignore_errors=True)
    srv = s3server.S3Server(work / "weed")
    srv.start()
    os.environ.update(srv.env())
    fs = srv.filesystem()
    fs.mkdir("bench")
    for p in sorted(shards.iterdir()):
        if p.is_file():
            fs.put(str(p), f"s3://bench/resume/{p.name}")
    url, cache = "s3://bench/resume", work / "cache"
    best: dict[str, float] = {}
    try:
        epoch_ips(url, args, cache_dir=cache)  # fills the cache
        for r in range(args.rounds):
            for name, loc, kw in (("local disk", str(shards), {}), ("s3, no cache", url, {}),
                                  ("s3, cached", url, {"cache_dir": cache})):
                bc.log(f"cache: {name} (round {r + 1} of {args.rounds})")
                best[name] = max(best.get(name, 0.0), epoch_ips(loc, args, **kw))
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    return best


def report(resume: dict[str, float], cache: dict[str, float], args: argparse.Namespace, n: int) -> str:
    """The markdown section."""
    base = resume["start the epoch"]
    rows = [[name, bc.fmt(s, 3), bc.fmt(s / base, 2) + "x",
             "baseline" if name == "start the epoch" else bc.goal(s / base <= GOAL_RESUME)]
            for name, s in resume.items()]
    disk = cache["local disk"]
    crow = [[name, bc.fmt(v, 1), bc.fmt(v / disk, 2) + "x",
             "baseline" if name == "local disk" else (bc.goal(v / disk >= GOAL_CACHE) if "cached" in name else "-")]
            for name, v in cache.items()]
    return "\n".join([
        bc.report_header("Resume and the shard cache (scripts/bench_resume.py)"),
        f"{n} samples (tiny_coco repeated) in shards of {bc.SAMPLES_PER_SHARD}, batch {args.batch_size}, "
        f"{args.workers} worker(s), hflip 0.5, default shuffle buffer; best of {args.rounds} interleaved rounds.", "",
        f"### Seconds from make_loader to the first batch (goal: resuming <= {GOAL_RESUME}x starting)", "",
        bc.md_table(["what", "seconds", "against starting", "goal"], rows), "",
        f"### A whole epoch, images/s (goal: cached >= {GOAL_CACHE}x the local disk)", "",
        bc.md_table(["read from", "images/s", "against the local disk", "goal"], crow), "",
        "Resuming replays the shuffle buffer on sample numbers and reads only the shards that still held "
        "buffered samples (raw bytes, not decoded); the cached epoch hashes each shard before reading it. "
        f"The S3 server is SeaweedFS on loopback, on the same {os.cpu_count()} cores.",
    ]) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="rows of the benchmark dataset (default 2000)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out-md", default=str(bc.BENCH_MD))
    p.add_argument("--no-md", action="store_true")
    args = p.parse_args(argv)
    bc.BENCH_DATA.mkdir(exist_ok=True)
    shards = bc.shard_dir(args.images)
    resume = bench_resume(str(shards), args)
    cache = bench_cache(shards, args)
    from frcnn_shard.shards import read_manifest

    n = read_manifest(shards).samples
    bc.publish("resume", report(resume, cache, args, n), args.out_md, args.no_md)


if __name__ == "__main__":
    main()
