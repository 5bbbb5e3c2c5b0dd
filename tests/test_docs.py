"""The documents: benchmark numbers live in docs/BENCHMARKS.md only, links into it resolve, and the
tests the documents name exist."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = "docs/BENCHMARKS.md"
# The documents that describe measurements in words and link to BENCHMARKS.md for the numbers.
DOCS = ("README.md", "docs/ARCHITECTURE.md", "docs/FORMAT.md", "docs/INSPECT.md", "docs/LOADER.md",
        "docs/RELIABILITY.md")

# What a measured result looks like: a ratio ("4.9x", "29×"; not a size like 400x400 or 1200 x 900),
# a per-item time ("0.21 ms", "126 us"), a rate ("1,140 images/s", "390 MB/s") or a duration ("0.32 s").
BENCHMARK_LIKE = re.compile(
    r"(?<![\w.,])\d+(?:[.,]\d+)*(?:"
    r"[x×](?!\w)"
    r"|\s?(?:ms|us|µs)\b"
    r"|\s?(?:images|img|samples|rows|MB|MiB|GB|kB|KB)/s\b"
    r"|\s?s\b(?!/)"
    r")"
)
INLINE_CODE = re.compile(r"`[^`]*`")  # option values and identifiers, such as `--image-size 400x`
# Numbers of that shape that are behaviour or arithmetic, not measurements: (document, the phrase
# around the number, why). Each phrase must still occur, so the list cannot go stale.
NOT_BENCHMARKS = (
    ("docs/RELIABILITY.md", "(max 60 s)", "the retry backoff's cap, build.rows.MAX_RETRY_DELAY_S"),
    ("docs/RELIABILITY.md", "within 0.5 s", "how often the build polls its workers, build.pool.POLL_S"),
    ("docs/RELIABILITY.md", "within ~1 s", "what test_ctrl_c_stops_within_seconds_and_resumes asserts"),
    ("docs/RELIABILITY.md", "sleeps S seconds", "a fault point's syntax"),
)


def _prose(text: str) -> list[tuple[int, str, str]]:
    """(line number, line, its prose) outside code (fenced blocks, inline spans): example output and
    option values are not claims about speed."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append((i, line, INLINE_CODE.sub("``", line)))
    return out


def _allowed(doc: str, line: str, match: re.Match) -> bool:
    return any(d == doc and phrase in line and match.group(0).strip() in phrase for d, phrase, _ in NOT_BENCHMARKS)


def benchmark_like_numbers(doc: str, text: str) -> list[str]:
    """'doc:line: number' for each benchmark-like number in the prose of ``text``, allow-list excepted."""
    return [f"{doc}:{i}: {m.group(0)!r} in {line.strip()!r}"
            for i, line, prose in _prose(text) for m in BENCHMARK_LIKE.finditer(prose) if not _allowed(doc, prose, m)]


def test_the_pattern_finds_the_numbers_that_used_to_disagree():
    # The copies issue 11 found, in the words they had: each must be caught.
    for sentence in ("**check:** 4.9x the time of reading", "That is 4.2x a sequential read",
                     "| loader, `normalize=True` (float32) | ~0.39x (0.79x of the normalised floor) | ~4.1x |",
                     "0.21 ms per real COCO image", "takes 0.32 s, about 160 us per sample",
                     "slower than about 300 MB/s", "0.68x the delivered decode floor", "29x faster",
                     "1,140 images/s"):
        assert benchmark_like_numbers("README.md", sentence), sentence
    for fact in ("a 400x400 image", "declaring 9000x9000", "HxW 480x640", "stride 4..64", "sha256 c8f0",
                 "1.9 MB per image", "2 workers, batch 8", "`--image-size 400x`", "version 1.0",
                 "each cell 500 x 500 px", "4 x uint32 LE"):
        assert not benchmark_like_numbers("README.md", fact), fact


@pytest.mark.parametrize("doc", DOCS)
def test_benchmark_numbers_live_only_in_benchmarks_md(doc):
    found = benchmark_like_numbers(doc, (ROOT / doc).read_text())
    assert not found, ("benchmark numbers belong in docs/BENCHMARKS.md; link to its section instead:\n"
                       + "\n".join(found))


def test_the_allow_list_is_current():
    for doc, phrase, why in NOT_BENCHMARKS:
        assert phrase in (ROOT / doc).read_text(), f"{doc} no longer says {phrase!r} ({why}): drop the entry"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_into_benchmarks_md_resolve():
    headings = re.findall(r"^#+\s+(.+?)\s*$", (ROOT / BENCHMARKS).read_text(), flags=re.M)
    anchors = {github_anchor(h) for h in headings}
    links = [(doc, a) for doc in DOCS for a in re.findall(r"BENCHMARKS\.md#([\w-]+)", (ROOT / doc).read_text())]
    assert len(links) >= 5  # README, INSPECT, LOADER and FORMAT link to sections
    broken = [f"{doc}: #{a}" for doc, a in links if a not in anchors]
    assert not broken, f"links to no heading of {BENCHMARKS}: {broken}; headings: {sorted(anchors)}"


def test_the_tests_the_documents_name_exist():
    defined = set(re.findall(r"^def (test_\w+)", "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py")),
                             flags=re.M))
    named = {(doc, t) for doc in DOCS for t in re.findall(r"`(test_\w+)", (ROOT / doc).read_text())}
    assert len(named) > 10
    missing = sorted(f"{doc}: {t}" for doc, t in named if t not in defined)
    assert not missing, f"documents name tests that do not exist: {missing}"


def _architecture_refs() -> tuple[list[str], list[str]]:
    """(files, dotted names) that docs/ARCHITECTURE.md names: the modules of its package table (first column, and
    each `x.py` of a package's row), and every `a.b[.c]` in backticks whose first part is one of our modules."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("## Packages and modules", 1)[1].split("\n## ", 1)[0]
    files, dotted = [], []
    for line in table.splitlines():
        cells = line.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`"):
            continue
        firsts = re.findall(r"`([^`]+)`", cells[1])
        files += firsts
        for package in (f for f in firsts if f.endswith("/")):
            files += [package + m for m in re.findall(r"`([a-z_]+\.py)`", cells[2])]
    top = {p.stem for p in (ROOT / "frcnn_shard").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    for ref in re.findall(r"`([a-z_]+(?:\.[A-Za-z_]+)+)`", text):
        if ref.split(".")[0] in top and not ref.endswith(".py"):
            dotted.append(ref)
    return files, dotted


def _resolves(ref: str) -> bool:
    import importlib

    parts = ref.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module("frcnn_shard." + ".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_the_modules_and_names_architecture_md_names_exist():
    files, dotted = _architecture_refs()
    assert len(files) > 40 and len(dotted) > 30  # the parser found the table and the references
    missing = [f for f in files if not (ROOT / "frcnn_shard" / f).exists()]
    missing += [d for d in dotted if not _resolves(d)]
    assert not missing, f"docs/ARCHITECTURE.md names what does not exist: {missing}"
