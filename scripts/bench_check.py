#!/usr/bin/env python
"""Check benchmark (issue 5): `frcnn-shard check` against a bare sequential read of the same files.

On shards of tiny_coco repeated to ``--images`` (default 2,000, and ``--more-images``, default 10,000;
250 samples per shard, built once and cached in the git-ignored bench_data/), measured in the same
run, best of ``--repeats`` interleaved rounds (each round runs every variant once, in turn):

- bare read:        every shard file of the manifest, open + read() in 1 MB blocks, bytes discarded;
- read + sha256:    the same, each block also fed to hashlib.sha256 (what the check must do at least);
- check (default):  frcnn_shard.check.check_shards(DIR), in this process, with the default worker choice
                    (in-process below check.PARALLEL_MIN_BYTES, else one worker process per CPU);
- check in-process: check_shards(DIR, workers=0), where the default picked worker processes;
- check --deep:     check_shards(DIR, deep=True, fraction=0.05);
- CLI:              `frcnn-shard check DIR` in a subprocess, end to end (interpreter start and imports too);
- baseline:         with ``--baseline FILE``, check_shards from another copy of frcnn_shard/check.py
                    (e.g. ``git show HEAD:frcnn_shard/check.py > /tmp/check_old.py``), for a before/after.

Warm: the files are in the page cache (one untimed read first). Cold: before every timed run each shard
file gets ``posix_fadvise(POSIX_FADV_DONTNEED)``, which drops its clean pages from the page cache
without root; the table says whether that took effect (cold bare read slower than warm). CPU time is
user + sys of this process (all its threads) plus reaped children (worker processes, the CLI).

Then the per-sample stages of the default check are timed one at a time on the first shard (one core,
best of repeats) to show what bounds it, with an optional cProfile top (``--profile``).

Run:  python scripts/bench_check.py                 # ~1-2 minutes on 2 cores (the 10,000 split: +1 min build once)
      python scripts/bench_check.py --more-images 0 --repeats 5 --profile
      git show HEAD:frcnn_shard/check.py > /tmp/check_old.py
      python scripts/bench_check.py --baseline /tmp/check_old.py --baseline-label "before the change"
The markdown report goes to stdout and replaces the "check" section of --out-md (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import importlib.util
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

from frcnn_shard.inspect import check as chk  # noqa: E402
from frcnn_shard.inspect import sample_rules as sr, shard_rules as shr  # noqa: E402
from frcnn_shard.format.members import group_by_key  # noqa: E402
from frcnn_shard.format.targets import unpack_all_targets  # noqa: E402
from frcnn_shard.shards import read_manifest  # noqa: E402

BLOCK = 1 << 20
DEEP_FRACTION = 0.05


# ------------------------------------------------------------------------------------ variants


def bare_read(files: list[Path]) -> int:
    """Sequential read() in 1 MB blocks; the bytes are discarded."""
    n = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while b := f.read(BLOCK):
                n += len(b)
    return n


def read_sha256(files: list[Path]) -> int:
    """The same read, each block hashed."""
    n = 0
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while b := f.read(BLOCK):
                h.update(b)
                n += len(b)
        h.hexdigest()
    return n


def drop_cache(files: list[Path]) -> None:
    """Ask the kernel to drop these files' clean pages from the page cache (no root needed)."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cli_check(d: Path) -> None:
    """`frcnn-shard check DIR` in a subprocess (progress bar to /dev/null); must exit 0."""
    exe = Path(sys.executable).with_name("frcnn-shard")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "frcnn_shard.cli"]
    r = subprocess.run(cmd + ["check", str(d)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if r.returncode != 0:
        raise SystemExit(f"CLI check failed ({r.returncode}): {r.stdout[-500:]}")


def load_baseline(path: str):
    """check_shards from another copy of check.py, imported inside the frcnn_shard package."""
    spec = importlib.util.spec_from_file_location("frcnn_shard._bench_baseline_check", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.check_shards


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


@dataclass
class Variant:
    name: str
    fn: Callable[[], object]
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    last: object = None  # what fn returned in the latest run

    def run(self, cold: bool, files: list[Path]) -> None:
        if cold:
            drop_cache(files)
        c0, t0 = _cpu(), time.perf_counter()
        self.last = self.fn()
        self.walls.append(time.perf_counter() - t0)
        self.cpus.append(_cpu() - c0)

    @property
    def wall(self) -> float:
        return min(self.walls)

    @property
    def cpu(self) -> float:
        return min(self.cpus)


def variants(d: Path, files: list[Path], manifest: dict, baseline) -> list[Variant]:
    """What is timed on one split, in the order each round runs them."""
    auto = chk.default_workers(manifest, len(files))

    def default_check() -> chk.CheckReport:
        r = chk.check_shards(d)
        if not r.ok:
            raise SystemExit(f"check of the benchmark shards found problems: {r.summary_line()}")
        return r

    out = [
        Variant("bare read (1 MB blocks)", lambda: bare_read(files)),
        Variant("read + sha256", lambda: read_sha256(files)),
        Variant(f"check_shards (default: {f'{auto} worker processes' if auto else 'in-process'})", default_check),
    ]
    if auto:
        out.append(Variant("check_shards (workers=0: in-process)", lambda: chk.check_shards(d, workers=0)))
    out.append(Variant(f"check_shards --deep --fraction {DEEP_FRACTION:g}",
                       lambda: chk.check_shards(d, deep=True, fraction=DEEP_FRACTION)))
    out.append(Variant("CLI `frcnn-shard check` (subprocess, end to end)", lambda: cli_check(d)))
    if baseline is not None:
        out.append(Variant("baseline: --baseline check_shards (workers=0)", lambda: baseline(d, workers=0)))
    return out


def measure(d: Path, repeats: int, cold: bool, baseline, skip_deep_cold: bool = True) -> tuple[list[Variant], dict]:
    """Interleaved rounds over all variants; returns them with their timings and the split's facts."""
    manifest = read_manifest(d)
    files = [d / s["name"] for s in manifest["shards"]]
    vs = variants(d, files, manifest, baseline)
    if cold and skip_deep_cold:
        vs = [v for v in vs if "--deep" not in v.name]
    bare_read(files)  # warm the page cache (and the imports) once, untimed
    chk.check_shards(d, workers=0)
    for i in range(repeats):
        bc.log(f"{d.parent.name}: {'cold' if cold else 'warm'} round {i + 1}/{repeats}")
        for v in vs:
            v.run(cold, files)
    deep = next((v.last for v in vs if "--deep" in v.name), None)
    facts = {"samples": manifest["totals"]["samples"], "bytes": manifest["totals"]["bytes"],
             "shards": len(files), "deep": deep.deep_samples if deep is not None else None}
    return vs, facts


def table(vs: list[Variant], facts: dict) -> str:
    """Rows with wall, CPU, MB/s, us/sample and the two ratios."""
    bare = next(v for v in vs if v.name.startswith("bare"))
    sha = next(v for v in vs if v.name.startswith("read + sha256"))
    rows = []
    for v in vs:
        rows.append([v.name, bc.fmt(v.wall, 3), bc.fmt(v.cpu, 3), bc.fmt(facts["bytes"] / 1e6 / v.wall, 0),
                     bc.fmt(1e6 * v.wall / facts["samples"], 0),
                     f"{v.wall / bare.wall:.1f}x", f"{v.wall / sha.wall:.2f}x"])
    return bc.md_table(["variant", "best wall s", "CPU s", "MB/s", "us/sample (wall)", "/ bare read",
                        "/ read+sha256"], rows)


# ------------------------------------------------------------------------------------- stages


def stage_table(d: Path, repeats: int) -> tuple[str, float]:
    """Per-sample cost of each stage of the default check, on the first shard, one core."""
    manifest = read_manifest(d)
    entry = manifest.shards[0]
    path = d / entry.name
    ctx = sr.make_context(manifest, False, 1.0, 0, pick=lambda key, seed, fraction: False)
    data = path.read_bytes()
    raws = [raw for raw in group_by_key(shr.archive(data)[0], read_exts=None) if raw.key]
    walked = [(raw.key, raw.members) for raw in raws]
    n = len(walked)
    metas = [json.loads(m["json"]) for _, m in walked]

    def per_sample(fn: Callable[[], object]) -> float:
        return 1e6 * bc.best_of(fn, repeats) / n

    def targets_rules() -> None:
        for (_, m), meta in zip(walked, metas):
            sr.check_targets(m["rpn.npz"], meta, len(meta["boxes"]), ctx, ctx.num_anchors)

    def unpack_only() -> None:
        for _, m in walked:
            unpack_all_targets(m["rpn.npz"], ctx.num_anchors)

    loaded = shr.Loaded(len(data), data, entry.sha256)  # what the reader thread hands over
    rows = [
        ("read the shard file (page cache, one read())", per_sample(lambda: path.read_bytes()), "reader thread"),
        ("sha256 of the shard bytes", per_sample(lambda: hashlib.sha256(data).digest()), "reader thread"),
        ("tar walk (plain-ustar scan, members sliced, group_by_key)",
         per_sample(lambda: list(group_by_key(shr.archive(data)[0], read_exts=None))), "main"),
        ("tar walk through tarfile (fallback for damaged tars)",
         per_sample(lambda: list(group_by_key(shr.archive_tarfile(data)[0], read_exts=None))), "(not run)"),
        ("image header (Pillow open: format + size)",
         per_sample(lambda: [sr.check_image(m[ctx.image_ext], ctx.image_ext, ctx.image_hw, False) for _, m in walked]),
         "main"),
        ("JSON decode (json.loads)", per_sample(lambda: [json.loads(m["json"]) for _, m in walked]), "main"),
        ("JSON rules (key, size, boxes, labels)",
         per_sample(lambda: [sr.check_meta(k, meta, ctx) for (k, _), meta in zip(walked, metas)]), "main"),
        ("anchor targets: format.targets.unpack_all_targets", per_sample(unpack_only), "main"),
        ("anchor targets: unpack + rules (counts, matched range)", per_sample(targets_rules), "main"),
        ("all sample rules (check_sample, incl. the four above)",
         per_sample(lambda: [sr.check_sample(raw, ctx, False) for raw in raws]), "main"),
        ("whole shard, bytes given (check_shard: walk + samples + shard rules)",
         per_sample(lambda: shr.check_shard(path, entry, ctx, None, loaded)), "main"),
    ]
    main_total = rows[-1][1]
    us = {name.split(" (")[0]: v for name, v, _ in rows}
    targets, image, jdec = us["anchor targets: unpack + rules"], us["image header"], us["JSON decode"]
    walk, sha = us["tar walk"], us["sha256 of the shard bytes"] + us["read the shard file"]
    sample_bytes = len(data) / n
    bounds = (
        f"\n\nWhat bounds it: the main thread's per-sample Python work, not the bytes. Of its "
        f"{main_total:.0f} us/sample, the anchor-target member takes {targets:.0f} us "
        f"({100 * targets / main_total:.0f}%: {us['anchor targets: format.targets.unpack_all_targets']:.0f} us in "
        f"format.targets.unpack_all_targets: zip, inflate and the index rules, no dense arrays of the {ctx.num_anchors} "
        f"anchors; the rest the count and box-range rules), the image header "
        f"{image:.0f} us, json.loads {jdec:.0f} us and the tar walk {walk:.0f} us; reading and hashing the "
        f"{sample_bytes / 1e3:.0f} kB of a sample costs {sha:.0f} us and runs in the reader thread, overlapped. "
        f"So the check is read-bound only where the storage delivers less than about "
        f"{sample_bytes / main_total:.0f} MB/s ({sample_bytes / 1e3:.0f} kB per {main_total:.0f} us)."
    )
    text = bc.md_table(["stage (first shard, %d samples)" % n, "us/sample (1 core)", "share of main thread",
                        "runs on"],
                       [(name, bc.fmt(t, 1), f"{100 * t / main_total:.0f}%" if where == "main" else "", where)
                        for name, t, where in rows])
    return text + bounds, main_total


def profile_top(d: Path, lines: int = 18) -> str:
    """cProfile of check_shards(DIR, workers=0), sorted by own time."""
    prof = cProfile.Profile()
    prof.enable()
    chk.check_shards(d, workers=0)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(lines)
    body = s.getvalue()
    body = body[body.find("   ncalls"):] if "   ncalls" in body else body
    return "```\n" + body.replace(str(bc.ROOT) + "/", "").rstrip() + "\n```"


# --------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--images", type=int, default=2000, help="rows of the main split (default 2000)")
    ap.add_argument("--more-images", type=int, default=10000, help="a second, larger split (0: none)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; best of them is reported")
    ap.add_argument("--cold-repeats", type=int, default=2, help="rounds with the page cache dropped (0: none)")
    ap.add_argument("--baseline", help="another check.py to time as 'baseline' in the same rounds")
    ap.add_argument("--baseline-label", default="", help="what the baseline is, for the report")
    ap.add_argument("--profile", action="store_true", help="append a cProfile top of the in-process check")
    ap.add_argument("--out-md", default=str(bc.BENCH_MD))
    ap.add_argument("--no-md", action="store_true", help="print the report only")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bc.BENCH_DATA.mkdir(exist_ok=True)
    baseline = load_baseline(args.baseline) if args.baseline else None
    sizes = [args.images] + ([args.more_images] if args.more_images else [])
    parts = [bc.report_header("Check (scripts/bench_check.py)")]
    summary = []
    for i, n in enumerate(sizes):
        d = bc.shard_dir(n)
        vs, facts = measure(d, args.repeats, False, baseline)
        head = (f"### {i + 1}. {facts['samples']} samples, {facts['shards']} shards, "
                f"{bc.fmt(facts['bytes'] / 1e6, 1)} MB ({n} rows)")
        body = [head, "", f"Page cache **warm** (files read once before, untimed); best of {args.repeats} "
                          "interleaved rounds.", "", table(vs, facts)]
        bare = next(v for v in vs if v.name.startswith("bare"))
        summary.append((facts, vs, "warm"))
        if args.cold_repeats:
            cvs, _ = measure(d, args.cold_repeats, True, None)
            cbare = next(v for v in cvs if v.name.startswith("bare"))
            effect = ("the cold bare read is %.1fx the warm one, so the pages were dropped"
                      % (cbare.wall / bare.wall)) if cbare.wall > 1.5 * bare.wall else \
                "**the cold bare read was not slower than the warm one: the drop had no effect here**"
            body += ["", f"Page cache **cold** (`posix_fadvise(DONTNEED)` on every shard before each run; "
                         f"{effect}); best of {args.cold_repeats} rounds, --deep left out.", "", table(cvs, facts)]
            summary.append((facts, cvs, "cold"))
        body.append(f"\n`--deep --fraction {DEEP_FRACTION:g}` selected {facts['deep']} samples (full decode + "
                    "reference matcher each).")
        parts.append("\n".join(body))
    d0 = bc.shard_dir(args.images)
    stages, main_us = stage_table(d0, max(3, args.repeats))
    parts.append(f"### {len(sizes) + 1}. Where the default check's time goes\n\nEach stage timed alone on "
                 f"the first shard of the {args.images}-row split, in this process, best of "
                 f"{max(3, args.repeats)}. The reader thread reads and hashes the next shard while the main "
                 f"thread walks the current one, so on 2+ cores the check's wall time is about the main "
                 f"thread's {bc.fmt(main_us, 0)} us/sample, not the sum.\n\n" + stages)
    lines = []
    for facts, vs, cache in summary:
        bare = next(v for v in vs if v.name.startswith("bare"))
        sha = next(v for v in vs if v.name.startswith("read + sha256"))
        for v in vs:
            if v.name.startswith("check_shards (") and "deep" not in v.name:
                how = v.name[len("check_shards ("):-1]
                lines.append(f"- {facts['samples']} samples, {cache} cache, {how}: check {bc.fmt(v.wall, 3)} s = "
                             f"**{v.wall / bare.wall:.1f}x** the bare read ({bc.fmt(bare.wall, 3)} s), "
                             f"**{v.wall / sha.wall:.2f}x** read + sha256 ({bc.fmt(sha.wall, 3)} s)")
    if baseline is not None:
        lines.append(f"- baseline row: check_shards of `{args.baseline}`"
                     + (f" ({args.baseline_label})" if args.baseline_label else "") + ", timed in the same rounds")
    parts.insert(1, "Ratios of the default check's wall time (same run, best of rounds):\n\n" + "\n".join(lines))
    if args.profile:
        parts.append(f"### Profile: check_shards(workers=0) on the {args.images}-row split\n\n" + profile_top(d0))
    report = "\n\n".join(parts) + "\n"
    bc.publish("check", report, args.out_md, args.no_md)


if __name__ == "__main__":
    main()
