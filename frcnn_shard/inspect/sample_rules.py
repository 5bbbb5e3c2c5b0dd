"""`check`'s rules for one sample: members, image, JSON record, anchor targets, and --deep's recomputation.

Each rule returns [(rule, detail)] for what it finds (``report.Found``); the record and member rules
are the loader's own (``format.record``, ``format.members``), so check and the loader agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import anchors as anc
from ..format.image import StoredImageError, decode_stored_image, open_stored_image
from ..format.manifest import Manifest, ManifestError
from ..format.members import IMAGE_EXTS, JSON_EXT, RULE_MEMBERS, TARGETS_EXT, RawSample, image_member, members_problems
from ..format.record import RecordError, box_array, flip_boxes, parse_json, record_problems
from ..format.targets import ORIENTATIONS, SparseTargets, unpack_all_targets
from .report import RULE_JSON_INVALID, RULE_TARGETS_COUNTS, RULE_TARGETS_DEEP, RULE_TARGETS_INVALID, Found

Pick = Callable[[str, int, float], bool]  # (key, seed, fraction) -> whether --deep checks this sample


@dataclass
class Context:
    """What every sample check needs from the manifest, resolved once."""

    image_hw: tuple[int, int]
    image_ext: str
    num_anchors: int
    deep: bool
    fraction: float
    seed: int
    pick: Pick  # --deep --fraction's per-key choice (seeds' draw, handed in by check)
    flip_targets: bool = False  # the manifest says every member also holds the mirrored image's targets
    deep_fn: Callable | None = None  # (meta, flipped) -> recomputed labels, built lazily
    expected_members: frozenset = frozenset()  # {image ext, json, targets ext}: the members of a sound sample
    num_classes: int = 0  # background included: labels lie in 1..num_classes-1 (the manifest's classes)


def make_context(manifest: Manifest, deep: bool, fraction: float, seed: int, pick: Pick) -> Context:
    """Resolve the manifest's fields once (the typed view: ``read_manifest`` checked them);
    ManifestError when --deep cannot use its anchors section."""
    ext = manifest.image_format
    ctx = Context(manifest.image_hw, ext, manifest.num_anchors, deep, fraction, seed, pick, manifest.flip_targets,
                  num_classes=manifest.num_classes)
    if ext in IMAGE_EXTS:
        ctx.expected_members = frozenset((ext, JSON_EXT, TARGETS_EXT))
    if deep:
        ctx.deep_fn = _deep_matcher(manifest, manifest.image_hw)
    return ctx


def _deep_matcher(manifest: Manifest, image_hw: tuple[int, int]) -> Callable[[dict, bool], np.ndarray]:
    """A function (meta, flipped) -> labels recomputed with the reference matcher and the manifest's config;
    flipped: for the mirrored boxes (format.record.flip_boxes, the build's own definition)."""
    try:
        anchors = anc.anchors_from_manifest(manifest)
        cfg = anc.MatchConfig.from_dict(manifest.anchors["matching"])
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"manifest anchors section cannot be used for a deep check: {e}") from None

    def recompute(meta: dict, flipped: bool) -> np.ndarray:
        boxes, crowd = box_array(meta.get("boxes"), "boxes"), box_array(meta.get("crowd_boxes"), "crowd_boxes")
        if flipped:
            boxes, crowd = flip_boxes(boxes, image_hw[1]), flip_boxes(crowd, image_hw[1])
        labels, _ = anc.match_reference(anchors, boxes, crowd, cfg, image_hw)
        return np.asarray(labels)

    return recompute


def check_image(data: bytes, ext: str, ctx: Context, full: bool) -> Found:
    """Image header (always) and full pixel decode (when asked): [(rule, detail)]."""
    try:  # header rules first, before any pixel is decoded
        (decode_stored_image if full else open_stored_image)(data, ext, ctx.image_hw)
    except StoredImageError as e:
        return [(e.rule, str(e))]
    return []


def check_meta(key: str, meta, ctx: Context) -> tuple[Found, int | None]:
    """JSON member rules (format.record.record_problems, the loader's own): key, size, boxes, labels.
    Returns ([(rule, detail)], number of boxes or None)."""
    return record_problems(meta, ctx.image_hw, ctx.num_classes, key)


def check_targets(data: bytes, meta, num_boxes: int | None, ctx: Context
                   ) -> tuple[Found, tuple[SparseTargets, ...] | None]:
    """Anchor-target member rules, for every orientation it holds. Returns ([(rule, detail)], the sparse
    targets per orientation, or None).

    The sparse form is validated by format.targets.unpack_all_targets (index ranges, order, overlap, box
    indices against the header), so no dense array of all A anchors is built unless --deep needs one.
    """
    try:
        orientations = unpack_all_targets(data, ctx.num_anchors)
    except Exception as e:  # unpack raises ValueError by contract; a damaged npz can raise zip/zlib errors too
        return [(RULE_TARGETS_INVALID, f"cannot unpack: {type(e).__name__}: {e}")], None
    out: list[tuple[str, str]] = []
    want = 2 if ctx.flip_targets else 1
    if len(orientations) != want:
        out.append((RULE_TARGETS_INVALID, f"the member holds {len(orientations)} orientation(s), the manifest's "
                                          f"anchors.flip_targets={ctx.flip_targets} says {want}"))
    for name, targets in zip(ORIENTATIONS, orientations):
        if num_boxes is not None and len(targets.matched) and int(targets.matched.max()) >= num_boxes:
            out.append((RULE_TARGETS_INVALID, f"{name}: positive anchors matched to boxes outside 0..{num_boxes - 1}"))
    rpn = meta.get("rpn") if isinstance(meta, dict) else None
    if isinstance(rpn, dict):
        diff = {k: (rpn.get(k), v) for k, v in orientations[0].counts(ctx.num_anchors).items() if rpn.get(k) != v}
        if diff:
            out.append((RULE_TARGETS_COUNTS, "JSON rpn counts differ from the member (json, member): "
                        + ", ".join(f"{k} {j}/{m}" for k, (j, m) in diff.items())))
    return out, orientations


def check_deep(meta, orientations: tuple[SparseTargets, ...] | None, ctx: Context) -> Found:
    """Recompute the anchor labels of every stored orientation from the boxes and compare them anchor by anchor."""
    if orientations is None or not isinstance(meta, dict) or ctx.deep_fn is None:
        return []
    out: list[tuple[str, str]] = []
    for name, targets in zip(ORIENTATIONS, orientations):
        stored = targets.dense(ctx.num_anchors)[0]
        try:
            ref = ctx.deep_fn(meta, name != ORIENTATIONS[0])
        except Exception as e:  # boxes already reported as broken make the matcher fail; say so, do not crash
            return [(RULE_TARGETS_DEEP, f"reference matcher failed: {type(e).__name__}: {e}")]
        differ = np.flatnonzero(ref != stored)
        if len(differ):
            i = int(differ[0])
            out.append((RULE_TARGETS_DEEP, f"{name}: {len(differ)} of {len(stored)} anchor labels differ from the "
                                           f"reference matcher (first: anchor {i} stored {int(stored[i])}, "
                                           f"recomputed {int(ref[i])})"))
    return out


def check_sample(raw: RawSample, ctx: Context, full_decode: bool) -> tuple[Found, bool]:
    """All per-sample rules for one sample: ([(rule, detail)], deep-checked?)."""
    members = raw.members
    out: list[tuple[str, str]] = list(raw.problems)
    if members.keys() == ctx.expected_members:  # the sound case: image in the manifest's format, JSON, targets
        image = ctx.image_ext
    else:
        out += [(RULE_MEMBERS, p) for p in members_problems(members.keys(), ctx.image_ext)]
        image = image_member(members)
    deep = ctx.deep and ctx.pick(raw.key, ctx.seed, ctx.fraction)
    if image is not None:
        out += check_image(members[image], image, ctx, full_decode or deep)
    meta, num_boxes = None, None
    if JSON_EXT in members:
        try:
            meta = parse_json(members[JSON_EXT])
        except RecordError as e:
            out.append((RULE_JSON_INVALID, str(e)))
        else:
            found, num_boxes = check_meta(raw.key, meta, ctx)
            out += found
    if TARGETS_EXT in members:
        found, orientations = check_targets(members[TARGETS_EXT], meta, num_boxes, ctx)
        out += found
        if deep and meta is not None:
            out += check_deep(meta, orientations, ctx)
    return out, deep
