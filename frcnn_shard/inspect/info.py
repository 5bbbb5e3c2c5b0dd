"""`frcnn-shard info`: a short table describing a build, from its manifest alone."""
from __future__ import annotations

from ..format.classes import ClassMap, ClassMapError
from ..format.manifest import Manifest
from ..words import human_bytes, plural

CLASSES_SHOWN = 10  # labels named on the "class ids" row; the rest are counted
CANVASES_SHOWN = 12  # keep-ratio canvases named on the "canvases" row; COCO at 800/1333 has tens of them


def _counts_text(d: dict | None) -> str:
    """{reason: n} -> 'a 3, b 1' or 'none'."""
    return ", ".join(f"{k} {v}" for k, v in sorted((d or {}).items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def _evidence_text(ev) -> str:
    """A compact one-line rendering of the bbox-format evidence."""
    if isinstance(ev, dict):
        return ", ".join(f"{k}={_evidence_text(v)}" for k, v in ev.items())
    if isinstance(ev, float):
        return f"{ev:.4g}"
    if isinstance(ev, (list, tuple)):
        return "[" + ", ".join(_evidence_text(v) for v in ev) + "]"
    return str(ev)


def _lines(n) -> str:
    return plural(n, "line") if isinstance(n, int) else "? lines"


def bbox_format_text(bf: dict | None) -> str:
    """The bbox-format decision in words, from the manifest's bbox_format record (build summary and info)."""
    bf = _obj(bf)
    text = f"{bf.get('decision', '?')} (requested {bf.get('requested', '?')}"
    text += f"; {bf['rule']})" if bf.get("rule") else ")"
    if bf.get("contradicted_by_evidence"):
        text += "; CONTRADICTED by the evidence"
    evidence = bf.get("evidence")
    if evidence not in (None, "", {}):
        rows = f" ({plural(bf['rows_examined'], 'row')})" if isinstance(bf.get("rows_examined"), int) else ""
        text += f"; evidence{rows}: {_evidence_text(evidence)}"
    return text


def _obj(value) -> dict:
    """An informational section as a dict: the manifest's check leaves their insides free-form."""
    return value if isinstance(value, dict) else {}


def classes_text(classes: ClassMap) -> str:
    """How many classes, by which rule they were numbered and where the names were read."""
    k = len(classes.names)
    count = str(k) if classes.kept_from is None else f"{k} of the source's {classes.kept_from}"
    return f"{count}, {classes.order}; from {classes.evidence}"


def class_ids_text(classes: ClassMap, shown: int = CLASSES_SHOWN) -> str:
    """'1 dog (id 18), 2 person (id 1)': the first labels, their names and the category ids evaluation writes."""
    text = ", ".join(f"{label} {name} (id {cid})" for label, (name, cid)
                     in enumerate(zip(classes.names[:shown], classes.ids[:shown]), start=1))
    more = len(classes.names) - shown
    return text + (f", ... (+{more} more)" if more > 0 else "")


def _class_rows(manifest: Manifest) -> list[tuple[str, str]]:
    """The "classes" and "class ids" rows; a class list no reader can use is worded, not raised (info describes)."""
    try:
        classes = manifest.class_map
    except ClassMapError as e:  # only a format-2.0 manifest's bare "classes" list can get here unchecked
        return [("classes", f"unusable: {e}")]
    return [("classes", classes_text(classes)), ("class ids", class_ids_text(classes)), ("crowd", _crowd_text(manifest))]


def _crowd_text(manifest: Manifest) -> str:
    """How crowd / ignore boxes were recognised (the manifest's ``crowd``; absent before format 2.1)."""
    crowd = _obj(manifest.get("crowd"))
    if not crowd:
        return "not recorded (format 2.0)"
    count = crowd.get("annotations")
    counted = f", {count} in the source" if isinstance(count, int) else ""
    return f"{str(crowd.get('rule'))[:80]}{counted}; {str(crowd.get('evidence'))[:200]}"


def _yes(v) -> str:
    return "yes" if v else "no"


def canvas_counts_text(counts: dict | None, shown: int = CANVASES_SHOWN) -> str:
    """'416x608 17, 544x416 10, ... (+3 more)': samples per canvas, most first (ties by name)."""
    items = sorted((counts or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{k} {n}" for k, n in items[:shown]) or "none"
    return text + (f", ... (+{len(items) - shown} more)" if len(items) > shown else "")


def _image_rows(manifest: Manifest, tf: dict) -> list[tuple[str, str]]:
    """The "image" row (the canvas rule, the format) and, for keep-ratio, the "canvases" row."""
    image, fmt = _obj(manifest.get("image")), manifest.image_format
    fmt_text = f"{fmt} quality {tf.get('quality')}" if fmt == "jpg" and tf.get("quality") is not None else str(fmt)
    h, w = manifest.image_hw
    if not manifest.keep_ratio:
        return [("image", f"{h}x{w} (HxW), {image.get('resize') or tf.get('resize', '?')}, {fmt_text}")]
    canvases = _obj(manifest.get("canvases"))
    rule = (f"keep-ratio {image.get('min_size', '?')}/{image.get('max_size', '?')}, "
            f"{plural(len(canvases), 'canvas')}, largest {h}x{w} (HxW)")
    return [("image", f"{rule}, {fmt_text}"), ("canvases", canvas_counts_text(canvases) + " (samples per canvas)")]


def _anchors_text(manifest: Manifest) -> str:
    """The preset, the anchor count (keep-ratio: at the largest canvas, each canvas its own) and the sha256."""
    anc = manifest.anchors
    sha = str(anc.get("sha256") or "")
    where = ""
    if manifest.keep_ratio:
        h, w = manifest.image_hw
        where = f" at {h}x{w} (each canvas its own: the same spec over it)"
    return f"{anc.get('preset', '?')}, {plural(manifest.num_anchors, 'anchor')}{where}, sha256 {sha[:12] or '?'}"


def info_rows(manifest: Manifest | dict) -> list[tuple[str, str]]:
    """A short (label, value) table describing a build from its manifest alone (``read_manifest``'s, or a dict
    that passes its checks). Every field comes through the typed view except ``tool``, ``format_version``,
    ``image.resize`` / ``min_size`` / ``max_size`` and ``canvases`` (informational, no accessor)."""
    manifest = Manifest.checked(manifest, "manifest")
    src, opts, tool = manifest.source, manifest.options, _obj(manifest.get("tool"))
    tf = _obj(opts.get("transform"))
    totals, drops = manifest.totals, manifest.drops
    m = manifest.anchors.get("matching") or {}

    source_id = src.get("id") or src.get("name") or src.get("path") or opts.get("source") or "?"
    revision = src.get("revision") or opts.get("revision")
    if isinstance(m, dict):
        matching = ", ".join(f"{k} {_yes(v) if isinstance(v, bool) else v}" for k, v in m.items())
    else:
        matching = str(m)
    nbytes = totals.get("bytes")
    return [
        ("source", f"{source_id}" + (f" @ {revision}" if revision else " (no revision pinned)")),
        ("split", manifest.split),
        *_class_rows(manifest),
        *_image_rows(manifest, tf),
        ("min box size", f"{tf.get('min_box_size', '?')} px" + (", empty images kept" if tf.get("keep_empty") else "")),
        ("rows per shard", str(opts.get("rows_per_shard", "?"))
         + (f" (the first {opts['max_rows']} rows only)" if opts.get("max_rows") else "")),
        ("samples", str(totals.get("samples", "?"))),
        ("shards", str(totals.get("shards", len(manifest.shards)))),
        ("bytes", f"{human_bytes(nbytes)} ({nbytes} bytes)" if isinstance(nbytes, int) else "?"),
        ("rows read", str(totals.get("rows", "?"))),
        ("images dropped", _counts_text(drops.get("images"))
         + (f" (each row in {drops['file']}: {_lines(drops.get('rows'))})" if drops.get("file") else "")),
        ("boxes dropped", _counts_text(drops.get("boxes"))),
        ("bbox format", bbox_format_text(manifest.bbox_format)),
        ("anchors", _anchors_text(manifest)),
        ("matching", matching or "?"),
        ("flip targets", "stored: the mirrored images' targets too (make_loader hflip=)" if manifest.flip_targets
         else "not stored (built with --no-flip-targets): no hflip in the loader"),
        ("format version", str(manifest.get("format_version", "?"))),
        ("tool", f"{tool.get('name', 'frcnn-shard')} {tool.get('version', '?')}"),
        ("complete", _yes(manifest.complete)),
    ]
