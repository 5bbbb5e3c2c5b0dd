"""The header of a build: what every part of it, on any engine, computes identically (the manifest apart
from its shards, totals and run), and the output-shaping options a resume must see again.
"""
from __future__ import annotations

import json

from .. import __version__, anchors as anc
from ..format import FORMAT_VERSION
from ..format.layout import Layout
from ..transform import IMAGENET_MEAN, IMAGENET_STD
from ..format.canvas import CANVAS_DIVISOR
from ..transform import KEEP_RATIO
from .options import BuildOptions, canvas_bound


def _jsonable(obj):
    """Normalise to what JSON gives back (tuples -> lists), so option dicts compare equal after a round trip."""
    return json.loads(json.dumps(obj))


def output_options(opts: BuildOptions, split: str, spec: anc.AnchorSpec) -> dict:
    """The options that shape the output; a resume must see exactly these again."""
    tdict = opts.transform.to_dict()
    tdict.pop("bbox_format", None)  # the decision lives in the manifest's bbox_format section
    return _jsonable({
        "source": opts.source, "revision": opts.revision, "split": split, "image_dir": opts.image_dir,
        "classes": opts.classes, "hub_crowd": opts.hub_crowd,
        "bbox_format": opts.bbox_format, "transform": tdict,
        "anchors": anc.anchors_manifest_section(opts.anchor_preset, spec, opts.matching,
                                                flip_targets=opts.flip_targets),
        "rows_per_shard": opts.rows_per_shard, "max_rows": opts.max_rows, "max_bad_fraction": opts.max_bad_fraction,
    })


def image_section(opts: BuildOptions) -> dict:
    """The manifest's ``image``: format and canvas; a keep-ratio build's ``size`` is its largest canvas, and it
    records torchvision's min_size / max_size and the canvas divisor (format.canvas)."""
    t = opts.transform
    section = {"format": t.image_format, "size": list(canvas_bound(opts)), "resize": t.resize, "mode": "RGB"}
    if t.resize == KEEP_RATIO:
        section.update(min_size=t.min_size, max_size=t.max_size, divisor=CANVAS_DIVISOR)
    return section


def make_header(opts: BuildOptions, source, options: dict, layout: Layout) -> dict:
    """What every part of a build computes identically: the manifest apart from shards, totals and run."""
    return {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "frcnn-shard", "version": __version__},
        "split": source.info["split"],
        "source": source.info,
        "source_fingerprint": source.fingerprint,
        "source_stats": dict(source.stats),
        "bbox_format": source.bbox_format,
        "options": options,
        "layout": {"rows": layout.rows, "rows_per_shard": layout.rows_per_shard, "shards": layout.shards},
        "image": image_section(opts),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                          "rule": "float = (uint8 / 255 - mean) / std, per RGB channel"},
        "classes": list(source.classes.class_names),
        "categories": source.classes.to_manifest(),
        "crowd": dict(source.crowd),
        "anchors": options["anchors"],  # built once, in output_options
    }
