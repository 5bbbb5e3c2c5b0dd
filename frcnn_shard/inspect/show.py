"""`frcnn-shard show`: samples drawn with their boxes, class names and positive anchors, into one PNG.

matplotlib is the optional ``viz`` extra, imported only when drawing (see plot.py).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..anchors import CanvasAnchors
from ..format.canvas import canvas_key
from ..format.image import StoredImageError, decode_stored_image
from ..format.members import ShardFormatError, image_member
from ..format.manifest import Manifest
from ..format.record import Record, key_of
from ..storage.base import Store
from ..storage.location import store_of
from ..storage.manifest_io import read_manifest
from ..storage.samples import iter_store_shard, sample_record, sample_targets
from ..words import plural
from .plot import DPI, new_figure

CELL_INCHES = 5.0  # one sample per cell: show PNGs are (cols x 500) x (rows x 500) px
MAX_COLS = 3
LABEL_ROOM = 0.05  # of the image height: a box closer than this to the top or bottom edge gets its label inside


def _normalize_key(key) -> str:
    """'139' or 139 -> '000000000139' (keys are 12-digit zero-padded image ids)."""
    k = str(key).strip()
    return key_of(int(k)) if k.isdigit() else k


def _scan_shard(store: Store, name: str, select) -> tuple[str, dict[str, bytes], str] | None:
    """(key, members, shard location) of the first sample of a shard that ``select(index, key)`` accepts,
    reading only that sample's bytes.

    Every header passed over is held to the member rules too (iter_store_shard raises ShardFormatError).
    """
    for key, members in iter_store_shard(store, name, select=select):
        if members:
            return key, members, store.location(name)
    return None


def _locate_key(store: Store, manifest: Manifest, key: str) -> tuple[str, dict[str, bytes], str]:
    """The sample with ``key``: shards whose first/last key range holds it are tried first."""
    entries = manifest.shards
    likely = [e for e in entries if (e.first_key or "") <= key <= (e.last_key or "")]
    # Keys follow source order, which is usually but not necessarily sorted; fall back to every shard.
    for entry in likely + [e for e in entries if e not in likely]:
        got = _scan_shard(store, entry.name, lambda i, k: k == key)
        if got is not None:
            return got
    raise KeyError(f"key {key} not found in {store.url} "
                   f"({plural(manifest.samples, 'sample')} in {plural(len(entries), 'shard')})")


def _locate_index(store: Store, manifest: Manifest, index: int) -> tuple[str, dict[str, bytes], str]:
    """The sample at position ``index`` of the split, going straight to its shard via the manifest counts."""
    entries = manifest.shards
    total = manifest.samples
    if not 0 <= index < total:
        raise IndexError(f"index {index} is out of range: {store.url} holds samples 0..{total - 1}")
    start = 0
    for entry in entries:
        n = entry.samples
        if index < start + n:
            got = _scan_shard(store, entry.name, lambda i, k, at=index - start: i == at)
            if got is None:
                raise IndexError(f"index {index}: {entry.name} holds fewer samples than its manifest entry says "
                                 "(run frcnn-shard check)")
            return got
        start += n
    raise IndexError(f"index {index} is out of range: {store.url} holds samples 0..{total - 1}")  # pragma: no cover


def _class_color(label: int):
    """A stable colour per class (tab20, cycled)."""
    from matplotlib import colormaps

    return colormaps["tab20"](label % 20)


def _draw_boxes(ax, record: Record, image_h: int, names: Sequence[str]) -> None:
    """Ground-truth boxes with their class names (``names``: the manifest's, index = label); crowd boxes dashed.

    A name goes above its box (below, for crowd boxes) unless the image edge leaves no room there:
    then it goes just inside the box, so it is never cut off at the top or bottom of the cell.
    """
    from matplotlib.patches import Rectangle

    room = LABEL_ROOM * image_h
    for (x1, y1, x2, y2), lab in zip(record.boxes.tolist(), record.labels.tolist()):
        color = _class_color(lab)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, lw=1.6))
        name = names[lab] if 0 < lab < len(names) else f"label {lab}"
        ax.text(x1, y1, name, fontsize=6, color="black", va="bottom" if y1 >= room else "top",
                bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "lw": 0})
    crowd_labels = record.crowd_labels.tolist()
    for i, (x1, y1, x2, y2) in enumerate(record.crowd_boxes.tolist()):
        lab = crowd_labels[i] if i < len(crowd_labels) else 0
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", lw=1.2, ls="--"))
        name = names[lab] if 0 < lab < len(names) else ""
        ax.text(x1, y2, f"crowd {name}".strip(), fontsize=6, color="white",
                va="top" if y2 <= image_h - room else "bottom")


def _draw_sample(ax, key: str, image: np.ndarray, record: Record, positives: np.ndarray | None,
                 names: Sequence[str], flip: bool = False, canvas: bool = False) -> None:
    """One cell: the stored (resized) image, its boxes and class names, crowd boxes dashed, positive anchors thin.

    ``positives``: the positive anchors' boxes (None: not drawn); ``names``: the manifest's class names, index
    = label; ``flip``: the sample is drawn as the loader delivers it mirrored (hflip): image, record and
    targets are the mirrored ones; ``canvas``: the title names the record's canvas (keep-ratio: a canvas each,
    the image drawn being its content).
    """
    from matplotlib.patches import Rectangle

    ax.imshow(image)
    ax.set_xlim(0, image.shape[1])
    ax.set_ylim(image.shape[0], 0)
    ax.set_axis_off()
    n_pos = 0
    if positives is not None:
        pos = positives
        n_pos = len(pos)
        for x1, y1, x2, y2 in pos:  # drawn first, under the ground truth
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="yellow", lw=0.4, alpha=0.9))
    _draw_boxes(ax, record, image.shape[0], names)
    title = f"{key}{' (flipped)' if flip else ''}: {plural(len(record.boxes), 'box')}"
    if positives is not None:
        title += f", {plural(n_pos, 'positive anchor')}"
    if canvas:
        title += f", canvas {canvas_key(record.size)}"
    ax.set_title(title, fontsize=8)


def _decoded(sample: tuple[str, dict[str, bytes], str], manifest: Manifest, anchors: CanvasAnchors | None,
             flip: bool) -> tuple[np.ndarray, Record, np.ndarray | None]:
    """(image, record, positive anchors' boxes or None) of a located sample, each member held to the format's
    rules first (ShardFormatError / StoredImageError naming the shard, the key and the rule). A keep-ratio
    sample's image is its content (``content_size``), mirrored in place."""
    key, members, where = sample
    record = sample_record(members, key, where, manifest.canvas, manifest.num_classes)
    image_hw = tuple(record.content_size) if manifest.keep_ratio else manifest.image_hw
    positives = None
    if anchors is not None:
        targets = sample_targets(members, key, where, manifest.anchor_count(record.size), flipped=flip)
        positives = anchors.at(record.size)[targets.positive]
    image_ext = image_member(members)
    if image_ext is None:
        raise ShardFormatError(f"{where}: key {key!r}: no image member (run frcnn-shard check)")
    try:
        image = decode_stored_image(members[image_ext], image_ext, image_hw, mirror=flip)  # header checked first
    except StoredImageError as e:
        raise StoredImageError(e.rule, f"{where}: key {key!r}: {e} (run frcnn-shard check)") from None
    return image, record.hflip(content=manifest.keep_ratio) if flip else record, positives


def render_samples(shard_dir, keys: Sequence = (), indices: Sequence[int] = (), anchors: bool = False,
                   out="sample.png", flip: bool = False) -> list[str]:
    """Draw the samples (keys first, then indices) into one grid PNG; returns the keys drawn.

    ``flip``: draw them mirrored, as make_loader(hflip=...) delivers them, with the flipped targets' anchors.
    Raises KeyError (unknown key, naming it and the directory), IndexError (with the valid range), or
    ValueError (flip on shards built without flip targets).
    """
    fig, shown = sample_figure(shard_dir, keys=keys, indices=indices, anchors=anchors, flip=flip)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    return shown


def sample_figure(shard_dir, keys: Sequence = (), indices: Sequence[int] = (), anchors: bool = False,
                  flip: bool = False):
    """The figure render_samples writes, and the keys drawn in it (one axes per sample, in order)."""
    store = store_of(shard_dir)  # a folder or a URL (s3://...)
    manifest = read_manifest(store)
    if flip and not manifest.flip_targets:
        raise ValueError(f"{store.url} was built with --no-flip-targets: it stores no flipped targets to show")
    samples = [_locate_key(store, manifest, _normalize_key(k)) for k in keys]
    samples += [_locate_index(store, manifest, int(i)) for i in indices]
    if not samples:
        raise ValueError("render_samples needs at least one key or index")
    anchor_boxes = CanvasAnchors(manifest) if anchors else None

    cols = min(len(samples), MAX_COLS)
    rows = math.ceil(len(samples) / cols)
    fig = new_figure((cols * CELL_INCHES, rows * CELL_INCHES))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, sample in zip(axes, samples):
        _draw_sample(ax, sample[0], *_decoded(sample, manifest, anchor_boxes, flip), manifest.classes, flip=flip,
                     canvas=manifest.keep_ratio)
    for ax in axes[len(samples):]:
        ax.set_axis_off()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.03, hspace=0.08)
    return fig, [k for k, _, _ in samples]
