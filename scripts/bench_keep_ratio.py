"""Benchmarks of --resize keep-ratio (torchvision's 800 / 1333 recipe), issue 23:

1. build: images/s of a keep-ratio build (torchvision-fpn anchors, on the CPU) against the PIL codec floor at
   the same sizes (decode, bilinear resize to the stored size, JPEG encode: what any build must do), both
   with ``--workers`` processes, in the same run;
2. matching: ms/image of the CPU matcher over canvases of about 200k-450k anchors (each image its canvas);
3. payload: the targets' (rpn.npz) share of the shard bytes (goal <= 3 %);
4. padding: the share of canvas pixels that are padding, ours (a canvas per sample: the size rounded up to
   32) against torchvision's own grouping (references/detection: GroupedBatchSampler over aspect-ratio bins,
   k = 3, each batch padded to its largest image rounded up to 32) at batch 2, 4 and 8 (goal: no more).
5. loader: images/s of make_loader over the keep-ratio shards against the PIL delivered-decode floor at the same
   sizes (tar read, decode, into a zeroed canvas), the same worker count.

Input: tiny_coco repeated to ``--images`` (a Hub-layout folder under bench_data/, as the other benchmarks).
Run:  python scripts/bench_keep_ratio.py [--images 200] [--workers 2] [--no-md]
"""
from __future__ import annotations

import argparse
import bisect
import io
import multiprocessing
import os
import shutil
import time

import numpy as np
import torch

from bench_common import (BENCH_DATA, BENCH_MD, best_of, fmt, goal, hub_folder, log, md_table, publish, report_header,
                          repeated_hub_rows)
from frcnn_shard import anchors as anc
from frcnn_shard.build import BuildOptions, anchor_spec, build
from frcnn_shard.format.canvas import canvas_of, keep_ratio_size
from frcnn_shard.format.members import TARGETS_EXT, group_by_key
from frcnn_shard.storage.tar import tar_members
from frcnn_shard.transform import TransformConfig

MIN_SIZE, MAX_SIZE = 800, 1333


def _floor_one(data: bytes) -> int:
    """The codec floor of one image: decode, resize to its keep-ratio size (bilinear), encode JPEG q90."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    h, w = keep_ratio_size((img.height, img.width), MIN_SIZE, MAX_SIZE)
    out = io.BytesIO()
    img.resize((w, h), Image.Resampling.BILINEAR).save(out, "JPEG", quality=90)
    return out.tell()


def bench_build(n: int, workers: int, repeats: int) -> tuple[list, str]:
    """(rows, split dir): keep-ratio build images/s against the codec floor at the same sizes."""
    src = hub_folder(n)
    images = [r["image"]["bytes"] for r in repeated_hub_rows(n)]
    out = BENCH_DATA / f"kr_{n}"
    tcfg = TransformConfig(resize="keep-ratio", min_size=MIN_SIZE, max_size=MAX_SIZE)

    def run_build() -> None:
        shutil.rmtree(out, ignore_errors=True)
        build(BuildOptions(source=str(src), split="train", out=str(out), transform=tcfg, anchor_preset="torchvision-fpn",
                           workers=workers, device="cpu", rows_per_shard=250))

    def run_floor() -> None:
        if workers > 0:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                pool.map(_floor_one, images, chunksize=8)
        else:
            [_floor_one(d) for d in images]

    log(f"keep-ratio build of {n} images, {workers} workers")
    t_build = best_of(run_build, repeats)
    log("codec floor")
    t_floor = best_of(run_floor, repeats)
    rows = [["keep-ratio build (torchvision-fpn, CPU matching)", fmt(n / t_build, 1), fmt(1000 * t_build / n, 1),
             fmt(t_floor / t_build)],
            ["PIL codec floor (decode, resize, encode)", fmt(n / t_floor, 1), fmt(1000 * t_floor / n, 1), "1.00"]]
    return rows, str(out / "train")


class DecodeFloor(torch.utils.data.IterableDataset):
    """The least a loader of these shards does: whole shards per worker, the tar read, each stored content decoded
    with PIL into a zeroed uint8 canvas of its own size (what a batch of that canvas holds), handed over in
    lists of ``batch`` (no grouping, no targets)."""

    def __init__(self, tars: list[str], batch: int):
        super().__init__()
        self.tars, self.batch = tars, batch

    def __iter__(self):
        from PIL import Image

        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        out = []
        for path in self.tars[wid::nw]:
            with open(path, "rb") as f:
                for raw in group_by_key(tar_members(f)):
                    img = np.asarray(Image.open(io.BytesIO(raw.members["jpg"])).convert("RGB"))
                    h, w = img.shape[:2]
                    canvas = torch.zeros((3, *canvas_of((h, w))), dtype=torch.uint8)
                    canvas[:, :h, :w] = torch.from_numpy(img).permute(2, 0, 1)
                    out.append(canvas)
                    if len(out) == self.batch:
                        yield out
                        out = []
        if out:
            yield out


def bench_loader(split_dir: str, workers: int, batch: int, rounds: int) -> list:
    """images/s of make_loader on keep-ratio shards (uint8 batches of one canvas) against the PIL delivered-decode
    floor at the same sizes, the same worker count."""
    from frcnn_shard.loader import make_loader
    from frcnn_shard.storage import read_manifest

    man = read_manifest(split_dir)
    tars = [os.path.join(split_dir, e.name) for e in man.shards]
    loader = make_loader(split_dir, batch, num_workers=workers, normalize=False)
    floor = torch.utils.data.DataLoader(DecodeFloor(tars, batch), batch_size=None, num_workers=workers)

    def epoch(dl) -> None:
        for _ in dl:
            pass

    t_loader = best_of(lambda: epoch(loader), rounds)
    t_floor = best_of(lambda: epoch(floor), rounds)
    n = man.samples
    return [["make_loader (uint8, batches of one canvas, targets, hflip off)", fmt(n / t_loader, 1),
             fmt(t_floor / t_loader)],
            ["PIL delivered-decode floor (tar read, decode, into a zeroed canvas)", fmt(n / t_floor, 1), "1.00"]]


def bench_matching(split_dir: str, limit: int) -> list:
    """ms/image of the CPU matcher, each sample over its own canvas's anchors."""
    from frcnn_shard.storage import read_manifest
    from frcnn_shard.coco_eval import iter_records

    man = read_manifest(split_dir)
    spec = anc.AnchorSpec.from_dict(man.anchors["spec"])
    cfg = anc.MatchConfig.from_dict(man.anchors["matching"])
    records = list(iter_records(split_dir))[:limit]
    matchers = {tuple(r.size): anc.AnchorMatcher(spec.at(tuple(r.size)), cfg) for r in records}
    counts = [man.anchor_count(tuple(r.size)) for r in records]
    t = best_of(lambda: [matchers[tuple(r.size)].match(r.boxes, r.crowd_boxes) for r in records], 3)
    return [["match (fast CPU matcher, stored orientation)", f"{min(counts):,}..{max(counts):,} "
             f"(mean {int(np.mean(counts)):,})", fmt(1000 * t / len(records), 1)]]


def bench_payload(split_dir: str) -> tuple[list, bool]:
    """The targets' share of the shard bytes."""
    import tarfile

    from frcnn_shard.storage import read_manifest

    man = read_manifest(split_dir)
    total = targets = 0
    for entry in man.shards:
        total += entry.bytes
        with tarfile.open(os.path.join(split_dir, entry.name)) as tar:
            targets += sum(m.size for m in tar.getmembers() if m.name.endswith("." + TARGETS_EXT))
    share = targets / total
    return [["rpn.npz (both orientations)", f"{targets / man.samples:,.0f} B/sample", f"{100 * share:.2f} %",
             goal(share <= 0.03)]], share <= 0.03


def torchvision_padding(sizes: list[tuple[int, int]], batch: int, seed: int, k: int = 3) -> tuple[int, int]:
    """(padding pixels, canvas pixels) of one epoch of torchvision's GroupedBatchSampler (RandomSampler order,
    aspect-ratio bins 2 ** linspace(-1, 1, 2k + 1), leftover batches filled from their group's first samples,
    len = N // batch), each batch padded to its largest height and width rounded up to 32."""
    bins = (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist()
    groups = [bisect.bisect_right(bins, h / w) for h, w in sizes]
    order = np.random.default_rng(seed).permutation(len(sizes)).tolist()
    buffers: dict[int, list[int]] = {}
    seen: dict[int, list[int]] = {}
    batches = []
    for i in order:
        buffers.setdefault(groups[i], []).append(i)
        seen.setdefault(groups[i], []).append(i)
        if len(buffers[groups[i]]) == batch:
            batches.append(buffers.pop(groups[i]))
    for g, buf in sorted(buffers.items(), key=lambda x: len(x[1]), reverse=True):
        if len(batches) >= len(sizes) // batch:
            break
        batches.append(buf + seen[g][: batch - len(buf)])
    pad = total = 0
    for b in batches:
        ch, cw = canvas_of((max(sizes[i][0] for i in b), max(sizes[i][1] for i in b)))
        total += ch * cw * len(b)
        pad += ch * cw * len(b) - sum(sizes[i][0] * sizes[i][1] for i in b)
    return pad, total


def bench_padding(seeds: int) -> tuple[list, bool]:
    """Padding share: ours (a canvas per sample) against torchvision's grouping, on tiny_coco's real sizes."""
    import json

    from bench_common import require_tiny_coco

    data = json.loads((require_tiny_coco() / "annotations" / "instances_train2017.json").read_text())
    sizes = [keep_ratio_size((im["height"], im["width"]), MIN_SIZE, MAX_SIZE) for im in data["images"]]
    ours_total = sum(canvas_of(s)[0] * canvas_of(s)[1] for s in sizes)
    ours = (ours_total - sum(h * w for h, w in sizes)) / ours_total
    rows, ok = [], True
    for batch in (2, 4, 8):
        runs = [torchvision_padding(sizes, batch, seed) for seed in range(seeds)]
        theirs = sum(p for p, _ in runs) / sum(t for _, t in runs)
        ok &= ours <= theirs
        rows.append([batch, f"{100 * ours:.2f} %", f"{100 * theirs:.2f} %", goal(ours <= theirs)])
    return rows, ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--match-images", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="loader epochs timed (best of)")
    p.add_argument("--seeds", type=int, default=20, help="epochs of torchvision's sampler averaged for the padding")
    p.add_argument("--out-md", default=str(BENCH_MD))
    p.add_argument("--no-md", action="store_true")
    a = p.parse_args()
    t0 = time.perf_counter()
    build_rows, split_dir = bench_build(a.images, a.workers, a.repeats)
    match_rows = bench_matching(split_dir, a.match_images)
    payload_rows, _ = bench_payload(split_dir)
    padding_rows, _ = bench_padding(a.seeds)
    log("loader against the delivered-decode floor")
    loader_rows = bench_loader(split_dir, a.workers, a.batch_size, a.rounds)
    spec = anchor_spec(BuildOptions(anchor_preset="torchvision-fpn", transform=TransformConfig(resize="keep-ratio")))
    text = "\n".join([
        report_header("Keep-ratio builds (800 / 1333, a canvas per sample): scripts/bench_keep_ratio.py"),
        f"Input: tiny_coco repeated to {a.images} images; torchvision-fpn anchors ({spec.num_anchors():,} at the "
        f"largest canvas {spec.image_hw[0]}x{spec.image_hw[1]}); {a.workers} worker processes for the build and the "
        "floor alike.\n",
        "**Build** against the codec floor at the same sizes (the build's speed as a share of the floor's: "
        "1.00 would be a build as fast as decoding, resizing and encoding alone):\n",
        md_table(["path", "images/s", "ms/image", "speed / floor's"], build_rows), "",
        "**Matching** on the CPU, one process, each sample over its own canvas:\n",
        md_table(["step", "anchors per image", "ms/image"], match_rows), "",
        "**Targets' share of the payload** (goal <= 3 %):\n",
        md_table(["member", "size", "share of shard bytes", "goal"], payload_rows), "",
        f"**Padding**: the share of canvas pixels that are padding on tiny_coco's 50 real sizes; torchvision's "
        f"grouping averaged over {a.seeds} epochs (goal: ours no more):\n",
        md_table(["batch", "ours (canvas per sample)", "torchvision (aspect-ratio groups, k=3)", "goal"], padding_rows),
        "", f"**Loader** at 800/1333, {a.workers} workers, batch {a.batch_size}, one epoch of the build above (best of "
        f"{a.rounds}), against the PIL delivered-decode floor at the same sizes and workers:\n",
        md_table(["path", "images/s", "speed / floor's"], loader_rows),
        "", f"Total run time {time.perf_counter() - t0:.0f} s.",
    ])
    publish("keep_ratio", text, a.out_md, a.no_md)


if __name__ == "__main__":
    main()
