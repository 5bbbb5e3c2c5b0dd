"""Bounded memory and regular files only on hostile shard folders (issue 20, item 2; docs/RELIABILITY.md "Bounds").

A zip-bomb ``rpn.npz`` is refused before it is inflated, by every reader (in-process: tracemalloc; in child
processes: ru_maxrss against the same command on the clean split); a FIFO or a symbolic link in place of a
shard is refused at once (children with a timeout, so a hang fails the test instead of stalling it); a
sparse 8 GiB shard is reported by its size without being read; a split with no samples fails check.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from frcnn_shard.format.members import TARGETS_EXT
from frcnn_shard.format.targets import max_inflated_bytes, pack_targets, unpack_all_targets, unpack_targets
from frcnn_shard.inspect.check import RULES, check_shards
from frcnn_shard.shards import MANIFEST_NAME, ShardWriter, iter_shard, write_json_atomic
from frcnn_shard.storage import LocalStore, NotRegularFileError

from conftest import ROOT

BOMB_BYTES = 768 << 20  # what the bomb inflates to: far above any bound, far below this machine's memory
N_ANCHORS = 200_000  # a member for this many anchors may be larger than the bomb: the inflate limit refuses it
HEAP_BOUND = 32 << 20  # what refusing a bomb may allocate, in-process
RSS_MARGIN_KB = 200 << 10  # how much more a command may hold on the bombed split than on the clean one
CHILD_TIMEOUT_S = 120


# ----------------------------------------------------------------------------------- hostile members


def _npy_header(n: int) -> bytes:
    """A .npy (1.0) header of a 1-D uint8 array of n bytes, padded as NumPy pads it."""
    text = "{'descr': '|u1', 'fortran_order': False, 'shape': (%d,), }" % n
    pad = 64 - (10 + len(text) + 1) % 64
    head = (text + " " * (pad % 64) + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head


def zip_bomb(inflated: int = BOMB_BYTES) -> bytes:
    """An npz laid out as the build writes it (one deflated t.npy, no extras) whose array is ``inflated`` zeros."""
    buf = io.BytesIO()
    chunk = bytes(16 << 20)
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("t.npy", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w") as f:
            f.write(_npy_header(inflated))
            for _ in range(inflated // len(chunk)):
                f.write(chunk)
    return buf.getvalue()


def lying_sizes(bomb: bytes, usize: int) -> bytes:
    """The bomb with its declared inflated size (local header and central directory) set to ``usize``."""
    out = bytearray(bomb)
    out[22:26] = usize.to_bytes(4, "little")
    cd = out.rindex(b"PK\x01\x02")
    out[cd + 24:cd + 28] = usize.to_bytes(4, "little")
    return bytes(out)


def with_comment(bomb: bytes) -> bytes:
    """The bomb with a zip comment: not the build's layout, so it goes through zipfile."""
    buf = io.BytesIO(bomb)
    with zipfile.ZipFile(buf, "a") as zf:
        zf.comment = b"hello"
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return zip_bomb()


def _peak_heap(fn) -> tuple[int, BaseException | None]:
    """The peak of Python-allocated memory while fn() runs, and what it raised."""
    tracemalloc.start()
    try:
        fn()
        err = None
    except BaseException as e:  # noqa: BLE001 - returned for the test to judge
        err = e
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, err


@pytest.mark.parametrize("variant", ["honest sizes (fast path)", "declared sizes lie", "zipfile path"])
def test_a_zip_bomb_is_refused_before_it_is_inflated(bomb, variant):
    data = {"honest sizes (fast path)": lambda: bomb,
            "declared sizes lie": lambda: lying_sizes(bomb, 1000),
            "zipfile path": lambda: with_comment(bomb)}[variant]()
    assert max_inflated_bytes(N_ANCHORS) < HEAP_BOUND
    for unpack in (lambda: unpack_targets(data, N_ANCHORS), lambda: unpack_all_targets(data, N_ANCHORS)):
        peak, err = _peak_heap(unpack)
        assert isinstance(err, ValueError), err
        assert str(err).startswith("packed targets:")
        assert peak < HEAP_BOUND, f"{variant}: {peak >> 20} MiB allocated to refuse a {len(data)}-byte member"


def test_an_honest_bomb_is_refused_by_its_declared_size(bomb):
    with pytest.raises(ValueError, match="inflates to more than .* its anchor count allows"):
        unpack_targets(bomb, N_ANCHORS)


def test_compression_methods_without_an_output_limit_are_refused():
    labels = np.zeros(N_ANCHORS, np.int8)
    labels[:5] = 1
    good = pack_targets(labels, np.where(labels == 1, 0, -1))
    with zipfile.ZipFile(io.BytesIO(good)) as zf:
        raw = zf.read("t.npy")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_BZIP2) as zf:
        zf.writestr("t.npy", raw)
    with pytest.raises(ValueError, match="compression method 12"):
        unpack_targets(buf.getvalue(), N_ANCHORS)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:  # stored stays readable
        zf.writestr("t.npy", raw)
    assert unpack_targets(buf.getvalue(), N_ANCHORS).positive.tolist() == [0, 1, 2, 3, 4]


def test_sound_members_stay_within_the_bound():
    """The bound is never below what a real member needs: every anchor positive or ignored, both orientations."""
    for n in (1, 255, 256, 257, 65536, 65537, 200_000):
        labels = np.ones(n, np.int8)
        labels[::2] = -1
        matched = np.where(labels == 1, np.arange(n) % 70000, -1)
        data = pack_targets(labels, matched, flipped=(labels, matched))
        assert [len(t.positive) for t in unpack_all_targets(data, n)] == [n // 2, n // 2]


# ----------------------------------------------------------------------------------- hostile splits


@pytest.fixture
def split(tmp_path, tiny_shards) -> Path:
    dst = tmp_path / "split"
    shutil.copytree(tiny_shards, dst)
    return dst


def _manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST_NAME).read_text())


def replace_first_targets(d: Path, data: bytes) -> str:
    """Shard 0 rewritten with its first sample's rpn.npz replaced by ``data``; the manifest agrees. Returns the key."""
    m = _manifest(d)
    entry = m["shards"][0]
    samples = list(iter_shard(d / entry["name"]))
    samples[0][1][TARGETS_EXT] = data
    w = ShardWriter(d / entry["name"])
    for key, members in samples:
        w.add(key, list(members.items()))
    info = w.close()
    entry.update(bytes=info.bytes, sha256=info.sha256)
    m["totals"]["bytes"] = sum(s["bytes"] for s in m["shards"])
    write_json_atomic(d / MANIFEST_NAME, m)
    return samples[0][0]


_CHILD = r"""
import json, resource, sys
what, folder = sys.argv[1], sys.argv[2]
out = {}
try:
    if what.startswith("loader"):
        from frcnn_shard.loader import make_loader
        on_error = "raise" if what == "loader-raise" else "skip"
        for _ in make_loader(folder, 4, num_workers=0, on_error=on_error, shuffle=False):
            pass
        out["outcome"] = "done"
    elif what.startswith("check"):
        from frcnn_shard.inspect.check import check_shards
        r = check_shards(folder, deep=what == "check-deep", fraction=0.2, workers=0)
        out["outcome"] = "report"
        out["problems"] = [p.to_dict() for p in r.problems]
    else:
        from frcnn_shard.cli import main
        args = {"stats": ["stats", folder, "--out", sys.argv[3]],
                "show": ["show", folder, "--index", "0", "--anchors", "--out", sys.argv[3]]}[what]
        main(args, standalone_mode=False)
        out["outcome"] = "done"
except BaseException as e:
    out["outcome"] = f"{type(e).__name__}: {e}"
out["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(out))
"""


def run_child(what: str, folder: Path, tmp: Path, timeout: float = CHILD_TIMEOUT_S, as_limit: int | None = None
              ) -> dict:
    """Run one reader over ``folder`` in a child process; its outcome and peak RSS. A hang fails the test."""
    def limit() -> None:  # a runaway read ends in the child's MemoryError, not in this machine's swap
        if as_limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))

    proc = subprocess.run([sys.executable, "-c", _CHILD, what, str(folder), str(tmp / f"{what}.png")],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, preexec_fn=limit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("what", ["check", "check-deep", "stats", "show", "loader"])
def test_every_reader_stays_bounded_on_a_zip_bomb(split, tmp_path, tiny_shards, bomb, what):
    clean = run_child(what, tiny_shards, tmp_path)
    replace_first_targets(split, bomb)
    hostile = run_child(what, split, tmp_path)
    grew = hostile["maxrss_kb"] - clean["maxrss_kb"]
    assert grew < RSS_MARGIN_KB, f"{what}: {grew >> 10} MiB more on the bombed split ({hostile['outcome']})"
    if what.startswith("check"):
        assert {p["rule"] for p in hostile["problems"]} == {"targets_invalid"}, hostile["problems"]
        assert "allow" in hostile["problems"][0]["detail"]  # the bound its anchor count implies


def _shard(d: Path, i: int) -> Path:
    return d / _manifest(d)["shards"][i]["name"]


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_shard_that_is_not_a_regular_file_is_refused_at_once(split, tmp_path, kind):
    path = _shard(split, 1)
    moved = tmp_path / "elsewhere.tar"
    shutil.move(path, moved)
    {"fifo": lambda: os.mkfifo(path), "symlink": lambda: path.symlink_to(moved),  # same bytes, another file
     "directory": lambda: path.mkdir()}[kind]()
    report = run_child("check", split, tmp_path, timeout=60)
    bad = [p for p in report["problems"] if p["shard"] == path.name]
    assert [p["rule"] for p in bad] == ["shard_unreadable"], report["problems"]
    assert "regular_file" in bad[0]["detail"] and str(path) in bad[0]["detail"]
    loaded = run_child("loader", split, tmp_path, timeout=60)
    assert loaded["outcome"] == "done"  # on_error="skip": the shard counts as lost, the rest is read
    with pytest.raises(NotRegularFileError, match="regular_file"):
        LocalStore(split).open_read(path.name)


def test_the_loader_names_a_fifo_shard_and_the_rule(split, tmp_path):
    path = _shard(split, 0)
    path.unlink()
    os.mkfifo(path)
    outcome = run_child("loader-raise", split, tmp_path, timeout=60)["outcome"]
    assert re.fullmatch(f"ShardFormatError: .*{path.name}.*regular_file: a FIFO.*", outcome), outcome


def test_a_sparse_8_gib_shard_is_reported_by_its_size_unread(split, tmp_path):
    path = _shard(split, 0)
    os.truncate(path, 8 << 30)  # a hole: no disk used
    report = run_child("check", split, tmp_path, timeout=60, as_limit=4 << 30)
    assert report["outcome"] == "report"
    bad = [p for p in report["problems"] if p["shard"] == path.name]
    assert [p["rule"] for p in bad] == ["shard_size"], report["problems"]
    assert bad[0]["detail"].startswith(f"{8 << 30} bytes, the manifest says") and "not read" in bad[0]["detail"]
    assert report["maxrss_kb"] < 1 << 20  # KB: well under a GiB


def test_a_shard_larger_than_check_holds_is_not_read_even_when_the_manifest_agrees(split, tmp_path):
    path = _shard(split, 0)
    os.truncate(path, 8 << 30)
    m = _manifest(split)
    m["shards"][0]["bytes"] = 8 << 30
    m["totals"]["bytes"] = sum(s["bytes"] for s in m["shards"])
    write_json_atomic(split / MANIFEST_NAME, m)
    report = run_child("check", split, tmp_path, timeout=60, as_limit=4 << 30)
    bad = [p for p in report["problems"] if p["shard"] == path.name]
    assert [p["rule"] for p in bad] == ["shard_size"], report["problems"]
    assert "a check holds in memory; not read" in bad[0]["detail"]


def test_an_endless_drops_file_is_read_with_a_bound(split, tmp_path):
    m = _manifest(split)
    m["drops"].update(file="drops.jsonl", rows=1)  # one dropped row: a line of at most MAX_DROP_LINE_BYTES
    write_json_atomic(split / MANIFEST_NAME, m)
    drops = split / "drops.jsonl"
    drops.unlink(missing_ok=True)
    drops.touch()
    os.truncate(drops, 8 << 30)  # as long as /dev/zero is, for a reader without a bound
    report = run_child("check", split, tmp_path, timeout=60, as_limit=4 << 30)
    bad = [p for p in report["problems"] if p["shard"] == "drops.jsonl"]
    assert [p["rule"] for p in bad] == ["drops_file"], report["problems"]
    assert "cannot be read" in bad[0]["detail"]
    drops.unlink()
    drops.symlink_to("/dev/zero")
    report = run_child("check", split, tmp_path, timeout=60, as_limit=4 << 30)
    bad = [p for p in report["problems"] if p["shard"] == "drops.jsonl"]
    assert [p["rule"] for p in bad] == ["drops_file"] and "regular_file" in bad[0]["detail"], report["problems"]


# ----------------------------------------------------------------------------------- empty split


def test_a_split_with_no_samples_fails_check(split):
    """What a build whose every row dropped leaves (a complete manifest, 0 samples) is a problem, exit 1."""
    from click.testing import CliRunner

    from frcnn_shard.cli import main

    m = _manifest(split)
    for entry in m["shards"]:
        (split / entry["name"]).unlink()
    m["shards"] = []
    m["totals"].update(samples=0, shards=0, bytes=0)
    write_json_atomic(split / MANIFEST_NAME, m)
    assert m["complete"]
    report = check_shards(split)
    assert [p.rule for p in report.problems if p.shard == MANIFEST_NAME] == ["split_empty"]
    assert "split_empty" in RULES
    res = CliRunner().invoke(main, ["check", str(split)])
    assert res.exit_code == 1 and "split_empty" in res.output
