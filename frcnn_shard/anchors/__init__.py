"""RPN anchors, split by concept: the spec and its presets (``spec``), the matching rule with its
reference and fast CPU matchers (``match``), batched matching in torch (``match_torch``), the manifest's anchors section (``manifest``),
and what the loss sees: sampling and box deltas (``sampling``). The packed targets are part of the sample format
(``frcnn_shard.format.targets``).

Everything public is importable from here: ``from frcnn_shard import anchors as anc``.
"""
from __future__ import annotations

from .match import (
    CROWD_COVER, LOW_QUALITY_MODES, AnchorMatcher, MatchConfig, as_boxes, inside_image, iou_matrix64, match_reference,
)
from .match_torch import match_batch_torch
from .sampling import encode_deltas, key_hash, sample_indices, sample_labels, sample_rng
from .manifest import CanvasAnchors, anchors_from_manifest, anchors_manifest_section, check_anchors, has_flip_targets
from .spec import (
    DEFAULT_PRESET, ORDERS, PRESETS, RATIO_CONVENTIONS, AnchorSpec, anchors_sha256, as_hw, as_numpy, locate_anchor,
    make_anchors, parse_numbers, parse_sizes, preset_spec,
)

__all__ = [
    "AnchorMatcher", "AnchorSpec", "CROWD_COVER", "CanvasAnchors", "DEFAULT_PRESET", "LOW_QUALITY_MODES", "MatchConfig", "ORDERS",
    "PRESETS", "RATIO_CONVENTIONS", "anchors_from_manifest", "anchors_manifest_section", "anchors_sha256", "as_boxes",
    "as_hw", "as_numpy", "check_anchors", "encode_deltas", "has_flip_targets", "inside_image", "iou_matrix64", "key_hash", "locate_anchor",
    "make_anchors", "match_batch_torch", "match_reference", "parse_numbers", "parse_sizes", "preset_spec", "sample_indices", "sample_labels",
    "sample_rng",
]
