#!/usr/bin/env python
"""Loader benchmark (issues 7, 15, benchmark 3): frcnn_shard.loader.make_loader against two reference points.

All run as torch DataLoaders with the same ``--batch-size`` (default 8), over tiny_coco repeated to
``--images`` (default 2,000; shards of 250 samples built once and cached in the git-ignored bench_data/),
at ``--workers`` (default os.cpu_count()) and again with 0 workers (everything in the main process):

- loader:          make_loader(shards, batch_size, num_workers=W, normalize=True | False, rpn_batch_size=256):
                   images/s into collated batches (images + anchor labels + matched boxes), in the main process
                   (with 0 workers at its default decode_threads, one per CPU, and with decode_threads=0);
                   then without and with hflip=0.5 (half the samples mirrored, with their stored flipped
                   targets), alternating for ``--flip-rounds`` rounds, for the hflip ratio; and the worker's
                   pipeline on one core at hflip 0 / 0.5 / 1.
- decode floor:    the same tars read the same way (the same tar reader, whole shards per worker) and only the
                   stored JPEG bytes decoded with PIL to uint8 arrays, delivered as uint8 batches (the PIL
                   delivered-decode floor, the goal's reference); the same with libjpeg-turbo (simplejpeg,
                   decoding into the batch) shows how much of the loader's time is decoding; and a
                   decode-only variant whose workers send back a count per batch.
- streaming loop:  what users run today: ``datasets.load_dataset(hub_folder, split="train", streaming=True)``
                   split over the workers, the original JPEG decoded, resized to 400x400, normalised with the
                   ImageNet mean/std, and RPN targets assigned per image by brute force on the CPU in torch
                   (the tutorial's AnchorTargetGenerator: full IoU matrix anchors x boxes, IoU >= 0.7
                   positive, < 0.3 negative, each box's best anchor forced positive, 256 sampled with at most
                   half positive), collated by the DataLoader. Limited to ``--stream-images`` images.

Throughput is reported for the whole epoch (worker start-up included) and in steady state (from the first
batch on); the goals use steady state. Per-image stage costs of the loader are then timed in this process
(one core) to show where the time goes, with an optional cProfile (``--profile``).

Run:  python scripts/bench_loader.py                       # ~2-3 minutes on 2 cores
      python scripts/bench_loader.py --workers 2 --batch-size 8 --images 2000 --stream-images 600 --profile
The markdown report goes to stdout and replaces the "loader" section of --out-md (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import subprocess
import textwrap
import pstats
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import simplejpeg  # noqa: E402

from frcnn_shard import anchors as anc  # noqa: E402
from frcnn_shard.format.members import TARGETS_EXT  # noqa: E402
from frcnn_shard.format.targets import unpack_targets  # noqa: E402
from frcnn_shard.shards import iter_shard, read_manifest  # noqa: E402
from frcnn_shard.transform import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

GOAL_VS_FLOOR = 0.85  # the uint8 loader vs the PIL delivered-decode floor, with workers
GOAL_VS_STREAM = 10.0  # the uint8 loader vs the streaming loop, 0 workers (and with workers)
GOAL_HFLIP = 0.95  # the loader with hflip=0.5 against the same loader without it
IMAGE_HW = (400, 400)

# (x / 255 - mean) / std as one multiply-add, exactly as the loader computes it.
NORM_SCALE = np.array([1 / (255 * s) for s in IMAGENET_STD], np.float32).reshape(3, 1, 1)
NORM_BIAS = np.array([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], np.float32).reshape(3, 1, 1)


@dataclass
class Run:
    """One timed pass: images delivered, total seconds, and seconds to the first batch."""

    name: str
    images: int
    seconds: float
    first_batch_s: float
    first_batch_images: int

    @property
    def epoch_ips(self) -> float:
        return self.images / self.seconds

    @property
    def steady_ips(self) -> float:
        n, t = self.images - self.first_batch_images, self.seconds - self.first_batch_s
        return n / t if t > 0 and n > 0 else float("nan")


def time_batches(name: str, batches: Iterable, count: Callable[[object], int]) -> Run:
    """Consume an iterable of batches, timing the total and the first batch."""
    t0 = time.perf_counter()
    first_t, first_n, n = None, 0, 0
    for b in batches:
        k = count(b)
        n += k
        if first_t is None:
            first_t, first_n = time.perf_counter() - t0, k
    return Run(name, n, time.perf_counter() - t0, first_t or 0.0, first_n)


# ================================================================================ the loader


def run_loader(shards: Path, batch_size: int, workers: int, normalize: bool, hflip: float = 0.0,
               decode_threads: int | None = None) -> Run:
    """frcnn_shard.loader.make_loader over the shards, as a user would iterate it (decode_threads None: its default)."""
    from frcnn_shard.loader import make_loader

    loader = make_loader(str(shards), batch_size, num_workers=workers, normalize=normalize, rpn_batch_size=256,
                         hflip=hflip, decode_threads=decode_threads)
    label = f"loader, normalize={normalize} ({'float32' if normalize else 'uint8'} images)"
    label += f", hflip={hflip}" if hflip else ""
    label += f", decode_threads={loader.options.decode_threads}" if not workers else ""
    return time_batches(label, loader, lambda b: int(b[0].shape[0]))


def run_loader_tree(tree: Path, shards: Path, batch_size: int, workers: int, normalize: bool) -> Run:
    """make_loader of the frcnn_shard package in ``tree``, timed like run_loader, in a child process.

    Two source trees measured this way, interleaved, give an A/B ratio in one run (e.g. before and
    after a change: ``git worktree add /tmp/before <rev>``).
    """
    code = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {str(tree)!r})
        from frcnn_shard.loader import make_loader
        loader = make_loader({str(shards)!r}, {batch_size}, num_workers={workers}, normalize={normalize},
                             rpn_batch_size=256)
        t0, first, n, first_n = time.perf_counter(), None, 0, 0
        for images, _ in loader:
            n += int(images.shape[0])
            if first is None:
                first, first_n = time.perf_counter() - t0, n
        print("RESULT " + json.dumps([n, time.perf_counter() - t0, first, first_n]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    n, seconds, first, first_n = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
    return Run(f"loader of {tree}, normalize={normalize}", n, seconds, first, first_n)


def compare_trees(baseline: Path, shards: Path, batch_size: int, workers: int, rounds: int = 3) -> str:
    """The loader of this tree against the one in ``baseline``, interleaved, best steady state of each."""
    here = Path(__file__).resolve().parents[1]
    best: dict[tuple[str, bool], Run] = {}
    for attempt in range(rounds):
        for normalize in (False, True):
            for name, tree in (("baseline", baseline), ("this tree", here)):
                bc.log(f"A/B: {name}, normalize={normalize} (round {attempt + 1} of {rounds})")
                run = run_loader_tree(tree, shards, batch_size, workers, normalize)
                key = (name, normalize)
                best[key] = max(best.get(key, run), run, key=lambda r: r.steady_ips)
    rows = []
    for normalize in (False, True):
        a, b = best[("baseline", normalize)], best[("this tree", normalize)]
        rows.append([f"normalize={normalize}", bc.fmt(a.steady_ips, 1), bc.fmt(b.steady_ips, 1),
                     bc.fmt(b.steady_ips / a.steady_ips, 3) + "x"])
    table = bc.md_table(["loader", f"baseline ({baseline}) images/s", "this tree images/s", "ratio"], rows)
    return "\n".join([f"A/B against another source tree ({rounds} interleaved rounds, best steady state of each, "
                      f"{workers} workers, batch size {batch_size}, the same shards):", "", table])


# ============================================================================= decode floor


class DecodeFloor(torch.utils.data.IterableDataset):
    """Whole shards per worker (as the loader), tar read, stored JPEG decoded with PIL (or libjpeg-turbo).

    ``deliver=False`` yields only counts: the pixels never leave the worker (a floor no loader can
    reach, since it must hand the pixels over). ``deliver=True`` writes each batch into a uint8
    [B, H, W, 3] tensor in shared memory and yields it: the least any loader of these shards does.
    ``codec="turbo"`` decodes with simplejpeg, into the batch row when delivering uint8.
    """

    def __init__(self, tars: list[Path], hw: tuple[int, int], batch_size: int, deliver: bool,
                 normalize: bool = False, codec: str = "pil"):
        super().__init__()
        self.tars, self.hw, self.batch_size, self.deliver = tars, hw, batch_size, deliver
        self.normalize, self.codec = normalize, codec

    def _pixels(self, data: bytes, row: np.ndarray | None) -> np.ndarray:
        if self.codec == "turbo":
            return simplejpeg.decode_jpeg(data, "RGB", buffer=row)
        img = Image.open(io.BytesIO(data))
        pixels = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)  # decodes the pixels
        if row is not None:
            row[...] = pixels
        return pixels

    def __iter__(self) -> Iterator:
        from frcnn_shard.loader.collate import shared_empty as _empty

        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        shape = (self.batch_size, 3, *self.hw) if self.normalize else (self.batch_size, *self.hw, 3)
        n, out = 0, None
        for p in self.tars[wid::nw]:
            for _, members in iter_shard(p):
                if self.deliver and out is None:
                    out = _empty(shape, torch.float32 if self.normalize else torch.uint8, info is not None)
                pixels = self._pixels(members["jpg"], out.numpy()[n] if self.deliver and not self.normalize else None)
                if self.deliver and self.normalize:  # float32 CHW, normalised as the loader does it
                    dst = out.numpy()[n]
                    np.multiply(pixels.transpose(2, 0, 1), NORM_SCALE, out=dst, dtype=np.float32)
                    dst += NORM_BIAS
                n += 1
                if n == self.batch_size:
                    yield out if self.deliver else n
                    n, out = 0, None
        if n:
            yield out[:n] if self.deliver else n


FLOOR_NAMES = {
    ("pil", True, False): "PIL delivered-decode floor (tar read + PIL decode + uint8 batch to the consumer)",
    ("turbo", True, False): "libjpeg-turbo delivered-decode floor (tar read + simplejpeg into the uint8 batch)",
    ("pil", True, True): "PIL delivered floor, normalised (+ float32 normalise, 4x the bytes)",
    ("pil", False, False): "PIL decode-only floor (tar read + PIL decode; pixels never leave the worker)",
}


def run_floor(shards: Path, batch_size: int, workers: int, deliver: bool, normalize: bool = False,
              codec: str = "pil") -> Run:
    """A decode floor through a DataLoader with the same worker count."""
    man = read_manifest(shards)
    tars = [shards / s["name"] for s in man["shards"]]
    hw = tuple(man["image"]["size"])
    dl = torch.utils.data.DataLoader(DecodeFloor(tars, hw, batch_size, deliver, normalize, codec), batch_size=None,
                                     num_workers=workers)
    return time_batches(FLOOR_NAMES[(codec, deliver, normalize)], dl, lambda b: int(b.shape[0]) if deliver else b)


# ============================================================================ streaming loop


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix [A, K] of xyxy boxes (as torchvision.ops.box_iou)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


class AnchorTargetGenerator:
    """The tutorial's per-image RPN target assignment, by brute force on the CPU."""

    def __init__(self, anchors: torch.Tensor, pos_iou: float = 0.7, neg_iou: float = 0.3,
                 batch: int = 256, pos_fraction: float = 0.5):
        self.anchors, self.pos_iou, self.neg_iou = anchors, pos_iou, neg_iou
        self.batch, self.pos_fraction = batch, pos_fraction

    def __call__(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """labels [A] (1 / 0 / -1) and matched box [A, 4] for one image."""
        iou = box_iou(self.anchors, boxes)  # [A, K], the full matrix
        max_iou, argmax = iou.max(dim=1)
        labels = torch.full((len(self.anchors),), -1, dtype=torch.int64)
        labels[max_iou < self.neg_iou] = 0
        labels[iou.argmax(dim=0)] = 1  # each box's best anchor
        labels[max_iou >= self.pos_iou] = 1
        pos = torch.nonzero(labels == 1).flatten()
        n_pos = int(self.batch * self.pos_fraction)
        if len(pos) > n_pos:
            labels[pos[torch.randperm(len(pos))[: len(pos) - n_pos]]] = -1
        neg = torch.nonzero(labels == 0).flatten()
        n_neg = self.batch - int((labels == 1).sum())
        if len(neg) > n_neg:
            labels[neg[torch.randperm(len(neg))[: len(neg) - n_neg]]] = -1
        return labels, boxes[argmax]


class StreamingLoop(torch.utils.data.IterableDataset):
    """datasets streaming -> decode -> resize -> normalise -> brute-force anchor targets, per image."""

    def __init__(self, hub: Path, limit: int):
        super().__init__()
        self.hub, self.limit = hub, limit

    def __iter__(self) -> Iterator[dict]:
        import datasets
        from datasets.distributed import split_dataset_by_node

        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        ds = datasets.load_dataset(str(self.hub), split="train", streaming=True)
        ds = split_dataset_by_node(ds, rank=wid, world_size=nw)
        spec = anc.preset_spec(anc.DEFAULT_PRESET, IMAGE_HW)
        gen = AnchorTargetGenerator(torch.from_numpy(anc.make_anchors(spec)))
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        quota = self.limit // nw + (1 if wid < self.limit % nw else 0)
        n = 0
        for row in ds:
            if n >= quota:
                return
            img = row["image"].convert("RGB")  # datasets decodes the original JPEG
            w, h = img.size
            img = img.resize((IMAGE_HW[1], IMAGE_HW[0]), Image.Resampling.BILINEAR)
            x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)
            x = (x - mean) / std
            b = torch.tensor(row["objects"]["bbox"], dtype=torch.float32).reshape(-1, 4)
            b = torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)
            b = b * torch.tensor([IMAGE_HW[1] / w, IMAGE_HW[0] / h] * 2)
            b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
            if len(b) == 0:
                continue  # no boxes: skipped, as the build drops it
            labels, matched = gen(b)
            n += 1
            yield {"image": x, "boxes": b, "labels": labels, "matched": matched}


def collate_stream(items: list[dict]) -> dict:
    """Stack images and per-anchor targets; boxes stay a list."""
    return {"images": torch.stack([i["image"] for i in items]),
            "anchor_labels": torch.stack([i["labels"] for i in items]),
            "matched": torch.stack([i["matched"] for i in items]),
            "boxes": [i["boxes"] for i in items]}


def run_stream(hub: Path, batch_size: int, workers: int, limit: int) -> Run:
    """The streaming loop through a DataLoader with the same batch size and worker count."""
    dl = torch.utils.data.DataLoader(StreamingLoop(hub, limit), batch_size=batch_size, num_workers=workers,
                                     collate_fn=collate_stream)
    return time_batches("streaming loop (datasets + decode + resize + normalise + brute-force targets)", dl,
                        lambda b: int(b["images"].shape[0]))


# ======================================================================== per-stage timings


def pil_pixels(data: bytes) -> np.ndarray:
    """A stored JPEG through PIL alone, as the PIL floor decodes it."""
    img = Image.open(io.BytesIO(data))
    return np.asarray(img.convert("RGB") if img.mode != "RGB" else img)


def stage_timings(shards: Path, batch_size: int, n: int, repeats: int) -> tuple[list[tuple[str, float]], dict]:
    """ms/image of each loader stage on the first n samples, one core, plus the bytes a batch carries."""
    from frcnn_shard import loader as L
    from frcnn_shard.format.image import decode_stored_image
    from frcnn_shard.format.record import Record

    man = read_manifest(shards)
    tar = str(shards / man["shards"][0]["name"])
    num_anchors = int(man["anchors"]["count"])
    how = L.DecodeOptions(rpn_batch_size=256)
    ds = L.DatasetFacts(num_anchors, IMAGE_HW, IMAGENET_MEAN, IMAGENET_STD)
    norm = (ds.mean, ds.std)
    raws = [r for _, r in zip(range(n), L.iter_raw_samples(tar))]
    n = len(raws)
    decoded = [L.decode_sample(url, r, ds, how, 0) for url, r in raws]
    stored = [unpack_targets(r.members[TARGETS_EXT], num_anchors) for _, r in raws]
    batches = [decoded[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    row = np.empty((*IMAGE_HW, 3), np.uint8)
    ms = bc.per_item_ms

    def read_all() -> None:
        for _ in zip(range(n), L.iter_raw_samples(tar)):
            pass

    def sampled(i: int):
        return anc.sample_indices(stored[i], num_anchors, 256, 0.5, rng=anc.sample_rng(0, 0, raws[i][1].key))

    collate_norm = ms(lambda b: L.collate(b, num_anchors, True, norm), batches, repeats) / batch_size
    copy_u8 = ms(lambda b: L.collate(b, num_anchors, True), batches, repeats) / batch_size  # images copied in
    rows = torch.empty((batch_size, *IMAGE_HW, 3), dtype=torch.uint8)
    collate_u8 = ms(lambda b: L.collate(b, num_anchors, True, None, False, rows), batches, repeats) / batch_size
    shared_u8 = ms(lambda b: L.collate(b, num_anchors, True, None, True), batches, repeats) / batch_size
    packed = [L.collate(b, num_anchors, True) for b in batches]
    unpack = ms(lambda b: b.unpack(), packed, repeats) / batch_size
    stages = [
        ("tar read (iter_raw_samples)", 1000 * bc.best_of(read_all, repeats) / n),
        ("JPEG decode, PIL (the PIL floor's decode; reference, not in the sum)",
         ms(lambda r: pil_pixels(r[1].members["jpg"]), raws, repeats)),
        ("JPEG decode (decode_stored_image: libjpeg-turbo into the batch row)",
         ms(lambda r: decode_stored_image(r[1].members["jpg"], "jpg", IMAGE_HW, out=row), raws, repeats)),
        ("JSON record (Record.from_json)", ms(lambda r: Record.from_json(r[1].members["json"]), raws, repeats)),
        ("targets unpack (unpack_targets: npz/zip + checks, sparse)",
         ms(lambda r: unpack_targets(r[1].members[TARGETS_EXT], num_anchors), raws, repeats)),
        ("anchor sampling on the sparse targets (sample_rng + sample_indices)", ms(sampled, list(range(n)), repeats)),
        ("collate, uint8 (anchor index lists; the images were decoded into the batch)", collate_u8),
        ("extra for the batch in shared memory: allocation, first touch (worker side)", shared_u8 - copy_u8),
        ("unpack in the consumer (index lists -> dense int64 labels, matched_gt)", unpack),
        ("collate, normalised (+ float32 multiply-add)", collate_norm),
    ]
    return stages, _batch_bytes(L.collate(decoded[:batch_size], num_anchors, True, norm),
                                L.collate(decoded[:batch_size], num_anchors, True),
                                [r for _, r in raws], batch_size)


def _batch_bytes(b, b8, raws: list, batch_size: int) -> dict:
    """What one image costs on disk, shipped from a worker (float32 batch b, uint8 batch b8) and delivered."""
    _, dense = b8.unpack()
    return {
        "stored JPEG": float(np.mean([len(r.members["jpg"]) for r in raws])),
        "shipped: images float32 (normalize=True)": b.images.nbytes / batch_size,
        "shipped: images uint8 (normalize=False)": b8.images.nbytes / batch_size,
        "shipped: anchor index lists + positives' boxes":
            (b8.ones.nbytes + b8.others.nbytes + b8.ones_boxes.nbytes) / batch_size,
        "delivered: anchor_labels int64 [A]": dense[0]["anchor_labels"].nbytes,
        "delivered: anchor_matched_gt float32 [A, 4] (lazily zero-filled)": dense[0]["anchor_matched_gt"].nbytes,
    }


def flip_ab(shards: Path, batch_size: int, workers: int, rounds: int) -> dict[str, Run]:
    """The loader without and with hflip=0.5, alternating run by run (the machine is noisy), best of each."""
    best: dict[str, Run] = {}
    for _ in range(rounds):
        for normalize, key in ((False, "u8"), (True, "norm")):
            for hflip, suffix in ((0.0, "_ab"), (0.5, "_flip")):
                run = run_loader(shards, batch_size, workers, normalize, hflip=hflip)
                best[key + suffix] = max(best.get(key + suffix, run), run, key=lambda r: r.steady_ips)
    return best


def flip_cpu_cost(shards: Path, batch_size: int, n: int, repeats: int) -> list[tuple[str, float]]:
    """One core, this process: CPU ms/image (process time, so time lost to other processes on a loaded machine
    does not count) of the worker's whole pipeline (decode_sample, collate in shared memory, unpack) at
    hflip 0, 0.5 and 1, alternating, median of ``repeats``: the work hflip adds."""
    from frcnn_shard import loader as L

    man = read_manifest(shards)
    tar = str(shards / man["shards"][0]["name"])
    ds = L.DatasetFacts(int(man["anchors"]["count"]), IMAGE_HW, IMAGENET_MEAN, IMAGENET_STD, flip_targets=True)
    raws = [r for _, r in zip(range(n), L.iter_raw_samples(tar))]

    def pipeline(how, norm) -> None:
        decoded = [L.decode_sample(url, r, ds, how, 0) for url, r in raws]
        for i in range(0, len(decoded), batch_size):
            L.collate(decoded[i:i + batch_size], ds.num_anchors, True, norm, True).unpack()

    times: dict[tuple[bool, float], list[float]] = {}
    with torch_threads(1):  # the worker's work, on one core: no intra-op threads to count twice
        for _ in range(repeats):
            for normalize in (False, True):
                for hflip in (0.0, 0.5, 1.0):
                    how = L.DecodeOptions(hflip=hflip, rpn_batch_size=256)
                    t0 = time.process_time()
                    pipeline(how, (ds.mean, ds.std) if normalize else None)
                    times.setdefault((normalize, hflip), []).append((time.process_time() - t0) * 1000 / len(raws))
    return [(f"normalize={normalize}, hflip={hflip}", float(np.median(times[(normalize, hflip)])))
            for normalize in (False, True) for hflip in (0.0, 0.5, 1.0)]


class torch_threads:
    """Temporarily set torch's intra-op thread count."""

    def __init__(self, n: int):
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.before)


def flip_stage_timings(shards: Path, batch_size: int, n: int, repeats: int) -> list[tuple[str, float]]:
    """ms/image of what hflip adds per mirrored sample, one core: the decision, the flipped targets, the boxes, the copy."""
    from frcnn_shard import loader as L
    from frcnn_shard.format.image import decode_stored_image
    from frcnn_shard.format.record import Record

    man = read_manifest(shards)
    tar = str(shards / man["shards"][0]["name"])
    num_anchors = int(man["anchors"]["count"])
    ds = L.DatasetFacts(num_anchors, IMAGE_HW, IMAGENET_MEAN, IMAGENET_STD, flip_targets=True)
    raws = [r for _, r in zip(range(n), L.iter_raw_samples(tar))]
    records = [Record.from_json(r.members["json"]) for _, r in raws]
    ms = bc.per_item_ms
    rows = [
        ("flip decision (hflip_decision: a hash of tag, seed, epoch, key)",
         ms(lambda r: L.hflip_decision(0, 0, r[1].key, 0.5), raws, repeats)),
        ("targets unpack, stored orientation", ms(lambda r: unpack_targets(r[1].members[TARGETS_EXT], num_anchors),
                                                   raws, repeats)),
        ("targets unpack, flipped orientation",
         ms(lambda r: unpack_targets(r[1].members[TARGETS_EXT], num_anchors, flipped=True), raws, repeats)),
        ("mirrored boxes (Record.hflip)", ms(lambda rec: rec.hflip(), records, repeats)),
    ]
    for flip in (0.0, 1.0):
        decoded = [L.decode_sample(url, r, ds, L.DecodeOptions(hflip=flip, rpn_batch_size=256), 0) for url, r in raws]
        batches = [decoded[i:i + batch_size] for i in range(0, len(decoded) - batch_size + 1, batch_size)]
        what = "mirrored images" if flip else "images as stored"
        rows.append((f"collate, uint8, {what}", ms(lambda b: L.collate(b, num_anchors, True), batches, repeats) / batch_size))
    rows.insert(1, ("JPEG decode, mirrored (decode_stored_image(mirror=True)) minus the plain decode",
                    ms(lambda r: decode_stored_image(r[1].members["jpg"], "jpg", IMAGE_HW, mirror=True), raws, repeats)
                    - ms(lambda r: decode_stored_image(r[1].members["jpg"], "jpg", IMAGE_HW), raws, repeats)))
    return rows


def profile_loader(shards: Path, batch_size: int, n: int) -> str:
    """cProfile (tottime) of the loader's per-worker pipeline run in this process (num_workers=0)."""
    from frcnn_shard.loader import make_loader

    loader = make_loader(str(shards), batch_size, num_workers=0, normalize=True, rpn_batch_size=256)
    prof = cProfile.Profile()
    prof.enable()
    seen = 0
    for images, _ in loader:
        seen += images.shape[0]
        if seen >= n:
            break
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(16)
    lines = [l for l in buf.getvalue().splitlines() if l.strip()]
    start = next(i for i, l in enumerate(lines) if l.lstrip().startswith("ncalls"))
    return "\n".join([f"{seen} images, num_workers=0, normalize=True:"] + lines[start:])


# ===================================================================================== report


def hflip_report(runs: dict[str, Run], flip_stages: list[tuple[str, float]], flip_cpu: list[tuple[str, float]],
                 rounds: int) -> list[str]:
    """The hflip=0.5 runs against the plain ones of the same run, and what a mirrored sample costs."""
    lines = ["### Horizontal flip (hflip=0.5 against the same loader without it)", "",
             f"DataLoader throughput, {rounds} rounds alternating the two, best steady state of each:", ""]
    for plain, flipped in (("u8_ab", "u8_flip"), ("norm_ab", "norm_flip")):
        a, b = runs[plain], runs[flipped]
        ratio = b.steady_ips / a.steady_ips
        lines.append(f"- {a.name}: {bc.fmt(a.steady_ips, 1)} images/s; with hflip=0.5 {bc.fmt(b.steady_ips, 1)} "
                     f"images/s: {bc.fmt(ratio, 3)}x (goal >= {GOAL_HFLIP}: {bc.goal(ratio >= GOAL_HFLIP)}).")
    base = {k.split(",")[0]: v for k, v in flip_cpu if k.endswith("hflip=0.0")}
    cpu_rows = [[k, bc.fmt(v, 3), bc.fmt(base[k.split(",")[0]] / v, 3) + "x"] for k, v in flip_cpu]
    rows = [[k, bc.fmt(v, 3)] for k, v in flip_stages]
    return lines + [
        "", "The worker's whole pipeline on one core (decode_sample + collate in shared memory + unpack), "
        "alternating, median CPU (process) time of each: the work hflip adds, which time lost to other processes "
        "on a loaded machine does not blur:",
        "", bc.md_table(["pipeline", "CPU ms/image", "throughput vs hflip=0"], cpu_rows),
        "", "What a mirrored sample costs (each step timed alone, one core):", "",
        bc.md_table(["step (per image)", "ms/image"], rows)]


ROW_ORDER = ("u8", "u8_1t", "norm", "floor", "floor_turbo", "floor_norm", "floor_bare", "stream")


def _runs_table(runs: dict[tuple[str, int], Run], worker_counts: tuple[int, ...]) -> str:
    """Every run, with its ratios to the PIL delivered floor and to the streaming loop at its own worker count."""
    rows = []
    for w in worker_counts:
        floor, stream = runs.get(("floor", w)), runs.get(("stream", w))
        for key in ROW_ORDER:
            r = runs.get((key, w))
            if r is None:
                continue
            vs_floor = bc.fmt(r.steady_ips / floor.steady_ips, 3) + "x" if floor else "n/a"
            vs_stream = bc.fmt(r.steady_ips / stream.steady_ips, 2) + "x" if stream else "n/a"
            rows.append([r.name, w, r.images, bc.fmt(r.seconds), bc.fmt(r.first_batch_s), bc.fmt(r.epoch_ips, 1),
                         bc.fmt(r.steady_ips, 1), vs_floor, vs_stream])
    return bc.md_table(["pipeline", "workers", "images", "seconds", "first batch s", "images/s (epoch)",
                        "images/s (steady)", "vs PIL delivered floor (same workers)",
                        "vs streaming loop (same workers)"], rows)


def _goal_lines(runs: dict[tuple[str, int], Run], worker_counts: tuple[int, ...]) -> list[str]:
    """The goals, each with its number and whether it was met."""
    lines = []
    for w in worker_counts:
        for key in ("u8", "norm"):
            r, floor, stream = runs[(key, w)], runs[("floor", w)], runs[("stream", w)]
            a, b = r.steady_ips / floor.steady_ips, r.steady_ips / stream.steady_ips
            lines.append(f"- {w} workers, {r.name}: {bc.fmt(b, 2)}x the streaming loop (goal >= {GOAL_VS_STREAM:.0f}: "
                         f"{bc.goal(b >= GOAL_VS_STREAM)}), {bc.fmt(a, 3)}x the PIL delivered-decode floor "
                         f"(goal >= {GOAL_VS_FLOOR}: {bc.goal(a >= GOAL_VS_FLOOR)}).")
        if ("floor_norm", w) in runs:
            a = runs[("norm", w)].steady_ips / runs[("floor_norm", w)].steady_ips
            lines.append(f"- {w} workers, normalised loader vs the normalised PIL floor (same float32 output): "
                         f"{bc.fmt(a, 3)}x (>= {GOAL_VS_FLOOR}: {bc.goal(a >= GOAL_VS_FLOOR)}).")
        if ("u8_1t", w) in runs:
            r, floor, stream = runs[("u8_1t", w)], runs[("floor", w)], runs[("stream", w)]
            lines.append(f"- {w} workers, {r.name} (one thread, as the floor): "
                         f"{bc.fmt(r.steady_ips / stream.steady_ips, 2)}x the streaming loop, "
                         f"{bc.fmt(r.steady_ips / floor.steady_ips, 3)}x the PIL delivered-decode floor; the default "
                         f"decode_threads run {bc.fmt(runs[('u8', w)].steady_ips / r.steady_ips, 3)}x this one.")
        if ("floor_turbo", w) in runs:
            a = runs[("u8", w)].steady_ips / runs[("floor_turbo", w)].steady_ips
            lines.append(f"- {w} workers, uint8 loader vs the libjpeg-turbo delivered floor (the same decode as the "
                         f"loader's): {bc.fmt(a, 3)}x: the share of the loader's time that is decoding and delivering.")
    return lines


def report(runs: dict[tuple[str, int], Run], stages: list[tuple[str, float]], nbytes: dict,
           args: argparse.Namespace, prof: str | None, ab: str | None = None,
           flip: tuple[dict, list, list] | None = None) -> str:
    worker_counts = (args.workers, 0) if args.workers else (0,)
    in_sum = [(k, v) for k, v in stages if "normalised" not in k and "reference" not in k]
    total_u8 = sum(v for _, v in in_sum)
    stage_rows = [[k, bc.fmt(v, 3), bc.fmt(100 * v / total_u8, 0) + "%" if (k, v) in in_sum else ""]
                  for k, v in stages]
    stage_table = bc.md_table(["stage (per image, one core)", "ms/image", "share of the uint8 path"], stage_rows)
    pil_floor_ms = stages[0][1] + stages[1][1]
    byte_table = bc.md_table(["per image", "bytes"], [[k, f"{v:,.0f}"] for k, v in nbytes.items()])
    w = worker_counts[0]
    parts = [
        bc.report_header("Loader (scripts/bench_loader.py)"),
        f"### 3. Loader throughput ({' and '.join(map(str, worker_counts))} workers, batch size {args.batch_size}, "
        f"{runs[('u8', w)].images} images from shards of {bc.SAMPLES_PER_SHARD}; streaming loop on "
        f"{runs[('stream', w)].images} images)", "",
        _runs_table(runs, worker_counts), "",
        f"Steady state = images after the first batch / time after the first batch; ratios use it; each run the "
        f"best of {args.rounds} interleaved rounds. "
        "The epoch numbers include worker start-up (the streaming loop's includes load_dataset in each worker). "
        f"With 0 workers the streaming loop's brute-force matching runs on torch's {torch.get_num_threads()} intra-op "
        "threads (DataLoader workers use one each), which stall when other processes hold the cores: on a shared "
        "machine its 0-worker rate, and every ratio to it, is unreliable.",
        "", *_goal_lines(runs, worker_counts), "",
        "The PIL delivered-decode floor: tar read + PIL decode + the uint8 batch handed to the consumer through "
        "the same DataLoader (shared memory with workers). The decode-only row keeps the pixels in the "
        "worker; it is shown for reference (no loader can deliver pixels for free).", "",
        "Where the loader's time goes (each stage timed alone in this process on the first shard's samples):", "",
        stage_table, "",
        f"The PIL floor's own work is tar read + PIL decode = {bc.fmt(pil_floor_ms, 3)} ms/image; the uint8 loader "
        f"does {bc.fmt(total_u8, 3)} ms/image of work (with workers), so the CPU-bound ratio is about "
        f"{bc.fmt(pil_floor_ms / total_u8, 2)}x before any IPC. What one image costs to ship from a worker:", "",
        byte_table,
    ]
    if flip is not None:
        parts += [""] + hflip_report(*flip, args.flip_rounds)
    if ab:
        parts += ["", ab]
    if prof:
        parts += ["", "### Loader profile (cProfile, tottime)", "", "```", prof, "```"]
    return "\n".join(parts) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="rows of the benchmark dataset (default 2000)")
    p.add_argument("--stream-images", type=int, default=600, help="images for the streaming loop (default 600)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers (default: all cores)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every throughput run (best kept)")
    p.add_argument("--stage-images", type=int, default=160, help="samples for the per-stage timings")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each micro-timing (best is kept)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="accepted for symmetry with bench_build.py; batches are measured as the loader yields "
                        "them (on the CPU)")
    p.add_argument("--flip-rounds", type=int, default=4,
                   help="interleaved rounds of the loader with and without hflip=0.5 (best of each kept)")
    p.add_argument("--profile", action="store_true", help="append a cProfile of the loader pipeline")
    p.add_argument("--baseline-tree", type=Path, default=None,
                   help="also time the loader of the frcnn_shard package in this source tree against this one")
    p.add_argument("--ab-only", action="store_true",
                   help="with --baseline-tree: only the A/B of the two trees, printed (no section rewritten)")
    p.add_argument("--ab-rounds", type=int, default=3, help="interleaved rounds of the A/B (default 3)")
    p.add_argument("--out-md", default=str(bc.BENCH_MD), help="markdown file whose 'loader' section is replaced")
    p.add_argument("--no-md", action="store_true", help="print only; leave --out-md alone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bc.BENCH_DATA.mkdir(exist_ok=True)
    shards = bc.shard_dir(args.images)
    hub = bc.hub_folder(args.images)
    b = args.batch_size
    if args.ab_only:  # a quick before/after of a change, e.g. against `git worktree add /tmp/before <rev>`
        if args.baseline_tree is None:
            raise SystemExit("--ab-only needs --baseline-tree")
        print(compare_trees(args.baseline_tree, shards, b, args.workers, args.ab_rounds))
        return
    runs: dict[tuple[str, int], Run] = {}
    plans = []  # (key, workers, what, run)
    for w in ((args.workers, 0) if args.workers else (0,)):
        plans += [("floor", w, "PIL delivered floor", lambda w=w: run_floor(shards, b, w, True)),
                  ("floor_turbo", w, "libjpeg-turbo delivered floor",
                   lambda w=w: run_floor(shards, b, w, True, codec="turbo")),
                  ("norm", w, "loader, normalize=True", lambda w=w: run_loader(shards, b, w, True)),
                  ("u8", w, "loader, normalize=False", lambda w=w: run_loader(shards, b, w, False)),
                  ("stream", w, f"streaming loop ({args.stream_images} images)",
                   lambda w=w: run_stream(hub, b, w, args.stream_images))]
        if not w:
            plans.append(("u8_1t", w, "loader, normalize=False, decode_threads=0",
                          lambda w=w: run_loader(shards, b, w, False, decode_threads=0)))
        if w:
            plans += [("floor_bare", w, "decode-only floor", lambda w=w: run_floor(shards, b, w, False)),
                      ("floor_norm", w, "PIL delivered floor, normalised",
                       lambda w=w: run_floor(shards, b, w, True, normalize=True))]
    # Interleaved, best of --rounds each: the machine is shared and noisy. (The streaming loop with 0 workers
    # runs torch's brute-force matching on its intra-op threads, which stall badly when other processes
    # hold the cores: compare it only on an otherwise idle machine.)
    for attempt in range(args.rounds):
        for key, w, what, fn in plans:
            bc.log(f"{what}, {w} workers (run {attempt + 1} of {args.rounds})")
            run = fn()
            runs[(key, w)] = max(runs.get((key, w), run), run, key=lambda r: r.steady_ips)
    bc.log("per-stage timings")
    stages, nbytes = stage_timings(shards, b, args.stage_images, args.repeats)
    flip_stages = flip_stage_timings(shards, b, args.stage_images, args.repeats)
    bc.log(f"hflip A/B ({args.flip_rounds} interleaved rounds)")
    flip_runs = flip_ab(shards, b, args.workers, args.flip_rounds)
    flip_cpu = flip_cpu_cost(shards, b, args.stage_images, 2 * args.flip_rounds)
    prof = profile_loader(shards, b, 400) if args.profile else None
    ab = compare_trees(args.baseline_tree, shards, b, args.workers, args.ab_rounds) if args.baseline_tree else None
    text = report(runs, stages, nbytes, args, prof, ab, (flip_runs, flip_stages, flip_cpu))
    bc.publish("loader", text, args.out_md, args.no_md)


if __name__ == "__main__":
    main()
