"""`check`'s rules for one sample: members, image, JSON record, anchor targets, and --deep's recomputation.

Each rule returns [(rule, detail)] for what it finds (``report.Found``); the record and member rules
are the loader's own (``format.record``, ``format.members``), so check and the loader agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import anchors as anc
from ..format.canvas import KeepRatioCanvas
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
    canvas: tuple[int, int] | KeepRatioCanvas | None = None  # the record rules' canvas (Manifest.canvas)
    anchor_count: Callable[[tuple[int, int]], int] | None = None  # a canvas's anchors (Manifest.anchor_count)

    @property
    def keep_ratio(self) -> bool:
        """A canvas per sample: the stored image is the record's content, the targets its canvas's anchors."""
        return isinstance(self.canvas, KeepRatioCanvas)

    def sizes(self, meta) -> tuple[tuple[int, int] | None, int]:
        """(the stored image's (H, W), the targets' anchor count) of a sample; keep-ratio reads them from its
        record (None: the record cannot say, its own rules report why)."""
        if not self.keep_ratio:
            return self.image_hw, self.num_anchors
        content, _ = self.canvas.content_of(meta) if isinstance(meta, dict) else (None, "")
        if content is None:
            return None, self.num_anchors
        return content, self.anchor_count((meta["size"][0], meta["size"][1]))


def make_context(manifest: Manifest, deep: bool, fraction: float, seed: int, pick: Pick) -> Context:
    """Resolve the manifest's fields once (the typed view: ``read_manifest`` checked them);
    ManifestError when --deep cannot use its anchors section."""
    ext = manifest.image_format
    ctx = Context(manifest.image_hw, ext, manifest.num_anchors, deep, fraction, seed, pick, manifest.flip_targets,
                  num_classes=manifest.num_classes, canvas=manifest.canvas, anchor_count=manifest.anchor_count)
    if ext in IMAGE_EXTS:
        ctx.expected_members = frozenset((ext, JSON_EXT, TARGETS_EXT))
    if deep:
        ctx.deep_fn = _deep_matcher(manifest)
    return ctx


def _deep_matcher(manifest: Manifest) -> Callable[[dict, bool], np.ndarray]:
    """A function (meta, flipped) -> labels recomputed with the reference matcher and the manifest's config, over
    the sample's canvas; flipped: for the mirrored boxes (format.record.flip_boxes, the build's own definition:
    about the canvas width, or a keep-ratio sample's content width)."""
    try:
        anchors = anc.CanvasAnchors(manifest)
        anchors.at(manifest.image_hw)  # the manifest's canvas: count and sha256 verified now
        cfg = anc.MatchConfig.from_dict(manifest.anchors["matching"])
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"manifest anchors section cannot be used for a deep check: {e}") from None

    def recompute(meta: dict, flipped: bool) -> np.ndarray:
        canvas = (meta["size"][0], meta["size"][1]) if manifest.keep_ratio else manifest.image_hw
        boxes, crowd = box_array(meta.get("boxes"), "boxes"), box_array(meta.get("crowd_boxes"), "crowd_boxes")
        if flipped:
            w = meta["content_size"][1] if manifest.keep_ratio else canvas[1]
            boxes, crowd = flip_boxes(boxes, w), flip_boxes(crowd, w)
        labels, _ = anc.match_reference(anchors.at(canvas), boxes, crowd, cfg, canvas)
        return np.asarray(labels)

    return recompute


def check_image(data: bytes, ext: str, image_hw: tuple[int, int] | None, full: bool) -> Found:
    """Image header (always; ``image_hw``: the size it must have) and full pixel decode (when asked)."""
    try:  # header rules first, before any pixel is decoded
        (decode_stored_image if full else open_stored_image)(data, ext, image_hw)
    except StoredImageError as e:
        return [(e.rule, str(e))]
    return []


def check_meta(key: str, meta, ctx: Context) -> tuple[Found, int | None]:
    """JSON member rules (format.record.record_problems, the loader's own): key, size, boxes, labels.
    Returns ([(rule, detail)], number of boxes or None)."""
    return record_problems(meta, ctx.canvas or ctx.image_hw, ctx.num_classes, key)


def check_targets(data: bytes, meta, num_boxes: int | None, ctx: Context, num_anchors: int
                   ) -> tuple[Found, tuple[SparseTargets, ...] | None]:
    """Anchor-target member rules, for every orientation it holds. Returns ([(rule, detail)], the sparse
    targets per orientation, or None).

    The sparse form is validated by format.targets.unpack_all_targets (index ranges, order, overlap, box
    indices against the header), so no dense array of all A anchors is built unless --deep needs one.
    """
    try:
        orientations = unpack_all_targets(data, num_anchors)
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
        diff = {k: (rpn.get(k), v) for k, v in orientations[0].counts(num_anchors).items() if rpn.get(k) != v}
        if diff:
            out.append((RULE_TARGETS_COUNTS, "JSON rpn counts differ from the member (json, member): "
                        + ", ".join(f"{k} {j}/{m}" for k, (j, m) in diff.items())))
    return out, orientations


def check_deep(meta, orientations: tuple[SparseTargets, ...] | None, ctx: Context, num_anchors: int) -> Found:
    """Recompute the anchor labels of every stored orientation from the boxes and compare them anchor by anchor."""
    if orientations is None or not isinstance(meta, dict) or ctx.deep_fn is None:
        return []
    out: list[tuple[str, str]] = []
    for name, targets in zip(ORIENTATIONS, orientations):
        stored = targets.dense(num_anchors)[0]
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
    meta, num_boxes, found = None, None, []
    if JSON_EXT in members:  # first: a keep-ratio sample's record says its image's size and its anchors
        try:
            meta = parse_json(members[JSON_EXT])
        except RecordError as e:
            found = [(RULE_JSON_INVALID, str(e))]
        else:
            found, num_boxes = check_meta(raw.key, meta, ctx)
    image_hw, num_anchors = ctx.sizes(meta)
    if image is not None:
        out += check_image(members[image], image, image_hw, full_decode or deep)
    out += found
    if TARGETS_EXT in members:
        found, orientations = check_targets(members[TARGETS_EXT], meta, num_boxes, ctx, num_anchors)
        out += found
        if deep and meta is not None and not (ctx.keep_ratio and image_hw is None):
            out += check_deep(meta, orientations, ctx, num_anchors)
    return out, deep
