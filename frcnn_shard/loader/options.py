"""What the loader is asked for (LoaderOptions) and what the manifest says about every sample (DatasetFacts),
each checked once, and the loader's errors."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from ..errors import FrcnnShardError
from ..format.canvas import KeepRatioCanvas
from ..labels import NUM_CLASSES
from ..transform import IMAGENET_MEAN, IMAGENET_STD

ON_ERROR_CHOICES = ("raise", "skip")
DEFAULT_SHUFFLE_BUFFER = 256  # encoded samples (~30-60 KB each), so a few MB per worker
DEFAULT_CANVAS_STREAMS = 8  # keep-ratio streams per rank by default (capped by the shards per rank)
MAX_STREAMS = 4096  # streams per rank anyone may ask for (a state bounds its own the same way)


class LoaderError(FrcnnShardError, ValueError):
    """The loader cannot be set up as asked (bad source, options or shard/worker layout)."""


class ImageTransformError(LoaderError):
    """The ``image_transform`` callable failed or changed the image's shape or dtype; names the sample key."""


class LoaderWarning(UserWarning):
    """The loader changed what was asked for to something it can do (it says what and why)."""


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
    streams: int | None = None  # streams per rank, fixed whatever num_workers is (None: keep-ratio 8, else per worker)

    def __post_init__(self) -> None:
        for ok, message in self._rules():
            if not ok:
                raise LoaderError(message)

    def _rules(self) -> list[tuple[bool, str]]:
        """(holds, what it says when it does not) for every option with a rule."""
        return [
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
            (self.streams is None or (isinstance(self.streams, numbers.Integral) and not isinstance(self.streams, bool)
                                      and 1 <= self.streams <= MAX_STREAMS),
             f"streams must be an integer within 1..{MAX_STREAMS} or None (got {self.streams!r})"),
        ]


@dataclass(frozen=True)
class DatasetFacts:
    """What the manifest says about every sample: anchor count, canvas size, normalisation.

    A keep-ratio build (``keep_ratio`` set) has a canvas per sample: ``image_hw`` is then the largest canvas,
    ``canvas_anchors`` the anchor count of each canvas the manifest lists, and ``at_sample`` gives the facts
    one sample is decoded with (its content size, its canvas's anchor count).
    """

    num_anchors: int
    image_hw: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip_targets: bool | None = None  # the shards store the mirrored image's targets (None: no manifest says)
    num_classes: int = NUM_CLASSES  # background included (the manifest's classes): labels lie in 1..num_classes-1
    keep_ratio: KeepRatioCanvas | None = None  # the record-size rule of a keep-ratio build (None: one canvas)
    canvas_anchors: tuple[tuple[tuple[int, int], int], ...] = ()  # keep-ratio: (canvas, anchor count) per canvas

    @property
    def record_canvas(self) -> tuple[int, int] | KeepRatioCanvas | None:
        """What the record rules take: the fixed canvas, or the keep-ratio rule (a canvas per record)."""
        return self.keep_ratio if self.keep_ratio is not None else self.image_hw

    def anchors_at(self, canvas_hw: tuple[int, int]) -> int | None:
        """The anchor count of a keep-ratio canvas the manifest lists (None: not one of them)."""
        return dict(self.canvas_anchors).get((int(canvas_hw[0]), int(canvas_hw[1])))

    def at_sample(self, content_hw: tuple[int, int], num_anchors: int) -> "DatasetFacts":
        """The facts a keep-ratio sample is decoded with: its stored image is its content, its targets index
        its canvas's ``num_anchors`` anchors (the record rule stays the build's)."""
        return replace(self, image_hw=(int(content_hw[0]), int(content_hw[1])), num_anchors=int(num_anchors))


def mean_std(mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[tuple, tuple]:
    """(mean, std) as float tuples; ImageNet's for the one not given."""
    mean = IMAGENET_MEAN if mean is None else mean
    std = IMAGENET_STD if std is None else std
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
