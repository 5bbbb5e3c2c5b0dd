"""The manifest's structure, checked once when it is read, before any reader uses a field of it.

Every byte of a split folder is untrusted. ``parse_json`` bounds the size and nesting of a JSON file;
``check_manifest`` checks the type and range of every field a reader uses (the build, the loader,
``check``, ``info``, ``stats``, ``show``, ``coco-gt``): shard names are ``<split>-NNNNNN.tar`` of the
manifest's own split, in index order (so none is listed twice), the drops file is ``drops.jsonl``, sizes
and counts are integers within bounds, and the anchor spec gives the recorded anchor count before any
anchor is made. Whether the numbers agree with each other and with the files is ``check``'s business:
a manifest passes here when every reader can use it without a traceback and without unbounded memory.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Mapping

from ..errors import FrcnnShardError
from .canvas import KeepRatioCanvas, parse_canvas_key
from .classes import BACKGROUND, MAX_CLASSES, ClassMap, categories_problem
from .layout import Layout
from .names import DROPS_NAME, SPLIT_RE, shard_name_problem

MAX_JSON_BYTES = 64 << 20  # a manifest of 100k shards is ~40 MB; part records and locks are far smaller
MAX_JSON_DEPTH = 16  # manifests and part records nest 5 levels deep
MAX_ANCHORS = 1 << 22  # 4M anchors = 64 MB of float32 boxes; 800 x 1333 letterboxed FPN has 268,569
MAX_SIDE = 1 << 14  # canvas pixels per side
MAX_SHARD_SAMPLES = 1 << 24
MAX_SHARD_BYTES = 1 << 42  # 4 TiB
MAX_LEVELS, MAX_CELL_SHAPES = 16, 64  # an anchor spec's feature levels; sizes per level, ratios
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(FrcnnShardError, ValueError):
    """The manifest is missing, unreadable, malformed or of an unknown format version."""


def parse_json(data: bytes, where: str, error: Callable[[str], Exception] = ManifestError) -> Any:
    """The JSON value of ``data``, at most MAX_JSON_BYTES long and MAX_JSON_DEPTH deep; else ``error(message)``
    naming ``where`` and the rule (never a RecursionError or a decoding traceback)."""
    if len(data) > MAX_JSON_BYTES:
        raise error(f"{where}: {len(data)} bytes, over the {MAX_JSON_BYTES}-byte limit of a JSON file")
    try:
        value = json.loads(data)
    except RecursionError:
        raise error(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"{where}: unreadable: not valid JSON ({e})") from None
    if _depth_exceeds(value, MAX_JSON_DEPTH):
        raise error(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether containers nest more than ``limit`` deep (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


# ------------------------------------------------------------------------------------ field rules
# Each returns why the value breaks its rule, or None.


def is_int(value: Any, lo: int = 0, hi: int = MAX_SHARD_BYTES) -> bool:
    """An integer (not a bool, not 1.0) within lo..hi."""
    return type(value) is int and lo <= value <= hi


def _want_int(lo: int, hi: int) -> Callable[[Any], str | None]:
    return lambda v: None if is_int(v, lo, hi) else f"must be an integer within {lo}..{hi} (got {_short(v)})"


def _want(kind: type, what: str) -> Callable[[Any], str | None]:
    def rule(v: Any) -> str | None:
        ok = type(v) is bool if kind is bool else isinstance(v, kind)  # True is an int, but not a count
        return None if ok else f"must be {what} (got {_short(v)})"
    return rule


def _counts(v: Any) -> str | None:
    """{reason: n} with string reasons and integer counts."""
    if not isinstance(v, dict) or not all(isinstance(k, str) and is_int(n, 0, MAX_SHARD_BYTES) for k, n in v.items()):
        return f"must be an object of counts {{reason: n}} (got {_short(v)})"
    return None


def _canvas_counts(v: Any) -> str | None:
    """{"HxW": n}: samples per keep-ratio canvas (sides positive multiples of 32)."""
    if _counts(v) or not all(parse_canvas_key(k) for k in v):
        return f"must be an object of counts {{\"HxW\": n}}, sides multiples of 32 (got {_short(v)})"
    return None


def _numbers(n: int, positive: bool) -> Callable[[Any], str | None]:
    def rule(v: Any) -> str | None:
        ok = isinstance(v, list) and len(v) == n and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)
            for x in v)
        return None if ok else f"must be {n} finite{' positive' if positive else ''} numbers (got {_short(v)})"
    return rule


def _size(v: Any) -> str | None:
    ok = isinstance(v, list) and len(v) == 2 and all(is_int(x, 1, MAX_SIDE) for x in v)
    return None if ok else f"must be [H, W], integers within 1..{MAX_SIDE} (got {_short(v)})"


def _short_list(n: int) -> Callable[[Any], str | None]:
    return lambda v: None if isinstance(v, list) and 1 <= len(v) <= n else f"must be a list of 1..{n} items (got {_short(v)})"


def _sha256(v: Any) -> str | None:
    return None if isinstance(v, str) and _SHA256_RE.match(v) else f"must be 64 lowercase hex digits (got {_short(v)})"


def _key(v: Any) -> str | None:
    return None if v is None or isinstance(v, str) and len(v) <= 256 else f"must be a key or null (got {_short(v)})"


def _short(v: Any) -> str:
    text = repr(v) if not isinstance(v, (dict, list)) else f"a {'list' if isinstance(v, list) else 'object'}"
    return text if len(text) <= 60 else text[:57] + "..."


def _field(obj: dict, path: str, rule: Callable[[Any], str | None], required: bool = True) -> str | None:
    """The problem of obj's field ``path`` (dotted), or None; a missing optional field is fine."""
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return f"{path}: missing" if required else None
        node = node[part]
    why = rule(node)
    return f"{path}: {why}" if why else None


_OBJECT = _want(dict, "an object")
_HEADER_RULES: tuple[tuple[str, Callable[[Any], str | None], bool], ...] = (
    ("format_version", _want(str, "a string"), True),
    ("split", lambda v: None if isinstance(v, str) and SPLIT_RE.match(v) else
     f"must be a split name of letters, digits and _ (got {_short(v)})", True),
    ("tool", _OBJECT, False), ("source", _OBJECT, False), ("source_stats", _OBJECT, False),
    ("bbox_format", _OBJECT, False), ("options", _OBJECT, False),
    ("layout.rows", _want_int(0, MAX_SHARD_BYTES), True),
    ("layout.rows_per_shard", _want_int(1, MAX_SHARD_SAMPLES), True),
    ("layout.shards", _want_int(0, MAX_SHARD_BYTES), True),
    ("image.size", _size, True),
    ("image.format", lambda v: None if v in ("jpg", "png") else f"must be 'jpg' or 'png' (got {_short(v)})", True),
    ("image.resize", _want(str, "a string"), False),
    ("image.min_size", _want_int(1, MAX_SIDE), False),
    ("image.max_size", _want_int(1, MAX_SIDE), False),
    ("canvases", _canvas_counts, False),
    ("normalization.mean", _numbers(3, False), False),
    ("normalization.std", _numbers(3, True), False),
    ("classes", lambda v: None if isinstance(v, list) and 2 <= len(v) <= MAX_CLASSES and all(
        isinstance(c, str) for c in v) else f"must be a list of 2..{MAX_CLASSES} names (got {_short(v)})", True),
    ("categories", categories_problem, False),
    ("anchors.count", _want_int(1, MAX_ANCHORS), True),
    ("anchors.sha256", _sha256, True),
    ("anchors.spec", _OBJECT, True),
    ("anchors.matching", _OBJECT, True),
    ("anchors.flip_targets", _want(bool, "true or false"), False),
)
_MANIFEST_RULES: tuple[tuple[str, Callable[[Any], str | None], bool], ...] = (
    ("complete", _want(bool, "true or false"), True),
    ("shards", _want(list, "a list of shard entries"), True),
    ("totals", _OBJECT, False),
    *((f"totals.{k}", _want_int(0, MAX_SHARD_BYTES), False) for k in ("samples", "shards", "bytes", "rows")),
    ("drops.images", _counts, False), ("drops.boxes", _counts, False), ("drops.annotations", _counts, False),
    ("drops.file", lambda v: None if v == DROPS_NAME else f"must be {DROPS_NAME!r} (got {_short(v)})", False),
    ("drops.rows", _want_int(0, MAX_SHARD_BYTES), False),
    ("run", _OBJECT, False),
)
_ENTRY_RULES: tuple[tuple[str, Callable[[Any], str | None], bool], ...] = (
    ("index", _want_int(0, MAX_SHARD_BYTES), True),
    ("samples", _want_int(0, MAX_SHARD_SAMPLES), True),
    ("bytes", _want_int(0, MAX_SHARD_BYTES), True),
    ("sha256", _sha256, True),
    ("first_key", _key, True), ("last_key", _key, True),
    ("rows", lambda v: None if isinstance(v, list) and len(v) == 2 and all(is_int(x) for x in v) and v[0] <= v[1]
     else f"must be [start, stop] with 0 <= start <= stop (got {_short(v)})", True),
    ("drops", _counts, False), ("box_drops", _counts, False), ("canvases", _canvas_counts, False),
)


def _problems(obj: dict, rules) -> list[str]:
    return [p for path, rule, required in rules if (p := _field(obj, path, rule, required))]


def header_problems(header: Any) -> list[str]:
    """What breaks the rules in the fields every part computes alike (the manifest's and part records' header)."""
    if not isinstance(header, dict):
        return [f"must be a JSON object (got {_short(header)})"]
    problems = _problems(header, _HEADER_RULES)
    if not problems:
        problems += _anchor_count_problems(header["anchors"]) + _classes_problems(header)
    return problems


def _classes_problems(header: dict) -> list[str]:
    """``classes`` (names by label) and ``categories`` (the full record) must tell the same labels."""
    classes = header["classes"]
    if classes[0] != BACKGROUND:
        return [f"classes: index 0 must be {BACKGROUND!r} (got {_short(classes[0])})"]
    if "categories" in header and [e["name"] for e in header["categories"]["list"]] != classes[1:]:
        return ["categories: names differ from classes[1:] (the two must list the same labels)"]
    return []


def _anchor_count_problems(section: dict) -> list[str]:
    """The spec must give the recorded count before anything makes the anchors (bounds their memory)."""
    from ..anchors.spec import AnchorSpec  # the anchors package imports format: import here, not at the top

    spec = section["spec"]
    shape = [_field(spec, "image_hw", _size), _field(spec, "strides", _short_list(MAX_LEVELS)),
             _field(spec, "ratios", _short_list(MAX_CELL_SHAPES)), _field(spec, "sizes", _short_list(MAX_LEVELS))]
    if not any(shape):  # AnchorSpec makes each level's cell anchors: bound their number first
        shape = [f"sizes[{i}]: {why}" for i, level in enumerate(spec["sizes"])
                 if (why := _short_list(MAX_CELL_SHAPES)(level))]
    if any(shape):
        return [f"anchors.spec.{p}" for p in shape if p]
    try:
        n = AnchorSpec.from_dict(spec).num_anchors()
    except (TypeError, ValueError, KeyError, ZeroDivisionError, OverflowError) as e:
        return [f"anchors.spec: unreadable ({type(e).__name__}: {e})"]
    return [] if n == section["count"] else [f"anchors.spec gives {n} anchors, anchors.count says {section['count']}"]


def shard_entries_problems(entries: Any, split: str) -> list[str]:
    """What breaks the rules in a list of shard entries (manifest or part record): each an object with the
    fields below, named ``<split>-NNNNNN.tar`` for its own ``index``, indices strictly increasing (no shard
    listed twice)."""
    if not isinstance(entries, list):
        return [f"shards: must be a list of shard entries (got {_short(entries)})"]
    problems: list[str] = []
    last = -1
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"shards[{i}]: must be an object (got {_short(entry)})")
            continue
        own = _problems(entry, _ENTRY_RULES)
        if not own:
            name_problem = shard_name_problem(entry.get("name"), split, entry["index"])
            own += [name_problem] if name_problem else []
            if entry["index"] <= last:
                own.append(f"index {entry['index']} follows index {last}: each shard is listed once, in index order")
            last = entry["index"]
        problems += [f"shards[{i}]: {p}" for p in own]
        if len(problems) >= 5:
            break  # enough to say what is wrong; a hostile list may be long
    return problems


def manifest_problems(man: Any) -> list[str]:
    """Every rule a manifest breaks (empty when every reader can use it); at most a few shard-entry problems."""
    if not isinstance(man, dict):
        return [f"must be a JSON object (got {_short(man)})"]
    problems = header_problems(man) + _problems(man, _MANIFEST_RULES)
    if not problems:
        problems += shard_entries_problems(man["shards"], man["split"])
    return problems


def check_manifest(man: Any, where: str) -> dict:
    """``man`` when it keeps every rule, else ManifestError naming ``where`` and the first rules broken."""
    problems = manifest_problems(man)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ManifestError(f"{where}: malformed manifest: {'; '.join(problems[:3])}{more}")
    return man


# ---------------------------------------------------------------------------------- the typed view


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a manifest (or part record), as ``shard_entries_problems`` checked it."""

    name: str
    index: int
    samples: int
    bytes: int
    sha256: str
    first_key: str | None
    last_key: str | None
    rows: tuple[int, int]
    drops: Mapping[str, int]
    box_drops: Mapping[str, int]

    @classmethod
    def of(cls, entry: Mapping[str, Any]) -> "ShardEntry":
        """The typed entry of a checked JSON shard entry."""
        return cls(entry["name"], entry["index"], entry["samples"], entry["bytes"], entry["sha256"],
                   entry["first_key"], entry["last_key"], (entry["rows"][0], entry["rows"][1]),
                   dict(entry.get("drops") or {}), dict(entry.get("box_drops") or {}))


class Manifest(dict):
    """A checked manifest: its JSON object (every field as written; unknown ones kept) plus typed accessors for
    what readers use. ``read_manifest`` returns one; ``Manifest.checked(obj, where)`` makes one from a dict.

    Readers take the typed accessors below rather than indexing the JSON: they are the fields
    ``check_manifest`` vouches for, so a reader never meets a missing key or a value of the wrong type.
    """

    @classmethod
    def checked(cls, obj: Any, where: str) -> "Manifest":
        """The view of ``obj`` after ``check_manifest`` (ManifestError naming ``where`` when it breaks a rule)."""
        return obj if isinstance(obj, cls) else cls(check_manifest(obj, where))

    @property
    def split(self) -> str:
        """The split name every shard name starts with."""
        return self["split"]

    @property
    def complete(self) -> bool:
        """Whether the merge wrote it after every part finished (readers refuse an incomplete one by default)."""
        return self["complete"]

    @property
    def image_hw(self) -> tuple[int, int]:
        """(H, W) of the stored canvas."""
        h, w = self["image"]["size"]
        return h, w

    @property
    def keep_ratio(self) -> bool:
        """A canvas per sample (``--resize keep-ratio``): ``image.size`` is the largest, each record has its own."""
        return self["image"].get("resize") == "keep-ratio"

    @property
    def canvas(self) -> tuple[int, int] | KeepRatioCanvas:
        """The canvas rule the record rules take: the fixed (H, W), or a keep-ratio build's KeepRatioCanvas."""
        return KeepRatioCanvas(self.image_hw) if self.keep_ratio else self.image_hw

    def anchor_count(self, canvas_hw: tuple[int, int]) -> int:
        """Anchors over a sample's canvas (its targets' length): ``num_anchors`` unless keep-ratio."""
        key = (int(canvas_hw[0]), int(canvas_hw[1]))
        if not self.keep_ratio or key == self.image_hw:
            return self.num_anchors
        counts = self.__dict__.setdefault("_anchor_counts", {})  # a split has tens of canvases: count each once
        if key not in counts:
            from ..anchors.spec import AnchorSpec  # the anchors package imports format: import here, not at the top

            counts[key] = AnchorSpec.from_dict(self["anchors"]["spec"]).at(key).num_anchors()
        return counts[key]

    @property
    def image_format(self) -> str:
        """'jpg' or 'png': the image member's extension."""
        return self["image"]["format"]

    @property
    def num_anchors(self) -> int:
        """A, the anchors every sample's targets index."""
        return self["anchors"]["count"]

    @property
    def anchors(self) -> Mapping[str, Any]:
        """The anchors section (spec, matching, count, sha256, flip_targets): see anchors.anchors_from_manifest."""
        return self["anchors"]

    @property
    def flip_targets(self) -> bool:
        """Whether each sample also stores the mirrored image's targets (the loader's hflip needs them)."""
        return bool(self["anchors"].get("flip_targets", False))

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, index = label; index 0 is the background."""
        return tuple(self["classes"])

    @cached_property
    def class_map(self) -> ClassMap:
        """Which class each label is and the category id evaluation writes for it (``categories``).

        A manifest from before format 2.1 has no ``categories``: its ``classes`` are COCO's 80 (official ids)
        or, for any other list, ids equal to the labels.
        """
        if "categories" in self:
            return ClassMap.from_manifest(self["categories"], "manifest")
        names = tuple(self["classes"][1:])
        from ..labels import COCO_CLASSES, coco_class_map  # noqa: PLC0415 - labels imports format

        if names == COCO_CLASSES:
            return coco_class_map()
        labels = tuple(range(1, len(names) + 1))
        return ClassMap(names, labels, labels, "manifest classes order", "manifest 'classes' (format 2.0)")

    @property
    def num_classes(self) -> int:
        """Classes with the background: labels lie in 1..num_classes-1."""
        return len(self["classes"])

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The normalisation's (mean, std) per RGB channel, or None when the manifest names none."""
        norm = self.get("normalization")
        if not isinstance(norm, dict) or "mean" not in norm or "std" not in norm:
            return None
        return tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])

    @cached_property
    def shards(self) -> tuple[ShardEntry, ...]:
        """The shard entries, in index order."""
        return tuple(ShardEntry.of(e) for e in self["shards"])

    @property
    def samples(self) -> int:
        """The samples the shard entries list (what a full read of the split meets)."""
        return sum(e.samples for e in self.shards)

    @property
    def layout(self) -> Layout:
        """The split's rows -> shards plan (layout.rows, layout.rows_per_shard)."""
        return Layout(self["layout"]["rows"], self["layout"]["rows_per_shard"])

    @property
    def options(self) -> Mapping[str, Any]:
        """The build options that shaped the output ({} when absent; free-form to the manifest's rules)."""
        return _section(self, "options")

    @property
    def bbox_format(self) -> Mapping[str, Any]:
        """The bbox-convention decision and its evidence ({} when absent; free-form to the manifest's rules)."""
        return _section(self, "bbox_format")

    @property
    def source(self) -> Mapping[str, Any]:
        """Where the rows came from ({} when absent; free-form to the manifest's rules)."""
        return _section(self, "source")

    @property
    def drops(self) -> Mapping[str, Any]:
        """The drops section ({} when absent): images, boxes, annotations, file, rows."""
        return self.get("drops") or {}

    @property
    def totals(self) -> Mapping[str, Any]:
        """The totals section ({} when absent): samples, shards, bytes, rows; check compares them."""
        return self.get("totals") or {}


def _section(man: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """An informational section as a mapping: check_manifest only vouches that it is an object when present."""
    value = man.get(name)
    return value if isinstance(value, dict) else {}
