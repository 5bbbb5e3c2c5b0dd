#!/usr/bin/env python
"""Build-side benchmarks (issues 7, 15): build throughput vs the PIL codec floor, start-up, anchor cost, size, RSS.

1. Throughput: ``frcnn_shard.build.build`` with all cores (``--workers``, default os.cpu_count()) on a
   Hub-layout folder of tiny_coco repeated to ``--images`` (default 2,000), against the *PIL codec
   floor*: the same fork pool (same process count, chunks of ``chunk_size`` rows, at most 4 x workers
   chunks in flight), the same source rows, doing only PIL decode + PIL bilinear resize + PIL encode
   and discarding the bytes. Both run in a fresh subprocess and are timed from before the pool is
   forked to the end (source opening included in both) and in steady state: from the first chunk's
   result to the end, which leaves out the fixed start-up (the goal's number). Then each component is
   timed on its own, in this process, to say where the rest goes: source reading, the transform's
   non-codec part, anchor matching, target packing, pickling across the pool, the shard writer (tar +
   sha256 + fsync) and the JSON records.
2. Anchor targets per image on the 50 real images (boxes resized to 400x400, default preset): the fast
   CPU matcher (anchors.AnchorMatcher.match) vs the brute-force float64 reference (match_reference) vs
   match_batch_torch at a few batch sizes on ``--device`` (cpu; cuda runs batch sizes 1..256).
3. Size and memory: shard bytes per image split into image / JSON / anchor targets / tar overhead, and
   the build's peak memory (Rss and Pss summed over the main process and its workers, sampled every
   0.2 s from /proc, plus getrusage ru_maxrss) at each of ``--rss-images`` (default 2,000 and 10,000).
5. Start-up: a 4-image build end to end, in a fresh interpreter (in-process, broken down: imports,
   device resolution, pool start, source open, first row, the rest) and through the CLI, from a
   Hub-layout folder and from a coco: folder.

Run:  python scripts/bench_build.py                  # all three, ~3-4 minutes on 2 cores
      python scripts/bench_build.py --only anchors --device cuda --batch-sizes 1,4,16,64,256
      python scripts/bench_build.py --profile          # adds cProfile tops of the worker and main side
The markdown report goes to stdout and replaces the "build" section of --out-md (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pickle
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

import numpy as np  # noqa: E402
import simplejpeg  # noqa: E402

from frcnn_shard import anchors as anc  # noqa: E402
from frcnn_shard.format.members import TARGETS_EXT  # noqa: E402
from frcnn_shard.format.targets import pack_targets, unpack_all_targets  # noqa: E402
from frcnn_shard import build as fb  # noqa: E402
from frcnn_shard.build import pool as build_pool, worker as build_worker  # noqa: E402 - the stages, timed
from frcnn_shard.format.members import sample_members  # noqa: E402
from frcnn_shard.records import Sample  # noqa: E402
from frcnn_shard.shards import ShardWriter, iter_shard, read_manifest  # noqa: E402
from frcnn_shard.sources import open_source  # noqa: E402
from PIL import Image  # noqa: E402

from frcnn_shard.codec import fast_jpeg_hw  # noqa: E402
from frcnn_shard.format.record import flip_boxes  # noqa: E402
from frcnn_shard.malloc import tune_worker_malloc  # noqa: E402
from frcnn_shard.transform import (  # noqa: E402
    TransformConfig, box_drop_reasons, decode_image, encode_image, open_image, process_row, resize_geometry,
    resize_image, to_rgb,
)

GOAL_BUILD_VS_FLOOR = 1.0  # steady state, against the PIL codec floor
GOAL_STARTUP_S = 2.0  # a 4-image build end to end
GOAL_MATCH_MS = 1.0
GOAL_MATCH_SPEEDUP = 10.0
GOAL_TARGET_SHARE = 0.02
GOAL_FLIP_SHARE = 0.025  # both orientations' targets, of the payload bytes
GOAL_RSS_BYTES = 2 << 30


# =============================================================================== child runs


def pil_codec(image: bytes, cfg: TransformConfig) -> bytes:
    """The PIL codec alone, as the build runs it: PIL decode, PIL bilinear resize, PIL encode."""
    img = decode_image(image, cfg.max_pixels)
    return encode_image(resize_image(img, cfg.image_size, cfg.resize), cfg.image_format, cfg.quality)


def turbo_codec(image: bytes, cfg: TransformConfig) -> bytes:
    """The same with libjpeg-turbo's decode (PIL's exact pixels) handed to PIL's resize without a copy: decoded
    as RGBX, PIL's own 4-byte layout, and mapped as a PIL image. What the build would cost with it (it does not
    use it: see the report); the shard bytes are the same."""
    img = open_image(image, cfg.max_pixels)
    if img.format == "JPEG" and img.mode == "RGB" and fast_jpeg_hw(image) == (img.height, img.width):
        x = simplejpeg.decode_jpeg(image, "RGBX", fastdct=False, fastupsample=False, strict=True)
        rgb = Image.frombuffer("RGBX", (x.shape[1], x.shape[0]), x, "raw", "RGBX", 0, 1)
        resized = resize_image(rgb, cfg.image_size, cfg.resize)
        if cfg.image_format == "jpg":  # PIL writes RGBX as RGB JPEG: no conversion of the output either
            buf = io.BytesIO()
            resized.save(buf, format="JPEG", quality=int(cfg.quality), subsampling="4:2:0", optimize=False,
                         progressive=False)
            return buf.getvalue()
        return encode_image(resized, cfg.image_format, cfg.quality)
    return encode_image(resize_image(to_rgb(img), cfg.image_size, cfg.resize), cfg.image_format, cfg.quality)


def match_both(row, cfg: TransformConfig, matcher: anc.AnchorMatcher) -> None:
    """The anchor matching a default build does for a row: its kept boxes on the canvas, stored and mirrored."""
    hw = (int(row.height), int(row.width))
    scale, content_hw, _ = resize_geometry(hw, cfg.image_size, cfg.resize)
    boxes, reasons = box_drop_reasons(row.bboxes, row.labels, cfg.bbox_format, hw, scale, content_hw,
                                      cfg.min_box_size)
    kept = boxes[np.array([r is None for r in reasons], dtype=bool)].astype(np.float32)
    matcher.match(kept)
    matcher.match(flip_boxes(kept, cfg.image_size[1]))


def _floor_chunk(job: tuple) -> list[bytes]:
    """Codec floor worker: PIL decode + resize + encode each row with an annotation, nothing else
    (with a matcher: the "codec + matching" ceiling, which also matches each row's boxes, both orientations)."""
    fmt, rows = job
    cfg, matcher = replace(_FLOOR["tcfg"], bbox_format=fmt), _FLOOR.get("matcher")
    # Rows without boxes are dropped by the build (no_boxes) before any pixel is decoded.
    out = [pil_codec(row.image, cfg) for row in rows if len(row.bboxes)]
    if matcher is not None:
        for row in rows:
            if len(row.bboxes):
                match_both(row, cfg, matcher)
    return out


_FLOOR: dict = {}


def _init_floor(tcfg: TransformConfig, match: bool) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_worker_malloc()  # the build's workers' allocator settings: the same processes in every run
    _FLOOR["tcfg"] = tcfg
    if match:
        opts = fb.BuildOptions()
        _FLOOR["matcher"] = anc.AnchorMatcher(fb.anchor_spec(opts), opts.matching)


def run_floor(source: str, workers: int, match: bool = False) -> dict:
    """The codec floor, shaped exactly like build(): fork pool first, then the source, bounded in-flight chunks.

    ``match``: the "codec + matching" ceiling: the floor plus the anchor matching of both orientations.
    """
    import multiprocessing as mp

    opts = fb.BuildOptions(source=source, workers=workers)
    t0 = time.perf_counter()
    pool = mp.get_context("fork").Pool(workers, initializer=_init_floor, initargs=(opts.transform, match))
    try:
        src = open_source(source, "train", bbox_format=opts.bbox_format, detect_rows=opts.detect_rows)
        fmt = src.bbox_format["decision"]
        pending: deque = deque()
        images = rows = 0
        first = None  # when the first chunk's result arrived: the end of the start-up
        for chunk in build_pool.chunks(src.rows(), opts.chunk_size):
            rows += len(chunk)
            pending.append(pool.apply_async(_floor_chunk, ((fmt, chunk),)))
            if len(pending) >= 4 * workers:
                images += len(pending.popleft().get())
                first = first or time.perf_counter()
        while pending:
            images += len(pending.popleft().get())
            first = first or time.perf_counter()
    finally:
        pool.terminate()
        pool.join()
    return {"seconds": time.perf_counter() - t0, "first_s": first - t0, "rows": rows, "samples": images,
            "chunk": opts.chunk_size}


def run_build(source: str, out: str, workers: int) -> dict:
    """One real build (default options, all rows) into ``out``; ``first_s``: when the first row was written."""
    opts = fb.BuildOptions(source=source, split="train", out=out, workers=workers, device="cpu",
                           rows_per_shard=bc.SAMPLES_PER_SHARD, overwrite=True)
    first: list[float] = []
    t0 = time.perf_counter()
    res = fb.build(opts, progress=lambda c: first or first.append(time.perf_counter()))
    return {"seconds": time.perf_counter() - t0, "first_s": first[0] - t0, "rows": res.rows, "samples": res.samples,
            "bytes": res.bytes, "shards": res.shards, "out_dir": str(res.out_dir), "chunk": opts.chunk_size}


def steady_rows_per_s(r: dict) -> float:
    """Rows/s after the first chunk's result (the whole first chunk is ready then): start-up left out."""
    return (r["rows"] - r["chunk"]) / (r["seconds"] - r["first_s"])


def child_main(kind: str, source: str, out: str, workers: int) -> None:
    """Entry point of the measuring subprocess: run, then print one JSON line with results and rusage."""
    r = run_build(source, out, workers) if kind == "build" else run_floor(source, workers, kind == "ceiling")
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    r["maxrss_self_kib"], r["maxrss_children_kib"] = me.ru_maxrss, kids.ru_maxrss
    r["cpu_main_s"] = me.ru_utime + me.ru_stime
    r["cpu_workers_s"] = kids.ru_utime + kids.ru_stime  # the pool's workers, reaped by pool.join()
    print("RESULT " + json.dumps(r), flush=True)


def in_subprocess(kind: str, source: Path, out: Path, workers: int) -> dict:
    """Run child_main in a fresh interpreter, sampling its process tree's memory meanwhile."""
    cmd = [sys.executable, __file__, "--child", kind, "--child-source", str(source), "--child-out", str(out),
           "--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    with bc.TreeSampler(proc.pid) as sampler:
        stdout, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{kind} subprocess failed (rc {proc.returncode})")
    line = next(l for l in stdout.splitlines() if l.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    r["tree"] = sampler.mem
    return r


# ============================================================================ 1. throughput


@dataclass
class Components:
    """Per-image costs (ms, one core) of each stage, measured in this process on the first rows."""

    n: int
    source_open_s: float
    source: float
    transform_total: float
    codec: float  # PIL decode + resize + encode: the build's and the floor's
    turbo_codec: float  # the same with libjpeg-turbo's decode handed to PIL without a copy (not used)
    match: float
    pack: float
    job_pickle: float  # main: pickle the rows; worker: unpickle them (both sides summed)
    result_pickle: float  # worker: pickle the samples; main: unpickle them (both sides summed)
    floor_result_pickle: float  # the codec floor's results (encoded bytes only), both sides
    json_meta: float
    tar_write: float  # ShardWriter.add + close: tar headers, writes, sha256, fsync, rename
    sha256: float  # sha256 alone over the same bytes (part of tar_write)


def measure_components(source: Path, n: int, repeats: int) -> tuple[Components, list[Sample]]:
    """Time every stage of the build separately on the first n rows of the source (the source on all rows)."""
    t0 = time.perf_counter()
    src = open_source(str(source), "train")
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows, total = [], 0
    for row in src.rows():  # all rows: the first detect_rows come from the detection buffer
        total += 1
        if len(rows) < n:
            rows.append(row)
    source_ms = 1000 * (time.perf_counter() - t0) / total
    opts = fb.BuildOptions()
    tcfg = replace(opts.transform, bbox_format=src.bbox_format["decision"])
    items = [process_row(r, tcfg) for r in rows]
    kept = [r for r, it in zip(rows, items) if isinstance(it, Sample)]
    samples = [it for it in items if isinstance(it, Sample)]
    matcher = anc.AnchorMatcher(fb.anchor_spec(opts), opts.matching)
    # Both orientations, as the build does by default (flip_targets): the stored and the mirrored boxes.
    results = [build_worker.match_orientations(matcher, s.record, opts.flip_targets) for s in samples]
    packed = [pack_targets(*stored, flipped=flipped) for stored, flipped in results]

    ms = bc.per_item_ms
    transform_ms = ms(lambda r: process_row(r, tcfg), rows, repeats)  # includes dropped rows, as the build
    codec_ms, turbo_ms = (v * len(kept) / len(rows) for v in paired_ms(
        lambda r: pil_codec(r.image, tcfg), lambda r: turbo_codec(r.image, tcfg), kept, 2 * repeats))
    match_ms = ms(lambda s: build_worker.match_orientations(matcher, s.record, opts.flip_targets), samples,
                  repeats) * len(samples) / len(rows)
    pack_ms = ms(lambda sr: build_worker.pack(sr[0], *sr[1]), list(zip(samples, results)),
                 repeats) * len(samples) / len(rows)  # the worker's _pack: rpn counts + pack_targets
    chunks = [rows[i:i + opts.chunk_size] for i in range(0, len(rows), opts.chunk_size)]
    job_ms = ms(lambda c: pickle.loads(pickle.dumps(("xywh", c), protocol=pickle.HIGHEST_PROTOCOL)), chunks,
                repeats) * len(chunks) / len(rows)
    outs = [list(zip(samples[i:i + opts.chunk_size], packed[i:i + opts.chunk_size]))
            for i in range(0, len(samples), opts.chunk_size)]
    res_ms = ms(lambda o: pickle.loads(pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL)), outs,
                repeats) * len(outs) / len(rows)
    floor_outs = [[s.image_bytes for s in samples[i:i + opts.chunk_size]] for i in range(0, len(samples), opts.chunk_size)]
    floor_res_ms = ms(lambda o: pickle.loads(pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL)), floor_outs,
                      repeats) * len(floor_outs) / len(rows)
    kept_frac = len(samples) / len(rows)  # per-sample costs are paid for kept rows only
    json_per_sample = ms(lambda s: s.record.to_json(), samples, repeats)
    writer_per_sample = _writer_ms(samples, packed, repeats)  # includes the JSON dumps
    blobs = [b for s, p in zip(samples, packed) for b in (s.image_bytes, p)]
    sha_ms = 1000 * bc.best_of(lambda: hashlib.sha256(b"".join(blobs)).digest(), repeats) / len(rows)
    return Components(len(rows), open_s, source_ms, transform_ms, codec_ms, turbo_ms, match_ms, pack_ms, job_ms, res_ms,
                      floor_res_ms, json_per_sample * kept_frac, (writer_per_sample - json_per_sample) * kept_frac,
                      sha_ms), samples


def paired_ms(fa, fb, items: list, rounds: int) -> tuple[float, float]:
    """Best-of-rounds ms per item of fa and of fb, alternated round by round (a noisy machine hits both alike)."""
    best = [float("inf"), float("inf")]
    for i in range(rounds):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            best[k] = min(best[k], bc.per_item_ms((fa, fb)[k], items, 1))
    return best[0], best[1]


def resize_alternatives(rounds: int = 6) -> str:
    """PIL's bilinear resize (the build's) against torch's antialiased bilinear uint8 resize, on the real
    originals: speed, alternated, and whether the pixels are the same."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)  # one worker's core, as in the build
    src = open_source(f"coco:{bc.require_tiny_coco()}", "train2017")
    images = [decode_image(r.image) for r in src.rows()]
    out_hw = TransformConfig().image_size
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
               for im in images]

    def pil(i: int) -> np.ndarray:
        return np.asarray(resize_image(images[i], out_hw, "stretch"))

    def tv(i: int) -> np.ndarray:
        y = F.interpolate(tensors[i], size=out_hw, mode="bilinear", antialias=True, align_corners=False)
        return y[0].permute(1, 2, 0).numpy()

    idx = list(range(len(images)))
    pil_ms, torch_ms = paired_ms(pil, tv, idx, rounds)
    diffs = [int(np.abs(pil(i).astype(np.int16) - tv(i).astype(np.int16)).max()) for i in idx]
    same = sum(d == 0 for d in diffs)
    return (f"The resize is PIL's: torch's antialiased bilinear resize of uint8 images (`F.interpolate(..., "
            f"antialias=True)`, channels last, one thread) takes {bc.fmt(torch_ms, 3)} ms against PIL's "
            f"{bc.fmt(pil_ms, 3)} on the {len(images)} real originals ({bc.fmt(pil_ms / torch_ms, 1)}x faster), but "
            f"gives PIL's pixels on {same} of {len(images)} images (largest difference {max(diffs)}), so it would "
            "change the shard bytes; and torch's fast uint8 kernel is AVX2-only (other CPUs, ARM among them, take "
            "another code path), while PIL's integer resample gives the same bytes on every machine, which "
            "byte-identical builds across machines and parts rest on.")


def _writer_ms(samples: list[Sample], packed: list[bytes], repeats: int) -> float:
    """ms per sample of the main-process writer: members (JSON) + tar add + close (sha256, fsync, rename)."""
    with tempfile.TemporaryDirectory(dir=bc.BENCH_DATA) as d:
        def write() -> None:
            w = ShardWriter(Path(d) / "bench-000000.tar")
            for s, p in zip(samples, packed):
                w.add(s.key, sample_members(s.image_ext, s.image_bytes, s.record.to_json(), p))
            w.close()
        return 1000 * bc.best_of(write, repeats) / len(samples)


def _runs_table(build: dict, floor: dict, ceiling: dict) -> str:
    """The build and the floor side by side: whole run, start-up, steady state, CPU time."""
    def row(name: str, r: dict, ref: dict) -> list:
        cpu = 1000 * (r["cpu_main_s"] + r["cpu_workers_s"]) / r["rows"]
        ref_cpu = 1000 * (ref["cpu_main_s"] + ref["cpu_workers_s"]) / ref["rows"]
        steady = steady_rows_per_s(r) / steady_rows_per_s(ref)
        return [name, r["rows"], r["samples"], bc.fmt(r["seconds"]), bc.fmt(r["first_s"]),
                bc.fmt(r["rows"] / r["seconds"], 1), bc.fmt((r["rows"] / r["seconds"]) / (ref["rows"] / ref["seconds"]), 3)
                + "x", bc.fmt(steady_rows_per_s(r), 1), bc.fmt(steady, 3) + "x",
                f"{bc.fmt(cpu)} ({bc.fmt(1000 * r['cpu_main_s'] / r['rows'])} + "
                f"{bc.fmt(1000 * r['cpu_workers_s'] / r['rows'])})", bc.fmt(ref_cpu / cpu, 3) + "x"]

    return bc.md_table(
        ["run", "rows", "samples", "wall s", "start-up s (to the first result)", "rows/s (whole run)",
         "whole run vs floor", "rows/s (steady)", "steady vs floor (the goal's)", "CPU ms/row (main + workers)",
         "CPU-time ratio floor/build"],
        [row("build (frcnn_shard.build.build)", build, floor),
         row("PIL codec floor (same pool: PIL decode + resize + encode only)", floor, floor),
         row("codec + matching ceiling (the floor + AnchorMatcher.match of both orientations, nothing else)",
             ceiling, floor)])


def _components_table(c: Components, workers: int, images: int, gap_s: float) -> str:
    """Each component's cost per row and its estimated share of the build - floor gap in wall time."""
    # Worker-side work runs on `workers` processes; main-side work is serial and, on a machine with no
    # spare core, it also takes CPU away from the workers.
    worker_side = [("transform minus codec (box rules, JSON meta, header parse)", c.transform_total - c.codec),
                   ("anchor matching (AnchorMatcher.match, stored + mirrored boxes)", c.match),
                   ("target packing (build.worker.pack: rpn counts + pack_targets, npz + deflate)", c.pack)]
    main_side = [("source reading (datasets streaming -> SourceRow)", c.source),
                 ("IPC: pickle rows out + samples back (both ends)", c.job_pickle + c.result_pickle),
                 ("JSON record dumps (sample_members)", c.json_meta),
                 ("tar writing + sha256 + fsync (ShardWriter)", c.tar_write)]
    rows = []
    for side, items, share in (("worker", worker_side, workers), ("main", main_side, 1)):
        for name, v in items:
            est = v * images / 1000 / share
            rows.append([name, side, bc.fmt(v, 3), bc.fmt(est, 2),
                         bc.fmt(100 * est / gap_s, 0) + "%" if gap_s > 0 else "n/a"])
    rows.append(["(codec: PIL decode + resize + encode, in both runs)", "worker", bc.fmt(c.codec, 3),
                 bc.fmt(c.codec * images / 1000 / workers, 2), "in floor"])
    rows.append(["(the same with libjpeg-turbo decode handed to PIL without a copy; not used)", "worker",
                 bc.fmt(c.turbo_codec, 3), bc.fmt(c.turbo_codec * images / 1000 / workers, 2), ""])
    rows.append(["(sha256 alone, part of tar writing)", "main", bc.fmt(c.sha256, 3),
                 bc.fmt(c.sha256 * images / 1000, 2), ""])
    return bc.md_table(["component (per source row)", "process", "ms/row (1 core)",
                        f"est. wall s for {images} rows", "share of build - floor gap"], rows)


def throughput_section(build: dict, floor: dict, ceiling: dict, c: Components, workers: int, images: int) -> str:
    """Markdown for benchmark 1: the ratios, then the components and what they cost the build's wall time."""
    steady = steady_rows_per_s(build) / steady_rows_per_s(floor)
    ceil = steady_rows_per_s(ceiling) / steady_rows_per_s(floor)
    gap_s = build["seconds"] - build["first_s"] - (floor["seconds"] - floor["first_s"])
    cores = os.cpu_count() or 1
    worker_cpu = c.transform_total + c.match + c.pack
    w_gap = 1000 * (build["cpu_workers_s"] / build["rows"] - floor["cpu_workers_s"] / floor["rows"])
    m_gap = 1000 * (build["cpu_main_s"] / build["rows"] - floor["cpu_main_s"] / floor["rows"])
    main_cpu = c.source + c.job_pickle + c.result_pickle + c.json_meta + c.tar_write
    floor_cpu = c.codec + c.source + c.job_pickle + c.floor_result_pickle
    return "\n".join([
        f"### 1. Build throughput vs the PIL codec floor ({images} rows, {workers} workers, {cores} cores)", "",
        _runs_table(build, floor, ceiling), "",
        f"Steady state (rows after the first chunk's result / time after it) of the build = {bc.fmt(steady, 3)}x the "
        f"PIL codec floor's; goal >= {GOAL_BUILD_VS_FLOOR}x: {bc.goal(steady >= GOAL_BUILD_VS_FLOOR)}. Best of "
        f"{build['repeats']} interleaved runs each (build, floor, build, floor, ...), each in a fresh subprocess. "
        "The CPU-time ratio (user + sys of the main process and the reaped workers) is the less noise-sensitive "
        "number on a shared machine.", "",
        f"The ceiling: no build that stores anchor targets of both orientations can do less than decode, resize, "
        f"encode and match each row, so the ceiling's steady state, {bc.fmt(ceil, 3)}x the floor's here, bounds "
        f"the build's ratio on this machine when the matching runs on the same cores (the build reaches "
        f"{bc.fmt(steady / ceil, 3)}x the ceiling). The goal of >= {GOAL_BUILD_VS_FLOOR}x is out of reach on the CPU "
        f"{'by construction' if ceil < GOAL_BUILD_VS_FLOOR else '(it is not: the ceiling reaches it)'}: it needs "
        f"the matching elsewhere (a GPU, `--device cuda`) or a codec faster than PIL's with PIL's bytes.", "",
        f"Gap in steady state: build - floor = {bc.fmt(gap_s)} s. Components timed one at a time in the parent "
        f"process on the first {c.n} rows (best of repeats); worker-side estimates = ms x rows / workers, "
        "main-side = ms x rows.", "",
        _components_table(c, workers, images, gap_s), "",
        f"The build decodes its source JPEGs with PIL: its resize is PIL's and needs a PIL image. libjpeg-turbo's "
        f"decode handed to PIL without a copy (RGBX, mapped) costs {bc.fmt(c.turbo_codec, 3)} ms/row in the codec "
        f"against PIL's {bc.fmt(c.codec, 3)} (measured alternately, best of rounds; the same shard bytes): in the whole "
        "chain it saves nothing over PIL's own decode, which runs the same libjpeg-turbo underneath. So the "
        "build's codec is the floor's, and the build can only approach the floor: everything else it does is on "
        "top.", "",
        f"CPU per row: workers {bc.fmt(worker_cpu)} ms + main {bc.fmt(main_cpu)} ms = {bc.fmt(worker_cpu + main_cpu)} ms "
        f"(floor: about {bc.fmt(floor_cpu)} ms). On {cores} cores the CPU-bound limit is "
        f"{bc.fmt(1000 * cores / (worker_cpu + main_cpu), 0)} rows/s for the build and "
        f"{bc.fmt(1000 * cores / floor_cpu, 0)} rows/s for the floor (a ratio of "
        f"{bc.fmt(floor_cpu / (worker_cpu + main_cpu), 2)}x); with as many workers as cores the main process "
        f"competes with the workers for CPU. Opening the source (datasets streaming setup + bbox detection "
        f"over the first rows) took {bc.fmt(c.source_open_s)} s in both runs.", "",
        f"Measured in the runs above (rusage), the build's workers spent {bc.fmt(w_gap, 3)} ms/row more CPU than the "
        f"floor's and its main process {bc.fmt(m_gap, 3)} ms/row more, against {bc.fmt(worker_cpu - c.codec, 3)} "
        f"and {bc.fmt(main_cpu - c.source - c.job_pickle - c.floor_result_pickle, 3)} ms/row from the warm, "
        "one-at-a-time component timings: in the build each stage starts with caches the codec has just evicted "
        "(the worker runs each chunk's transforms first, then its matching, to limit this). On a shared machine "
        "both rusage numbers move by +-0.2 ms/row between runs.",
    ])


# ========================================================================== 2. anchor cost


def real_samples() -> list[Sample]:
    """The 50 real images through the default transform (400x400): the samples that keep boxes."""
    src = open_source(f"coco:{bc.require_tiny_coco()}", "train2017")
    tcfg = replace(TransformConfig(), bbox_format=src.bbox_format["decision"])
    return [s for s in (process_row(r, tcfg) for r in src.rows()) if isinstance(s, Sample)]


def _tile(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


def torch_ms(samples: list[Sample], spec: anc.AnchorSpec, cfg: anc.MatchConfig, bsz: int, device: str,
             repeats: int) -> tuple[float, bool]:
    """ms/image of match_batch_torch at one batch size, and whether it agrees with the fast matcher."""
    import torch

    anchors = torch.as_tensor(anc.make_anchors(spec)).to(device)
    n = max(len(samples), bsz)
    n = -(-n // bsz) * bsz
    work = _tile(samples, n)
    batches = [work[i:i + bsz] for i in range(0, n, bsz)]

    def run() -> list:
        out = []
        for b in batches:
            out.extend(anc.match_batch_torch(anchors, [s.record.boxes for s in b], [s.record.crowd_boxes for s in b], cfg,
                                             spec.image_hw, device=device))
        return out

    got = run()  # warm-up (and CUDA context / kernels)
    matcher = anc.AnchorMatcher(spec, cfg)
    agree = all(np.array_equal(g[0], matcher.match(s.record.boxes, s.record.crowd_boxes)[0]) for g, s in zip(got, work))
    return 1000 * bc.best_of(run, 1 if device == "cpu" else repeats) / n, agree  # CPU: slow, one timed run


def anchors_section(device: str, batch_sizes: list[int], repeats: int) -> str:
    """Markdown for benchmark 2."""
    import torch

    samples = real_samples()
    opts = fb.BuildOptions()
    spec, cfg = fb.anchor_spec(opts), opts.matching
    anchors = anc.make_anchors(spec)
    matcher = anc.AnchorMatcher(spec, cfg)
    fast = bc.per_item_ms(lambda s: matcher.match(s.record.boxes, s.record.crowd_boxes), samples, max(repeats, 5))
    ref = bc.per_item_ms(lambda s: anc.match_reference(anchors, s.record.boxes, s.record.crowd_boxes, cfg, spec.image_hw),
                         samples, repeats)
    agree_ref = all(np.array_equal(matcher.match(s.record.boxes, s.record.crowd_boxes)[0],
                                   anc.match_reference(anchors, s.record.boxes, s.record.crowd_boxes, cfg, spec.image_hw)[0])
                    for s in samples)
    pack = bc.per_item_ms(lambda lm: pack_targets(*lm), [matcher.match(s.record.boxes, s.record.crowd_boxes) for s in samples],
                          max(repeats, 5))
    k = [len(s.record.boxes) for s in samples]
    rows = [["AnchorMatcher.match (fast CPU, numpy, 1 thread)", "1", bc.fmt(fast, 3), bc.fmt(ref / fast, 1) + "x",
             "yes" if agree_ref else "**NO**"],
            ["match_reference (brute force float64)", "1", bc.fmt(ref, 3), "1x", "-"]]
    cpu_threads = torch.get_num_threads()
    for b in batch_sizes:
        if device == "cpu" and b > 64:
            continue
        t, agree = torch_ms(samples, spec, cfg, b, device, repeats)
        rows.append([f"match_batch_torch ({device}" + (f", {cpu_threads} threads)" if device == "cpu" else ")"),
                     str(b), bc.fmt(t, 3), bc.fmt(ref / t, 1) + "x", "yes" if agree else "**NO**"])
    table = bc.md_table(["matcher", "batch", "ms/image", "speed-up vs reference", "labels equal fast matcher"], rows)
    ok_ms, ok_x = fast <= GOAL_MATCH_MS, ref / fast >= GOAL_MATCH_SPEEDUP
    gpu_note = (
        "GPU: this run had no GPU (`torch.cuda.is_available()` is False). Placeholder: run "
        "`python scripts/bench_build.py --only anchors --device cuda --batch-sizes 1,2,4,8,16,32,64,128,256` "
        "on a CUDA machine to fill in match_batch_torch on the GPU."
        if device == "cpu" else f"GPU: {torch.cuda.get_device_name(0)}."
    )
    return "\n".join([
        f"### 2. Anchor targets per image (preset {opts.anchor_preset}, {spec.image_hw[0]}x{spec.image_hw[1]}, "
        f"{len(anchors)} anchors, {len(samples)} real images, {min(k)}-{max(k)} boxes, mean {np.mean(k):.1f})", "",
        table, "",
        f"Goals: fast CPU matching <= {GOAL_MATCH_MS} ms/image: {bc.goal(ok_ms)} ({bc.fmt(fast, 3)} ms); "
        f">= {GOAL_MATCH_SPEEDUP:.0f}x the reference: {bc.goal(ok_x)} ({bc.fmt(ref / fast, 1)}x). "
        f"Packing the targets (pack_targets) adds {bc.fmt(pack, 3)} ms/image. These are per orientation: a build "
        "with flip targets (the default) matches and packs each image's stored and mirrored boxes. "
        "Batched torch pads every image to the batch's largest box count and computes the full float32 IoU "
        "matrix (anchors x boxes), then re-decides near-ties in float64; on a CPU it cannot beat the fast "
        "matcher, which only scores the (anchor, box) pairs whose IoU can reach 0.3, in float64 with the "
        "reference's own operations.",
        "", gpu_note,
    ])


# ========================================================================= 4. size and RSS


def _on_disk(nbytes: int) -> int:
    """A tar member's bytes on disk: its 512-byte header and its data padded to 512."""
    return 512 + -(-nbytes // 512) * 512


def shard_bytes(shard_dir: Path) -> dict:
    """Bytes of the shards split by member kind, with each member's tar header + padding.

    ``stored_only``: the targets member as a --no-flip-targets build writes it (the stored orientation
    alone, repacked), to tell what the mirrored orientation adds.
    """
    sizes = {"jpg": 0, "png": 0, "json": 0, TARGETS_EXT: 0}
    onDisk = dict.fromkeys(sizes, 0)
    stored_only = {"payload": 0, "on_disk": 0}
    n = 0
    tars = sorted(shard_dir.glob("*.tar"))
    num_anchors = read_manifest(shard_dir)["anchors"]["count"]
    for p in tars:
        for _, members in iter_shard(p):
            n += 1
            for ext, data in members.items():
                sizes[ext] = sizes.get(ext, 0) + len(data)
                onDisk[ext] = onDisk.get(ext, 0) + _on_disk(len(data))
            one = pack_targets(*unpack_all_targets(members[TARGETS_EXT], num_anchors)[0].dense(num_anchors))
            stored_only["payload"] += len(one)
            stored_only["on_disk"] += _on_disk(len(one))
    return {"samples": n, "total": sum(p.stat().st_size for p in tars), "payload": sizes, "on_disk": onDisk,
            "stored_only": stored_only}


def size_section(sizes: dict, runs: list[tuple[int, dict]]) -> str:
    """Markdown for benchmark 4."""
    n, total = sizes["samples"], sizes["total"]
    img = sizes["payload"]["jpg"] + sizes["payload"]["png"]
    rows = []
    for ext, label in (("jpg", "image (.jpg)"), ("json", "record (.json)"), (TARGETS_EXT, "anchor targets (.rpn.npz)")):
        pay, disk = sizes["payload"].get(ext, 0), sizes["on_disk"].get(ext, 0)
        rows.append([label, bc.fmt(pay / n, 0), bc.fmt(100 * pay / total, 2) + "%", bc.fmt(disk / n, 0),
                     bc.fmt(100 * disk / total, 2) + "%"])
    other = total - sum(sizes["on_disk"].values())
    rows.append(["tar end-of-archive blocks", "-", "-", bc.fmt(other / n, 0), bc.fmt(100 * other / total, 2) + "%"])
    rows.append(["**shard total**", "-", "-", bc.fmt(total / n, 0), "100%"])
    share = sizes["payload"][TARGETS_EXT] / total
    share_disk = sizes["on_disk"][TARGETS_EXT] / total
    payload = sum(sizes["payload"].values())  # the sum of the samples' member bytes
    both, one = sizes["payload"][TARGETS_EXT], sizes["stored_only"]["payload"]
    flip_line = (
        f"Flip targets (both orientations in the one member, the default): {bc.fmt(both / n, 0)} B/image against "
        f"{bc.fmt(one / n, 0)} B for the stored orientation alone (--no-flip-targets), so the mirrored orientation "
        f"adds {bc.fmt((both - one) / n, 0)} B/image ({bc.fmt(100 * (both - one) / payload, 2)}% of the payload). "
        f"Both orientations together: {bc.fmt(100 * both / payload, 2)}% of the payload bytes (the sum of the "
        f"samples' member bytes; goal <= {100 * GOAL_FLIP_SHARE:.1f}%: {bc.goal(both <= GOAL_FLIP_SHARE * payload)}), "
        f"{bc.fmt(100 * share_disk, 2)}% of the shard bytes on disk against "
        f"{bc.fmt(100 * sizes['stored_only']['on_disk'] / total, 2)}% for one orientation.")
    size_table = bc.md_table(["member", "payload B/image", "payload share", "on disk B/image (+header, padding)",
                              "on-disk share"], rows)
    mem_rows = []
    for images, r in runs:
        t = r["tree"]
        mem_rows.append([images, r["samples"], bc.fmt(r["rows"] / r["seconds"], 1),
                         bc.fmt(r["maxrss_self_kib"] / 1024, 0), bc.fmt(r["maxrss_children_kib"] / 1024, 0),
                         bc.fmt(t.peak_rss_kib / 1024, 0), bc.fmt(t.peak_pss_kib / 1024, 0), t.max_procs,
                         bc.goal(t.peak_pss_kib * 1024 < GOAL_RSS_BYTES)])
    mem_table = bc.md_table(["rows", "samples", "rows/s", "main VmHWM MiB", "largest worker VmHWM MiB",
                             "peak tree Rss MiB (sampled)", "peak tree Pss MiB (sampled)", "processes",
                             "goal < 2 GiB"], mem_rows)
    flat = ""
    if len(runs) >= 2:
        (i0, r0), (i1, r1) = runs[0], runs[-1]
        growth = r1["tree"].peak_pss_kib / max(1, r0["tree"].peak_pss_kib)
        flat = (f"Peak Pss at {i1} rows / at {i0} rows = {bc.fmt(growth, 2)}x for {i1 / i0:.0f}x the rows: "
                f"{'flat' if growth < 1.15 else '**not flat**'}.")
    return "\n".join([
        "### 4. Size and build memory", "",
        f"Shards of the throughput run ({n} samples, 400x400 JPEG q90):", "", size_table, "",
        f"Anchor targets' share of shard bytes: {bc.fmt(100 * share, 2)}% of payload bytes, "
        f"{bc.fmt(100 * share_disk, 2)}% counting their tar header and padding; goal <= 2%: "
        f"{bc.goal(share_disk <= GOAL_TARGET_SHARE)}. Shard bytes / image bytes = {bc.fmt(total / img, 3)}x.",
        "", flip_line,
        "", "Build peak memory, each build in a fresh subprocess (main + workers):", "", mem_table, "",
        "Tree Rss double-counts pages the fork()ed workers share with the parent; Pss splits them and is the "
        "real footprint. " + flat,
    ])


# ============================================================================== 5. start-up

# A 4-image build in a fresh interpreter, each phase timed: the imports the command needs, then build()
# with its device resolution and source opening wrapped (build's resolve_device and open_source seams) and the
# first progress call marking the first written row.
_STARTUP_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import frcnn_shard.cli
from frcnn_shard import build as fb
marks = {"imports": time.perf_counter()}
def timed(name, fn):
    def wrapper(*a, **k):
        marks[name + "_start"] = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            marks[name] = time.perf_counter()
    return wrapper
from frcnn_shard.sources import open_source
source, split, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
first = []
res = fb.build(fb.BuildOptions(source=source, split=split, out=out, workers=workers, max_rows=4, overwrite=True),
               progress=lambda c: first or first.append(time.perf_counter()),
               resolve_device=timed("device", fb.resolve_device), open_source=timed("source", open_source))
marks["first_row"], marks["end"] = first[0], time.perf_counter()
print("RESULT " + json.dumps({"t0": t0, "marks": marks, "device": res.device, "samples": res.samples,
                              "torch": "torch" in sys.modules, "datasets": "datasets" in sys.modules}))
"""
STARTUP_PHASES = [  # (label, from mark, to mark)
    ("imports (frcnn_shard.cli, frcnn_shard.build)", "t0", "imports"),
    ("until device resolution (option checks)", "imports", "device_start"),
    ("device resolution (device=auto)", "device_start", "device"),
    ("pool start (fork + worker init) and anchor spec", "device", "source_start"),
    ("source open (incl. its imports, bbox-format detection)", "source_start", "source"),
    ("first row (first chunk through a worker, written)", "source", "first_row"),
    ("the other 3 rows, shard + manifest published, pool shut down", "first_row", "end"),
]


def startup_run(source: str, split: str, workers: int, cli_env: bool) -> dict:
    """One 4-image build in a fresh interpreter: phase seconds, total in-process, interpreter wall.

    ``cli_env``: with the environment the CLI sets for a build (USE_TORCH=0 unless set), else as a
    library call from a process that has not set it.
    """
    env = {k: v for k, v in os.environ.items() if k != "USE_TORCH"}
    if cli_env:
        env["USE_TORCH"] = os.environ.get("USE_TORCH", "0")
    with tempfile.TemporaryDirectory(dir=bc.BENCH_DATA) as d:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _STARTUP_CHILD, source, split, d, str(workers)],
                             capture_output=True, text=True, check=True, cwd=bc.ROOT, env=env).stdout
        wall = time.perf_counter() - t
    r = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
    m = {"t0": r["t0"], **r["marks"]}
    phases = {label: m[b] - m[a] if a in m and b in m else float("nan") for label, a, b in STARTUP_PHASES}
    return {"wall": wall, "in_process": m["end"] - m["t0"], "phases": phases, "device": r["device"],
            "torch": r["torch"], "datasets": r["datasets"]}


def cli_run(source: str, split: str, workers: int) -> float:
    """Wall seconds of `frcnn-shard build ... --max-rows 4` in a fresh interpreter."""
    with tempfile.TemporaryDirectory(dir=bc.BENCH_DATA) as d:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "frcnn_shard.cli", "build", "--source", source, "--split", split,
                        "--out", d, "--max-rows", "4", "--workers", str(workers)],
                       capture_output=True, check=True, cwd=bc.ROOT)
        return time.perf_counter() - t


def startup_section(hub: Path, workers: int, repeats: int) -> str:
    """Markdown for benchmark 5: a 4-image build's fixed cost, phase by phase, for two kinds of source."""
    coco = f"coco:{bc.require_tiny_coco()}"
    sources = [("Hub-layout folder", str(hub), "train", True), ("coco: folder", coco, "train2017", True),
               ("Hub-layout folder, library call (USE_TORCH unset)", str(hub), "train", False)]
    python_s = min(bc.best_of(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), 1)
                   for _ in range(repeats))
    best, cli = {}, {}
    for attempt in range(repeats):
        for name, src, split, cli_env in sources:
            bc.log(f"start-up: {name} (round {attempt + 1} of {repeats})")
            r = startup_run(src, split, workers, cli_env)
            best[name] = min(best.get(name, r), r, key=lambda x: x["in_process"])
            if cli_env:
                cli[name] = min(cli.get(name, float("inf")), cli_run(src, split, workers))
    names = [n for n, *_ in sources]
    rows = [[label] + [bc.fmt(best[n]["phases"][label], 3) for n in names] for label, _, _ in STARTUP_PHASES]
    rows.append(["**in-process total** (from the first import)"] + [bc.fmt(best[n]["in_process"], 3) for n in names])
    rows.append(["interpreter start + exit (the rest of the subprocess wall)"]
                + [bc.fmt(best[n]["wall"] - best[n]["in_process"], 3) for n in names])
    rows.append([f"**CLI end to end** (`frcnn-shard build --max-rows 4`), goal <= {GOAL_STARTUP_S:.0f} s"]
                + [f"{bc.fmt(cli[n], 3)} {bc.goal(cli[n] <= GOAL_STARTUP_S)}" if n in cli else "-" for n in names])
    rows.append(["imported torch / datasets"] + [f"{'yes' if best[n]['torch'] else 'no'} / "
                                                 f"{'yes' if best[n]['datasets'] else 'no'}" for n in names])
    table = bc.md_table(["phase of a 4-image build (s, best of rounds)"] + names, rows)
    return "\n".join([
        f"### 5. Start-up: a 4-image build ({workers} workers, device=auto, best of {repeats} rounds)", "",
        table, "",
        f"An empty interpreter (`python -c pass`) takes {bc.fmt(python_s, 3)} s here. Device resolution with "
        f"device=auto resolved to `{best[sources[0][0]]['device']}`: without a GPU device node it no longer imports "
        "torch, and the CLI keeps `datasets` from importing it for a Hub source (USE_TORCH=0 unless set: "
        "`datasets` imports torch when it builds a streaming dataset, only to offer torch-formatted rows; the "
        "last column shows what a library call pays without that). What is left is bound by the imports "
        "(numpy, PIL, click: the CLI's own), the source (a Hub-layout folder imports `datasets`, sets up its "
        "streaming and reads the first rows to decide the bbox convention; a coco: folder reads its "
        "annotations JSON) and one chunk through a worker.",
    ])


# ================================================================================= profiles


def profile_section(source: Path, n: int) -> str:
    """cProfile tops: the worker side (_process_chunk in this process) and the main side of a real build."""
    src = open_source(str(source), "train")
    rows = [r for _, r in zip(range(n), src.rows())]
    opts = fb.BuildOptions()
    build_worker.init_worker(opts.transform, fb.anchor_spec(opts), opts.matching, True, opts.flip_targets,
                             pool_worker=False)
    chunks = [rows[i:i + opts.chunk_size] for i in range(0, len(rows), opts.chunk_size)]
    prof = cProfile.Profile()
    prof.enable()
    for c in chunks:
        build_worker.process_chunk(("xywh", c))
    prof.disable()
    worker = _top(prof, 14)
    with tempfile.TemporaryDirectory(dir=bc.BENCH_DATA) as d:
        prof = cProfile.Profile()
        prof.enable()
        fb.build(fb.BuildOptions(source=str(source), out=d, workers=os.cpu_count() or 1, device="cpu",
                                 rows_per_shard=bc.SAMPLES_PER_SHARD, max_rows=n))
        prof.disable()
    main = _top(prof, 14)
    return "\n".join([
        "### Profiles (cProfile, tottime)", "",
        f"Worker side: `_process_chunk` over {n} rows in one process:", "", "```", worker, "```", "",
        f"Main side of a real build of {n} samples (workers excluded):", "", "```", main, "```",
    ])


def _top(prof: cProfile.Profile, n: int) -> str:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(n)
    lines = [l for l in buf.getvalue().splitlines() if l.strip()]
    start = next(i for i, l in enumerate(lines) if l.lstrip().startswith("ncalls"))
    head = [l for l in lines[:start] if "function calls" in l]
    return "\n".join(head + lines[start:])


# ===================================================================================== main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="rows in the throughput run (default 2000)")
    p.add_argument("--rss-images", default="2000,10000",
                   help="comma-separated row counts for the peak-memory builds (default 2000,10000)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="build workers (default: all cores)")
    p.add_argument("--build-repeats", type=int, default=2, help="interleaved build/floor runs (best kept)")
    p.add_argument("--component-rows", type=int, default=200, help="rows for the per-component timings")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device for match_batch_torch")
    p.add_argument("--batch-sizes", default=None,
                   help="match_batch_torch batch sizes (default 1,8,32 on cpu; 1,2,4,...,256 on cuda)")
    p.add_argument("--batch-size", type=int, default=None, help="a single match_batch_torch batch size")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each micro-timing (best is kept)")
    p.add_argument("--only", default="throughput,anchors,size,startup",
                   help="comma-separated subset of throughput,anchors,size,startup")
    p.add_argument("--profile", action="store_true", help="append cProfile tops of worker and main side")
    p.add_argument("--out-md", default=str(bc.BENCH_MD), help="markdown file whose 'build' section is replaced")
    p.add_argument("--no-md", action="store_true", help="print only; leave --out-md alone")
    p.add_argument("--child", choices=("build", "floor", "ceiling"), help=argparse.SUPPRESS)
    p.add_argument("--child-source", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def batch_sizes(args: argparse.Namespace) -> list[int]:
    if args.batch_size:
        return [args.batch_size]
    if args.batch_sizes:
        return [int(v) for v in args.batch_sizes.split(",")]
    return [1, 2, 4, 8, 16, 32, 64, 128, 256] if args.device == "cuda" else [1, 8, 32]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.child_source, args.child_out, args.workers)
        return
    only = set(args.only.split(","))
    bc.BENCH_DATA.mkdir(exist_ok=True)
    parts = [bc.report_header("Build (scripts/bench_build.py)")]
    first_build = None
    if "throughput" in only or "size" in only:
        src = bc.hub_folder(args.images)
        out = bc.BENCH_DATA / "build_run"
        builds, floors, ceilings = [], [], []
        for i in range(args.build_repeats if "throughput" in only else 1):
            bc.log(f"build of {args.images} rows with {args.workers} workers (subprocess, run {i + 1})")
            builds.append(in_subprocess("build", src, out, args.workers))
            if "throughput" in only:
                bc.log(f"codec floor (subprocess, run {i + 1})")
                floors.append(in_subprocess("floor", src, out, args.workers))
                bc.log(f"codec + matching ceiling (subprocess, run {i + 1})")
                ceilings.append(in_subprocess("ceiling", src, out, args.workers))
        first_build = max(builds, key=steady_rows_per_s)
        first_build["repeats"] = len(builds)
        if "throughput" in only:
            floor = max(floors, key=steady_rows_per_s)
            ceiling = max(ceilings, key=steady_rows_per_s)
            bc.log("component timings")
            comps, _ = measure_components(src, args.component_rows, args.repeats)
            parts.append(throughput_section(first_build, floor, ceiling, comps, args.workers, args.images))
            parts.append(resize_alternatives())
    if "anchors" in only:
        bc.log(f"anchor matching ({args.device})")
        parts.append(anchors_section(args.device, batch_sizes(args), args.repeats))
    if "size" in only:
        sizes = shard_bytes(Path(first_build["out_dir"]))
        runs = [(args.images, first_build)]
        for n in (int(v) for v in args.rss_images.split(",")):
            if n == args.images:
                continue
            bc.log(f"peak-memory build of {n} rows (subprocess)")
            runs.append((n, in_subprocess("build", bc.hub_folder(n), bc.BENCH_DATA / "build_rss", args.workers)))
        runs.sort(key=lambda r: r[0])
        parts.append(size_section(sizes, runs))
    if "startup" in only:
        parts.append(startup_section(bc.hub_folder(args.images), args.workers, args.repeats))
    if args.profile:
        bc.log("profiles")
        parts.append(profile_section(bc.hub_folder(args.images), args.component_rows))
    report = "\n\n".join(parts) + "\n"
    bc.publish("build", report, args.out_md, args.no_md)


if __name__ == "__main__":
    main()
