"""`frcnn-shard stats` and `show`: numbers and pictures from shards.

matplotlib is an optional extra: it is imported inside the plotting functions only, and through its
object-oriented API with the Agg canvas, so nothing here switches the caller's global backend.
"""
from __future__ import annotations

import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from .labels import CLASS_NAMES
from .shards import (
    IMAGE_EXTS, ShardFormatError, check_member_name, iter_shard, member_problem, read_manifest, split_member_name,
)

DPI = 100
STATS_FIGSIZE = (12.0, 9.0)  # inches: stats PNGs are 1200 x 900 px
CELL_INCHES = 5.0  # one sample per cell: show PNGs are (cols x 500) x (rows x 500) px
MAX_COLS = 3
SIZE_BINS = 40  # box-size histogram bins over [0, sqrt(H * W)]
COCO_SMALL, COCO_MEDIUM = 32.0, 96.0  # COCO's area thresholds (sqrt of area, original pixels)


# ---------------------------------------------------------------------------------------- stats


def _summary(values: Sequence[float]) -> dict:
    """min / max / mean / median / total of a list (zeros when empty)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "min": 0, "max": 0, "mean": 0.0, "median": 0.0, "total": 0}
    num = int if np.all(a == np.round(a)) else float
    return {"n": int(a.size), "min": num(a.min()), "max": num(a.max()), "mean": float(a.mean()),
            "median": float(np.median(a)), "total": num(a.sum())}


def _iter_samples(shard_dir: Path, manifest: dict, limit: int | None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples in split order, stopping after ``limit``; shards past the limit are never opened."""
    n = 0
    for entry in manifest.get("shards", []):
        for key, members in iter_shard(shard_dir / entry["name"]):
            if limit is not None and n >= limit:
                return
            n += 1
            yield key, members


def compute_stats(shard_dir, limit: int | None = None, rpn_batch_size: int = 256,
                  positive_fraction: float = 0.5, seed: int = 0) -> dict:
    """Class, box and anchor-label statistics over all samples (or the first ``limit``)."""
    from . import anchors as anc
    from .loader import sample_rng  # the loader's own per-sample generator: same draws as training, epoch 0

    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    num_anchors = int(manifest["anchors"]["count"])
    h, w = (int(v) for v in manifest["image"]["size"])
    classes: Counter = Counter()
    keys: list[str] = []
    per_image = {k: [] for k in ("boxes", "crowd_boxes", "positive", "negative", "ignore",
                                 "sampled_positive", "sampled_negative")}
    size_edges = np.linspace(0.0, math.sqrt(h * w), SIZE_BINS + 1)
    size_hist = np.zeros(SIZE_BINS, dtype=np.int64)
    sizes_sum, sizes_n, sizes_min, sizes_max = 0.0, 0, math.inf, 0.0
    coco = Counter({"small": 0, "medium": 0, "large": 0})
    aspect_log2 = []  # per-box log2(w / h): symmetric around square boxes

    for key, members in _iter_samples(shard_dir, manifest, limit):
        meta = json.loads(members["json"])
        boxes = np.asarray(meta["boxes"], dtype=np.float64).reshape(-1, 4)
        labels = [int(v) for v in meta["labels"]]
        keys.append(key)
        classes.update(labels)
        per_image["boxes"].append(len(boxes))
        per_image["crowd_boxes"].append(len(meta.get("crowd_boxes") or []))
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        side = np.sqrt(np.maximum(bw * bh, 0.0))
        if len(side):
            size_hist += np.histogram(np.clip(side, 0, size_edges[-1]), bins=size_edges)[0]
            sizes_sum += float(side.sum())
            sizes_n += len(side)
            sizes_min, sizes_max = min(sizes_min, float(side.min())), max(sizes_max, float(side.max()))
            sy, sx = meta.get("scale", [1.0, 1.0])
            orig = side / math.sqrt(sy * sx)  # back to the original image's pixels, where COCO's thresholds live
            coco["small"] += int((orig < COCO_SMALL).sum())
            coco["medium"] += int(((orig >= COCO_SMALL) & (orig < COCO_MEDIUM)).sum())
            coco["large"] += int((orig >= COCO_MEDIUM).sum())
            aspect_log2.extend(np.log2(bw / bh).tolist())
        # The sparse form gives the counts directly; the dense labels are built only for the sampler.
        pos, ign, _ = anc.unpack_sparse(members[anc.TARGETS_EXT], num_anchors)
        per_image["positive"].append(len(pos))
        per_image["negative"].append(num_anchors - len(pos) - len(ign))
        per_image["ignore"].append(len(ign))
        # The loader's draws (distinct indices), counted without building the sampled label row.
        sampled_pos, sampled_neg = anc.sample_indices(anc.dense_labels(num_anchors, pos, ign), rpn_batch_size,
                                                      positive_fraction, rng=sample_rng(seed, 0, key))
        per_image["sampled_positive"].append(len(sampled_pos))
        per_image["sampled_negative"].append(len(sampled_neg))

    total_boxes = sum(per_image["boxes"])
    class_rows = [{"label": lab, "name": CLASS_NAMES[lab] if 0 <= lab < len(CLASS_NAMES) else f"label {lab}",
                   "count": n, "share": n / total_boxes if total_boxes else 0.0}
                  for lab, n in sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))]
    return {
        "shard_dir": str(shard_dir),
        "split": manifest.get("split"),
        "samples": len(keys),
        "limit": limit,
        "image_hw": [h, w],
        "num_anchors": num_anchors,
        "keys": keys,
        "classes": class_rows,
        "boxes": total_boxes,
        "crowd_boxes": sum(per_image["crowd_boxes"]),
        "per_image": per_image,
        "boxes_per_image": _summary(per_image["boxes"]),
        "box_sizes": {
            "measure": "sqrt(w * h), resized pixels",
            "edges": size_edges.tolist(), "counts": size_hist.tolist(),
            "n": sizes_n, "mean": sizes_sum / sizes_n if sizes_n else 0.0,
            "min": sizes_min if sizes_n else 0.0, "max": sizes_max,
            "coco_area": dict(coco),  # by sqrt(area) in original pixels: < 32 small, < 96 medium, else large
            "log2_aspect_w_over_h": _summary(aspect_log2),
        },
        "anchors": {
            "before": {k: _summary(per_image[k]) for k in ("positive", "negative", "ignore")},
            "after": {"positive": _summary(per_image["sampled_positive"]),
                      "negative": _summary(per_image["sampled_negative"])},
            "images_without_positive": sum(1 for v in per_image["positive"] if v == 0),
            "sampling": {"rpn_batch_size": rpn_batch_size, "positive_fraction": positive_fraction,
                         "seed": seed, "epoch": 0, "rng": "frcnn_shard.loader.sample_rng(seed, epoch, key)"},
        },
    }


def _fmt(v: float) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def _line(s: dict) -> str:
    return f"min {_fmt(s['min'])}  median {_fmt(s['median'])}  mean {_fmt(s['mean'])}  max {_fmt(s['max'])}"


def stats_table(stats: dict, top: int = 20) -> str:
    """The numbers of compute_stats as a plain-text table (top-N classes by box count)."""
    a, bs = stats["anchors"], stats["box_sizes"]
    smp = a["sampling"]
    coco = bs["coco_area"]
    lines = [
        f"samples           {stats['samples']}" + (f" (first {stats['limit']})" if stats.get("limit") else ""),
        f"boxes             {stats['boxes']} (+{stats['crowd_boxes']} crowd), {len(stats['classes'])} classes present",
        f"boxes per image   {_line(stats['boxes_per_image'])}",
        f"box size          sqrt(w*h) in resized px: min {bs['min']:.1f}  mean {bs['mean']:.1f}  max {bs['max']:.1f}",
        f"COCO size         small {coco['small']}  medium {coco['medium']}  large {coco['large']} (original px)",
        f"anchors/image     of {stats['num_anchors']}, stored labels before sampling:",
        f"  positive        {_line(a['before']['positive'])}",
        f"  negative        {_line(a['before']['negative'])}",
        f"  ignore          {_line(a['before']['ignore'])}",
        f"  no positive     {a['images_without_positive']} images",
        f"after sampling    batch {smp['rpn_batch_size']}, positive fraction {smp['positive_fraction']:g}, "
        f"seed {smp['seed']}, epoch {smp['epoch']}:",
        f"  positive        {_line(a['after']['positive'])}",
        f"  negative        {_line(a['after']['negative'])}",
        "",
        f"top {min(top, len(stats['classes']))} classes (by boxes)",
        f"  {'label':>5}  {'name':<16} {'boxes':>7}  {'share':>6}",
    ]
    for row in stats["classes"][:top]:
        lines.append(f"  {row['label']:>5}  {row['name']:<16} {row['count']:>7}  {row['share']:>6.1%}")
    return "\n".join(lines)


def _new_figure(figsize: tuple[float, float]):
    """A matplotlib Figure on an Agg canvas, without pyplot (no global backend or figure state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def plot_stats(stats: dict, out_png, top: int = 20) -> None:
    """One PNG (STATS_FIGSIZE at DPI): top-N classes, boxes per image, box sizes, anchor labels per image."""
    fig = _new_figure(STATS_FIGSIZE)
    ax_cls, ax_bpi, ax_size, ax_anc = fig.subplots(2, 2).ravel()

    rows = stats["classes"][:top]
    ax_cls.barh(range(len(rows)), [r["count"] for r in rows], color="tab:blue")
    ax_cls.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
    ax_cls.invert_yaxis()
    ax_cls.set_title(f"top {len(rows)} classes (boxes)")

    bpi = stats["per_image"]["boxes"]
    ax_bpi.hist(bpi, bins=np.arange(0, (max(bpi) if bpi else 0) + 2) - 0.5, color="tab:green")
    ax_bpi.set_title("boxes per image")
    ax_bpi.set_xlabel("boxes")
    ax_bpi.set_ylabel("images")

    bs = stats["box_sizes"]
    edges = np.asarray(bs["edges"])
    ax_size.bar(edges[:-1], bs["counts"], width=np.diff(edges), align="edge", color="tab:orange")
    ax_size.set_title("box size, sqrt(w*h) (resized px)")
    ax_size.set_xlabel("px")
    ax_size.set_ylabel("boxes")

    pi = stats["per_image"]
    series = [("positive\nstored", pi["positive"]), ("ignore\nstored", pi["ignore"]),
              ("negative\nstored", pi["negative"]), ("positive\nsampled", pi["sampled_positive"]),
              ("negative\nsampled", pi["sampled_negative"])]
    ax_anc.boxplot([s or [0] for _, s in series], tick_labels=[n for n, _ in series])
    ax_anc.set_yscale("symlog", linthresh=1)  # positives are tens, negatives tens of thousands
    ax_anc.set_title(f"anchor labels per image (of {stats['num_anchors']})")
    ax_anc.tick_params(axis="x", labelsize=7)

    fig.suptitle(f"{stats.get('split') or ''} - {stats['samples']} samples, {stats['boxes']} boxes")
    fig.tight_layout()
    fig.savefig(out_png, dpi=DPI, format="png")


# ---------------------------------------------------------------------------------------- show


def _normalize_key(key) -> str:
    """'139' or 139 -> '000000000139' (keys are 12-digit zero-padded image ids)."""
    k = str(key).strip()
    return k.zfill(12) if k.isdigit() else k


def _scan_shard(path: Path, *, key: str | None = None,
                position: int | None = None) -> tuple[str, dict[str, bytes]] | None:
    """Find one sample in a shard by key or by position, reading tar headers and only that sample's bytes."""
    members: dict[str, bytes] = {}
    found: str | None = None
    index, current = -1, None
    with tarfile.open(path, mode="r:") as tar:  # seeks over the data of every other sample
        for info in tar:
            check_member_name(info.name, str(path))  # every header passed over, not only the sample shown
            k, ext = split_member_name(info.name)
            if k != current:
                if found is not None:
                    break
                current, index = k, index + 1
                if k == key or index == position:
                    found = k
            if found is not None:
                problem = member_problem(info, f"{path}: key {k!r}", members)  # refused before reading
                if problem is not None:
                    raise ShardFormatError(problem)
                f = tar.extractfile(info)
                members[ext] = f.read() if f is not None else b""
    return (found, members) if found is not None else None


def _locate_key(shard_dir: Path, manifest: dict, key: str) -> tuple[str, dict[str, bytes]]:
    """The sample with ``key``: shards whose first/last key range holds it are tried first."""
    entries = manifest.get("shards", [])
    likely = [e for e in entries if (e.get("first_key") or "") <= key <= (e.get("last_key") or "")]
    # Keys follow source order, which is usually but not necessarily sorted; fall back to every shard.
    for entry in likely + [e for e in entries if e not in likely]:
        got = _scan_shard(shard_dir / entry["name"], key=key)
        if got is not None:
            return got
    total = sum(int(e.get("samples") or 0) for e in entries)
    raise KeyError(f"key {key} not found in {shard_dir} ({total} samples in {len(entries)} shards)")


def _locate_index(shard_dir: Path, manifest: dict, index: int) -> tuple[str, dict[str, bytes]]:
    """The sample at position ``index`` of the split, going straight to its shard via the manifest counts."""
    entries = manifest.get("shards", [])
    total = sum(int(e.get("samples") or 0) for e in entries)
    if not 0 <= index < total:
        raise IndexError(f"index {index} is out of range: {shard_dir} holds samples 0..{total - 1}")
    start = 0
    for entry in entries:
        n = int(entry.get("samples") or 0)
        if index < start + n:
            got = _scan_shard(shard_dir / entry["name"], position=index - start)
            if got is None:
                raise IndexError(f"index {index}: {entry['name']} holds fewer samples than its manifest entry says "
                                 "(run frcnn-shard check)")
            return got
        start += n
    raise IndexError(f"index {index} is out of range: {shard_dir} holds samples 0..{total - 1}")  # pragma: no cover


def _class_color(label: int):
    """A stable colour per class (tab20, cycled)."""
    from matplotlib import colormaps

    return colormaps["tab20"](label % 20)


def _draw_sample(ax, key: str, members: dict[str, bytes], anchors: np.ndarray | None, num_anchors: int,
                 image_hw: tuple[int, int]) -> None:
    """One cell: the stored (resized) image, its boxes and class names, crowd boxes dashed, positive anchors thin."""
    from matplotlib.patches import Rectangle

    from . import anchors as anc

    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    if image_ext is None or "json" not in members:
        raise ValueError(f"sample {key} lacks its image or JSON member (run frcnn-shard check)")
    img = Image.open(io.BytesIO(members[image_ext]))
    if (img.height, img.width) != tuple(image_hw):  # checked from the header: a bomb is never decoded
        raise ShardFormatError(f"sample {key}: image is {img.height}x{img.width}, the manifest's canvas is "
                               f"{image_hw[0]}x{image_hw[1]} (run frcnn-shard check)")
    img = img.convert("RGB")
    meta = json.loads(members["json"])
    ax.imshow(np.asarray(img))
    ax.set_xlim(0, img.width)
    ax.set_ylim(img.height, 0)
    ax.set_axis_off()

    n_pos = 0
    if anchors is not None and anc.TARGETS_EXT in members:
        labels, _ = anc.unpack_targets(members[anc.TARGETS_EXT], num_anchors)
        pos = anchors[labels == 1]
        n_pos = len(pos)
        for x1, y1, x2, y2 in pos:  # drawn first, under the ground truth
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="yellow", lw=0.4, alpha=0.9))
    boxes = meta.get("boxes") or []
    for (x1, y1, x2, y2), lab in zip(boxes, meta.get("labels") or []):
        color = _class_color(lab)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, lw=1.6))
        name = CLASS_NAMES[lab] if 0 < lab < len(CLASS_NAMES) else f"label {lab}"
        ax.text(x1, y1, name, fontsize=6, color="black", va="bottom",
                bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "lw": 0})
    crowd_labels = meta.get("crowd_labels") or []
    for i, (x1, y1, x2, y2) in enumerate(meta.get("crowd_boxes") or []):
        lab = crowd_labels[i] if i < len(crowd_labels) else 0
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", lw=1.2, ls="--"))
        name = CLASS_NAMES[lab] if 0 < lab < len(CLASS_NAMES) else ""
        ax.text(x1, y2, f"crowd {name}".strip(), fontsize=6, color="white", va="top")
    title = f"{key}: {len(boxes)} boxes"
    if anchors is not None:
        title += f", {n_pos} positive anchors"
    ax.set_title(title, fontsize=8)


def render_samples(shard_dir, keys: Sequence = (), indices: Sequence[int] = (), anchors: bool = False,
                   out="sample.png") -> list[str]:
    """Draw the samples (keys first, then indices) into one grid PNG; returns the keys drawn.

    Raises KeyError (unknown key, naming it and the directory) or IndexError (with the valid range).
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    samples = [_locate_key(shard_dir, manifest, _normalize_key(k)) for k in keys]
    samples += [_locate_index(shard_dir, manifest, int(i)) for i in indices]
    if not samples:
        raise ValueError("render_samples needs at least one key or index")
    anchor_boxes = None
    if anchors:
        from .anchors import anchors_from_manifest

        anchor_boxes = anchors_from_manifest(manifest)
    num_anchors = int(manifest["anchors"]["count"])

    cols = min(len(samples), MAX_COLS)
    rows = math.ceil(len(samples) / cols)
    fig = _new_figure((cols * CELL_INCHES, rows * CELL_INCHES))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (key, members) in zip(axes, samples):
        _draw_sample(ax, key, members, anchor_boxes, num_anchors, tuple(manifest["image"]["size"]))
    for ax in axes[len(samples):]:
        ax.set_axis_off()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.03, hspace=0.08)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    return [k for k, _ in samples]
