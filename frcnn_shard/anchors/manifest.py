"""The manifest's "anchors" section: the anchors a split's targets index, the matching rule that made them, and
which orientations each sample stores; and the anchors rebuilt from it (count and sha256 checked)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..format.members import TARGETS_EXT
from .match import MatchConfig
from .spec import AnchorSpec, anchors_sha256, as_numpy, locate_anchor, make_anchors


def anchors_manifest_section(preset_name: str | None, spec: AnchorSpec, match_cfg: MatchConfig,
                             flip_targets: bool = True) -> dict:
    """The manifest's "anchors" section: the anchors, the matching rule used, and which orientations are stored."""
    anchors = make_anchors(spec)
    return {
        "preset": preset_name,
        "spec": spec.to_dict(),
        "count": int(anchors.shape[0]),
        "sha256": anchors_sha256(anchors),
        "matching": match_cfg.to_dict(),
        "member": TARGETS_EXT,
        "flip_targets": bool(flip_targets),  # the member also holds the mirrored image's targets
    }


def _anchors_section(manifest: Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(manifest, Mapping):
        raise ValueError(f"expected a manifest dict, got {type(manifest).__name__}")
    section = manifest.get("anchors", manifest) if "spec" not in manifest else manifest
    if not isinstance(section, Mapping) or "spec" not in section:
        raise ValueError("manifest has no 'anchors' section with a 'spec'")
    return section


def has_flip_targets(manifest: Mapping[str, Any]) -> bool:
    """Whether the shards store the horizontally mirrored image's targets too (build option flip_targets)."""
    return bool(_anchors_section(manifest).get("flip_targets", False))


def anchors_from_manifest(manifest: Mapping[str, Any]) -> np.ndarray:
    """Rebuild the anchors from a manifest (or its "anchors" section), checking count and sha256."""
    section = _anchors_section(manifest)
    spec = AnchorSpec.from_dict(section["spec"])
    anchors = make_anchors(spec)
    if "count" in section and int(section["count"]) != anchors.shape[0]:
        raise ValueError(
            f"anchors: manifest count {section['count']} != {anchors.shape[0]} anchors rebuilt from its spec"
        )
    digest = anchors_sha256(anchors)
    if "sha256" in section and section["sha256"] != digest:
        raise ValueError(
            f"anchors: manifest sha256 {section['sha256']} != {digest} of the anchors rebuilt from its spec "
            "(different anchor code or float behaviour)"
        )
    return anchors


def check_anchors(model_anchors: Any, manifest_or_spec: Any, atol: float = 1e-4) -> None:
    """Assert a model's anchors equal the shards' anchors (AssertionError names the first bad index)."""
    if isinstance(manifest_or_spec, AnchorSpec):
        spec = manifest_or_spec
        expected = make_anchors(spec)
    elif isinstance(manifest_or_spec, Mapping) and "strides" in manifest_or_spec:
        spec = AnchorSpec.from_dict(manifest_or_spec)
        expected = make_anchors(spec)
    else:
        expected = anchors_from_manifest(manifest_or_spec)
        spec = AnchorSpec.from_dict(_anchors_section(manifest_or_spec)["spec"])
    got = as_numpy(model_anchors).astype(np.float64)
    if got.ndim != 2 or got.shape[1] != 4:
        raise ValueError(f"model anchors must be [A, 4], got shape {tuple(got.shape)}")
    if got.shape[0] != expected.shape[0]:
        raise ValueError(
            f"model has {got.shape[0]} anchors but the shards have {expected.shape[0]} "
            f"(spec: {spec.to_dict()})"
        )
    bad = ~(np.abs(got - expected) <= atol).all(axis=1)  # NaN counts as a mismatch
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AssertionError(
            f"anchor {i} differs ({int(bad.sum())} of {len(bad)} differ beyond atol={atol}): "
            f"model {got[i].tolist()} vs shards {expected[i].astype(np.float64).tolist()} at {locate_anchor(spec, i)}"
        )


class CanvasAnchors:
    """The anchors over each canvas of a split, made once per canvas (the ``keep`` most recently used kept): the
    manifest's spec over that canvas. The manifest's anchors (count and sha256) are verified on the first use, and
    serve its own canvas; a keep-ratio sample's canvas gets the same spec over it (``AnchorSpec.at``), which is
    what the build matched that sample against."""

    def __init__(self, manifest: Mapping[str, Any], keep: int = 8):
        self.section = _anchors_section(manifest)
        self.spec = AnchorSpec.from_dict(self.section["spec"])
        self.keep = keep
        self._made: dict[tuple[int, int], np.ndarray] = {}
        self._own: np.ndarray | None = None  # the manifest's anchors, verified once

    def at(self, canvas_hw: Any) -> np.ndarray:
        """The float32 [A, 4] anchors over ``canvas_hw`` (H, W); ValueError when the manifest's do not verify."""
        key = (int(canvas_hw[0]), int(canvas_hw[1]))
        if self._own is None:
            self._own = anchors_from_manifest(self.section)
        if key == self.spec.image_hw:
            return self._own
        anchors = self._made.pop(key, None)
        if anchors is None:
            anchors = make_anchors(self.spec.at(key))
        self._made[key] = anchors  # most recently used last
        while len(self._made) > self.keep:
            self._made.pop(next(iter(self._made)))
        return anchors
