"""torchvision's Faster R-CNN trained from shards: the model at the stored size, fed the loader's batches
as they come, its RPN taking the anchor targets stored in the shards instead of matching anchors.

    from frcnn_shard import make_loader
    from frcnn_shard.torchvision import fasterrcnn_resnet50_fpn, coco_results
    loader = make_loader("shards/train", batch_size=8, normalize=False, num_workers=4)
    model = fasterrcnn_resnet50_fpn(loader, weights_backbone=None)
    for images, targets in loader:
        losses = model(images, targets)

The shards must be built with ``--anchor-preset torchvision-fpn`` (any canvas size; sizes and ratios
may be overridden): its anchors are torchvision's AnchorGenerator's, bit for bit, for an image that
is not resized and is padded to a multiple of 32, which is what ``StoredSizeTransform`` does.
Needs torchvision (the ``[torchvision]`` extra); works with torchvision 0.26 and later.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

try:
    import torch
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection import fasterrcnn_resnet50_fpn as _tv_fasterrcnn_resnet50_fpn
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import RegionProposalNetwork
    from torchvision.models.detection.transform import GeneralizedRCNNTransform
except ImportError as e:  # the core package works without torchvision
    raise ImportError(f"frcnn_shard.torchvision needs torchvision ({e}): pip install 'frcnn-shard[torchvision]' "
                      "(make install includes it)") from e

from .errors import FrcnnShardError
from . import anchors as anc
from .coco_eval import coco_results  # noqa: F401 - part of this module's API
from .format.manifest import Manifest
from .loader import ShardLoader, manifest_folder
from .shards import read_manifest
from .transform import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["AnchorMismatchError", "StoredSizeTransform", "StoredTargetsRPN", "coco_results", "fasterrcnn_resnet50_fpn"]

RESNET_FPN_STRIDES = (4, 8, 16, 32, 64)  # levels "0".."3" and "pool" of torchvision's resnet50-FPN
# What the shards decide: the canvas (no resize), the padding and the normalisation.
_SET_BY_SHARDS = ("min_size", "max_size", "image_mean", "image_std", "size_divisible", "fixed_size")


class AnchorMismatchError(FrcnnShardError, ValueError):
    """The model's anchors are not the shards' anchors, so the stored targets do not fit the model."""


# ------------------------------------------------------------------------------------ transform


class StoredSizeTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform for images at the shards' canvas size: no resize, uint8 or normalised input.

    - uint8 [3, H, W] (``make_loader(normalize=False)``): x / 255, then (x - mean) / std: the stock
      arithmetic on ``image.float() / 255``, bit for bit;
    - float [3, H, W]: taken as already normalised with the same mean / std (``make_loader(normalize=True)``
      or ``loader.normalize_batch``).
    ``resize`` never resizes: it refuses an image that is not the canvas (the stored targets are only
    valid there) and moves the target's tensors to the image's device. Batching pads to a multiple of
    ``size_divisible`` as stock torchvision does; ``postprocess`` is then the identity.
    """

    def __init__(self, image_hw: Sequence[int], image_mean: Sequence[float] = IMAGENET_MEAN,
                 image_std: Sequence[float] = IMAGENET_STD, size_divisible: int = 32):
        h, w = anc.as_hw(image_hw)
        super().__init__(min_size=min(h, w), max_size=max(h, w), image_mean=[float(v) for v in image_mean],
                         image_std=[float(v) for v in image_std], size_divisible=int(size_divisible))
        self.image_hw = (h, w)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8: to [0, 1], then the stock normalisation; floating point: already normalised."""
        if image.dtype == torch.uint8:
            return super().normalize(image.to(torch.float32).div_(255.0))
        if not image.is_floating_point():
            raise TypeError(f"images must be uint8 or already normalised floats, got {image.dtype}")
        return image

    def resize(self, image: torch.Tensor, target: dict[str, Any] | None = None
               ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """The identity on a canvas-sized image (ValueError otherwise); target tensors go to the image's device."""
        if tuple(image.shape[-2:]) != self.image_hw:
            raise ValueError(f"image is {tuple(image.shape[-2:])}, the shards' canvas is {self.image_hw}: the model "
                             "takes images as the loader delivers them (the stored anchor targets hold only there)")
        if target is not None:
            target = {k: v.to(image.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                      for k, v in target.items()}
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(canvas={self.image_hw}, no resize, uint8 -> /255 -> mean={self.image_mean}, "
                f"std={self.image_std}; floats taken as normalised; pad to /{self.size_divisible})")


# ------------------------------------------------------------------------------------------ RPN


class StoredTargetsRPN(RegionProposalNetwork):
    """A RegionProposalNetwork whose anchor targets come with the batch instead of being matched.

    ``assign_targets_to_anchors`` returns each target's ``anchor_labels`` (as float32: 1 / 0 / -1) and
    ``anchor_matched_gt`` (the matched box of each positive; zeros elsewhere, which the loss never
    reads). On its first call it checks that the model's anchors equal the shards' exactly (values and
    order), raising AnchorMismatchError naming the preset and the size. The stock fg_bg_sampler is
    kept: on the loader's default 256-anchor sample (at most half positive) the stock
    BalancedPositiveNegativeSampler(256, 0.5) keeps exactly that sample; on ``rpn_batch_size=None``
    labels it samples as it does after torchvision's own matching.
    """

    def __init__(self, *args: Any, anchors_section: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.anchors_section = dict(anchors_section)
        self.anchors_checked = False

    @classmethod
    def from_rpn(cls, rpn: RegionProposalNetwork, anchors_section: Mapping[str, Any]) -> "StoredTargetsRPN":
        """The same RPN (anchor generator, head and its weights, NMS settings), taking stored targets."""
        new = cls(rpn.anchor_generator, rpn.head, rpn.proposal_matcher.high_threshold,
                  rpn.proposal_matcher.low_threshold, rpn.fg_bg_sampler.batch_size_per_image,
                  rpn.fg_bg_sampler.positive_fraction, dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n),
                  rpn.nms_thresh, score_thresh=rpn.score_thresh, anchors_section=anchors_section)
        new.train(rpn.training)
        return new

    def check_anchors(self, anchors: torch.Tensor) -> None:
        """Raise AnchorMismatchError unless one image's anchors equal the shards' exactly."""
        try:
            anc.check_anchors(anchors, self.anchors_section, atol=0.0)
        except (AssertionError, ValueError) as e:
            raise AnchorMismatchError(f"the model's anchors are not the shards' ({_describe(self.anchors_section)}): "
                                      f"{e}. Feed the images as the loader delivers them, through the model's "
                                      "StoredSizeTransform") from None
        self.anchors_checked = True

    def assign_targets_to_anchors(self, anchors: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
                                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The stored (labels float32 [A], matched boxes [A, 4]) of each image, after a one-time anchor check."""
        if not self.anchors_checked:
            self.check_anchors(anchors[0])  # a batch's images share one anchor tensor
        labels, matched = [], []
        for i, (a, t) in enumerate(zip(anchors, targets)):
            if "anchor_labels" not in t or "anchor_matched_gt" not in t:
                raise ValueError(f"image {i} of the batch: its target has no anchor_labels / anchor_matched_gt; pass "
                                 "the loader's targets, or build the model with use_stored_targets=False")
            lab, gt = t["anchor_labels"], t["anchor_matched_gt"]
            if tuple(lab.shape) != (a.shape[0],) or tuple(gt.shape) != tuple(a.shape):
                raise ValueError(f"image {i} of the batch: stored targets {tuple(lab.shape)} / {tuple(gt.shape)} for "
                                 f"{a.shape[0]} model anchors")
            labels.append(lab.to(a.device, torch.float32))
            matched.append(gt.to(a.device, a.dtype))
        return labels, matched


# ---------------------------------------------------------------------------------------- model


def _manifest_of(source: Any) -> Manifest:
    """The manifest of a loader, a manifest dict, a split folder or its manifest.json (local or a URL)."""
    if isinstance(source, ShardLoader):
        if source.manifest is None:
            raise ValueError("the loader has no manifest (pass manifest= to make_loader): the anchors are unknown")
        return source.manifest
    if isinstance(source, Mapping):
        return Manifest.checked(dict(source), "the manifest given")
    return read_manifest(manifest_folder(source))


def _describe(section: Mapping[str, Any]) -> str:
    """'anchor preset 'torchvision-fpn' at 400x400' from a manifest's anchors section."""
    h, w = section["spec"]["image_hw"]
    return f"anchor preset {section.get('preset')!r} at {h}x{w}"


def _generator_problem(spec: anc.AnchorSpec) -> str | None:
    """Why torchvision's AnchorGenerator on a resnet50-FPN cannot give a spec's anchors (None: it may)."""
    rules = (
        (spec.strides == RESNET_FPN_STRIDES, f"strides {spec.strides}, the resnet50-FPN's levels are {RESNET_FPN_STRIDES}"),
        (spec.ratio_convention == "h/w", "ratios are w/h, torchvision's are h/w"),
        (spec.offset == 0.0, f"offset {spec.offset}, torchvision centres anchors at col * stride"),
        (spec.round_cells, "cell anchors are not rounded, torchvision rounds them"),
        (spec.stride_from_padding, "strides are nominal, torchvision's are padded size // feature size"),
        (len({spec.cells_per_location(level) for level in range(spec.num_levels)}) == 1,
         "levels have different anchor counts per cell, torchvision's RPNHead is shared by all levels"),
        (spec.order == anc.ORDERS[1] or all(len(s) == 1 for s in spec.sizes),
         "several sizes per level in size-major order, torchvision's cells are ratio-major"),
    )
    return next((why for ok, why in rules if not ok), None)


def generator_anchors(generator: AnchorGenerator, spec: anc.AnchorSpec) -> np.ndarray:
    """The anchors a generator gives one canvas image, with the resnet50-FPN's feature sizes (ceil(padded / stride))."""
    hp, wp = spec.padded_hw()
    images = ImageList(torch.zeros(1, 1, hp, wp), [tuple(spec.image_hw)])  # only shapes, dtype and device are read
    feats = [torch.zeros(1, 1, *spec.feature_hw(level)) for level in range(spec.num_levels)]
    return generator(images, feats)[0].numpy()


def _anchor_generator(section: Mapping[str, Any], generator: AnchorGenerator | None) -> AnchorGenerator:
    """torchvision's AnchorGenerator for the shards' anchors; AnchorMismatchError when it cannot give them."""
    spec = anc.AnchorSpec.from_dict(section["spec"])
    problem = _generator_problem(spec)
    if problem is not None:
        raise AnchorMismatchError(f"{_describe(section)}: torchvision's AnchorGenerator cannot give these anchors "
                                  f"({problem}); build the shards with --anchor-preset torchvision-fpn")
    if generator is None:
        generator = AnchorGenerator(sizes=spec.sizes, aspect_ratios=(spec.ratios,) * spec.num_levels)
    shards = anc.anchors_from_manifest(section)  # count and sha256 verified
    ours = generator_anchors(generator, spec)
    if ours.shape != shards.shape or not np.array_equal(ours, shards):
        bad = "counts differ" if ours.shape != shards.shape else (
            f"{int((ours != shards).any(1).sum())} of {len(shards)} differ, the first "
            f"{anc.locate_anchor(spec, int(np.flatnonzero((ours != shards).any(1))[0]))}")
        raise AnchorMismatchError(f"{_describe(section)}: torchvision's AnchorGenerator gives other anchors ({bad})")
    return generator


def fasterrcnn_resnet50_fpn(source: Any, *, use_stored_targets: bool = True, **torchvision_kwargs: Any) -> FasterRCNN:
    """torchvision's fasterrcnn_resnet50_fpn for shards (a loader, a manifest dict or a split folder).

    ``num_classes`` K + 1 (the manifest's K classes and the background) unless given; the shards' canvas
    without resizing, their normalisation, anchors checked against theirs (StoredSizeTransform); with
    ``use_stored_targets`` a StoredTargetsRPN, else torchvision's own RPN matching. Other keywords go to
    torchvision (``weights_backbone=None`` trains from scratch; its default downloads ImageNet weights).
    """
    fixed = sorted(set(torchvision_kwargs) & set(_SET_BY_SHARDS))
    if fixed:
        raise ValueError(f"{', '.join(fixed)}: set by the shards (their canvas, padding and normalisation)")
    manifest = _manifest_of(source)
    section = manifest.anchors
    kw = dict(torchvision_kwargs)
    kw.setdefault("num_classes", manifest.num_classes)  # K + 1: the build's classes, not COCO's 81
    kw["rpn_anchor_generator"] = _anchor_generator(section, kw.get("rpn_anchor_generator"))
    spec = anc.AnchorSpec.from_dict(section["spec"])
    model = _tv_fasterrcnn_resnet50_fpn(min_size=min(spec.image_hw), max_size=max(spec.image_hw), **kw)
    mean, std = manifest.mean_std or (IMAGENET_MEAN, IMAGENET_STD)
    model.transform = StoredSizeTransform(spec.image_hw, mean, std, size_divisible=spec.pad_multiple)
    if use_stored_targets:
        _check_thresholds(model.rpn, section)
        model.rpn = StoredTargetsRPN.from_rpn(model.rpn, section)
    return model


def _check_thresholds(rpn: RegionProposalNetwork, section: Mapping[str, Any]) -> None:
    """The model's RPN IoU thresholds must be the ones the stored targets were matched with."""
    m = section.get("matching") or {}
    have = (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold)
    if (m.get("pos_iou"), m.get("neg_iou")) != have:
        raise ValueError(f"rpn_fg_iou_thresh / rpn_bg_iou_thresh are {have}, the stored targets were matched with "
                         f"pos_iou={m.get('pos_iou')}, neg_iou={m.get('neg_iou')}: give those, or use_stored_targets=False")
