"""Read frcnn-shard shards back as training batches: (images, targets) with RPN anchor targets.

Pipeline per (rank, worker) stream: the epoch's shard plan -> tar members grouped into samples by the
format's one group-by-key (no unpickling, checked member names) -> sample-level shuffle buffer over the
still-encoded samples -> decode (image, JSON record, sparse anchor targets) -> anchor sampling on the
sparse targets -> batch. Targets stay sparse until the consumer: a batch carries the sampled anchor
indices and the positives' boxes, and ``_Batch.unpack`` in the training process expands them to the
dense per-anchor tensors the RPN loss takes.

Everything random is derived from (seed, epoch, ...) only: the shard permutation from (seed, epoch),
the shuffle buffer from (seed, epoch, rank, worker), and the anchor sampling and the horizontal-flip
decision of a sample from (seed, epoch, key), each its own stream. Hence an epoch repeats exactly
across runs, and the per-sample targets do not depend on the worker count.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import numbers
import os
import re
import struct
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import braceexpand
import numpy as np
import torch

from . import anchors as anc
from .format.image import decode_stored_image
from .format.members import (
    JSON_EXT, TARGETS_EXT, RawSample, ShardFormatError, group_by_key, image_member, members_problems,
)
from .format.record import Record, RecordError, checked_record, num_classes_of
from .labels import NUM_CLASSES
from .format.targets import SparseTargets, unpack_targets
from .malloc import tune_worker_malloc
from .shards import MANIFEST_NAME, read_manifest, sample_error, store_of, tar_members
from .storage import StoreOutage
from .transform import IMAGENET_MEAN, IMAGENET_STD

ON_ERROR_CHOICES = ("raise", "skip")
DEFAULT_SHUFFLE_BUFFER = 256  # encoded samples (~30-60 KB each), so a few MB per worker
MAX_SKIP_LOG = 1000  # skip messages kept per epoch; the count itself is never capped
_READ_BUFSIZE = 1 << 20

# Domain tags keep the random streams independent even for equal (seed, epoch) numbers; the anchor
# sample's own stream is anchors.sample_rng.
_TAG_SHARDS, _TAG_BUFFER, _TAG_RESAMPLE, _TAG_FLIP = 0x5348, 0x4255, 0x5245, 0x464C


class LoaderError(ValueError):
    """The loader cannot be set up as asked (bad source, options or shard/worker layout)."""


class ImageTransformError(LoaderError):
    """The ``image_transform`` callable failed or changed the image's shape or dtype; names the sample key."""


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


# ---------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class LoaderOptions:
    """Every option of make_loader, validated once here (LoaderError names the bad one).

    rank/world_size None: from torch.distributed when initialised, else 0/1. num_workers None:
    min(4, CPUs, shards per rank), and 0 (the calling process) when that is 1. decode_threads None:
    one per CPU (at most the batch size) when num_workers is 0 and there is no image_transform, else 0.
    """

    batch_size: int
    shuffle: bool = True
    num_workers: int | None = None
    seed: int = 0
    epoch: int = 0  # the first epoch; ShardLoader.set_epoch changes it
    rpn_batch_size: int | None = 256  # anchors sampled per image; None delivers the stored labels
    positive_fraction: float = 0.5
    normalize: bool = True  # float32 ImageNet-normalised [B,3,H,W]; False: uint8 (normalize_batch later)
    rank: int | None = None
    world_size: int | None = None
    resampled: bool = False  # every rank yields the same number of samples (shards drawn again)
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    on_error: str = "raise"  # or "skip": count and log bad samples instead of raising
    drop_last: bool = False
    pin_memory: bool = False
    prefetch_factor: int | None = 2
    timeout: float = 0
    strict: bool = False  # fewer shards than streams is an error (else fewer workers, with a warning)
    hflip: float = 0.0  # probability that a sample is mirrored left-right (needs shards with flip targets)
    image_transform: Callable[[np.ndarray], np.ndarray] | None = None  # uint8 HWC -> same shape and dtype
    decode_threads: int | None = None  # threads decoding a batch's samples side by side in each stream

    def __post_init__(self) -> None:
        rules = [
            (int(self.batch_size) >= 1, f"batch_size must be >= 1 (got {self.batch_size})"),
            (self.on_error in ON_ERROR_CHOICES, f"on_error must be one of {ON_ERROR_CHOICES} (got {self.on_error!r})"),
            (int(self.seed) >= 0 and int(self.epoch) >= 0,
             f"seed and epoch must be >= 0 (got seed={self.seed}, epoch={self.epoch})"),
            (self.rpn_batch_size is None or int(self.rpn_batch_size) >= 1,
             f"rpn_batch_size must be >= 1 or None (got {self.rpn_batch_size})"),
            (0.0 <= float(self.positive_fraction) <= 1.0,
             f"positive_fraction must be within 0..1 (got {self.positive_fraction})"),
            (int(self.shuffle_buffer) >= 0, f"shuffle_buffer must be >= 0 (got {self.shuffle_buffer})"),
            (self.num_workers is None or int(self.num_workers) >= 0,
             f"num_workers must be >= 0 (got {self.num_workers})"),
            (isinstance(self.hflip, numbers.Real) and not isinstance(self.hflip, bool) and 0.0 <= self.hflip <= 1.0,
             f"hflip must be a probability within 0..1 (got {self.hflip!r})"),
            (self.image_transform is None or callable(self.image_transform),
             f"image_transform must be a callable or None (got {type(self.image_transform).__name__})"),
            (self.decode_threads is None or int(self.decode_threads) >= 0,
             f"decode_threads must be >= 0 or None (got {self.decode_threads})"),
        ]
        for ok, message in rules:
            if not ok:
                raise LoaderError(message)


@dataclass(frozen=True)
class _Dataset:
    """What the manifest says about every sample: anchor count, canvas size, normalisation."""

    num_anchors: int
    image_hw: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip_targets: bool | None = None  # the shards store the mirrored image's targets (None: no manifest says)
    num_classes: int = NUM_CLASSES  # background included (the manifest's classes): labels lie in 1..num_classes-1


# ------------------------------------------------------------------------------------ normalisation


def _mean_std(mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[tuple, tuple]:
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


_PASSTHROUGH_SCHEMES = ("pipe", "http", "https")  # opened by WebDataset's gopen, as WebDataset users expect


def _scheme(url: str) -> str:
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", url)
    return m.group(1).lower() if m and len(m.group(1)) > 1 else ""


def _split_url(url: str) -> tuple[str, str]:
    """(folder, name) of a shard URL or path."""
    folder, _, name = url.rstrip("/").rpartition("/")
    return folder or ".", name


def expand_urls(source: str | Sequence[str]) -> list[str]:
    """A shard list from a list, a single URL, or a brace pattern (``train-{000000..000009}.tar``)."""
    if isinstance(source, (str, os.PathLike)):
        return list(braceexpand.braceexpand(os.fspath(source)))
    urls: list[str] = []
    for s in source:
        urls.extend(braceexpand.braceexpand(os.fspath(s)))
    return urls


def _manifest_folder(text: str) -> str:
    """The split folder of a folder path or URL, or of its manifest.json."""
    return _split_url(text)[0] if text.rstrip("/").endswith(MANIFEST_NAME) else text


def _load_manifest(manifest: dict | str | os.PathLike, storage_options: dict | None) -> tuple[dict, str | None]:
    """A manifest given as a dict, a shard directory or a manifest.json path / URL; returns (manifest, folder)."""
    if isinstance(manifest, dict):
        return manifest, None
    text = os.fspath(manifest)
    folder = _manifest_folder(text)
    return read_manifest(store_of(folder, storage_options)), folder


@dataclass
class _Source:
    """What the loader reads: shard URLs, their sample counts (None when unknown) and the manifest."""

    urls: list[str]
    counts: list[int] | None
    manifest: dict | None


def _is_folder_source(text: str) -> bool:
    """A shard folder (or its manifest.json), as opposed to shard files and patterns."""
    return not text.endswith(".tar") and "{" not in text and _scheme(text) not in _PASSTHROUGH_SCHEMES


def _folder_source(text: str, storage_options: dict | None, allow_incomplete: bool) -> _Source:
    """The shards of a split folder, local or remote, from its manifest; errors that say what the folder is."""
    folder = _manifest_folder(text)
    store = store_of(folder, storage_options)
    if store.is_local and not store.path.is_dir():
        what = "not a folder" if store.path.exists() else "no such folder"
        raise LoaderError(f"{what}: {folder} (give the split folder a build wrote, e.g. shards/train)")
    if not store.exists(MANIFEST_NAME):
        splits = [n for n in store.names() if not n.startswith("_") and store.sub(n).exists(MANIFEST_NAME)]
        if splits:
            raise LoaderError(f"{folder} is a build's output root, not a split folder; its splits are "
                              f"{', '.join(splits)}: pass {store.sub(splits[0]).url}")
    man = read_manifest(store)  # ManifestError says why there is none (an unfinished build, ...)
    _check_complete(man, store.url, allow_incomplete)
    _check_not_empty(man, store.url)
    shards = man.get("shards") or []
    return _Source([store.location(s["name"]) for s in shards], [int(s["samples"]) for s in shards], man)


def resolve_source(
    source: str | os.PathLike | Sequence[str],
    manifest: dict | str | os.PathLike | None = None,
    allow_incomplete: bool = False,
    storage_options: dict | None = None,
) -> _Source:
    """Turn a split folder (local or a URL), its manifest.json, a URL list or a brace pattern into URLs,
    per-shard counts and the manifest."""
    if isinstance(source, (str, os.PathLike)) and _is_folder_source(os.fspath(source)) and manifest is None:
        return _folder_source(os.fspath(source), storage_options, allow_incomplete)
    urls = expand_urls(source)
    if not urls:
        raise LoaderError(f"no shard URLs in source {source!r}")
    man, where = None, None
    if manifest is not None:
        man, where = _load_manifest(manifest, storage_options)
    else:
        folders = {_split_url(u)[0] for u in urls}
        if len(folders) == 1 and _scheme(urls[0]) not in _PASSTHROUGH_SCHEMES:
            store = store_of(next(iter(folders)), storage_options)
            if store.exists(MANIFEST_NAME):
                man, where = read_manifest(store), store.url
    if man is None:
        return _Source(urls, None, None)
    _check_complete(man, where, allow_incomplete)
    _check_not_empty(man, where)
    listed = {s["name"]: int(s["samples"]) for s in man.get("shards") or []}
    counts = []
    for u in urls:
        name = _split_url(u)[1]
        if name not in listed:
            raise LoaderError(
                f"shard {u!r} is not listed in the manifest{f' in {where}' if where else ''}; "
                "pass num_anchors= (and no manifest) to read shards the manifest does not describe"
            )
        counts.append(listed[name])
    return _Source(urls, counts, man)


def _check_complete(man: dict, where: str | None, allow_incomplete: bool) -> None:
    if not man.get("complete") and not allow_incomplete:
        raise LoaderError(
            f"the manifest{f' in {where}' if where else ''} is not complete (the build was interrupted "
            "or is still running); resume the build, or pass allow_incomplete=True to read the shards "
            "published so far"
        )


def _check_not_empty(man: dict, where: str | None) -> None:
    """A split whose manifest lists no sample at all is refused: training on it would silently train on nothing."""
    shards = man.get("shards") or []
    if sum(int(s["samples"]) for s in shards) == 0:
        at = f" in {where}" if where else ""
        info = f"frcnn-shard info {where}" if where else "frcnn-shard info <split folder>"
        raise LoaderError(
            f"the manifest{at} lists 0 samples ({len(shards)} shard(s)): every row of the source was dropped or "
            f"none was built; drops.jsonl next to the manifest says why each row was dropped (run `{info}` for "
            "a summary), then fix the source or the build options and rebuild"
        )


# ----------------------------------------------------------------------------------- epoch plan


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each (rank, worker) slot reads in one epoch, and how many samples it yields."""

    slots: tuple[tuple[int, ...], ...]  # shard indices per slot; slot = worker * world_size + rank
    quotas: tuple[int, ...] | None  # resampled mode: exact samples per slot; None otherwise


def feedable_workers(n_shards: int, world_size: int, workers: int, strict: bool) -> int:
    """The workers per rank that whole shards can feed (each stream reads whole shards).

    With strict, fewer shards than streams is a LoaderError; otherwise the count drops to what the
    shards can feed (at least 1), and a rank may get no shard at all when there are fewer shards than ranks.
    """
    if n_shards >= world_size * workers:
        return workers
    if strict:
        raise LoaderError(
            f"{n_shards} shard(s) cannot feed {world_size} rank(s) x {workers} worker(s) = {world_size * workers} "
            "streams (each stream reads whole shards); use fewer workers, or rebuild with a smaller rows_per_shard")
    return max(1, n_shards // world_size)


def plan_epoch(
    n_shards: int, counts: Sequence[int] | None, *, seed: int, epoch: int, shuffle: bool,
    world_size: int, workers: int, resampled: bool,
) -> EpochPlan:
    """Permute the shards with an rng from (seed, epoch) and deal them round-robin to the slots."""
    slots_n = world_size * workers
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
    return EpochPlan(slots, quotas)


def _slot_samples(plan: EpochPlan, counts: Sequence[int] | None, slot: int) -> int | None:
    if plan.quotas is not None:
        return plan.quotas[slot]
    if counts is None:
        return None
    return sum(counts[i] for i in plan.slots[slot])


def _batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


# ---------------------------------------------------------------------------------- raw reading


def _open_url(url: str, storage_options: dict | None = None):
    """A streaming reader of one shard: a local file, an object (retried reads), or a pipe:/http URL."""
    if _scheme(url) in _PASSTHROUGH_SCHEMES:
        from webdataset.gopen import gopen

        return gopen(url, "rb", bufsize=_READ_BUFSIZE)
    folder, name = _split_url(url)
    return store_of(folder, storage_options).open_read(name, _READ_BUFSIZE)


def iter_raw_samples(url: str, on_error: str = "raise", skips: list | None = None, expected: int | None = None,
                     storage_options: dict | None = None, store_down: StoreOutage | None = None
                     ) -> Iterator[tuple[str, RawSample]]:
    """Yield (url, encoded sample) for one shard URL; never unpickles, never uses a member name as a path.

    A sample breaking a member rule (pickle-type extension, traversal name, non-file, oversized,
    duplicate) raises ShardFormatError naming the URL and key, or with on_error="skip" is yielded
    with its problems (decode_sample then refuses it). A broken stream raises, or is skipped from
    that point on: ``skips`` gets (samples lost, message), the samples lost being what the manifest's
    count (``expected``) says never arrived, or 1 when the count is unknown. A shard that ends with
    fewer samples than ``expected`` is the same loss; one with more is an error too (with "skip", the
    samples beyond the count are not delivered, and counted). ``store_down``: the stream's record of a
    store that failed for good (see StoreOutage): while it says so, a remote shard gets one attempt.
    """
    key, got = None, 0
    try:
        stream = _open_url(url, storage_options)
    except OSError as e:
        _fail(on_error, skips, f"{url}: cannot open shard: {e}", expected if expected else 1)
        return
    if store_down is not None:
        store_down.arm(stream)
    finished = False
    try:
        samples = group_by_key(tar_members(stream), where=url if on_error == "raise" else None)
        for raw in samples:
            key = raw.key or key
            got += 1
            if expected is not None and got > expected:
                _too_many(url, expected, samples, on_error, skips)
                break
            yield url, raw
        finished = True
    except (tarfile.TarError, OSError, EOFError) as e:
        after = f" after key {key!r}" if key is not None else ""
        lost = max(expected - got, 1) if expected is not None else 1
        _fail(on_error, skips, f"{url}: unreadable shard{after}, {lost} sample(s) lost: {type(e).__name__}: {e}", lost)
        if store_down is not None:
            store_down.failed(e)
    finally:
        try:
            stream.close()  # a pipe: stream raises here when its command failed
        except Exception as e:  # noqa: BLE001 - any failure of the producer means a broken shard
            # Only a stream read to its end can be blamed; one closed early may see SIGPIPE.
            if finished:
                _fail(on_error, skips, f"{url}: shard stream failed on close: {e}", 1)
    if finished and store_down is not None:
        store_down.succeeded()
    if finished and expected is not None and got < expected:
        after = f" after key {key!r}" if key is not None else ""
        _fail(on_error, skips, f"{url}: the shard ends{after} with {got} sample(s) where the manifest says "
                               f"{expected}: {expected - got} sample(s) lost", expected - got)


def _too_many(url: str, expected: int, rest: Iterator, on_error: str, skips: list | None) -> None:
    """A shard holding more samples than its manifest entry: an error, or with "skip" the extra ones counted."""
    where = f"{url}: more samples than the manifest's {expected}"
    if on_error == "raise":
        _fail(on_error, skips, f"{where}; the shard does not match its manifest (rebuild it, or run frcnn-shard "
                               "check on the folder)", 1)
    extra = 1
    try:
        for _ in rest:  # counted only (one encoded sample in memory at a time), never delivered
            extra += 1
    except (tarfile.TarError, OSError, EOFError, ShardFormatError):
        pass  # the shard is already refused beyond its count; its tail's damage changes nothing
    _fail(on_error, skips, f"{where} ({expected + extra}): the {extra} sample(s) beyond it are not delivered", extra)


def _fail(on_error: str, skips: list | None, message: str, lost: int) -> None:
    if on_error == "raise":
        raise ShardFormatError(message)
    if skips is not None:
        skips.append((lost, message))


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
    """One decoded sample, before collation; its anchor targets as index lists.

    The training loss sees: 1 at ``ones``, ``other_value`` at ``others``, ``fill`` everywhere else;
    ``ones_boxes`` is the matched box of each of ``ones``.
    """

    key: str
    image: np.ndarray  # uint8 [H, W, 3]
    record: Record
    ones: np.ndarray  # int64 [P]: positive anchors (sampled, or all stored ones)
    ones_boxes: np.ndarray  # float32 [P, 4]
    others: np.ndarray  # int64: sampled negatives (other_value 0), or stored ignored (other_value -1)
    flipped: bool = False  # mirrored left-right: image, record boxes and targets are the mirrored ones


def _label_values(rpn_batch_size: int | None) -> tuple[int, int]:
    """(fill, other_value): sampled targets are -1 but for the sample; stored ones are 0 but for the ignored."""
    return (0, -1) if rpn_batch_size is None else (-1, 0)


def _sampled(targets: SparseTargets, key: str, ds: _Dataset, opts: LoaderOptions, epoch: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positives, their matched box index, others) of one sample, sampled for this epoch when asked."""
    if opts.rpn_batch_size is None:
        return targets.positive, targets.matched, targets.ignore
    pos, neg = anc.sample_indices(targets, ds.num_anchors, opts.rpn_batch_size, opts.positive_fraction,
                                  rng=anc.sample_rng(opts.seed, epoch, key))
    return pos, targets.matched[np.searchsorted(targets.positive, pos)], neg


def hflip_decision(seed: int, epoch: int, key: str, p: float) -> bool:
    """Whether sample ``key`` is mirrored in this epoch: a stream of its own from (seed, epoch, key)."""
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    # A uniform in [0, 1) from a hash of (tag, seed, epoch, key): a stream of its own (turning hflip on never
    # changes the anchor sample, anchors.sample_rng, of any sample), and ~10x cheaper than a seeded Generator.
    digest = hashlib.blake2b(struct.pack("<3Q", _TAG_FLIP, seed, epoch) + key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64 < p


def _transformed(image: np.ndarray, transform: Callable, where: str) -> np.ndarray:
    """The user's image_transform applied to a writable uint8 HWC array; it must keep shape and dtype."""
    if not image.flags.writeable:
        image = np.array(image)  # PIL's arrays are read-only; the transform may work in place
    try:
        out = transform(image)
    except Exception as e:  # noqa: BLE001 - the user's code: say which sample it failed on
        raise ImageTransformError(f"{where}: image_transform raised {type(e).__name__}: {e}") from e
    if not isinstance(out, np.ndarray) or out.shape != image.shape or out.dtype != np.uint8:
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ImageTransformError(
            f"{where}: image_transform must return a uint8 array of the input's shape {image.shape} "
            f"(image-only transforms that keep the geometry: the boxes and anchor targets refer to it), got {got}")
    return out


def decode_sample(url: str, raw: RawSample, ds: _Dataset, opts: LoaderOptions, epoch: int,
                  out: np.ndarray | None = None) -> Decoded:
    """Decode one sample (mirrored when its flip decision says so) and sample its anchors.

    A bad sample raises ShardFormatError naming URL and key; a failing image_transform ImageTransformError.
    ``out``: the uint8 [H, W, 3] batch row the image is decoded into (the sample's image is then that row).
    """
    error = sample_error(raw, url)
    if error is not None:
        raise error
    where = f"{url}: key {raw.key!r}"
    problems = members_problems(raw.members.keys(), None)
    if problems:
        raise ShardFormatError(f"{where}: {problems[0]}")
    ext = image_member(raw.members)
    flip = hflip_decision(opts.seed, epoch, raw.key, opts.hflip)
    stage = "image"
    try:
        image = decode_stored_image(raw.members[ext], ext, ds.image_hw, mirror=flip, out=out)
        stage = "json"
        record = checked_record(raw.members[JSON_EXT], ds.image_hw, ds.num_classes, raw.key)  # check's rules
        stage = "anchor targets"
        targets = unpack_targets(raw.members[TARGETS_EXT], ds.num_anchors, flipped=flip)
        if len(targets.matched) and targets.matched.max() >= len(record.boxes):
            raise ValueError(f"a positive anchor is matched to a box index outside 0..{len(record.boxes) - 1}")
    except ShardFormatError:
        raise
    except RecordError as e:  # a record rule broken: "rule: detail", as check words it
        raise ShardFormatError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL, json, zipfile and numpy raise assorted types on bad bytes
        raise ShardFormatError(f"{where}: corrupt {stage}: {type(e).__name__}: {e}") from e
    if flip:
        record = record.hflip()  # the image was decoded mirrored
    if opts.image_transform is not None:
        image = _transformed(image, opts.image_transform, where)
        if out is not None and image is not out:
            out[...] = image  # collate takes the batch row as this sample's image
            image = out
    ones, matched, others = _sampled(targets, raw.key, ds, opts, epoch)
    return Decoded(raw.key, image, record, ones, record.boxes[matched], others, flip)


# ------------------------------------------------------------------------------------ collation


class _Batch:
    """A collated batch as it travels from a worker: the images (in shared memory) plus compact targets.

    Dense targets are ~1 MB per image (int64 labels and a float32 [A, 4] matched box per anchor), so
    they are not what travels: the worker sends the anchor index lists and the positives' boxes, and
    ``unpack`` in the consumer expands them. The image tensor is allocated straight in shared memory
    inside workers, so the DataLoader queue passes a handle instead of copying.
    """

    def __init__(self, images, num_anchors: int, fill: int, other_value: int, ones, ones_boxes, others,
                 boxes, labels, counts, metas, skipped=0, skip_log=()):
        self.images = images  # uint8 [B, H, W, 3] (channels last) or normalised float32 [B, 3, H, W]
        self.num_anchors, self.fill, self.other_value = num_anchors, fill, other_value
        # Small arrays stay NumPy: pickled by value through the queue, where each tensor would
        # cost a shared-memory segment of its own. Anchor indices are flat: b * A + a.
        self.ones, self.ones_boxes, self.others = ones, ones_boxes, others
        self.boxes = boxes  # float32 [sum K, 4]
        self.labels = labels  # int64 [sum K]
        self.counts = counts
        self.metas = metas
        self.skipped = skipped
        self.skip_log = list(skip_log)

    def dense_targets(self) -> tuple[np.ndarray, np.ndarray]:
        """anchor_labels int64 [B, A] and anchor_matched_gt float32 [B, A, 4] from the index lists."""
        b, a = len(self.counts), self.num_anchors
        labels = np.full((b, a), self.fill, dtype=np.int64)
        flat = labels.reshape(-1)
        flat[self.others] = self.other_value
        flat[self.ones] = 1
        # np.zeros maps zero pages lazily: only the pages holding a positive are ever written here.
        matched = np.zeros((b, a, 4), dtype=np.float32)
        matched.reshape(-1, 4)[self.ones] = self.ones_boxes
        return labels, matched

    def unpack(self, pin_memory: bool = False) -> tuple[torch.Tensor, list[dict]]:
        """(images, targets) with dense per-image targets; target tensors are views of batch tensors."""
        images = self.images.permute(0, 3, 1, 2) if self.images.dtype == torch.uint8 else self.images
        labels_np, matched_np = self.dense_targets()
        anchor_labels, matched_gt = torch.from_numpy(labels_np), torch.from_numpy(matched_np)
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


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, allocated directly in shared memory when ``shared`` (as default_collate does)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return proto.new(storage).view(shape)


def _meta(s: Decoded) -> dict:
    """The per-image fields a target dict carries besides the tensors."""
    r = s.record
    return {"key": r.key, "image_id": r.image_id, "orig_size": r.orig_size, "size": r.size,
            "scale": r.scale, "pad": r.pad, "flipped": s.flipped}


def _batch_rows(ds: _Dataset, opts: LoaderOptions, shared: bool) -> torch.Tensor | None:
    """The uint8 [B, H, W, 3] batch the next samples are decoded straight into, or None (normalised
    batches, or a canvas size not known in advance): then collate copies the decoded images."""
    if opts.normalize or ds.image_hw is None:
        return None
    return _shared_empty((opts.batch_size, *ds.image_hw, 3), torch.uint8, shared)


def _images(samples: list[Decoded], ds: _Dataset, opts: LoaderOptions, shared: bool) -> torch.Tensor:
    """The batch's image tensor, filled from the decoded images (normalised into float32 when asked).

    Filling goes through NumPy views: torch's intra-op thread pool makes small copy kernels many
    times slower on a busy CPU, and the views write straight into the tensors' memory.
    """
    b = len(samples)
    h, w, _ = samples[0].image.shape
    if opts.normalize:
        images = _shared_empty((b, 3, h, w), torch.float32, shared)
        scale, bias = (c[0] for c in _norm_coeffs(ds.mean, ds.std))
    else:
        images = _shared_empty((b, h, w, 3), torch.uint8, shared)
    img_np = images.numpy()
    for i, s in enumerate(samples):
        if s.image.shape != (h, w, 3):
            raise ShardFormatError(f"key {s.key!r}: image {s.image.shape[:2]} differs from the batch's {(h, w)}")
        if opts.normalize:
            np.multiply(s.image.transpose(2, 0, 1), scale, out=img_np[i], dtype=np.float32)
            img_np[i] += bias
        else:
            img_np[i] = s.image
    return images


def collate(samples: list[Decoded], ds: _Dataset, opts: LoaderOptions, shared: bool = False,
            rows: torch.Tensor | None = None) -> _Batch:
    """Write decoded samples into one batch (the image tensor in shared memory when ``shared``, i.e. in a worker).

    ``rows``: the uint8 batch (from _batch_rows) the samples were decoded into, row i holding sample i.
    """
    b = len(samples)
    images = rows[:b] if rows is not None else _images(samples, ds, opts, shared)
    a = ds.num_anchors
    fill, other = _label_values(opts.rpn_batch_size)
    return _Batch(
        images, a, fill, other,
        np.concatenate([s.ones + i * a for i, s in enumerate(samples)]).astype(np.int64),
        np.concatenate([s.ones_boxes for s in samples]).astype(np.float32).reshape(-1, 4),
        np.concatenate([s.others + i * a for i, s in enumerate(samples)]).astype(np.int64),
        np.concatenate([s.record.boxes for s in samples]).astype(np.float32).reshape(-1, 4),
        np.concatenate([s.record.labels for s in samples]).astype(np.int64),
        [len(s.record.boxes) for s in samples], [_meta(s) for s in samples],
    )


def _stats_only(ds: _Dataset) -> _Batch:
    """An item with no samples, only skip counts (filled in by the stream)."""
    empty = np.zeros(0, np.int64)
    return _Batch(None, ds.num_anchors, 0, 0, empty, empty, empty, empty, empty, [], [])


# -------------------------------------------------------------------------------------- streams


@dataclass(frozen=True)
class _StreamConfig:
    """Everything one (rank, worker) stream needs; pickled into each DataLoader worker."""

    urls: tuple[str, ...]
    counts: tuple[int, ...] | None  # samples per shard, when the manifest says
    plan: EpochPlan
    opts: LoaderOptions  # rank, world_size and num_workers resolved
    dataset: _Dataset
    epoch: int
    storage_options: dict | None = None  # for shards on object storage (not recorded anywhere)

    def shard(self, i: int, skips: list, outage: StoreOutage | None = None) -> Iterator[tuple[str, RawSample]]:
        """The encoded samples of shard i (``outage``: the stream's, shared by its shards)."""
        return iter_raw_samples(self.urls[i], self.opts.on_error, skips, self.counts[i] if self.counts else None,
                                self.storage_options, outage)

    @property
    def workers(self) -> int:
        return max(1, self.opts.num_workers)


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


def _raw_stream(cfg: _StreamConfig, slot: int, worker: int, skips: list) -> Iterator[tuple[str, RawSample]]:
    """Encoded samples of one slot: its own shards; in resampled mode topped up to the slot's quota."""
    own = cfg.plan.slots[slot]
    outage = StoreOutage()  # a store found down costs one attempt per later shard, until one is read whole
    if cfg.plan.quotas is None:
        for i in own:
            yield from cfg.shard(i, skips, outage)
        return
    # Resampled: own shards first, then shards drawn with replacement, until the quota is met.
    rng = _rng(_TAG_RESAMPLE, cfg.opts.seed, cfg.epoch, cfg.opts.rank, worker)
    quota, n, empty_in_a_row = cfg.plan.quotas[slot], 0, 0
    sequence = iter(own)
    while n < quota:
        i = next(sequence, None)
        if i is None:
            i = int(rng.integers(len(cfg.urls)))
        got = 0
        for item in cfg.shard(i, skips, outage):
            yield item
            got += 1
            n += 1
            if n >= quota:
                return
        empty_in_a_row = 0 if got else empty_in_a_row + 1
        if empty_in_a_row > 2 * len(cfg.urls) + 8:  # every shard empty or unreadable: never loop forever
            last = f": {skips[-1][1]}" if skips else ""
            raise ShardFormatError(f"resampled stream found no readable samples in {empty_in_a_row} shard draws{last}")


def _run_stream(cfg: _StreamConfig, worker: int) -> Iterator[_Batch]:
    """Read, shuffle, decode, sample and batch the samples of one (rank, worker) slot."""
    opts, ds = cfg.opts, cfg.dataset
    slot = worker * opts.world_size + opts.rank
    shared = torch.utils.data.get_worker_info() is not None  # batches cross a process boundary
    skips: list[tuple[int, str]] = []  # (samples lost, why)
    raws: Iterator = _raw_stream(cfg, slot, worker, skips)
    if opts.shuffle and opts.shuffle_buffer > 1:
        raws = shuffle_buffer(raws, opts.shuffle_buffer, _rng(_TAG_BUFFER, opts.seed, cfg.epoch, opts.rank, worker))
    reported = 0

    def emit(samples: list[Decoded] | None, rows: torch.Tensor | None = None) -> _Batch:
        # Each item carries the skips since the previous one; None makes a stats-only item.
        nonlocal reported
        batch = _stats_only(ds) if samples is None else collate(samples, ds, opts, shared, rows)
        new = skips[reported:]
        batch.skipped, batch.skip_log, reported = sum(n for n, _ in new), [m for _, m in new], len(skips)
        return batch

    threads = opts.decode_threads or 0
    with ThreadPoolExecutor(threads) if threads > 1 else _NoPool() as pool:
        for pending, rows in _decoded_batches(raws, cfg, shared, skips, pool):
            if len(pending) == opts.batch_size or (pending and not opts.drop_last):
                yield emit(pending, rows)
    if len(skips) > reported:
        yield emit(None)


class _NoPool:
    """ThreadPoolExecutor's ``map`` in the calling thread (decode_threads 0 or 1)."""

    def __enter__(self) -> "_NoPool":
        return self

    def __exit__(self, *exc) -> None:
        return None

    map = staticmethod(map)


def _decoded_batches(raws: Iterator, cfg: _StreamConfig, shared: bool, skips: list, pool
                     ) -> Iterator[tuple[list[Decoded], torch.Tensor | None]]:
    """Batches of decoded samples and the uint8 rows they were decoded into: full ones, then the last.

    The samples of a batch are decoded side by side on ``pool``'s threads (libjpeg-turbo lets go of
    the GIL), each into its own row, and collected in stream order, so every batch is the one a
    single thread makes. A sample that fails (on_error="skip") leaves its row to the next one.
    """
    opts, ds = cfg.opts, cfg.dataset
    step = 1 if isinstance(pool, _NoPool) else opts.batch_size  # samples handed out at once

    def decode(job: tuple[str, RawSample, np.ndarray | None]) -> Decoded | ShardFormatError:
        try:
            return decode_sample(*job[:2], ds, opts, cfg.epoch, job[2])
        except ShardFormatError as e:
            return e

    while True:
        rows = view = None  # allocated when the batch's first sample arrives
        pending: list[Decoded] = []
        while len(pending) < opts.batch_size:
            items = list(itertools.islice(raws, min(step, opts.batch_size - len(pending))))
            if not items:
                yield pending, rows
                return
            if rows is None and (rows := _batch_rows(ds, opts, shared)) is not None:
                view = rows.numpy()
            first = len(pending)
            jobs = [(url, raw, None if view is None else view[first + i]) for i, (url, raw) in enumerate(items)]
            for i, got in enumerate(pool.map(decode, jobs)):
                if isinstance(got, ShardFormatError):
                    if opts.on_error == "raise":
                        raise got
                    skips.append((1, str(got)))
                    continue
                if view is not None and first + i != len(pending):  # a sample before it failed: close the gap
                    view[len(pending)] = view[first + i]
                    got.image = view[len(pending)]
                pending.append(got)
        yield pending, rows


def _init_worker(_: int) -> None:
    """A DataLoader worker of ours keeps the memory it frees (a mirrored sample's images were faulted in afresh)."""
    tune_worker_malloc()


def _passthrough(item):
    # DataLoader with batch_size=None applies collate_fn per item; ours arrive already collated.
    return item


# --------------------------------------------------------------------------------------- loader


class ShardLoader:
    """Iterable of (images, targets) over frcnn-shard shards; ``options`` holds what make_loader was given."""

    def __init__(self, src: _Source, options: LoaderOptions, dataset: _Dataset, storage_options: dict | None = None):
        self.storage_options = storage_options
        self.urls = list(src.urls)
        self.counts = src.counts
        self.manifest = src.manifest
        self.options = options
        self.dataset = dataset
        self.epoch = options.epoch
        self.skipped = 0  # samples skipped (on_error="skip") in the current / last epoch
        self.skip_log: list[str] = []  # their messages (at most MAX_SKIP_LOG)
        self.skipped_total = 0
        self._anchors: torch.Tensor | None = None
        self._plan()  # validate the shard / worker layout now, not at the first batch

    @property
    def batch_size(self) -> int:
        """Samples per batch (the last batch of each stream may hold fewer)."""
        return self.options.batch_size

    @property
    def num_workers(self) -> int:
        """DataLoader worker processes (0: batches are made in the calling process)."""
        return self.options.num_workers

    @property
    def anchors(self) -> torch.Tensor:
        """The float32 [A, 4] anchors the targets refer to, from the manifest (count and sha256 verified)."""
        if self._anchors is None:
            if self.manifest is None:
                raise LoaderError("no manifest: the anchors are unknown (pass manifest= to make_loader)")
            self._anchors = torch.from_numpy(anc.anchors_from_manifest(self.manifest))  # C-contiguous float32
        return self._anchors

    def check_anchors(self, model_anchors: Any, atol: float = 1e-4) -> None:
        """Raise unless a model's own anchor generator gives the shards' anchors, in the same order."""
        if self.manifest is None:
            raise LoaderError("no manifest: cannot check anchors (pass manifest= to make_loader)")
        # Compared as float32, the shards' dtype; as_numpy takes tensors on any device, Boxes and per-level lists.
        anc.check_anchors(anc.as_numpy(model_anchors).astype(np.float32), self.manifest, atol=atol)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: shard order, shuffle buffer and anchor sampling are all reseeded from it."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0 (got {epoch})")
        self.epoch = int(epoch)

    @property
    def workers(self) -> int:
        """Streams per rank: DataLoader workers, or 1 when reading in the main process."""
        return max(1, self.options.num_workers)

    def _plan(self) -> EpochPlan:
        o = self.options
        return plan_epoch(len(self.urls), self.counts, seed=o.seed, epoch=self.epoch, shuffle=o.shuffle,
                          world_size=o.world_size, workers=self.workers, resampled=o.resampled)

    def _slot_counts(self) -> list[int] | None:
        """Samples per stream of this rank in the current epoch (None when the shards' counts are unknown)."""
        plan = self._plan()
        per = [_slot_samples(plan, self.counts, w * self.options.world_size + self.options.rank)
               for w in range(self.workers)]
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
        return sum(_batches(p, self.options.batch_size, self.options.drop_last) for p in per)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[dict]]]:
        o = self.options
        counts = tuple(self.counts) if self.counts is not None else None
        stream = _ShardStream(_StreamConfig(tuple(self.urls), counts, self._plan(), o, self.dataset, self.epoch,
                                            self.storage_options))
        self.skipped, self.skip_log = 0, []
        if o.num_workers == 0:
            items = iter(stream)
        else:
            kw = {"prefetch_factor": o.prefetch_factor} if o.prefetch_factor else {}
            # Pinning happens in unpack, on the dense tensors the training loop receives.
            items = iter(torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=o.num_workers, collate_fn=_passthrough, timeout=o.timeout,
                worker_init_fn=_init_worker, **kw,
            ))
        for item in items:
            if item.skipped:
                self.skipped += item.skipped
                self.skipped_total += item.skipped
                self.skip_log.extend(item.skip_log[: max(0, MAX_SKIP_LOG - len(self.skip_log))])
            if item.images is None:
                continue
            yield item.unpack(o.pin_memory)

    def __repr__(self) -> str:
        o = self.options
        return (f"ShardLoader({len(self.urls)} shards, batch_size={o.batch_size}, rank={o.rank}/"
                f"{o.world_size}, workers={o.num_workers}, epoch={self.epoch}, resampled={o.resampled})")


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


def _dataset(src: _Source, source: Any, num_anchors: int | None) -> _Dataset:
    """The per-sample facts, from the manifest (or num_anchors alone, for shards without one)."""
    man = src.manifest
    if man is None:
        if num_anchors is None:
            raise LoaderError(
                f"no manifest found for {source!r}: pass manifest= (a dict, shard directory or manifest.json) "
                "or at least num_anchors="
            )
        return _Dataset(int(num_anchors), None, *_mean_std(None, None))
    count = int(man["anchors"]["count"])
    if num_anchors is not None and int(num_anchors) != count:
        raise LoaderError(f"num_anchors={num_anchors} but the manifest records {count} anchors")
    norm = man.get("normalization") or {}
    return _Dataset(count, tuple(int(v) for v in man["image"]["size"]), *_mean_std(norm.get("mean"), norm.get("std")),
                    flip_targets=anc.has_flip_targets(man), num_classes=num_classes_of(man))


def make_loader(
    source: str | os.PathLike | Sequence[str],
    batch_size: int,
    *,
    manifest: dict | str | os.PathLike | None = None,
    num_anchors: int | None = None,
    allow_incomplete: bool = False,
    storage_options: dict | None = None,
    **options: Any,
) -> ShardLoader:
    """A loader of (images [B,3,H,W], targets) from a split folder (local or a URL such as s3://...), its
    manifest.json, a URL list or a brace pattern.

    ``options`` are the fields of LoaderOptions (shuffle, num_workers, seed, epoch, rpn_batch_size,
    positive_fraction, normalize, rank, world_size, resampled, shuffle_buffer, on_error, drop_last,
    pin_memory, prefetch_factor, timeout, strict, hflip, image_transform, decode_threads). ``manifest`` describes shards
    given as URLs; ``num_anchors`` lets shards without a manifest be read at all; ``storage_options`` go to fsspec.
    """
    try:
        opts = LoaderOptions(batch_size=batch_size, **options)
    except TypeError as e:  # an unknown keyword
        raise LoaderError(f"make_loader: {e}") from None
    rank, world_size = _dist_defaults(opts.rank, opts.world_size)
    src = resolve_source(source, manifest, allow_incomplete, storage_options)
    dataset = _dataset(src, source, num_anchors)
    if opts.hflip > 0 and dataset.flip_targets is False:
        raise LoaderError(f"hflip={opts.hflip} needs the mirrored images' anchor targets, but {source!r} was built "
                          "with --no-flip-targets (flip_targets=False): rebuild without it, or pass hflip=0")
    workers = opts.num_workers
    if workers is None:
        workers = max(0, min(4, os.cpu_count() or 1, len(src.urls) // world_size))
        workers = 0 if workers == 1 else workers  # one worker only adds IPC
    elif workers > 0:
        fed = feedable_workers(len(src.urls), world_size, workers, opts.strict)
        if fed != workers:
            warnings.warn(f"{len(src.urls)} shard(s) feed {fed} worker(s) per rank, not the {workers} asked for "
                          f"(each stream reads whole shards); using {fed}. Pass strict=True to make this an error.",
                          LoaderWarning, stacklevel=2)
            workers = fed
    if len(src.urls) < world_size and not opts.resampled:
        feedable_workers(len(src.urls), world_size, 1, opts.strict)  # raises when strict
        warnings.warn(f"{len(src.urls)} shard(s) for {world_size} ranks: rank(s) {len(src.urls)}..{world_size - 1} get "
                      "no samples this epoch (pass resampled=True for equal ranks)", LoaderWarning, stacklevel=2)
    if opts.pin_memory and not torch.cuda.is_available():
        # As torch's DataLoader does: pinned memory needs an accelerator; without one it is a no-op.
        warnings.warn("pin_memory=True but no CUDA device is available: batches are not pinned",
                      LoaderWarning, stacklevel=2)
        opts = replace(opts, pin_memory=False)
    threads = opts.decode_threads
    if threads is None:  # in the calling process the CPUs would idle between samples; workers have theirs
        threads = min(os.cpu_count() or 1, opts.batch_size) if workers == 0 and opts.image_transform is None else 0
    opts = replace(opts, rank=rank, world_size=world_size, num_workers=int(workers), decode_threads=int(threads))
    return ShardLoader(src, opts, dataset, storage_options)


class LoaderWarning(UserWarning):
    """The loader changed what was asked for to something it can do (it says what and why)."""
