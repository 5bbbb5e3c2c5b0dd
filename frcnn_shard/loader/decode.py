"""One encoded sample -> a Decoded: the image (mirrored when its flip draw says so, then the user's
image_transform), its record checked by the format's rules, and its anchor targets (sampled for the epoch).

Nothing here knows the loader's options bag: ``DecodeOptions`` holds the five fields decoding needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..anchors.sampling import sample_indices
from ..format.image import decode_stored_image
from ..format.members import JSON_EXT, TARGETS_EXT, RawSample, ShardFormatError, image_member, members_problems
from ..format.record import Record, RecordError, checked_record
from ..format.targets import SparseTargets, unpack_targets
from ..seeds import hflip_decision, sample_rng
from ..shards import sample_error
from .options import DatasetFacts, ImageTransformError


@dataclass(frozen=True)
class DecodeOptions:
    """What decoding needs of the loader's options: the draws' seed, the flip probability, the anchor
    sample's size (None: the stored labels) and the user's image transform."""

    seed: int = 0
    hflip: float = 0.0
    rpn_batch_size: int | None = 256
    positive_fraction: float = 0.5
    image_transform: Callable[[np.ndarray], np.ndarray] | None = None


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


def label_values(sampled: bool) -> tuple[int, int]:
    """(fill, other_value): sampled targets are -1 but for the sample; stored ones are 0 but for the ignored."""
    return (-1, 0) if sampled else (0, -1)


def _sampled(targets: SparseTargets, key: str, num_anchors: int, how: DecodeOptions, epoch: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positives, their matched box index, others) of one sample, sampled for this epoch when asked."""
    if how.rpn_batch_size is None:
        return targets.positive, targets.matched, targets.ignore
    pos, neg = sample_indices(targets, num_anchors, how.rpn_batch_size, how.positive_fraction,
                              rng=sample_rng(how.seed, epoch, key))
    return pos, targets.matched[np.searchsorted(targets.positive, pos)], neg


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


def checked_members(url: str, raw: RawSample) -> str:
    """The image member's extension of a sample whose members keep the format's rules (else ShardFormatError)."""
    error = sample_error(raw, url)
    if error is not None:
        raise error
    problems = members_problems(raw.members.keys(), None)
    if problems:
        raise ShardFormatError(f"{url}: key {raw.key!r}: {problems[0]}")
    return image_member(raw.members)


def _decoded_members(raw: RawSample, ext: str, ds: DatasetFacts, flip: bool, out: np.ndarray | None, where: str
                     ) -> tuple[np.ndarray, Record, SparseTargets]:
    """(image, record, targets) of a sample, each checked; ShardFormatError naming the stage that failed."""
    stage = "image"
    try:
        image = decode_stored_image(raw.members[ext], ext, ds.image_hw, mirror=flip, out=out)
        stage = "json"
        record = checked_record(raw.members[JSON_EXT], ds.record_canvas, ds.num_classes, raw.key)  # check's rules
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
    return image, record, targets


def decode_sample(url: str, raw: RawSample, ds: DatasetFacts, how: DecodeOptions, epoch: int,
                  out: np.ndarray | None = None) -> Decoded:
    """Decode one sample (mirrored when its flip decision says so) and sample its anchors.

    A bad sample raises ShardFormatError naming URL and key; a failing image_transform ImageTransformError.
    ``out``: the uint8 [H, W, 3] batch row the image is decoded into (the sample's image is then that row).
    """
    ext = checked_members(url, raw)
    where = f"{url}: key {raw.key!r}"
    flip = hflip_decision(how.seed, epoch, raw.key, how.hflip)
    image, record, targets = _decoded_members(raw, ext, ds, flip, out, where)
    if flip:  # the image was decoded mirrored: a keep-ratio sample's content, in place at the top-left
        record = record.hflip(content=ds.keep_ratio is not None)
    if how.image_transform is not None:
        image = _transformed(image, how.image_transform, where)
        if out is not None and image is not out:
            out[...] = image  # collate takes the batch row as this sample's image
            image = out
    ones, matched, others = _sampled(targets, raw.key, ds.num_anchors, how, epoch)
    return Decoded(raw.key, image, record, ones, record.boxes[matched], others, flip)
