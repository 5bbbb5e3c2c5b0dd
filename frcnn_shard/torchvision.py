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

Keep-ratio shards (``--resize keep-ratio``, torchvision's min_size / max_size recipe) hold each image at the
size torchvision's transform gives it; a batch holds the samples of one canvas (their sizes rounded up to 32),
each image its content top-left of that canvas. ``KeepRatioTransform`` crops each image to its target's
``size`` (the content) and lets stock batching pad the batch back to the canvas with zeros after the
normalisation, as torchvision pads a batch of those images; the RPN's anchors are its AnchorGenerator's over
that canvas, checked once per canvas against the build's spec there. In eval, pass the targets too
(``model(images, targets)``) or the content crops (``content_images(images, targets)``): an image without a
target is taken whole, its padding as black content.
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
from .format.canvas import CANVAS_DIVISOR, canvas_of
from .format.manifest import Manifest
from .loader import ShardLoader, manifest_folder
from .shards import read_manifest
from .transform import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["AnchorMismatchError", "KeepRatioTransform", "StoredSizeTransform", "StoredTargetsRPN", "coco_results",
           "content_images", "fasterrcnn_resnet50_fpn"]

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


class KeepRatioTransform(StoredSizeTransform):
    """GeneralizedRCNNTransform for keep-ratio shards: each image cropped to its content, batches padded as stock.

    The images come as the loader delivers them (a canvas each, content top-left, zero pad) or as their content
    crops; uint8 or normalised floats as StoredSizeTransform. ``resize`` never resizes (the stored content is
    already torchvision's size for ``min_size`` / ``max_size``): with a target it crops the image to the
    target's ``size`` (the content); without one the image is taken whole. Stock ``batch_images`` then pads
    the batch with zeros after the normalisation to a multiple of 32: for a batch of one canvas, that canvas,
    exactly as torchvision pads those images. ``forward`` refuses a batch whose targets' canvases are not
    the padded size (their stored targets hold only there); ``postprocess`` is the identity: detections stay
    in content pixels, which are canvas pixels (coco_results maps them to the source image).
    """

    def __init__(self, largest_hw: Sequence[int], min_size: int, max_size: int,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 size_divisible: int = 32):
        super().__init__(largest_hw, image_mean, image_std, size_divisible)
        self.min_size, self.max_size = (int(min_size),), int(max_size)  # what the shards were resized with

    def resize(self, image: torch.Tensor, target: dict[str, Any] | None = None
               ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """The image cropped to its target's content (whole without a target); target tensors to its device."""
        h, w = (int(v) for v in image.shape[-2:])
        if h > self.image_hw[0] or w > self.image_hw[1]:
            raise ValueError(f"image is {(h, w)}, larger than the shards' largest canvas {self.image_hw}")
        if target is None:
            return image, None
        ch, cw = content_hw(target)
        if ch > h or cw > w:
            raise ValueError(f"image is {(h, w)}, smaller than its target's content size {(ch, cw)}")
        target = {k: v.to(image.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                  for k, v in target.items()}
        return image[..., :ch, :cw], target

    def forward(self, images: Sequence[torch.Tensor], targets: list[dict[str, Any]] | None = None
                ) -> tuple[ImageList, list[dict[str, Any]] | None]:
        """Stock forward (normalise, resize: crop, pad the batch), then each target's canvas held to the batch's."""
        image_list, targets = super().forward(list(images), targets)
        padded = tuple(int(v) for v in image_list.tensors.shape[-2:])
        for i, t in enumerate(targets or ()):
            canvas = target_canvas(t)
            if canvas != padded:
                raise ValueError(f"image {i} of the batch: its canvas is {canvas}, the batch pads to {padded}: a "
                                 "batch holds the samples of one canvas (their stored targets hold there only)")
        return image_list, targets

    def postprocess(self, result: list[dict[str, torch.Tensor]], image_shapes: Any, original_image_sizes: Any
                    ) -> list[dict[str, torch.Tensor]]:
        """The identity: boxes in content pixels, the content at the canvas's top-left (not rescaled to the input)."""
        return result

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(keep-ratio {self.min_size[0]}/{self.max_size}, canvases up to {self.image_hw}, "
                f"no resize: each image cropped to its target's size; uint8 -> /255 -> mean={self.image_mean}, "
                f"std={self.image_std}; floats taken as normalised; pad to /{self.size_divisible})")


def content_hw(target: Mapping[str, Any]) -> tuple[int, int]:
    """(H, W) of a keep-ratio target's content: its ``size``."""
    if "size" not in target:
        raise ValueError("a keep-ratio target needs its 'size' (the content size, as the loader gives it)")
    h, w = (int(v) for v in target["size"])
    return h, w


def target_canvas(target: Mapping[str, Any]) -> tuple[int, int]:
    """(H, W) of a keep-ratio target's canvas: its ``canvas``, else its content rounded up to 32 (the same rule)."""
    if "canvas" in target:
        h, w = (int(v) for v in target["canvas"])
        return h, w
    return canvas_of(content_hw(target))


def content_images(images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]]) -> list[torch.Tensor]:
    """Each image cropped to its target's content (views): what to give a keep-ratio model in eval without targets."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images for {len(targets)} targets (one each)")
    out = []
    for image, t in zip(images, targets):
        h, w = content_hw(t)
        out.append(image[..., :h, :w])
    return out


# ------------------------------------------------------------------------------------------ RPN


class StoredTargetsRPN(RegionProposalNetwork):
    """A RegionProposalNetwork whose anchor targets come with the batch instead of being matched.

    ``assign_targets_to_anchors`` returns each target's ``anchor_labels`` (as float32: 1 / 0 / -1) and
    ``anchor_matched_gt`` (the matched box of each positive; zeros elsewhere, which the loss never
    reads). It checks that the model's anchors equal the shards' exactly (values and order), raising
    AnchorMismatchError naming the preset and the size: once, or on keep-ratio shards once per canvas (the
    build's spec at the target's canvas; the checked ones are ``checked_canvases``). The stock fg_bg_sampler
    is kept: on the loader's default 256-anchor sample (at most half positive) the stock
    BalancedPositiveNegativeSampler(256, 0.5) keeps exactly that sample; on ``rpn_batch_size=None``
    labels it samples as it does after torchvision's own matching.
    """

    def __init__(self, *args: Any, anchors_section: Mapping[str, Any], keep_ratio: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.anchors_section = dict(anchors_section)
        self.keep_ratio = bool(keep_ratio)
        self.checked_canvases: set[tuple[int, int] | None] = set()  # None: the fixed canvas

    @property
    def anchors_checked(self) -> bool:
        """Whether the model's anchors were checked against the shards' (on some canvas, for keep-ratio)."""
        return bool(self.checked_canvases)

    @classmethod
    def from_rpn(cls, rpn: RegionProposalNetwork, anchors_section: Mapping[str, Any], keep_ratio: bool = False
                 ) -> "StoredTargetsRPN":
        """The same RPN (anchor generator, head and its weights, NMS settings), taking stored targets."""
        new = cls(rpn.anchor_generator, rpn.head, rpn.proposal_matcher.high_threshold,
                  rpn.proposal_matcher.low_threshold, rpn.fg_bg_sampler.batch_size_per_image,
                  rpn.fg_bg_sampler.positive_fraction, dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n),
                  rpn.nms_thresh, score_thresh=rpn.score_thresh, anchors_section=anchors_section,
                  keep_ratio=keep_ratio)
        new.train(rpn.training)
        return new

    def check_anchors(self, anchors: torch.Tensor, canvas: tuple[int, int] | None = None) -> None:
        """Raise AnchorMismatchError unless one image's anchors equal the shards' exactly (``canvas``: a keep-ratio
        canvas, whose anchors are the build's spec there; None: the manifest's anchors, count and sha256)."""
        expected: Any = self.anchors_section
        if canvas is not None:
            expected = anc.AnchorSpec.from_dict(self.anchors_section["spec"]).at(canvas)
        try:
            anc.check_anchors(anchors, expected, atol=0.0)
        except (AssertionError, ValueError) as e:
            raise AnchorMismatchError(f"the model's anchors are not the shards' ({_describe(self.anchors_section, canvas)}"
                                      f"): {e}. Feed the images as the loader delivers them, through the model's "
                                      f"{'KeepRatioTransform' if self.keep_ratio else 'StoredSizeTransform'}") from None
        self.checked_canvases.add(canvas)

    def assign_targets_to_anchors(self, anchors: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
                                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The stored (labels float32 [A], matched boxes [A, 4]) of each image, after the anchor check."""
        labels, matched = [], []
        for i, (a, t) in enumerate(zip(anchors, targets)):
            canvas = target_canvas(t) if self.keep_ratio else None
            if canvas not in self.checked_canvases:
                self.check_anchors(a, canvas)  # a batch's images share one anchor tensor: once per canvas
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


def _describe(section: Mapping[str, Any], canvas: tuple[int, int] | None = None) -> str:
    """'anchor preset 'torchvision-fpn' at 400x400' from a manifest's anchors section (or at a keep-ratio canvas)."""
    if canvas is not None:
        return f"anchor preset {section.get('preset')!r} at canvas {canvas[0]}x{canvas[1]}"
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
    without resizing, their normalisation, anchors checked against theirs (StoredSizeTransform; keep-ratio
    shards: KeepRatioTransform, the anchors checked per canvas); with ``use_stored_targets`` a StoredTargetsRPN,
    else torchvision's own RPN matching. Other keywords go to torchvision (``weights_backbone=None`` trains
    from scratch; its default downloads ImageNet weights).
    """
    fixed = sorted(set(torchvision_kwargs) & set(_SET_BY_SHARDS))
    if fixed:
        raise ValueError(f"{', '.join(fixed)}: set by the shards (their canvas, padding and normalisation)")
    manifest = _manifest_of(source)
    section = manifest.anchors
    kw = dict(torchvision_kwargs)
    kw.setdefault("num_classes", manifest.num_classes)  # K + 1: the build's classes, not COCO's 81
    kw["rpn_anchor_generator"] = _anchor_generator(section, kw.get("rpn_anchor_generator"))
    spec = anc.AnchorSpec.from_dict(section["spec"])  # keep-ratio: at the largest canvas, checked above too
    mean, std = manifest.mean_std or (IMAGENET_MEAN, IMAGENET_STD)
    if manifest.keep_ratio:
        lo, hi = _keep_ratio_sizes(manifest)
        model = _tv_fasterrcnn_resnet50_fpn(min_size=lo, max_size=hi, **kw)
        model.transform = KeepRatioTransform(manifest.image_hw, lo, hi, mean, std, size_divisible=spec.pad_multiple)
    else:
        model = _tv_fasterrcnn_resnet50_fpn(min_size=min(spec.image_hw), max_size=max(spec.image_hw), **kw)
        model.transform = StoredSizeTransform(spec.image_hw, mean, std, size_divisible=spec.pad_multiple)
    if use_stored_targets:
        _check_thresholds(model.rpn, section)
        model.rpn = StoredTargetsRPN.from_rpn(model.rpn, section, keep_ratio=manifest.keep_ratio)
    return model


def _keep_ratio_sizes(manifest: Manifest) -> tuple[int, int]:
    """(min_size, max_size) a keep-ratio build resized with (its manifest's image section)."""
    image = manifest["image"]
    if "min_size" not in image or "max_size" not in image:
        raise ValueError("a keep-ratio manifest without image.min_size / image.max_size: rebuild the shards")
    pad = anc.AnchorSpec.from_dict(manifest.anchors["spec"]).pad_multiple
    if pad != CANVAS_DIVISOR:  # the batch must pad to the canvas, the one size its targets hold at
        raise AnchorMismatchError(f"keep-ratio canvases are multiples of {CANVAS_DIVISOR}, the anchors pad to {pad}")
    return int(image["min_size"]), int(image["max_size"])


def _check_thresholds(rpn: RegionProposalNetwork, section: Mapping[str, Any]) -> None:
    """The model's RPN IoU thresholds must be the ones the stored targets were matched with."""
    m = section.get("matching") or {}
    have = (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold)
    if (m.get("pos_iou"), m.get("neg_iou")) != have:
        raise ValueError(f"rpn_fg_iou_thresh / rpn_bg_iou_thresh are {have}, the stored targets were matched with "
                         f"pos_iou={m.get('pos_iou')}, neg_iou={m.get('neg_iou')}: give those, or use_stored_targets=False")
