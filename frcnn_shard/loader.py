"""Read frcnn-shard shards back as training batches: (images, targets) with RPN anchor targets.

Pipeline per (rank, worker) stream: the epoch's shard plan -> safe tar reading (no unpickling, checked
member names) -> sample-level shuffle buffer over the still-encoded samples -> decode (PIL image, JSON,
NumPy targets) -> balanced anchor sampling -> batch collated into preallocated tensors.

Everything random is derived from (seed, epoch, ...) only: the shard permutation from (seed, epoch),
the shuffle buffer from (seed, epoch, rank, worker), and the anchor sampling of a sample from
(seed, epoch, key). Hence an epoch repeats exactly across runs, and the per-sample targets do not
depend on the worker count.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from .shards import (
    IMAGE_EXTS, KNOWN_EXTS, MANIFEST_NAME, ShardFormatError, member_problem,
    read_manifest, split_member_name,
)

ON_ERROR_CHOICES = ("raise", "skip")
DEFAULT_SHUFFLE_BUFFER = 256  # encoded samples (~30-60 KB each), so a few MB per worker
MAX_SKIP_LOG = 1000  # skip messages kept per epoch; the count itself is never capped
_READ_BUFSIZE = 1 << 20

# Domain tags keep the three random streams independent even for equal (seed, epoch) numbers.
_TAG_SHARDS, _TAG_BUFFER, _TAG_SAMPLE, _TAG_RESAMPLE = 0x5348, 0x4255, 0x5341, 0x5245


class LoaderError(ValueError):
    """The loader cannot be set up as asked (bad source, options or shard/worker layout)."""


# ------------------------------------------------------------------------------------------ seeds


def _key_hash(key: str) -> int:
    """A stable 64-bit integer for a sample key (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The anchor-sampling generator of one sample: a function of (seed, epoch, key) only."""
    return np.random.default_rng(np.random.SeedSequence([_TAG_SAMPLE, seed, epoch, _key_hash(key)]))


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


# ------------------------------------------------------------------------------------ normalisation


def _mean_std(mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[tuple, tuple]:
    if mean is None or std is None:
        from .transform import IMAGENET_MEAN, IMAGENET_STD

        mean = IMAGENET_MEAN if mean is None else mean
        std = IMAGENET_STD if std is None else std
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def normalize_batch(
    images: torch.Tensor,
    device: torch.device | str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 (x/255 - mean)/std on ``device`` (default: where the images are)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"normalize_batch expects uint8 [B,3,H,W], got {images.dtype} {tuple(images.shape)}")
    scale, bias = _norm_coeffs(mean, std)
    if device is not None:
        # Move the 4x smaller uint8 tensor, then convert on the device.
        images = images.to(device, non_blocking=True)
    out = images.to(torch.float32)
    return out.mul_(torch.from_numpy(scale).to(out.device)).add_(torch.from_numpy(bias).to(out.device))


def _norm_coeffs(mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    """(scale, bias) float32 [1,3,1,1] with x * scale + bias == (x/255 - mean)/std."""
    mean, std = _mean_std(mean, std)
    scale = np.array([1.0 / (255.0 * s) for s in std], dtype=np.float32).reshape(1, 3, 1, 1)
    bias = np.array([-m / s for m, s in zip(mean, std)], dtype=np.float32).reshape(1, 3, 1, 1)
    return scale, bias


# -------------------------------------------------------------------------------------- sources


def _is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _local_path(url: str) -> Path:
    pr = urlparse(url)
    return Path(pr.path) if pr.scheme == "file" else Path(url)


def expand_urls(source: str | Sequence[str]) -> list[str]:
    """A shard list from a list, a single URL, or a brace pattern (``train-{000000..000009}.tar``)."""
    import braceexpand

    if isinstance(source, (str, os.PathLike)):
        return list(braceexpand.braceexpand(os.fspath(source)))
    urls: list[str] = []
    for s in source:
        urls.extend(braceexpand.braceexpand(os.fspath(s)))
    return urls


def _load_manifest(manifest: dict | str | os.PathLike) -> tuple[dict, Path | None]:
    """A manifest given as a dict, a shard directory or a manifest.json path; returns (manifest, dir)."""
    if isinstance(manifest, dict):
        return manifest, None
    p = Path(manifest)
    d = p.parent if p.name == MANIFEST_NAME or p.is_file() else p
    return read_manifest(d), d


@dataclass
class _Source:
    """What the loader reads: shard URLs, their sample counts (None when unknown) and the manifest."""

    urls: list[str]
    counts: list[int] | None
    manifest: dict | None


def resolve_source(
    source: str | os.PathLike | Sequence[str],
    manifest: dict | str | os.PathLike | None = None,
    allow_incomplete: bool = False,
) -> _Source:
    """Turn a shard directory, URL list or brace pattern into URLs, per-shard counts and the manifest."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        man, _ = _load_manifest(manifest if manifest is not None else source)
        _check_complete(man, Path(source), allow_incomplete)
        shards = man.get("shards") or []
        urls = [str(Path(source) / s["name"]) for s in shards]
        return _Source(urls, [int(s["samples"]) for s in shards], man)

    urls = expand_urls(source)
    if not urls:
        raise LoaderError(f"no shard URLs in source {source!r}")
    man = None
    where = None
    if manifest is not None:
        man, where = _load_manifest(manifest)
    elif all(_is_local(u) for u in urls):
        parents = {_local_path(u).resolve().parent for u in urls}
        if len(parents) == 1 and (next(iter(parents)) / MANIFEST_NAME).exists():
            where = next(iter(parents))
            man = read_manifest(where)
    if man is None:
        return _Source(urls, None, None)
    _check_complete(man, where, allow_incomplete)
    listed = {s["name"]: int(s["samples"]) for s in man.get("shards") or []}
    counts = []
    for u in urls:
        name = os.path.basename(urlparse(u).path if not _is_local(u) else str(_local_path(u)))
        if name not in listed:
            raise LoaderError(
                f"shard {u!r} is not listed in the manifest{f' in {where}' if where else ''}; "
                "pass num_anchors= (and no manifest) to read shards the manifest does not describe"
            )
        counts.append(listed[name])
    return _Source(urls, counts, man)


def _check_complete(man: dict, where: Path | None, allow_incomplete: bool) -> None:
    if not man.get("complete") and not allow_incomplete:
        raise LoaderError(
            f"the manifest{f' in {where}' if where else ''} is not complete (the build was interrupted "
            "or is still running); resume the build, or pass allow_incomplete=True to read the shards "
            "published so far"
        )


# ----------------------------------------------------------------------------------- epoch plan


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each (rank, worker) slot reads in one epoch, and how many samples it yields."""

    slots: tuple[tuple[int, ...], ...]  # shard indices per slot; slot = worker * world_size + rank
    quotas: tuple[int, ...] | None  # resampled mode: exact samples per slot; None otherwise
    order: tuple[int, ...]  # the epoch's shard order (resampled mode wraps round it)


def plan_epoch(
    n_shards: int, counts: Sequence[int] | None, *, seed: int, epoch: int, shuffle: bool,
    world_size: int, workers: int, resampled: bool,
) -> EpochPlan:
    """Permute the shards with an rng from (seed, epoch) and deal them round-robin to the slots."""
    slots_n = world_size * workers
    if n_shards < slots_n:
        raise LoaderError(
            f"{n_shards} shard(s) cannot feed {world_size} rank(s) x {workers} worker(s) = {slots_n} "
            "streams (each stream reads whole shards); use fewer workers, or rebuild with smaller "
            "--samples-per-shard"
        )
    order = list(range(n_shards))
    if shuffle:
        order = [int(i) for i in _rng(_TAG_SHARDS, seed, epoch).permutation(n_shards)]
    slots = tuple(tuple(order[s::slots_n]) for s in range(slots_n))
    quotas = None
    if resampled:
        if counts is None:
            raise LoaderError("resampled=True needs the per-shard sample counts: give the loader a manifest")
        per_rank = math.ceil(sum(counts) / world_size)
        q = []
        for s in range(slots_n):
            w = s // world_size
            q.append(per_rank // workers + (1 if w < per_rank % workers else 0))
        quotas = tuple(q)
    return EpochPlan(slots, quotas, tuple(order))


def _slot_samples(plan: EpochPlan, counts: Sequence[int] | None, slot: int) -> int | None:
    if plan.quotas is not None:
        return plan.quotas[slot]
    if counts is None:
        return None
    return sum(counts[i] for i in plan.slots[slot])


def _batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


# ---------------------------------------------------------------------------------- raw reading


def _open_url(url: str):
    if _is_local(url):
        return open(_local_path(url), "rb", buffering=_READ_BUFSIZE)
    from webdataset.gopen import gopen

    return gopen(url, "rb", bufsize=_READ_BUFSIZE)


@dataclass
class _Raw:
    """One encoded sample as read from the tar: its members, or why it is unusable."""

    url: str
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None


def iter_raw_samples(url: str, on_error: str = "raise", skips: list | None = None) -> Iterator[_Raw]:
    """Yield the encoded samples of one shard URL; never unpickles, never uses a member name as a path.

    A bad member (pickle-type extension, traversal name, non-file, oversized, duplicate) raises
    ShardFormatError naming the URL and key, or with on_error="skip" marks its sample as unusable.
    A broken stream raises, or is skipped from that point on (recorded in ``skips``).
    """
    cur: _Raw | None = None
    try:
        stream = _open_url(url)
    except OSError as e:
        _fail(on_error, skips, f"{url}: cannot open shard: {e}")
        return
    finished = False
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")
        for info in tar:
            key, ext = split_member_name(info.name)
            if cur is None or key != cur.key:
                if cur is not None:
                    yield cur
                cur = _Raw(url, key)
            if cur.error is not None:
                continue
            problem = member_problem(info, f"{url}: key {cur.key!r}", cur.members)
            if problem is not None:
                if on_error == "raise":
                    raise ShardFormatError(problem)
                cur.error = problem
                continue
            if ext in KNOWN_EXTS:
                f = tar.extractfile(info)
                cur.members[ext] = f.read() if f is not None else b""
        if cur is not None:
            yield cur
        finished = True
    except (tarfile.TarError, OSError, EOFError) as e:
        after = f" after key {cur.key!r}" if cur is not None else ""
        _fail(on_error, skips, f"{url}: unreadable shard{after}: {type(e).__name__}: {e}")
    finally:
        try:
            stream.close()  # a pipe: stream raises here when its command failed
        except Exception as e:  # noqa: BLE001 - any failure of the producer means a broken shard
            # Only a stream read to its end can be blamed; one closed early may see SIGPIPE.
            if finished:
                _fail(on_error, skips, f"{url}: shard stream failed on close: {e}")


def _fail(on_error: str, skips: list | None, message: str) -> None:
    if on_error == "raise":
        raise ShardFormatError(message)
    if skips is not None:
        skips.append(message)


def shuffle_buffer(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Reservoir-style shuffle: keep ``size`` items, emit a random one for each new item."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], item = item, buf[j]
        yield item
    while buf:
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


# -------------------------------------------------------------------------------------- decoding


@dataclass
class Decoded:
    """One decoded sample, before collation."""

    key: str
    image: np.ndarray  # uint8 [H, W, 3]
    meta: dict
    boxes: np.ndarray  # float32 [K, 4]
    labels: np.ndarray  # int64 [K]
    anchor_labels: np.ndarray  # int8 [A] in {1, 0, -1}, after sampling
    matched: np.ndarray  # int32 [A]


@dataclass(frozen=True)
class DecodeConfig:
    """What decoding needs, shipped to each worker."""

    num_anchors: int
    image_hw: tuple[int, int] | None
    seed: int
    epoch: int
    rpn_batch_size: int | None
    positive_fraction: float


def decode_image_array(data: bytes, image_hw: tuple[int, int] | None) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 [H,W,3]; the size is checked from the header before any pixel is decoded."""
    img = Image.open(io.BytesIO(data))
    if img.format not in ("JPEG", "PNG"):
        raise ValueError(f"image is {img.format}, not JPEG or PNG")
    if image_hw is not None and (img.height, img.width) != tuple(image_hw):
        raise ValueError(f"image is {img.height}x{img.width} (HxW), the shards' canvas is {image_hw[0]}x{image_hw[1]}")
    img.load()
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def _boxes(meta: dict, name: str) -> np.ndarray:
    b = np.asarray(meta.get(name, []), dtype=np.float32)
    if b.size == 0:
        return np.zeros((0, 4), np.float32)
    if b.ndim != 2 or b.shape[1] != 4 or not np.isfinite(b).all():
        raise ValueError(f"JSON {name!r} is not a finite [K, 4] list")
    return b


def decode_sample(raw: _Raw, cfg: DecodeConfig) -> Decoded:
    """Decode one sample and sample its anchors; any problem raises ShardFormatError naming URL and key."""
    from . import anchors as anc

    where = f"{raw.url}: key {raw.key!r}"
    if raw.error is not None:
        raise ShardFormatError(raw.error)
    image_ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
    missing = [e for e in ("json", anc.TARGETS_EXT) if e not in raw.members]
    if image_ext is None:
        missing.insert(0, "/".join(IMAGE_EXTS))
    if missing:
        raise ShardFormatError(f"{where}: missing member(s) .{', .'.join(missing)}")
    stage = "image"
    try:
        image = decode_image_array(raw.members[image_ext], cfg.image_hw)
        stage = "json"
        meta = json.loads(raw.members["json"])
        if not isinstance(meta, dict):
            raise ValueError("JSON record is not an object")
        boxes = _boxes(meta, "boxes")
        labels = np.asarray(meta.get("labels", []), dtype=np.int64).reshape(-1)
        if len(labels) != len(boxes):
            raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
        stage = "anchor targets"
        stored, matched = anc.unpack_targets(raw.members[anc.TARGETS_EXT], cfg.num_anchors)
        pos = stored == 1
        if pos.any() and (matched[pos].min() < 0 or matched[pos].max() >= len(boxes)):
            raise ValueError(f"a positive anchor is matched to a box index outside 0..{len(boxes) - 1}")
    except ShardFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL, json, zipfile and numpy raise assorted types on bad bytes
        raise ShardFormatError(f"{where}: corrupt {stage}: {type(e).__name__}: {e}") from e
    if cfg.rpn_batch_size is None:
        anchor_labels = stored
    else:
        # Same draws as anchors.sample_labels, written straight into a compact int8 row.
        pos, neg = anc.sample_indices(stored, cfg.rpn_batch_size, cfg.positive_fraction,
                                      rng=sample_rng(cfg.seed, cfg.epoch, raw.key))
        anchor_labels = np.full(len(stored), -1, dtype=np.int8)
        anchor_labels[pos] = 1
        anchor_labels[neg] = 0
    return Decoded(raw.key, image, meta, boxes, labels, anchor_labels, matched)


# ------------------------------------------------------------------------------------ collation


class _Batch:
    """A collated batch as it travels from a worker: compact tensors (in shared memory) plus metadata.

    Dense targets are ~1 MB per image (int64 labels and a float32 [A, 4] matched box per anchor), so
    they are not what travels: the worker sends int8 labels and the (few) positives with their boxes,
    and ``unpack`` in the consumer expands them. The big tensors are allocated straight in shared
    memory inside workers, so the DataLoader queue passes handles instead of copying.
    """

    def __init__(self, images, anchor_labels, pos_index, pos_boxes, boxes, labels, counts, metas, skipped, skip_log):
        self.images = images  # uint8 [B, H, W, 3] (channels last) or normalised float32 [B, 3, H, W]
        self.anchor_labels = anchor_labels  # int8 [B, A], after sampling
        # Small arrays stay NumPy: pickled by value through the queue, where each tensor would
        # cost a shared-memory segment of its own.
        self.pos_index = pos_index  # int64 [P]: flat b * A + a of the positive anchors
        self.pos_boxes = pos_boxes  # float32 [P, 4]: the box each of them is matched to
        self.boxes = boxes  # float32 [sum K, 4]
        self.labels = labels  # int64 [sum K]
        self.counts = counts
        self.metas = metas
        self.skipped = skipped
        self.skip_log = skip_log

    def unpack(self, pin_memory: bool = False) -> tuple[torch.Tensor, list[dict]]:
        """(images, targets) with dense per-image targets; target tensors are views of batch tensors."""
        images = self.images.permute(0, 3, 1, 2) if self.images.dtype == torch.uint8 else self.images
        b, a = self.anchor_labels.shape
        # NumPy's cast: torch's (multi-threaded) one contends with the workers for the same cores.
        anchor_labels = torch.from_numpy(self.anchor_labels.numpy().astype(np.int64))
        # np.zeros maps zero pages lazily: only the pages holding a positive are ever written here.
        matched_gt = torch.from_numpy(np.zeros((b, a, 4), dtype=np.float32))
        matched_gt.numpy().reshape(-1, 4)[self.pos_index] = self.pos_boxes
        boxes, labels = torch.from_numpy(self.boxes), torch.from_numpy(self.labels)
        if pin_memory:
            images, anchor_labels, matched_gt, boxes, labels = (
                t.pin_memory() for t in (images, anchor_labels, matched_gt, boxes, labels))
        targets = []
        start = 0
        for i, (k, meta) in enumerate(zip(self.counts, self.metas)):
            targets.append({
                "boxes": boxes[start:start + k],
                "labels": labels[start:start + k],
                "anchor_labels": anchor_labels[i],
                "anchor_matched_gt": matched_gt[i],
                **meta,
            })
            start += k
        return images, targets


def _stats_only() -> _Batch:
    """An item with no samples, only skip counts (filled in by the stream)."""
    return _Batch(None, None, None, None, None, None, [], [], 0, [])


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, allocated directly in shared memory when ``shared`` (as default_collate does)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return proto.new(storage).view(shape)


def collate(samples: list[Decoded], normalize: bool, mean: tuple, std: tuple, shared: bool = False) -> _Batch:
    """Write decoded samples into batch tensors (shared memory when ``shared``, i.e. inside a worker).

    Filling goes through NumPy views: torch's intra-op thread pool makes small copy kernels many
    times slower on a busy CPU, and the views write straight into the tensors' memory.
    """
    b = len(samples)
    h, w, _ = samples[0].image.shape
    a = len(samples[0].anchor_labels)
    if normalize:
        images = _empty((b, 3, h, w), torch.float32, shared)
        scale, bias = (c[0] for c in _norm_coeffs(mean, std))
    else:
        images = _empty((b, h, w, 3), torch.uint8, shared)
    anchor_labels = _empty((b, a), torch.int8, shared)
    img_np, lab_np = images.numpy(), anchor_labels.numpy()
    pos_index, pos_boxes, metas = [], [], []
    for i, s in enumerate(samples):
        if s.image.shape != (h, w, 3) or len(s.anchor_labels) != a:
            raise ShardFormatError(f"key {s.key!r}: image {s.image.shape[:2]} differs from the batch's {(h, w)}")
        if normalize:
            np.multiply(s.image.transpose(2, 0, 1), scale, out=img_np[i], dtype=np.float32)
            img_np[i] += bias
        else:
            img_np[i] = s.image
        lab_np[i] = s.anchor_labels
        pos = np.flatnonzero(s.anchor_labels == 1)
        pos_index.append(pos + i * a)
        pos_boxes.append(s.boxes[s.matched[pos]])
        m = s.meta
        metas.append({
            "key": s.key,
            "image_id": int(m.get("image_id", -1)),
            "orig_size": tuple(int(v) for v in m.get("orig_size", (h, w))),
            "size": tuple(int(v) for v in m.get("size", (h, w))),
            "scale": tuple(float(v) for v in m.get("scale", (1.0, 1.0))),
            "pad": tuple(int(v) for v in m.get("pad", (0, 0))),
        })
    return _Batch(
        images, anchor_labels,
        np.concatenate(pos_index).astype(np.int64),
        np.concatenate(pos_boxes).astype(np.float32).reshape(-1, 4),
        np.concatenate([s.boxes for s in samples]).astype(np.float32).reshape(-1, 4),
        np.concatenate([s.labels for s in samples]).astype(np.int64),
        [len(s.boxes) for s in samples], metas, 0, [],
    )


# -------------------------------------------------------------------------------------- streams


@dataclass(frozen=True)
class _StreamConfig:
    """Everything one (rank, worker) stream needs; pickled into each DataLoader worker."""

    urls: tuple[str, ...]
    plan: EpochPlan
    rank: int
    world_size: int
    workers: int
    seed: int
    epoch: int
    shuffle: bool
    shuffle_buffer: int
    batch_size: int
    drop_last: bool
    on_error: str
    normalize: bool
    mean: tuple
    std: tuple
    decode: DecodeConfig


class _ShardStream(torch.utils.data.IterableDataset):
    """The batches of one rank; inside a DataLoader worker, of that worker's slot only."""

    def __init__(self, cfg: _StreamConfig):
        super().__init__()
        self.cfg = cfg

    def __iter__(self) -> Iterator[_Batch]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.cfg.workers:
            raise LoaderError(f"planned for {self.cfg.workers} workers, running in {info.num_workers}")
        return _run_stream(self.cfg, worker)


def _raw_stream(cfg: _StreamConfig, slot: int, worker: int, skips: list) -> Iterator[_Raw]:
    """Encoded samples of one slot: its own shards; in resampled mode topped up to the slot's quota."""
    own = cfg.plan.slots[slot]
    if cfg.plan.quotas is None:
        for i in own:
            yield from iter_raw_samples(cfg.urls[i], cfg.on_error, skips)
        return
    # Resampled: own shards first, then shards drawn with replacement, until the quota is met.
    rng = _rng(_TAG_RESAMPLE, cfg.seed, cfg.epoch, cfg.rank, worker)
    quota, n, empty_in_a_row = cfg.plan.quotas[slot], 0, 0
    sequence = iter(own)
    while n < quota:
        i = next(sequence, None)
        if i is None:
            i = int(rng.integers(len(cfg.urls)))
        got = 0
        for raw in iter_raw_samples(cfg.urls[i], cfg.on_error, skips):
            yield raw
            got += 1
            n += 1
            if n >= quota:
                return
        empty_in_a_row = 0 if got else empty_in_a_row + 1
        if empty_in_a_row > 2 * len(cfg.urls) + 8:  # every shard empty or unreadable: never loop forever
            last = f": {skips[-1]}" if skips else ""
            raise ShardFormatError(f"resampled stream found no readable samples in {empty_in_a_row} shard draws{last}")


def _run_stream(cfg: _StreamConfig, worker: int) -> Iterator[_Batch]:
    """Read, shuffle, decode, sample and batch the samples of one (rank, worker) slot."""
    slot = worker * cfg.world_size + cfg.rank
    shared = torch.utils.data.get_worker_info() is not None  # batches cross a process boundary
    skips: list[str] = []
    raws: Iterator[_Raw] = _raw_stream(cfg, slot, worker, skips)
    if cfg.shuffle and cfg.shuffle_buffer > 1:
        raws = shuffle_buffer(raws, cfg.shuffle_buffer, _rng(_TAG_BUFFER, cfg.seed, cfg.epoch, cfg.rank, worker))
    reported = 0

    def emit(samples: list[Decoded] | None) -> _Batch:
        # Each item carries the skips since the previous one; None makes a stats-only item.
        nonlocal reported
        batch = _stats_only() if samples is None else collate(samples, cfg.normalize, cfg.mean, cfg.std, shared)
        batch.skipped, batch.skip_log, reported = len(skips) - reported, skips[reported:], len(skips)
        return batch

    pending: list[Decoded] = []
    for raw in raws:
        try:
            pending.append(decode_sample(raw, cfg.decode))
        except ShardFormatError as e:
            if cfg.on_error == "raise":
                raise
            skips.append(str(e))
        if len(pending) == cfg.batch_size:
            yield emit(pending)
            pending = []
    if pending and not cfg.drop_last:
        yield emit(pending)
    if len(skips) > reported:
        yield emit(None)


def _passthrough(item):
    # DataLoader with batch_size=None applies collate_fn per item; ours arrive already collated.
    return item


# --------------------------------------------------------------------------------------- loader


class ShardLoader:
    """Iterable of (images, targets) over frcnn-shard shards; see make_loader for the options."""

    def __init__(self, src: _Source, *, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                 epoch: int, rpn_batch_size: int | None, positive_fraction: float, normalize: bool,
                 rank: int, world_size: int, resampled: bool, shuffle_buffer: int, on_error: str,
                 drop_last: bool, num_anchors: int, image_hw: tuple[int, int] | None, mean: tuple,
                 std: tuple, pin_memory: bool, prefetch_factor: int | None, timeout: float):
        self.urls = list(src.urls)
        self.counts = src.counts
        self.manifest = src.manifest
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.seed = seed
        self.epoch = epoch
        self.rpn_batch_size = rpn_batch_size
        self.positive_fraction = positive_fraction
        self.normalize = normalize
        self.rank = rank
        self.world_size = world_size
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.on_error = on_error
        self.drop_last = drop_last
        self.num_anchors = num_anchors
        self.image_hw = image_hw
        self.mean, self.std = mean, std
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.timeout = timeout
        self.skipped = 0  # samples skipped (on_error="skip") in the current / last epoch
        self.skip_log: list[str] = []  # their messages (at most MAX_SKIP_LOG)
        self.skipped_total = 0
        self._anchors: torch.Tensor | None = None
        self._plan()  # validate the shard / worker layout now, not at the first batch

    # -- description ---------------------------------------------------------------------------

    @property
    def anchors(self) -> torch.Tensor:
        """The float32 [A, 4] anchors the targets refer to, from the manifest (count and sha256 verified)."""
        if self._anchors is None:
            if self.manifest is None:
                raise LoaderError("no manifest: the anchors are unknown (pass manifest= to make_loader)")
            from . import anchors as anc

            self._anchors = torch.from_numpy(anc.anchors_from_manifest(self.manifest))  # C-contiguous float32
        return self._anchors

    def check_anchors(self, model_anchors: Any, atol: float = 1e-4) -> None:
        """Raise unless a model's own anchor generator gives the shards' anchors, in the same order."""
        from . import anchors as anc

        if self.manifest is None:
            raise LoaderError("no manifest: cannot check anchors (pass manifest= to make_loader)")
        # Compared as float32, the shards' dtype; _to_numpy takes tensors on any device, Boxes and per-level lists.
        anc.check_anchors(anc._to_numpy(model_anchors).astype(np.float32), self.manifest, atol=atol)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: shard order, shuffle buffer and anchor sampling are all reseeded from it."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0 (got {epoch})")
        self.epoch = int(epoch)

    @property
    def workers(self) -> int:
        """Streams per rank: DataLoader workers, or 1 when reading in the main process."""
        return max(1, self.num_workers)

    def _plan(self) -> EpochPlan:
        return plan_epoch(
            len(self.urls), self.counts, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
            world_size=self.world_size, workers=self.workers, resampled=self.resampled,
        )

    def _slots(self) -> list[int]:
        return [w * self.world_size + self.rank for w in range(self.workers)]

    def _slot_counts(self) -> list[int] | None:
        """Samples per stream of this rank in the current epoch (None when the shards' counts are unknown)."""
        plan = self._plan()
        per = [_slot_samples(plan, self.counts, s) for s in self._slots()]
        return None if any(p is None for p in per) else per

    @property
    def num_samples(self) -> int | None:
        """Samples this rank yields in the current epoch (None when the shards' counts are unknown)."""
        per = self._slot_counts()
        return None if per is None else sum(per)

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (each worker ends with its own partial batch)."""
        per = self._slot_counts()
        if per is None:
            raise TypeError("length unknown: the shards' sample counts need a manifest")
        return sum(_batches(p, self.batch_size, self.drop_last) for p in per)

    # -- iteration ------------------------------------------------------------------------------

    def _stream_config(self) -> _StreamConfig:
        return _StreamConfig(
            urls=tuple(self.urls), plan=self._plan(), rank=self.rank, world_size=self.world_size,
            workers=self.workers, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
            shuffle_buffer=self.shuffle_buffer, batch_size=self.batch_size, drop_last=self.drop_last,
            on_error=self.on_error, normalize=self.normalize, mean=self.mean, std=self.std,
            decode=DecodeConfig(self.num_anchors, self.image_hw, self.seed, self.epoch,
                                self.rpn_batch_size, self.positive_fraction),
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[dict]]]:
        stream = _ShardStream(self._stream_config())
        self.skipped, self.skip_log = 0, []
        if self.num_workers == 0:
            items = iter(stream)
        else:
            kw = {"prefetch_factor": self.prefetch_factor} if self.prefetch_factor else {}
            # Pinning happens in unpack, on the dense tensors the training loop receives.
            items = iter(torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, collate_fn=_passthrough,
                timeout=self.timeout, **kw,
            ))
        for item in items:
            if item.skipped:
                self.skipped += item.skipped
                self.skipped_total += item.skipped
                self.skip_log.extend(item.skip_log[: max(0, MAX_SKIP_LOG - len(self.skip_log))])
            if item.images is None:
                continue
            yield item.unpack(self.pin_memory)

    def __repr__(self) -> str:
        return (f"ShardLoader({len(self.urls)} shards, batch_size={self.batch_size}, rank={self.rank}/"
                f"{self.world_size}, workers={self.num_workers}, epoch={self.epoch}, resampled={self.resampled})")


def _dist_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """rank/world_size as given, else from torch.distributed when initialised, else 0/1."""
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
    rank = 0 if rank is None else int(rank)
    world_size = 1 if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise LoaderError(f"need 0 <= rank < world_size (got rank={rank}, world_size={world_size})")
    return rank, world_size


def make_loader(
    source: str | os.PathLike | Sequence[str],
    batch_size: int,
    *,
    shuffle: bool = True,
    num_workers: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    rpn_batch_size: int | None = 256,
    positive_fraction: float = 0.5,
    normalize: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    resampled: bool = False,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    on_error: str = "raise",
    drop_last: bool = False,
    manifest: dict | str | os.PathLike | None = None,
    num_anchors: int | None = None,
    allow_incomplete: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = 2,
    timeout: float = 0,
) -> ShardLoader:
    """Build a loader of (images [B,3,H,W], targets) from a shard directory, URL list or brace pattern.

    num_workers=None picks min(4, CPUs, shards per rank); 0 reads in the calling process.
    """
    if int(batch_size) < 1:
        raise LoaderError(f"batch_size must be >= 1 (got {batch_size})")
    if on_error not in ON_ERROR_CHOICES:
        raise LoaderError(f"on_error must be one of {ON_ERROR_CHOICES} (got {on_error!r})")
    if int(seed) < 0 or int(epoch) < 0:
        raise LoaderError(f"seed and epoch must be >= 0 (got seed={seed}, epoch={epoch})")
    if rpn_batch_size is not None and int(rpn_batch_size) < 1:
        raise LoaderError(f"rpn_batch_size must be >= 1 or None (got {rpn_batch_size})")
    if not 0.0 <= float(positive_fraction) <= 1.0:
        raise LoaderError(f"positive_fraction must be within 0..1 (got {positive_fraction})")
    if int(shuffle_buffer) < 0:
        raise LoaderError(f"shuffle_buffer must be >= 0 (got {shuffle_buffer})")
    rank, world_size = _dist_defaults(rank, world_size)
    src = resolve_source(source, manifest, allow_incomplete)
    man = src.manifest
    if man is not None:
        count = int(man["anchors"]["count"])
        if num_anchors is not None and int(num_anchors) != count:
            raise LoaderError(f"num_anchors={num_anchors} but the manifest records {count} anchors")
        num_anchors = count
        image_hw = tuple(int(v) for v in man["image"]["size"])
        norm = man.get("normalization") or {}
        mean, std = _mean_std(norm.get("mean"), norm.get("std"))
    else:
        if num_anchors is None:
            raise LoaderError(
                f"no manifest found for {source!r}: pass manifest= (a dict, shard directory or manifest.json) "
                "or at least num_anchors="
            )
        image_hw = None
        mean, std = _mean_std(None, None)
    if num_workers is None:
        per_rank = len(src.urls) // world_size
        num_workers = max(0, min(4, os.cpu_count() or 1, per_rank))
        num_workers = 0 if num_workers == 1 else num_workers  # one worker only adds IPC
    if int(num_workers) < 0:
        raise LoaderError(f"num_workers must be >= 0 (got {num_workers})")
    return ShardLoader(
        src, batch_size=int(batch_size), shuffle=bool(shuffle), num_workers=int(num_workers), seed=int(seed),
        epoch=int(epoch), rpn_batch_size=None if rpn_batch_size is None else int(rpn_batch_size),
        positive_fraction=float(positive_fraction), normalize=bool(normalize), rank=rank,
        world_size=world_size, resampled=bool(resampled), shuffle_buffer=int(shuffle_buffer),
        on_error=on_error, drop_last=bool(drop_last), num_anchors=int(num_anchors), image_hw=image_hw,
        mean=mean, std=std, pin_memory=bool(pin_memory), prefetch_factor=prefetch_factor, timeout=timeout,
    )
