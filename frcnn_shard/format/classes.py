"""The classes of a build: which class each label 1..K is, what the source calls it, and which category
id evaluation writes for it. One value (``ClassMap``), written once into the manifest's ``categories``
section, read back by every reader (loader, check, info, stats, show, coco-gt, coco_results, the model).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import FrcnnShardError

BACKGROUND = "__background__"
MAX_CLASSES = 1 << 16  # labels 1..K with K < MAX_CLASSES (LVIS has 1,203, Objects365 365)
MAX_NAME = 256  # characters in one class name
MAX_TEXT = 4096  # characters in the order and evidence strings


class ClassMapError(FrcnnShardError, ValueError):
    """A class list that cannot label a build: empty, duplicate names or ids, a name or id of the wrong type."""


@dataclass(frozen=True)
class ClassMap:
    """Labels 1..K: label ``l`` is the class ``names[l - 1]``.

    ``ids[l - 1]`` is the category id evaluation writes for label ``l`` (the source's own integer id where
    it has one: a COCO file's category id; else the label itself). ``source_ids[l - 1]`` is what the source
    calls the class in its rows (a COCO category id, a 0-based ClassLabel index, or the name itself).
    ``order`` is the rule that numbered the labels, ``evidence`` where the names were read; ``kept_from`` is
    the source's class count when ``--classes`` kept a subset (None: every class of the source).
    """

    names: tuple[str, ...]
    ids: tuple[int, ...]
    source_ids: tuple[int | str, ...]
    order: str
    evidence: str
    kept_from: int | None = None

    def __post_init__(self) -> None:
        problem = class_map_problem(self.names, self.ids, self.source_ids)
        if problem:
            raise ClassMapError(f"{self.evidence}: {problem}")

    @property
    def num_classes(self) -> int:
        """K + 1: the classes with the background (a model's ``num_classes``)."""
        return len(self.names) + 1

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names by label, index 0 the background: the manifest's ``classes`` list."""
        return (BACKGROUND,) + self.names

    def to_manifest(self) -> dict:
        """The manifest's ``categories`` section: one entry per label, in label order."""
        return {"order": self.order, "evidence": self.evidence, "kept_from": self.kept_from,
                "list": [{"label": i + 1, "name": n, "id": c, "source_id": s}
                         for i, (n, c, s) in enumerate(zip(self.names, self.ids, self.source_ids))]}

    @classmethod
    def from_manifest(cls, section: Any, where: str) -> "ClassMap":
        """The ClassMap of a manifest's ``categories`` section; ClassMapError names what is wrong."""
        problem = categories_problem(section)
        if problem:
            raise ClassMapError(f"{where}: categories: {problem}")
        entries = section["list"]
        return cls(tuple(e["name"] for e in entries), tuple(e["id"] for e in entries),
                   tuple(e["source_id"] for e in entries), section["order"], section["evidence"],
                   section.get("kept_from"))


def _is_int(v: Any) -> bool:
    return type(v) is int


def class_map_problem(names: Sequence[Any], ids: Sequence[Any], source_ids: Sequence[Any]) -> str | None:
    """Why these lists cannot number labels 1..K (None when they can)."""
    if not names:
        return "the class list is empty (a build needs at least one class)"
    if len(names) >= MAX_CLASSES:
        return f"{len(names)} classes; at most {MAX_CLASSES - 1}"
    if not len(names) == len(ids) == len(source_ids):
        return f"{len(names)} names, {len(ids)} ids and {len(source_ids)} source ids: one each per class"
    bad = [n for n in names if not isinstance(n, str) or not n.strip() or len(n) > MAX_NAME or n == BACKGROUND]
    if bad:
        return (f"class names must be non-blank strings of at most {MAX_NAME} characters other than "
                f"{BACKGROUND!r} (got {bad[:3]!r})")
    if not all(_is_int(c) and 1 <= c < 1 << 53 for c in ids):
        return "category ids must be integers in 1..2^53-1"
    if not all(_is_int(s) or (isinstance(s, str) and len(s) <= MAX_NAME) for s in source_ids):
        return f"source ids must be integers or strings of at most {MAX_NAME} characters"
    for what, values in (("class names", names), ("category ids", ids), ("source ids", source_ids)):
        dup = sorted(str(v) for v, n in Counter(values).items() if n > 1)
        if dup:
            return f"duplicate {what}: {dup[:5]}"
    return None


def categories_problem(section: Any) -> str | None:
    """Why a manifest's ``categories`` section is malformed (None when every reader can use it)."""
    if not isinstance(section, dict):
        return "must be an object"
    for key in ("order", "evidence"):
        if not isinstance(section.get(key), str) or len(section[key]) > MAX_TEXT:
            return f"{key} must be a string of at most {MAX_TEXT} characters"
    kept = section.get("kept_from")
    if kept is not None and not (_is_int(kept) and 1 <= kept < MAX_CLASSES):
        return "kept_from must be null or a class count"
    entries = section.get("list")
    if not isinstance(entries, list) or not 1 <= len(entries) < MAX_CLASSES:
        return f"list must be a list of 1..{MAX_CLASSES - 1} entries"
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or e.get("label") != i + 1 or not {"name", "id", "source_id"} <= set(e):
            return f"entry {i} must be {{label: {i + 1}, name, id, source_id}}"
    return class_map_problem([e["name"] for e in entries], [e["id"] for e in entries],
                             [e["source_id"] for e in entries])
