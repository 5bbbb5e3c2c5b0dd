#!/usr/bin/env python
"""GPU path benchmark (issue 16): CUDA matching, build --device cuda, the loader into the GPU, nvjpeg.

On tiny_coco repeated to ``--rows`` rows (a COCO-layout folder of hard links, written once under the
git-ignored bench_data/, so no `datasets` is needed), all in one run on one machine:

1. ``build --device cuda`` against ``--device cpu`` (``--workers`` each): wall time, and the sha256 of
   every shard, which must be identical;
2. ``match_batch_torch`` on ``--device`` at each batch size against the fast CPU matcher
   (``AnchorMatcher``, one core) on the same images: images/s (goal on cuda: >= 20,000 at batch 256,
   default preset);
3. the loader into the device: uint8 batches + ``normalize_batch`` on the device, against float32
   batches normalised in the workers and then moved;
4. the stored JPEGs decoded on the device (torchvision.io.decode_jpeg, nvjpeg on cuda) against the CPU
   decode the loader uses (codec.py: PIL's exact pixels): images/s and the pixel difference.

Run:  python scripts/bench_gpu.py                       # on a CUDA machine (scripts/gpu_check.sh runs it)
      python scripts/bench_gpu.py --device cpu --rows 200 --batch-sizes 1,8 --no-md   # a dry run here
The markdown report goes to stdout and replaces the "gpu" section of --out-md (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

from frcnn_shard import anchors as anc  # noqa: E402
from frcnn_shard.build import BuildOptions, build  # noqa: E402
from frcnn_shard.format.image import decode_stored_image  # noqa: E402
from frcnn_shard.format.record import Record  # noqa: E402
from frcnn_shard.loader import make_loader, normalize_batch  # noqa: E402
from frcnn_shard.shards import iter_shard, read_manifest  # noqa: E402

GOAL_MATCH_IPS = 20_000  # images/s of match_batch_torch at batch 256 on the GPU, default preset
IMAGE_HW = (400, 400)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def coco_folder(n_rows: int) -> Path:
    """tiny_coco repeated to ``n_rows`` images as a COCO folder (train2017 + annotations), built once."""
    tiny = bc.require_tiny_coco()
    out = bc.BENCH_DATA / f"coco_{n_rows}"
    ann_path = out / "annotations" / "instances_train2017.json"
    if ann_path.exists():
        return out
    d = json.loads((tiny / "annotations" / "instances_train2017.json").read_text())
    (out / "train2017").mkdir(parents=True, exist_ok=True)
    ann_path.parent.mkdir(exist_ok=True)
    by_image: dict[int, list] = {}
    for a in d["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    images, anns = [], []
    for i in range(n_rows):
        im = d["images"][i % len(d["images"])]
        rep, new_id = i // len(d["images"]), 10_000_000 * (i // len(d["images"]) + 1) + im["id"]
        name = f"{rep:04d}_{im['file_name']}"
        dst = out / "train2017" / name
        if not dst.exists():
            try:
                os.link(tiny / "train2017" / im["file_name"], dst)
            except OSError:
                shutil.copyfile(tiny / "train2017" / im["file_name"], dst)
        images.append({**im, "id": new_id, "file_name": name})
        anns += [{**a, "id": len(anns) + 1, "image_id": new_id} for a in by_image.get(im["id"], [])]
    tmp = ann_path.with_suffix(".partial")
    tmp.write_text(json.dumps({**d, "images": images, "annotations": anns}))
    tmp.rename(ann_path)
    return out


def shard_digests(split_dir: Path) -> dict[str, str]:
    """sha256 of every shard of a split, by name."""
    return {s["name"]: hashlib.sha256((split_dir / s["name"]).read_bytes()).hexdigest()
            for s in read_manifest(split_dir)["shards"]}


def build_ab(src: Path, workers: int, device: str) -> tuple[list[list[str]], bool, Path]:
    """The build on ``device`` against the CPU build, alternating; rows of the table, identical?, cpu split."""
    best: dict[str, float] = {}
    outs = {}
    for _ in range(2):
        for dev in ("cpu", device) if device != "cpu" else ("cpu",):
            out = bc.BENCH_DATA / f"gpu_build_{dev}"
            opts = BuildOptions(source=f"coco:{src}", split="train2017", out=str(out), workers=workers,
                                device=dev, rows_per_shard=bc.SAMPLES_PER_SHARD, overwrite=True)
            t0 = time.perf_counter()
            res = build(opts)
            best[dev] = min(best.get(dev, 1e9), time.perf_counter() - t0)
            outs[dev] = Path(res.out_dir)
    same = shard_digests(outs["cpu"]) == shard_digests(outs[device])
    rows = [[f"build --device {dev} ({workers} workers)", bc.fmt(best[dev], 2), bc.fmt(res.rows / best[dev], 1),
             bc.fmt(best["cpu"] / best[dev], 2) + "x"] for dev in best]
    return rows, same, outs["cpu"]


def stored_boxes(split_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes, crowd boxes) of every stored sample, float32 xyxy at the canvas size."""
    out = []
    for s in read_manifest(split_dir)["shards"]:
        for _, members in iter_shard(split_dir / s["name"]):
            r = Record.from_json(members["json"])
            out.append((r.boxes.astype(np.float32), r.crowd_boxes.astype(np.float32)))
    return out


def match_rates(boxes: list, device: str, batch_sizes: list[int], min_s: float) -> tuple[list[list[str]], float]:
    """images/s of match_batch_torch per batch size, and of AnchorMatcher on one core; table rows, cpu rate."""
    spec, cfg = anc.preset_spec("frcnn-fpn", IMAGE_HW), anc.MatchConfig()
    matcher = anc.AnchorMatcher(spec, cfg)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < min_s:
        for b, c in boxes:
            matcher.match(b, c)
        n += len(boxes)
    cpu_ips = n / (time.perf_counter() - t0)
    anchors = torch.from_numpy(anc.make_anchors(spec)).to(device)
    rows = [["AnchorMatcher (CPU, one core)", "1", bc.fmt(cpu_ips, 0), "1.00x"]]
    for bs in batch_sizes:
        batches = [boxes[i:i + bs] for i in range(0, len(boxes) - bs + 1, bs)] or [(boxes * bs)[:bs]]
        run = lambda bt: anc.match_batch_torch(anchors, [b for b, _ in bt], [c for _, c in bt], cfg, IMAGE_HW,  # noqa: E731
                                               device=device)
        run(batches[0])  # warm-up: kernels, allocator
        sync(device)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < min_s:
            for bt in batches:
                run(bt)
                n += len(bt)
        sync(device)
        ips = n / (time.perf_counter() - t0)
        rows.append([f"match_batch_torch ({device})", str(bs), bc.fmt(ips, 0), bc.fmt(ips / cpu_ips, 1) + "x"])
    return rows, ips


def loader_rates(split_dir: Path, device: str, workers: int) -> list[list[str]]:
    """images/s of a pass that ends with float32 normalised batches on ``device``: two ways, alternating."""
    def uint8_then_device():
        for images, _ in make_loader(str(split_dir), 32, num_workers=workers, normalize=False, pin_memory=device == "cuda"):
            yield normalize_batch(images, device)

    def float_then_device():
        for images, _ in make_loader(str(split_dir), 32, num_workers=workers, normalize=True, pin_memory=device == "cuda"):
            yield images.to(device, non_blocking=True)

    best: dict[str, float] = {}
    for _ in range(2):
        for name, fn in (("uint8 batches + normalize_batch on the device", uint8_then_device),
                         ("float32 batches normalised in the workers, then moved", float_then_device)):
            t0, n = time.perf_counter(), 0
            for x in fn():
                n += int(x.shape[0])
            sync(device)
            best[name] = max(best.get(name, 0.0), n / (time.perf_counter() - t0))
    base = best["float32 batches normalised in the workers, then moved"]
    return [[k, bc.fmt(v, 1), bc.fmt(v / base, 2) + "x"] for k, v in best.items()]


def decode_compare(split_dir: Path, device: str, limit: int = 512) -> tuple[list[list[str]], list[str]]:
    """Stored JPEGs decoded on ``device`` (torchvision.io.decode_jpeg) against the CPU decode; rates and diffs."""
    from torchvision.io import decode_jpeg

    jpgs = []
    for s in read_manifest(split_dir)["shards"]:
        jpgs += [m["jpg"] for _, m in iter_shard(split_dir / s["name"])]
    jpgs = jpgs[:limit]
    t0 = time.perf_counter()
    cpu = [decode_stored_image(j, "jpg", IMAGE_HW) for j in jpgs]
    cpu_ips = len(jpgs) / (time.perf_counter() - t0)
    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpgs]
    decode_jpeg(data[:8], device=device)  # warm-up (nvjpeg handles)
    sync(device)
    t0 = time.perf_counter()
    dev = []
    for i in range(0, len(data), 64):
        dev += decode_jpeg(data[i:i + 64], device=device)
    sync(device)
    dev_ips = len(jpgs) / (time.perf_counter() - t0)
    diffs = np.stack([np.abs(d.permute(1, 2, 0).cpu().numpy().astype(np.int16) - c.astype(np.int16))
                      for d, c in zip(dev, cpu)])
    rows = [["CPU: decode_stored_image (libjpeg-turbo, PIL's pixels)", bc.fmt(cpu_ips, 1), "1.00x"],
            [f"{device}: torchvision.io.decode_jpeg, batches of 64", bc.fmt(dev_ips, 1), bc.fmt(dev_ips / cpu_ips, 2) + "x"]]
    notes = [f"pixel difference against the CPU decode over {len(jpgs)} images: max {int(diffs.max())}, "
             f"mean {diffs.mean():.4f}, identical values {100 * float((diffs == 0).mean()):.2f}%, "
             f"images identical {sum(int(not d.any()) for d in diffs)} of {len(jpgs)}"]
    return rows, notes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--min-seconds", type=float, default=2.0, help="timed seconds per matching measurement")
    p.add_argument("--out-md", default=str(bc.BENCH_MD))
    p.add_argument("--no-md", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    bc.BENCH_DATA.mkdir(exist_ok=True)
    src = coco_folder(args.rows)
    bc.log("build: cpu and device, alternating")
    build_rows, same, split_dir = build_ab(src, args.workers, args.device)
    bc.log("matching")
    match_rows, ips_last = match_rates(stored_boxes(split_dir), args.device,
                                      [int(x) for x in args.batch_sizes.split(",")], args.min_seconds)
    bc.log("loader")
    load_rows = loader_rates(split_dir, args.device, min(8, args.workers))
    bc.log("decode")
    dec_rows, dec_notes = decode_compare(split_dir, args.device)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "no GPU (a dry run on the CPU)"
    last_bs = args.batch_sizes.split(",")[-1]
    text = "\n".join([
        bc.report_header("GPU path (scripts/bench_gpu.py)"),
        f"Device: {name}; torch {torch.__version__}; {args.rows} rows (tiny_coco repeated), frcnn-fpn preset at "
        f"{IMAGE_HW[0]}x{IMAGE_HW[1]}, {args.workers} CPU workers for the builds.", "",
        "### Build", "", bc.md_table(["build", "seconds (best of 2)", "rows/s", "vs cpu"], build_rows), "",
        f"Shards byte-identical between the two builds: **{'yes' if same else 'NO'}**.", "",
        "### Anchor matching", "", bc.md_table(["matcher", "batch", "images/s", "vs CPU matcher"], match_rows), "",
        f"Goal: >= {GOAL_MATCH_IPS:,} images/s at batch 256 on the GPU: "
        f"{bc.goal(args.device == 'cuda' and last_bs == '256' and ips_last >= GOAL_MATCH_IPS)} "
        f"({bc.fmt(ips_last, 0)} images/s at batch {last_bs}).", "",
        "### Loader into the device", "", bc.md_table(["pipeline (batch 32)", "images/s", "vs float32 from workers"],
                                                      load_rows), "",
        "### JPEG decode on the device", "", bc.md_table(["decode", "images/s", "vs CPU"], dec_rows), "",
        *dec_notes,
    ]) + "\n"
    bc.publish("gpu", text, args.out_md, args.no_md)
    if not same:
        raise SystemExit("the device build's shards differ from the CPU build's")


if __name__ == "__main__":
    main()
