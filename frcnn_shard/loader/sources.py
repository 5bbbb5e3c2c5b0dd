"""What the loader reads: a split folder (local or a URL), its manifest.json, a URL list or a brace pattern,
turned into shard URLs, their sample counts and the manifest (always its typed view, ``Manifest``)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import braceexpand

from ..format.canvas import parse_canvas_key
from ..format.manifest import Manifest
from ..format.names import MANIFEST_NAME
from ..shards import read_manifest, store_of
from .options import DatasetFacts, LoaderError, mean_std

PASSTHROUGH_SCHEMES = ("pipe", "http", "https")  # opened by WebDataset's gopen, as WebDataset users expect


def url_scheme(url: str) -> str:
    """The lower-case scheme of a URL ('' for a path; a one-letter 'scheme' is a Windows drive)."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", url)
    return m.group(1).lower() if m and len(m.group(1)) > 1 else ""


def split_url(url: str) -> tuple[str, str]:
    """(folder, name) of a shard URL or path."""
    folder, _, name = url.rstrip("/").rpartition("/")
    return folder or ".", name


def expand_urls(source: str | Sequence[str]) -> list[str]:
    """A shard list from a list, a single URL, or a brace pattern (``train-{000000..000009}.tar``)."""
    if isinstance(source, (str, os.PathLike)):
        return list(braceexpand.braceexpand(os.fspath(source)))
    urls: list[str] = []
    for s in source:
        urls.extend(braceexpand.braceexpand(os.fspath(s)))
    return urls


def manifest_folder(text: str | os.PathLike) -> str:
    """The split folder of a folder path or URL, or of its manifest.json (the one rule, torchvision's too)."""
    text = os.fspath(text)
    return split_url(text)[0] if text.rstrip("/").endswith(MANIFEST_NAME) else text


def manifest_of(manifest: Mapping | str | os.PathLike, storage_options: dict | None = None
                ) -> tuple[Manifest, str | None]:
    """(the manifest's typed view, its folder or None) of a manifest given as a dict (checked here, once),
    a split folder or a manifest.json path / URL."""
    if isinstance(manifest, Mapping):
        return Manifest.checked(manifest if isinstance(manifest, dict) else dict(manifest), "manifest="), None
    folder = manifest_folder(manifest)
    return read_manifest(store_of(folder, storage_options)), folder


@dataclass
class Source:
    """What the loader reads: shard URLs, their sample counts (None when unknown) and the manifest."""

    urls: list[str]
    counts: list[int] | None
    manifest: Manifest | None


def _is_folder_source(text: str) -> bool:
    """A shard folder (or its manifest.json), as opposed to shard files and patterns."""
    return not text.endswith(".tar") and "{" not in text and url_scheme(text) not in PASSTHROUGH_SCHEMES


def _folder_source(text: str, storage_options: dict | None, allow_incomplete: bool) -> Source:
    """The shards of a split folder, local or remote, from its manifest; errors that say what the folder is."""
    folder = manifest_folder(text)
    store = store_of(folder, storage_options)
    if store.is_local and not store.path.is_dir():
        what = "not a folder" if store.path.exists() else "no such folder"
        raise LoaderError(f"{what}: {folder} (give the split folder a build wrote, e.g. shards/train)")
    if not store.exists(MANIFEST_NAME):
        splits = [n for n in store.names() if not n.startswith("_") and store.sub(n).exists(MANIFEST_NAME)]
        if splits:
            raise LoaderError(f"{folder} is a build's output root, not a split folder; its splits are "
                              f"{', '.join(splits)}: pass {store.sub(splits[0]).url}")
    man = read_manifest(store)  # ManifestError says why there is none (an unfinished build, ...)
    _check_readable(man, store.url, allow_incomplete)
    return Source([store.location(s.name) for s in man.shards], [s.samples for s in man.shards], man)


def resolve_source(
    source: str | os.PathLike | Sequence[str],
    manifest: Mapping | str | os.PathLike | None = None,
    allow_incomplete: bool = False,
    storage_options: dict | None = None,
) -> Source:
    """Turn a split folder (local or a URL), its manifest.json, a URL list or a brace pattern into URLs,
    per-shard counts and the manifest."""
    if isinstance(source, (str, os.PathLike)) and _is_folder_source(os.fspath(source)) and manifest is None:
        return _folder_source(os.fspath(source), storage_options, allow_incomplete)
    urls = expand_urls(source)
    if not urls:
        raise LoaderError(f"no shard URLs in source {source!r}")
    if manifest is not None:
        man, where = manifest_of(manifest, storage_options)
    else:
        man, where = _manifest_beside(urls, storage_options)
    if man is None:
        return Source(urls, None, None)
    _check_readable(man, where, allow_incomplete)
    return Source(urls, _listed_counts(urls, man, where), man)


def _manifest_beside(urls: list[str], storage_options: dict | None) -> tuple[Manifest | None, str | None]:
    """The manifest of the one folder all the URLs lie in, when it has one (never for pipe: or http URLs)."""
    folders = {split_url(u)[0] for u in urls}
    if len(folders) == 1 and url_scheme(urls[0]) not in PASSTHROUGH_SCHEMES:
        store = store_of(next(iter(folders)), storage_options)
        if store.exists(MANIFEST_NAME):
            return read_manifest(store), store.url
    return None, None


def _listed_counts(urls: list[str], man: Manifest, where: str | None) -> list[int]:
    """Each URL's sample count from its manifest entry; LoaderError for a shard the manifest does not list."""
    listed = {s.name: s.samples for s in man.shards}
    counts = []
    for u in urls:
        name = split_url(u)[1]
        if name not in listed:
            raise LoaderError(
                f"shard {u!r} is not listed in the manifest{f' in {where}' if where else ''}; "
                "pass num_anchors= (and no manifest) to read shards the manifest does not describe"
            )
        counts.append(listed[name])
    return counts


def _check_readable(man: Manifest, where: str | None, allow_incomplete: bool) -> None:
    """A manifest the loader reads is complete (unless allowed otherwise) and lists at least one sample."""
    at = f" in {where}" if where else ""
    if not man.complete and not allow_incomplete:
        raise LoaderError(
            f"the manifest{at} is not complete (the build was interrupted or is still running); resume the build, "
            "or pass allow_incomplete=True to read the shards published so far"
        )
    if man.samples == 0:  # training on it would silently train on nothing
        info = f"frcnn-shard info {where}" if where else "frcnn-shard info <split folder>"
        raise LoaderError(
            f"the manifest{at} lists 0 samples ({len(man.shards)} shard(s)): every row of the source was dropped or "
            f"none was built; drops.jsonl next to the manifest says why each row was dropped (run `{info}` for "
            "a summary), then fix the source or the build options and rebuild"
        )


def dataset_facts(man: Manifest | None, source: Any, num_anchors: int | None) -> DatasetFacts:
    """The per-sample facts, from the manifest (or num_anchors alone, for shards without one)."""
    if man is None:
        if num_anchors is None:
            raise LoaderError(
                f"no manifest found for {source!r}: pass manifest= (a dict, shard directory or manifest.json) "
                "or at least num_anchors="
            )
        return DatasetFacts(int(num_anchors), None, *mean_std(None, None))
    if num_anchors is not None and int(num_anchors) != man.num_anchors:
        raise LoaderError(f"num_anchors={num_anchors} but the manifest records {man.num_anchors} anchors")
    return DatasetFacts(man.num_anchors, man.image_hw, *mean_std(*(man.mean_std or (None, None))),
                        flip_targets=man.flip_targets, num_classes=man.num_classes,
                        keep_ratio=man.canvas if man.keep_ratio else None, canvas_anchors=_canvas_anchors(man))


def _canvas_anchors(man: Manifest) -> tuple[tuple[tuple[int, int], int], ...]:
    """(canvas, anchor count) of every canvas a keep-ratio manifest lists (a sample on another canvas is refused)."""
    if not man.keep_ratio:
        return ()
    if not isinstance(man.get("canvases"), dict):
        raise LoaderError("a keep-ratio manifest without its 'canvases' counts: the loader needs them (each sample's "
                          "canvas is checked against them, and len() counts per canvas); rebuild the split")
    canvases = sorted(parse_canvas_key(k) for k in man["canvases"])  # check_manifest vouches for the keys
    return tuple((c, man.anchor_count(c)) for c in canvases)


def shard_canvases(man: Manifest | None, urls: Sequence[str]) -> list[dict[tuple[int, int], int]] | None:
    """Per URL, its shard's samples per canvas from the manifest entry (None: not keep-ratio, or unknown)."""
    if man is None or not man.keep_ratio:
        return None
    entries = {e.get("name"): e.get("canvases") for e in man["shards"]}
    out = []
    for u in urls:
        counts = entries.get(split_url(u)[1])
        if not isinstance(counts, dict):
            return None
        out.append({parse_canvas_key(k): int(n) for k, n in counts.items()})
    return out
