"""`check`'s rules for the folder as a whole: the files against the manifest's list, the manifest's totals
against its own entries, and drops.jsonl against the manifest's drop counts and the split's layout.
"""
from __future__ import annotations

import json
from collections import Counter

from ..format.manifest import Manifest
from ..format.names import MANIFEST_NAME, SHARD_RE
from ..storage.base import PARTIAL_SUFFIX, Store
from ..storage.manifest_io import read_bounded
from .report import RULE_DROPS_FILE, RULE_MANIFEST_TOTALS, RULE_PARTIAL_FILE, RULE_SHARD_EXTRA, RULE_SHARD_MISSING, Problem

# The most bytes one line of drops.jsonl may take (a record is {"row": ..., "reason": ...}, under 100 bytes),
# and the file as a whole (about 4 million dropped rows).
MAX_DROP_LINE_BYTES = 1024
MAX_DROPS_BYTES = 256 << 20


def check_directory(on_disk: set[str], manifest: Manifest) -> list[Problem]:
    """Files vs manifest: listed shards present, nothing unlisted or partial next to them."""
    listed = [s.name for s in manifest.shards]
    out = [Problem(n, "", RULE_SHARD_MISSING, "listed in the manifest but not on disk")
           for n in listed if n not in on_disk]
    for n in sorted(on_disk - set(listed)):
        if n.endswith(PARTIAL_SUFFIX):
            out.append(Problem(n, "", RULE_PARTIAL_FILE,
                               "unfinished write (interrupted build?); not part of the split"))
        elif SHARD_RE.match(n):
            out.append(Problem(n, "", RULE_SHARD_EXTRA,
                               "shard file not listed in the manifest (loaders would skip or include it)"))
    return out


def check_totals(manifest: Manifest) -> list[Problem]:
    """The manifest's totals must add up from its own shard entries."""
    totals = manifest.totals
    want = {"samples": manifest.samples, "shards": len(manifest.shards), "bytes": sum(s.bytes for s in manifest.shards)}
    return [Problem(MANIFEST_NAME, "", RULE_MANIFEST_TOTALS,
                    f"totals.{k} is {totals.get(k)!r}, the shard entries add up to {v}")
            for k, v in want.items() if totals.get(k) != v]


def _drop_lines(data: bytes, name: str) -> tuple[list[tuple[int, str]], list[Problem]]:
    """(row, reason) of every line of a drops file, and a problem for each line that is not a drop record."""
    rows, problems = [], []
    for i, line in enumerate(data.splitlines(), 1):
        try:
            d = json.loads(line)
            row, reason = d["row"], d["reason"]
            if type(row) is not int or not isinstance(reason, str):
                raise TypeError("row must be an integer and reason a string")
        except (ValueError, KeyError, TypeError) as e:
            problems.append(Problem(name, "", RULE_DROPS_FILE, f"line {i} is not a dropped row's record "
                                                               f"({type(e).__name__}: {e})"))
            continue
        rows.append((row, reason))
    return rows, problems


def check_drops(store: Store, manifest: Manifest) -> list[Problem]:
    """The dropped rows' file against the manifest: as many records as ``drops.rows``, each row once and in
    order, within the split's rows, and per shard the reasons its manifest entry counts."""
    name, listed = manifest.drops.get("file"), manifest.drops.get("rows")
    if not name:
        return []  # a manifest that names no such file
    limit = min(max(listed or 0, 0) * MAX_DROP_LINE_BYTES, MAX_DROPS_BYTES) + MAX_DROP_LINE_BYTES
    try:
        data = read_bounded(store, name, limit)  # a regular file only, never more than its rows can take
    except FileNotFoundError:
        return [Problem(name, "", RULE_DROPS_FILE, f"the manifest lists its {listed} dropped row(s) in "
                                                   f"{name}, which is not in the folder")]
    except (OSError, ValueError) as e:
        return [Problem(name, "", RULE_DROPS_FILE, f"cannot be read: {e}")]
    rows, problems = _drop_lines(data, name)
    if len(rows) + len(problems) != listed:
        problems.append(Problem(name, "", RULE_DROPS_FILE, f"{len(rows) + len(problems)} line(s), the manifest's "
                                                           f"drops.rows is {listed}"))
    return problems + _placement_problems(rows, name, manifest)


def _placement_problems(rows: list[tuple[int, str]], name: str, manifest: Manifest) -> list[Problem]:
    """Dropped rows in row order, each once, within the split's rows; per shard, the reasons its entry counts."""
    layout = manifest.layout
    problems: list[Problem] = []
    found: dict[int, Counter] = {}
    for i, (row, reason) in enumerate(rows):
        if i and row <= rows[i - 1][0]:
            problems.append(Problem(name, "", RULE_DROPS_FILE, f"row {row} follows row {rows[i - 1][0]}: "
                                                               "each dropped row is listed once, in row order"))
        if not 0 <= row < layout.rows:
            problems.append(Problem(name, "", RULE_DROPS_FILE,
                                    f"row {row} is outside the split's rows 0..{layout.rows - 1}"))
        found.setdefault(layout.shard_of(row), Counter())[reason] += 1
    for entry in manifest.shards:
        m = SHARD_RE.match(entry.name)
        counted = Counter(found.pop(int(m["index"]), {})) if m else Counter()
        if m and counted != Counter(entry.drops):
            problems.append(Problem(name, "", RULE_DROPS_FILE, f"lists {dict(sorted(counted.items()))} for the rows of "
                                                               f"{entry.name}, whose manifest entry counts "
                                                               f"{dict(sorted(entry.drops.items()))}"))
    return problems
