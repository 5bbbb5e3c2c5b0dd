"""`frcnn-shard stats`: class, box and anchor-label numbers over a split, as a table and a PNG.

No torch here: the anchor sample is the loader's own (anchors.sample_indices with anchors.sample_rng),
drawn on the sparse targets, so `stats` starts in a fraction of a second.

matplotlib is an optional extra, imported inside plot_stats only (see plot.py).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Iterator, Sequence

import numpy as np

from ..anchors.sampling import sample_indices, sample_rng
from ..format.canvas import canvas_key
from ..format.manifest import Manifest
from ..format.record import Record
from ..storage.base import Store
from ..storage.location import store_of
from ..storage.manifest_io import read_manifest
from ..storage.samples import iter_store_shard, sample_record, sample_targets
from ..words import plural
from .info import canvas_counts_text
from .plot import DPI, new_figure

STATS_FIGSIZE = (12.0, 9.0)  # inches: stats PNGs are 1200 x 900 px
SIZE_BINS = 40  # box-size histogram bins over [0, sqrt(H * W)]
COCO_SMALL, COCO_MEDIUM = 32.0, 96.0  # COCO's area thresholds (sqrt of area, original pixels)
PROGRESS_EVERY = 64  # samples between progress callbacks
_PER_IMAGE = ("boxes", "crowd_boxes", "anchors", "positive", "negative", "ignore", "sampled_positive",
              "sampled_negative")
CANVASES_SHOWN = 8  # keep-ratio canvases named on the table's "canvases" line; all are in the dict


def _summary(values: Sequence[float]) -> dict:
    """min / max / mean / median / total of a list (zeros when empty)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "min": 0, "max": 0, "mean": 0.0, "median": 0.0, "total": 0}
    num = int if np.all(a == np.round(a)) else float
    return {"n": int(a.size), "min": num(a.min()), "max": num(a.max()), "mean": float(a.mean()),
            "median": float(np.median(a)), "total": num(a.sum())}


def _iter_samples(store: Store, manifest: Manifest, limit: int | None) -> Iterator[tuple[str, str, dict[str, bytes]]]:
    """(shard location, key, members) in split order, stopping after ``limit``; shards past it are never opened."""
    n = 0
    for entry in manifest.shards:
        where = store.location(entry.name)
        for key, members in iter_store_shard(store, entry.name):
            if limit is not None and n >= limit:
                return
            n += 1
            yield where, key, members


class _BoxSizes:
    """Running box-size statistics: sqrt(w * h) in each sample's stored pixels (its content: keep-ratio samples
    each have their own scale), and COCO's size classes through each sample's scale back to its source image."""

    def __init__(self, h: int, w: int):
        self.edges = np.linspace(0.0, math.sqrt(h * w), SIZE_BINS + 1)
        self.hist = np.zeros(SIZE_BINS, dtype=np.int64)
        self.total, self.n, self.min, self.max = 0.0, 0, math.inf, 0.0
        self.coco = Counter({"small": 0, "medium": 0, "large": 0})
        self.aspect_log2: list[float] = []  # per-box log2(w / h): symmetric around square boxes

    def add(self, boxes: np.ndarray, scale: tuple[float, float]) -> None:
        """Count the boxes of one image (resized pixels; ``scale`` maps back to the original's)."""
        b = boxes.astype(np.float64)
        bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        side = np.sqrt(np.maximum(bw * bh, 0.0))
        if not len(side):
            return
        self.hist += np.histogram(np.clip(side, 0, self.edges[-1]), bins=self.edges)[0]
        self.total += float(side.sum())
        self.n += len(side)
        self.min, self.max = min(self.min, float(side.min())), max(self.max, float(side.max()))
        orig = side / math.sqrt(scale[0] * scale[1])  # back to the original image's pixels, where COCO's thresholds live
        self.coco["small"] += int((orig < COCO_SMALL).sum())
        self.coco["medium"] += int(((orig >= COCO_SMALL) & (orig < COCO_MEDIUM)).sum())
        self.coco["large"] += int((orig >= COCO_MEDIUM).sum())
        self.aspect_log2.extend(np.log2(bw / bh).tolist())

    def to_dict(self) -> dict:
        """The "box_sizes" section of compute_stats."""
        return {
            "measure": "sqrt(w * h), resized pixels (each sample's stored content)",
            "edges": self.edges.tolist(), "counts": self.hist.tolist(),
            "n": self.n, "mean": self.total / self.n if self.n else 0.0,
            "min": self.min if self.n else 0.0, "max": self.max,
            "coco_area": dict(self.coco),  # by sqrt(area) in original pixels: < 32 small, < 96 medium, else large
            "log2_aspect_w_over_h": _summary(self.aspect_log2),
        }


class _Canvases:
    """Samples per canvas and the padding's share of the canvas pixels (letterbox pads one canvas, keep-ratio
    pads each sample's content to its own canvas)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.content_px = self.canvas_px = 0

    def add(self, record: Record) -> None:
        """Count one sample's canvas and pixels."""
        self.counts[canvas_key(record.size)] += 1
        self.content_px += int(record.content_size[0]) * int(record.content_size[1])
        self.canvas_px += int(record.size[0]) * int(record.size[1])

    def to_dict(self, manifest: Manifest) -> dict:
        """The "canvases" section of compute_stats: rule, samples and anchors per canvas, padding share."""
        image = manifest["image"]
        rule = (f"keep-ratio {image.get('min_size', '?')}/{image.get('max_size', '?')}" if manifest.keep_ratio
                else f"fixed {canvas_key(manifest.image_hw)}")
        counts = dict(sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))
        anchors = {k: manifest.anchor_count(tuple(int(v) for v in k.split("x"))) for k in counts}
        share = 1.0 - self.content_px / self.canvas_px if self.canvas_px else 0.0
        return {"rule": rule, "counts": counts, "anchors": anchors, "padding_share": share}


def compute_stats(shard_dir, limit: int | None = None, rpn_batch_size: int = 256,
                  positive_fraction: float = 0.5, seed: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Class, box and anchor-label statistics over all samples (or the first ``limit``).

    ``progress(done, total)``: samples read so far, of the manifest's count (or ``limit``, if fewer).
    """
    store = store_of(shard_dir)  # a folder or a URL (s3://...)
    manifest = read_manifest(store)
    total = manifest.samples if limit is None else min(limit, manifest.samples)
    classes: Counter = Counter()
    keys: list[str] = []
    per_image: dict[str, list[int]] = {k: [] for k in _PER_IMAGE}
    sizes, canvases = _BoxSizes(*manifest.image_hw), _Canvases()  # keep-ratio: image_hw is the largest canvas
    if progress is not None:
        progress(0, total)
    for where, key, members in _iter_samples(store, manifest, limit):
        # ShardFormatError names a bad one; keep-ratio: each record its own canvas, its boxes in its content
        record = sample_record(members, key, where, manifest.canvas, manifest.num_classes)
        num_anchors = manifest.anchor_count(record.size)  # the sample's canvas's anchors
        targets = sample_targets(members, key, where, num_anchors)
        # The loader's draws for epoch 0 (same generator, same sparse sampler).
        sampled_pos, sampled_neg = sample_indices(targets, num_anchors, rpn_batch_size, positive_fraction,
                                                  rng=sample_rng(seed, 0, key))
        keys.append(key)
        classes.update(int(v) for v in record.labels)
        sizes.add(record.boxes, record.scale)
        canvases.add(record)
        counts = targets.counts(num_anchors)
        for name, value in (("boxes", len(record.boxes)), ("crowd_boxes", len(record.crowd_boxes)),
                            ("anchors", num_anchors), ("positive", counts["positive"]),
                            ("negative", counts["negative"]), ("ignore", counts["ignore"]),
                            ("sampled_positive", len(sampled_pos)), ("sampled_negative", len(sampled_neg))):
            per_image[name].append(value)
        if progress is not None and len(keys) % PROGRESS_EVERY == 0:
            progress(len(keys), total)
    if progress is not None:
        progress(len(keys), total)
    return _stats_dict(store.url, manifest, limit, keys, classes, per_image, sizes, canvases.to_dict(manifest),
                       {"rpn_batch_size": rpn_batch_size, "positive_fraction": positive_fraction, "seed": seed})


def _stats_dict(shard_dir: str, manifest: Manifest, limit: int | None, keys: list[str], classes: Counter,
                per_image: dict, sizes: _BoxSizes, canvases: dict, sampling: dict) -> dict:
    """The result of compute_stats from its tallies."""
    total_boxes = sum(per_image["boxes"])
    class_rows = [{**_class_of(manifest, lab), "count": n, "share": n / total_boxes if total_boxes else 0.0}
                  for lab, n in sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))]
    return {
        "shard_dir": str(shard_dir), "split": manifest.split, "samples": len(keys), "limit": limit,
        "image_hw": list(manifest.image_hw), "num_anchors": manifest.num_anchors,
        "class_count": manifest.num_classes - 1,  # K, the classes of the build (labels 1..K; no background)
        "keys": keys, "classes": class_rows, "boxes": total_boxes, "crowd_boxes": sum(per_image["crowd_boxes"]),
        "per_image": per_image, "boxes_per_image": _summary(per_image["boxes"]), "box_sizes": sizes.to_dict(),
        "canvases": canvases,
        "anchors": {
            "per_image": _summary(per_image["anchors"]),  # keep-ratio: each sample's canvas's count
            "before": {k: _summary(per_image[k]) for k in ("positive", "negative", "ignore")},
            "after": {"positive": _summary(per_image["sampled_positive"]),
                      "negative": _summary(per_image["sampled_negative"])},
            "images_without_positive": sum(1 for v in per_image["positive"] if v == 0),
            "sampling": {**sampling, "epoch": 0, "rng": "frcnn_shard.anchors.sample_rng(seed, epoch, key)"},
        },
    }


def _class_of(manifest: Manifest, label: int) -> dict:
    """{label, name, id}: the manifest's name and evaluation category id of a label (records hold 1..K)."""
    cmap = manifest.class_map
    return {"label": label, "name": cmap.names[label - 1], "id": cmap.ids[label - 1]}


def _fmt(v: float) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def _line(s: dict) -> str:
    return f"min {_fmt(s['min'])}  median {_fmt(s['median'])}  mean {_fmt(s['mean'])}  max {_fmt(s['max'])}"


def _canvas_lines(stats: dict) -> list[str]:
    """The canvas rule, samples per canvas (keep-ratio) and the padding's share of the canvas pixels."""
    c = stats.get("canvases")
    if not c:  # a stats dict from before the canvases section
        return []
    share = f"padding {c['padding_share']:.1%} of the canvas pixels"
    if not c["rule"].startswith("keep-ratio"):
        return [f"canvas            {c['rule']}, {share}"]
    return [f"canvases          {plural(len(c['counts']), 'canvas')} ({c['rule']}), {share}:",
            f"  samples         {canvas_counts_text(c['counts'], CANVASES_SHOWN)}"]


def _anchors_of(stats: dict) -> str:
    """How many anchors each image's labels count: the build's, or "its canvas's a..b" (keep-ratio)."""
    per = stats["anchors"].get("per_image") or {}
    if not per.get("n"):  # no samples, or a stats dict from before per-image anchor counts
        return f"{stats['num_anchors']}"
    return f"its canvas's {per['min']}..{per['max']}" if per["min"] != per["max"] else f"{per['min']}"


def stats_table(stats: dict, top: int = 20) -> str:
    """The numbers of compute_stats as a plain-text table (top-N classes by box count)."""
    a, bs = stats["anchors"], stats["box_sizes"]
    smp = a["sampling"]
    coco = bs["coco_area"]
    lines = [
        f"samples           {stats['samples']}" + (f" (first {stats['limit']})" if stats.get("limit") else ""),
        f"boxes             {stats['boxes']} (+{stats['crowd_boxes']} crowd), {plural(len(stats['classes']), 'class')} "
        f"present of {stats.get('class_count', '?')}",
        f"boxes per image   {_line(stats['boxes_per_image'])}",
        f"box size          sqrt(w*h) in resized px: min {bs['min']:.1f}  mean {bs['mean']:.1f}  max {bs['max']:.1f}",
        f"COCO size         small {coco['small']}  medium {coco['medium']}  large {coco['large']} (original px)",
        *_canvas_lines(stats),
        f"anchors/image     of {_anchors_of(stats)}, stored labels before sampling:",
        f"  positive        {_line(a['before']['positive'])}",
        f"  negative        {_line(a['before']['negative'])}",
        f"  ignore          {_line(a['before']['ignore'])}",
        f"  no positive     {plural(a['images_without_positive'], 'image')}",
        f"after sampling    batch {smp['rpn_batch_size']}, positive fraction {smp['positive_fraction']:g}, "
        f"seed {smp['seed']}, epoch {smp['epoch']}:",
        f"  positive        {_line(a['after']['positive'])}",
        f"  negative        {_line(a['after']['negative'])}",
        "",
        f"top {plural(min(top, len(stats['classes'])), 'class')} (by boxes)",
        f"  {'label':>5}  {'id':>7}  {'name':<16} {'boxes':>7}  {'share':>6}",
    ]
    for row in stats["classes"][:top]:
        lines.append(f"  {row['label']:>5}  {row.get('id', '?'):>7}  {row['name']:<16} {row['count']:>7}  "
                     f"{row['share']:>6.1%}")
    return "\n".join(lines)


def plot_stats(stats: dict, out_png, top: int = 20) -> None:
    """One PNG (STATS_FIGSIZE at DPI): top-N classes, boxes per image, box sizes, anchor labels per image."""
    stats_figure(stats, top=top).savefig(out_png, dpi=DPI, format="png")


def stats_figure(stats: dict, top: int = 20):
    """The figure plot_stats writes (a matplotlib Figure; count axes carry integer ticks only)."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(STATS_FIGSIZE)
    ax_cls, ax_bpi, ax_size, ax_anc = fig.subplots(2, 2).ravel()

    rows = stats["classes"][:top]
    ax_cls.barh(range(len(rows)), [r["count"] for r in rows], color="tab:blue")
    ax_cls.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
    ax_cls.invert_yaxis()
    ax_cls.set_title(f"top {plural(len(rows), 'class')} (boxes)")
    ax_cls.xaxis.set_major_locator(MaxNLocator(integer=True))

    bpi = stats["per_image"]["boxes"]
    ax_bpi.hist(bpi, bins=np.arange(0, (max(bpi) if bpi else 0) + 2) - 0.5, color="tab:green")
    ax_bpi.set_title("boxes per image")
    ax_bpi.set_xlabel("boxes")
    ax_bpi.set_ylabel("images")
    ax_bpi.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_bpi.yaxis.set_major_locator(MaxNLocator(integer=True))

    bs = stats["box_sizes"]
    edges = np.asarray(bs["edges"])
    ax_size.bar(edges[:-1], bs["counts"], width=np.diff(edges), align="edge", color="tab:orange")
    ax_size.set_title("box size, sqrt(w*h) (resized px)")
    ax_size.set_xlabel("px")
    ax_size.set_ylabel("boxes")
    ax_size.yaxis.set_major_locator(MaxNLocator(integer=True))

    pi = stats["per_image"]
    series = [("positive\nstored", pi["positive"]), ("ignore\nstored", pi["ignore"]),
              ("negative\nstored", pi["negative"]), ("positive\nsampled", pi["sampled_positive"]),
              ("negative\nsampled", pi["sampled_negative"])]
    ax_anc.boxplot([s or [0] for _, s in series], tick_labels=[n for n, _ in series])
    ax_anc.set_yscale("symlog", linthresh=1)  # positives are tens, negatives tens of thousands
    ax_anc.set_title(f"anchor labels per image (of {_anchors_of(stats)})")
    ax_anc.tick_params(axis="x", labelsize=7)

    canvases = stats.get("canvases") or {}
    keep_ratio = canvases.get("counts") and str(canvases.get("rule", "")).startswith("keep-ratio")
    rule = f", {plural(len(canvases['counts']), 'canvas')} ({canvases['rule']})" if keep_ratio else ""
    fig.suptitle(f"{stats.get('split') or ''} - {plural(stats['samples'], 'sample')}, "
                 f"{plural(stats['boxes'], 'box')}{rule}")
    fig.tight_layout()
    return fig


