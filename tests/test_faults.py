"""Fault injection (issue 6): kills, Ctrl-C, dropped connections, full disks, bad input, hostile shards.

Every test here is named in docs/RELIABILITY.md next to the fault it injects and the rule it proves.
Inputs are tiny (the synthetic sample at 128 px, shards of 4 samples) so the whole file runs in CI.
"""
from __future__ import annotations

import ast
import errno
import functools
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from frcnn_shard import build as fb
from frcnn_shard import shards as fs
from frcnn_shard.build import BuildError, BuildInterrupted, BuildOptions, SourceError, build, is_transient
from frcnn_shard.inspect.check import check_shards
from frcnn_shard.cli import main
from frcnn_shard.labels import COCO_CLASSES
from frcnn_shard.sources.fixtures import make_sample_hub_folder
from frcnn_shard.shards import (
    FAULT_ENV, MANIFEST_NAME, SHARD_RE, ManifestError, ShardFormatError, file_sha256, iter_shard, list_shard_keys,
    read_manifest,
)
from frcnn_shard.sources.fixtures import write_hub_folder
from frcnn_shard.sources import open_source
from frcnn_shard.transform import TransformConfig, process_row as real_process_row

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128
SPP = 4  # rows per shard
N_TRAIN = 24  # -> 6 shards


# ------------------------------------------------------------------------------------ helpers


def opts_for(source, out, **kw) -> BuildOptions:
    kw.setdefault("workers", 0)
    kw.setdefault("device", "cpu")
    kw.setdefault("rows_per_shard", SPP)
    kw.setdefault("retry_backoff", 0.001)
    kw.setdefault("transform", TransformConfig(image_size=(SIZE, SIZE)))
    return BuildOptions(source=str(source), split="train", out=str(out), **kw)


CLI_ARGS = ["--split", "train", "--image-size", str(SIZE), "--rows-per-shard", str(SPP), "--device", "cpu"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    return make_sample_hub_folder(tmp_path_factory.mktemp("fault_hub"), n_train=N_TRAIN, n_val=2, seed=3)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, hub) -> Path:
    """The uninterrupted build every interrupted one must equal."""
    res = build(opts_for(hub, tmp_path_factory.mktemp("fault_ref")))
    assert res.shards == N_TRAIN // SPP
    return res.out_dir


def entries(d: Path) -> list[tuple]:
    return [(s["name"], s["sha256"], s["samples"], s["rows"]) for s in read_manifest(d)["shards"]]


def all_keys(d: Path) -> list[str]:
    return [k for s in read_manifest(d)["shards"] for k in list_shard_keys(d / s["name"])]


def part_record(out_dir: Path) -> dict | None:
    """The one part record of a whole build (None before the first shard was recorded)."""
    p = out_dir / "_parts" / "part-000000-of-000001.json"
    return json.loads(p.read_text()) if p.exists() else None


def listed(out_dir: Path) -> list[str]:
    """The shards the part record lists."""
    rec = part_record(out_dir)
    return [s["name"] for s in rec["shards"]] if rec else []


def assert_crash_consistent(out_dir: Path, ref_dir: Path) -> None:
    """What a crash may leave: *.partial files, and under final names only complete, correct files."""
    ref_sha = {n: sha for n, sha, _, _ in entries(ref_dir)}
    ref_names = list(ref_sha)
    for p in out_dir.iterdir():
        if p.name.endswith(fs.PARTIAL_SUFFIX):
            continue
        if p.name == "_parts":
            names = listed(out_dir)  # the record parses: never half-written
            assert names == ref_names[: len(names)]
        elif p.name == MANIFEST_NAME:  # written last: only a finished build has one (how it ran aside)
            got, want = (json.loads(d.read_text()) for d in (p, ref_dir / p.name))
            assert {k: v for k, v in got.items() if k != "run"} == {k: v for k, v in want.items() if k != "run"}
        elif p.name == "drops.jsonl":
            assert p.read_bytes() == (ref_dir / p.name).read_bytes(), f"{p.name} is not the finished one"
        else:
            assert SHARD_RE.match(p.name), p
            assert file_sha256(p) == ref_sha[p.name], f"{p.name} under its final name is not the complete shard"


def assert_same_as_ref(out_dir: Path, ref_dir: Path) -> None:
    assert entries(out_dir) == entries(ref_dir)
    assert all_keys(out_dir) == all_keys(ref_dir)
    m, r = read_manifest(out_dir), read_manifest(ref_dir)
    assert m["complete"] and m["drops"] == r["drops"] and m["totals"] == r["totals"]
    assert (out_dir / "drops.jsonl").read_bytes() == (ref_dir / "drops.jsonl").read_bytes()
    assert not list(out_dir.glob("*" + fs.PARTIAL_SUFFIX)) and not list((out_dir / "_parts").glob("*.partial"))
    report = check_shards(out_dir, workers=0)
    assert report.ok, report.problems


def run_forked_until_killed(opts: BuildOptions, fault: str) -> None:
    """Run build(opts) in a forked child with FRCNN_SHARD_FAULT=fault; it must die by SIGKILL there."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.setpgid(0, 0)
            os.environ[FAULT_ENV] = fault
            build(opts)
        finally:
            os._exit(3)  # reaching this means the fault point was never hit
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)  # orphaned pool workers of the killed child
        except ProcessLookupError:
            pass
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child status {status}"


def children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def gone(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def cli_build(hub: Path, out: Path, *extra: str, fault: str | None = None, workers: int = 2) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    cmd = [sys.executable, "-m", "frcnn_shard.cli", "build", "--source", str(hub), "--out", str(out),
           "--workers", str(workers), *CLI_ARGS, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for(cond, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"build exited early ({proc.returncode}): {proc.communicate()}")
        assert time.monotonic() - t0 < timeout, "timed out waiting"
        time.sleep(0.005)


# ------------------------------------------------------------------------------ interruptions


@pytest.mark.parametrize("fault,workers,left", [
    ("mid_shard:1", 0, "partial"),  # a sample of shard 1 written, shard 1 still .partial
    ("published:2", 2, "unlisted"),  # shard 2 renamed to its final name, the part record not yet rewritten
    ("record_write:3", 0, "record_partial"),  # half of the part record's .partial written
    ("shard_done:1", 2, "between"),  # between shards: shard 1 published and recorded, nothing else open
    ("merge:0", 0, "unmerged"),  # every shard recorded, drops.jsonl written, the manifest not yet
])
def test_sigkill_at_named_points_then_resume_is_identical(hub, ref, tmp_path, fault, workers, left):
    opts = opts_for(hub, tmp_path, workers=workers)
    run_forked_until_killed(opts, fault)
    out_dir = tmp_path / "train"
    assert_crash_consistent(out_dir, ref)
    assert not (out_dir / MANIFEST_NAME).exists()  # the manifest is written last
    names = listed(out_dir)
    partials = {p.name for p in out_dir.glob("*.partial")} | {p.name for p in (out_dir / "_parts").glob("*.partial")}
    if left == "partial":
        assert partials == {"train-000001.tar.partial"} and len(names) == 1
    elif left == "unlisted":
        assert (out_dir / "train-000002.tar").exists() and len(names) == 2
    elif left == "record_partial":
        assert "part-000000-of-000001.json.partial" in partials and len(names) == 3
    elif left == "unmerged":
        assert part_record(out_dir)["complete"] and (out_dir / "drops.jsonl").exists()
    else:
        assert not partials and len(names) == 2
    res = build(opts)  # the same command again
    assert res.status == "resumed"
    assert_same_as_ref(out_dir, ref)


def test_sigkill_cli_at_random_moments_then_resume_is_identical(hub, ref, tmp_path):
    """The real command killed -9 three times at random moments (seeded), then run to the end."""
    rng = random.Random(6)
    out_dir = tmp_path / "train"
    for _ in range(3):
        target = rng.randint(1, N_TRAIN // SPP - 1)
        proc = cli_build(hub, tmp_path, workers=1)
        try:
            # Wait until `target` shards exist (or the build ends), then a random extra few ms.
            wait_for(lambda: proc.poll() is not None or len(list(out_dir.glob("*.tar"))) >= target, 90)
            time.sleep(rng.uniform(0, 0.03))
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
        assert_crash_consistent(out_dir, ref)
    build(opts_for(hub, tmp_path, workers=1))
    assert_same_as_ref(out_dir, ref)


@pytest.mark.parametrize("fault,ready", [
    ("mid_shard:1:sleep=60", "train-000001.tar.partial"),  # the writer is mid-shard
    ("worker_row:9:sleep=60", "train-000001.tar"),  # a worker is busy with row 9, the parent waits on it
])
def test_ctrl_c_stops_within_seconds_and_resumes(hub, ref, tmp_path, fault, ready):
    proc = cli_build(hub, tmp_path, fault=fault, workers=2)
    out_dir = tmp_path / "train"
    try:
        wait_for(lambda: (out_dir / ready).exists(), 90, proc)
        time.sleep(0.3)
        workers = children_of(proc.pid)
        assert len(workers) >= 2, "the worker pool should be running"
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole process group
        _, err = proc.communicate(timeout=20)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, err
    assert elapsed < 3.0, f"took {elapsed:.1f} s to stop"
    assert "resume" in err and "Traceback" not in err, err
    deadline = time.monotonic() + 5
    while not all(gone(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(p) for p in workers), "worker processes outlived the build"
    assert not list(out_dir.glob("*.partial"))
    assert not (out_dir / MANIFEST_NAME).exists() and not part_record(out_dir)["complete"]
    assert build(opts_for(hub, tmp_path, workers=2)).status == "resumed"
    assert_same_as_ref(out_dir, ref)


def test_ctrl_c_before_first_row_is_a_clean_interrupt(hub, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with pytest.raises(BuildInterrupted, match="resume"):
        build(opts_for(hub, tmp_path, workers=2), open_source=interrupted)


def test_worker_killed_stops_the_build_with_a_reason(hub, ref, tmp_path, monkeypatch):
    """A worker SIGKILLed (as by the OOM killer) must not hang the build: it stops, says why, resumes."""
    monkeypatch.setenv(FAULT_ENV, "worker_row:9")  # inherited by the forked workers only
    opts = opts_for(hub, tmp_path, workers=2)
    t0 = time.monotonic()
    with pytest.raises(BuildError, match="worker process died.*resume"):
        build(opts)
    assert time.monotonic() - t0 < 20
    out_dir = tmp_path / "train"
    assert not list(out_dir.glob("*.partial"))
    assert_crash_consistent(out_dir, ref)
    monkeypatch.delenv(FAULT_ENV)
    build(opts)
    assert_same_as_ref(out_dir, ref)


# ----------------------------------------------------------------------------- flaky sources


class FlakySource:
    """Wraps a real Source: rows(skip) raises ``exc`` when about to yield a row listed in ``fail_at``
    (row index -> how many more times it fails), like a connection dropping mid-stream."""

    def __init__(self, inner, fail_at: dict[int, int], exc: Exception):
        self._inner, self.fail_at, self.exc, self.calls = inner, dict(fail_at), exc, []
        self.info, self.bbox_format, self.stats = inner.info, inner.bbox_format, inner.stats
        self.num_rows, self.fingerprint = inner.num_rows, inner.fingerprint
        self.classes, self.crowd = inner.classes, inner.crowd

    def rows(self, start: int = 0, stop: int | None = None):
        self.calls.append(start)
        for row in self._inner.rows(start, stop):
            if self.fail_at.get(row.index, 0) > 0:
                self.fail_at[row.index] -= 1
                raise self.exc
            yield row


def flaky(fail_at: dict[int, int], exc: Exception) -> tuple[list, Callable]:
    """(the sources made, an open_source for build's seam that wraps each real source in a FlakySource)."""
    made: list[FlakySource] = []

    def open_flaky(*a, **k):
        made.append(FlakySource(open_source(*a, **k), fail_at, exc))
        return made[-1]

    return made, open_flaky


def test_transient_source_errors_are_retried_from_the_failed_row(hub, ref, tmp_path, caplog):
    made, open_flaky = flaky({7: 2, 13: 1}, ConnectionResetError("connection reset by peer"))
    caplog.set_level(logging.WARNING, "frcnn_shard.build")
    res = build(opts_for(hub, tmp_path, workers=2, retries=2), open_source=open_flaky)
    assert res.status == "built"
    assert made[0].calls == [0, 7, 7, 13]  # each retry resumes the stream at the row that failed
    assert sum("retry" in r.getMessage() for r in caplog.records) == 3
    assert_same_as_ref(res.out_dir, ref)


def test_retry_backoff_doubles_and_is_bounded():
    class Src:
        def __init__(self):
            self.n = 0

        def rows(self, start=0, stop=None):
            self.n += 1
            raise TimeoutError("read timed out")
            yield  # pragma: no cover

    delays: list[float] = []
    src = Src()
    opts = BuildOptions(retries=4, retry_backoff=0.5)
    with pytest.raises(SourceError, match=r"row 3 after 4 retries.*TimeoutError"):
        list(fb.resilient_rows(src, 3, 10, opts, sleep=delays.append))
    assert delays == [0.5, 1.0, 2.0, 4.0] and src.n == 5
    delays.clear()
    with pytest.raises(SourceError):
        list(fb.resilient_rows(Src(), 0, 10, BuildOptions(retries=3, retry_backoff=50.0), sleep=delays.append))
    assert delays == [50.0, fb.MAX_RETRY_DELAY_S, fb.MAX_RETRY_DELAY_S]


def test_transient_error_classification():
    class FakeHttpxError(Exception):
        pass

    FakeHttpxError.__module__ = "httpx._exceptions"
    transient = [ConnectionError(), ConnectionResetError(), BrokenPipeError(), TimeoutError(),
                 OSError(errno.EIO, "I/O error"), OSError("remote closed"), FakeHttpxError()]
    permanent = [FileNotFoundError(2, "gone"), PermissionError(13, "denied"), OSError(errno.ENOSPC, "full"),
                 ValueError("bad row"), KeyError("image"), RuntimeError("bug")]
    assert all(is_transient(e) for e in transient)
    assert not any(is_transient(e) for e in permanent)


def test_source_failing_for_good_stops_resumably(hub, ref, tmp_path):
    made, open_flaky = flaky({9: 99}, ConnectionError("network is unreachable"))
    opts = opts_for(hub, tmp_path, workers=2, retries=2)
    with pytest.raises(SourceError, match=r"row 9 after 2 retries.*network is unreachable.*resume"):
        build(opts, open_source=open_flaky)
    assert made[0].calls == [0, 9, 9]
    out_dir = tmp_path / "train"
    assert listed(out_dir) == ["train-000000.tar", "train-000001.tar"] and not part_record(out_dir)["complete"]
    assert not list(out_dir.glob("*.partial"))
    with pytest.raises(ManifestError, match="not finished"):
        check_shards(out_dir, workers=0)
    assert build(opts).status == "resumed"
    assert_same_as_ref(out_dir, ref)


def test_non_transient_source_error_is_not_retried(hub, tmp_path):
    made, open_flaky = flaky({5: 1}, ValueError("row 5: objects are not parallel lists"))
    with pytest.raises(SourceError, match=r"row 5 \(error\): ValueError.*resume"):
        build(opts_for(hub, tmp_path, retries=3), open_source=open_flaky)
    assert made[0].calls == [0]


def test_source_error_through_the_cli_exits_1_with_the_reason(hub, tmp_path, monkeypatch):
    _, open_flaky = flaky({6: 99}, TimeoutError("read timed out"))
    # The CLI calls frcnn_shard.build.build: here that build with the flaky source as its collaborator.
    monkeypatch.setattr(fb, "build", functools.partial(fb.build, open_source=open_flaky))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["build", "--source", str(hub), "--out", str(out), "--workers", "0",
                                  "--retries", "1", "--retry-backoff", "0", *CLI_ARGS])
    assert r.exit_code == 1
    assert "row 6 after 1 retry" in r.output and "read timed out" in r.output and "resume" in r.output


# ----------------------------------------------------------------------------- full disk


def test_enospc_mid_shard_removes_the_partial_and_resumes(hub, ref, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "mid_shard:2:enospc")  # the disk fills up inside shard 2
    opts = opts_for(hub, tmp_path, workers=2)
    with pytest.raises(BuildError, match="No space left on device.*unfinished shard was removed"):
        build(opts)
    out_dir = tmp_path / "train"
    assert not list(out_dir.glob("*.partial"))
    assert_crash_consistent(out_dir, ref)
    assert len(listed(out_dir)) == 2
    with pytest.raises(ManifestError, match="not finished"):
        check_shards(out_dir, workers=0)
    monkeypatch.undo()
    assert build(opts).status == "resumed"
    assert_same_as_ref(out_dir, ref)


def test_enospc_writing_the_part_record_keeps_the_old_one(hub, ref, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "record_write:2:enospc")  # half of the record listing shard 2, then the disk is full
    opts = opts_for(hub, tmp_path)
    with pytest.raises(BuildError, match="No space left on device"):
        build(opts)
    out_dir = tmp_path / "train"
    assert not list(out_dir.glob("*.partial")) and not list((out_dir / "_parts").glob("*.partial"))
    assert_crash_consistent(out_dir, ref)
    # The record still lists the two shards it listed before; shard 2 was published but is not listed.
    assert listed(out_dir) == ["train-000000.tar", "train-000001.tar"]
    monkeypatch.undo()
    assert build(opts).status == "resumed"
    assert_same_as_ref(out_dir, ref)


def test_enospc_through_the_cli_exits_1_with_the_reason(hub, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "mid_shard:0:enospc")
    r = CliRunner().invoke(main, ["build", "--source", str(hub), "--out", str(tmp_path), "--workers", "0", *CLI_ARGS])
    assert r.exit_code == 1
    assert "No space left on device" in r.output and "resume" in r.output
    assert not list((tmp_path / "train").glob("*.partial"))


# ----------------------------------------------------------------------------- bad input


def jpeg(w: int, h: int, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "CMYK":
        img = Image.fromarray(rng.integers(0, 255, (h, w, 4), dtype=np.uint8), "CMYK")
    else:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h grey pixels but holds almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def row(image_id: int, data: bytes | None, w: int = 64, h: int = 48, boxes=None, cats=None) -> dict:
    boxes = [[4.0, 4.0, 20.0, 20.0]] if boxes is None else boxes
    cats = [0] * len(boxes) if cats is None else cats
    return {
        "image_id": image_id, "image": None if data is None else {"bytes": data, "path": None},
        "width": w, "height": h,
        "objects": {"bbox_id": [image_id * 10 + i for i in range(len(boxes))], "category": cats,
                    "bbox": boxes, "area": [1.0] * len(boxes)},
    }


NAN, INF = float("nan"), float("inf")
BAD_ROWS = [  # (row, what happens) -- the rules are in docs/RELIABILITY.md
    (row(1, jpeg(64, 48)), "sample"),
    (row(2, bytes(np.random.default_rng(1).integers(0, 255, 3000, dtype=np.uint8))), "corrupt_image"),
    (row(3, jpeg(64, 48, seed=3)[:700]), "corrupt_image"),  # truncated JPEG, WITH boxes: fails at decode
    (row(4, b""), "corrupt_image"),  # empty
    (row(5, b"<html>503 Service Unavailable</html>"), "corrupt_image"),  # not an image
    (row(6, None), "missing_image"),
    (row(7, jpeg(64, 48), w=65), "size_mismatch"),
    (row(8, png_header_only(30000, 30000), w=30000, h=30000), "too_many_pixels"),  # Pillow's bomb guard
    (row(9, png_header_only(9000, 9000), w=9000, h=9000), "too_many_pixels"),  # 81 Mpx > max_pixels 64 Mpx
    (row(10, jpeg(64, 48, "L")), "sample"),  # grayscale
    (row(11, png(Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 64, 3), dtype=np.uint8))
                 .convert("P"))), "sample"),  # palette
    (row(12, png(Image.new("RGBA", (64, 48), (255, 255, 255, 0)))), "sample"),  # RGBA, fully transparent white
    (row(13, jpeg(64, 48, "CMYK")), "sample"),
    (row(14, png(Image.fromarray(np.full((48, 64), 0x8000, dtype=np.uint16)))), "sample"),  # 16-bit grey
    (row(15, jpeg(64, 48), boxes=[
        [4.0, 4.0, 20.0, 20.0],  # kept
        [50.0, 40.0, 30.0, 30.0],  # partly outside: clipped to the image, kept
        [NAN, 1.0, 5.0, 5.0], [1.0, 1.0, INF, 5.0],  # non_finite x2
        [10.0, 10.0, -5.0, 5.0], [10.0, 10.0, 0.0, 0.0],  # degenerate: negative size, zero area
        [100.0, 100.0, 10.0, 10.0],  # outside_image
        [1.0, 1.0, 0.1, 0.1],  # too_small after resizing
        [4.0, 4.0, 20.0, 20.0], [4.0, 4.0, 20.0, 20.0],  # bad_category x2 (95 and -1)
    ], cats=[0, 1, 0, 0, 0, 0, 0, 0, 95, -1]), "sample"),
    (row(1, jpeg(64, 48, seed=9)), "duplicate_image_id"),
    (row(16, jpeg(64, 48), boxes=[[200.0, 200.0, 5.0, 5.0]]), "no_boxes"),  # its one box is outside
    (row(17, jpeg(64, 48, seed=17)), "sample"),
]
EXPECTED_IMAGE_DROPS = {"corrupt_image": 4, "missing_image": 1, "size_mismatch": 1, "too_many_pixels": 2,
                        "duplicate_image_id": 1, "no_boxes": 1}
EXPECTED_BOX_DROPS = {"non_finite": 2, "degenerate": 2, "outside_image": 2, "too_small": 1, "bad_category": 2}


@pytest.fixture(scope="module")
def bad_hub(tmp_path_factory) -> Path:
    return write_hub_folder(tmp_path_factory.mktemp("bad_hub"), {"train": [r for r, _ in BAD_ROWS]})


def test_bad_rows_are_repaired_or_skipped_and_counted_by_reason(bad_hub, tmp_path):
    res = build(opts_for(bad_hub, tmp_path, workers=2, bbox_format="xywh", max_bad_fraction=1.0))
    m = read_manifest(res.out_dir)
    assert m["complete"] and m["totals"]["rows"] == len(BAD_ROWS)
    assert m["drops"]["images"] == EXPECTED_IMAGE_DROPS
    assert m["drops"]["boxes"] == EXPECTED_BOX_DROPS
    want = [f"{r['image_id']:012d}" for r, what in BAD_ROWS if what == "sample"]
    assert all_keys(res.out_dir) == want
    assert check_shards(res.out_dir, workers=0).ok
    samples = {k: v for s in m["shards"] for k, v in iter_shard(res.out_dir / s["name"])}
    for key, members in samples.items():
        img = Image.open(io.BytesIO(members["jpg"]))
        assert img.mode == "RGB" and img.size == (SIZE, SIZE), key
    rgba = np.asarray(Image.open(io.BytesIO(samples["000000000012"]["jpg"])))
    assert rgba.mean() < 3  # transparent pixels composited onto black
    grey16 = np.asarray(Image.open(io.BytesIO(samples["000000000014"]["jpg"])))
    assert abs(grey16.mean() - 0x80) < 3  # 16-bit 0x8000 keeps its top 8 bits
    boxes = json.loads(samples["000000000015"]["json"])
    assert len(boxes["boxes"]) == 2 and boxes["box_drops"] == {
        "bad_category": 2, "degenerate": 2, "non_finite": 2, "outside_image": 1, "too_small": 1}
    np.testing.assert_allclose(boxes["boxes"][1], [50 * SIZE / 64, 40 * SIZE / 48, SIZE, SIZE], atol=1e-3)


def test_max_bad_fraction_fails_the_build_but_keeps_what_was_written(bad_hub, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["build", "--source", str(bad_hub), "--out", str(out), "--workers", "0",
                                  "--bbox-format", "xywh", *CLI_ARGS])
    assert r.exit_code == 1
    assert "--max-bad-fraction" in r.output and "corrupt_image" in r.output and "kept" in r.output
    m = read_manifest(out / "train")
    assert m["complete"] and m["totals"]["samples"] == 8
    # The rows that were skipped are named: in the output, and one JSON line each in drops.jsonl.
    assert "row 1 (image id 2): corrupt_image" in r.output and "drops.jsonl" in r.output
    lines = [json.loads(line) for line in (out / "train" / "drops.jsonl").read_text().splitlines()]
    assert [(d["row"], d["reason"]) for d in lines] == [
        (i, what) for i, (_, what) in enumerate(BAD_ROWS) if what != "sample"]
    assert all({"row", "image_id", "origin", "reason", "detail"} <= set(d) for d in lines)
    assert check_shards(out / "train", workers=0).ok
    # Within the limit (9 bad of 18 = 50%), the same build succeeds.
    res = build(opts_for(bad_hub, tmp_path / "ok", bbox_format="xywh", max_bad_fraction=0.5))
    assert res.bad_fraction == pytest.approx(9 / 18)


def test_an_exception_in_a_worker_is_counted_not_fatal(bad_hub, tmp_path, caplog):
    def process_row(r, cfg):
        if r.image_id == 10:
            raise RuntimeError("boom in an odd codec")
        return real_process_row(r, cfg)

    caplog.set_level(logging.WARNING, "frcnn_shard.build")
    # The pool's initializer hands the workers this process_row (the pool forks: no pickling).
    res = build(opts_for(bad_hub, tmp_path, workers=2, bbox_format="xywh", max_bad_fraction=1.0),
                process_row=process_row)
    assert res.drops["processing_error"] == 1 and res.samples == 7
    assert any("boom in an odd codec" in r.getMessage() for r in caplog.records)


def write_coco(root: Path) -> Path:
    """A COCO folder with a missing file, a dangling annotation, a duplicate id, boxes without coordinates."""
    imgs = root / "train2017"
    imgs.mkdir(parents=True)
    for name, seed in (("a.jpg", 1), ("c.jpg", 3), ("d.jpg", 4), ("e.jpg", 5), ("f.jpg", 6)):
        (imgs / name).write_bytes(jpeg(64, 48, seed=seed))
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "missing.jpg", "width": 64, "height": 48},  # missing_image
        {"id": 3, "file_name": "c.jpg", "width": 64, "height": 48},
        {"id": 1, "file_name": "d.jpg", "width": 64, "height": 48},  # duplicate_image_id
        {"id": 4, "file_name": "e.jpg", "height": 48},  # no width: size_mismatch
        {"id": 5, "file_name": "f.jpg", "width": 64, "height": 48},
    ]
    box = [4.0, 4.0, 20.0, 20.0]
    anns = [
        {"id": 100, "image_id": 1, "category_id": 1, "bbox": box, "iscrowd": 0},
        {"id": 101, "image_id": 2, "category_id": 1, "bbox": box, "iscrowd": 0},
        {"id": 103, "image_id": 3, "category_id": 2, "bbox": box, "iscrowd": 0},
        {"id": 104, "image_id": 4, "category_id": 1, "bbox": box, "iscrowd": 0},
        {"id": 105, "image_id": 5, "category_id": 1, "bbox": None, "iscrowd": 0},  # non_finite
        {"id": 106, "image_id": 5, "category_id": 1, "bbox": [1, 2, 3], "iscrowd": 0},  # non_finite
        {"id": 107, "image_id": 5, "category_id": 1, "bbox": box, "iscrowd": 0},
        {"id": 108, "image_id": 777, "category_id": 1, "bbox": box, "iscrowd": 0},  # dangling
    ]
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(COCO_CLASSES)]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def test_coco_folder_faults_are_counted_in_the_manifest(tmp_path):
    coco = write_coco(tmp_path / "coco")
    opts = BuildOptions(source=f"coco:{coco}", split="train2017", out=str(tmp_path / "out"), workers=0,
                        device="cpu", rows_per_shard=SPP, max_bad_fraction=1.0,
                        transform=TransformConfig(image_size=(SIZE, SIZE)))
    res = build(opts)
    m = read_manifest(res.out_dir)
    assert m["drops"]["images"] == {"duplicate_image_id": 1, "missing_image": 1, "size_mismatch": 1}
    assert m["drops"]["boxes"] == {"non_finite": 2}  # an unknown category_id is an error (test_coco_file.py)
    assert m["drops"]["annotations"] == {"dangling": 1}
    assert m["source_stats"]["dangling_annotations"] == 1
    assert all_keys(res.out_dir) == ["000000000001", "000000000003", "000000000005"]
    assert check_shards(res.out_dir, workers=0).ok


# ------------------------------------------------------------------------------ hostile shards


class _Boom:
    """Unpickling this would create the directory ``path``: proof that nothing was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def add_member(tar: tarfile.TarFile, name: str, data: bytes, size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def hostile_copy(ref: Path, dst: Path, kind: str, sentinel: Path) -> Path:
    """A copy of the reference shards whose first shard starts with one hostile sample."""
    shutil.copytree(ref, dst)
    first = dst / read_manifest(dst)["shards"][0]["name"]
    samples = list(iter_shard(first))
    key = samples[0][0]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (k, members) in enumerate(samples):
            for ext, data in members.items():
                if i == 0 and kind == "bomb" and ext == "jpg":
                    add_member(tar, f"{k}.png", png_header_only(9000, 9000))
                    continue
                add_member(tar, f"{k}.{ext}", data)
            if i == 0 and kind == "pickle":
                add_member(tar, f"{k}.pyd", pickle.dumps(_Boom(str(sentinel))))
            if i == 0 and kind == "traversal":
                add_member(tar, f"../{sentinel.name}", b"{}")
    raw = buf.getvalue()
    if kind == "huge":
        # A header that declares 1 GiB followed by 512 bytes of data and the end of the archive.
        info = tarfile.TarInfo(f"{key}.json")
        info.size = 1 << 30
        raw = info.tobuf(tarfile.USTAR_FORMAT) + b"\0" * 512 + raw
    first.write_bytes(raw)
    # The manifest agrees with the hostile bytes, so check meets them: it never reads a shard larger than its entry.
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    manifest["shards"][0].update(bytes=len(raw), sha256=file_sha256(first))
    manifest["totals"]["bytes"] = sum(e["bytes"] for e in manifest["shards"])
    (dst / MANIFEST_NAME).write_text(json.dumps(manifest))
    return dst


HOSTILE = {  # kind -> what the refusal must say (for the bomb: its size, read from the header alone)
    "pickle": r"pickle-type member.*never unpickles",
    "traversal": r"path traversal refused",
    "huge": r"declares 1073741824 bytes",
    "bomb": r"9000x9000",
}
CHECK_RULE = {"pickle": "member_name", "traversal": "member_name", "huge": "tar_unreadable", "bomb": "image_size"}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_shards_fail_safely_in_check_and_shard_reading(ref, tmp_path, kind, monkeypatch):
    sentinel = tmp_path / "pwned"
    d = hostile_copy(ref, tmp_path / "shards", kind, sentinel)
    monkeypatch.chdir(d)  # a reader that used member names as paths would write here
    before = sorted(p.name for p in tmp_path.rglob("*"))
    report = check_shards(d, workers=0)
    assert not report.ok
    assert CHECK_RULE[kind] in {p.rule for p in report.problems if p.shard == "train-000000.tar"}, report.problems
    with pytest.raises(ShardFormatError, match=HOSTILE[kind]) if kind != "bomb" else _no_raise():
        for _ in iter_shard(d / "train-000000.tar"):
            pass
    r = CliRunner().invoke(main, ["check", str(d)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert not sentinel.exists() and sorted(p.name for p in tmp_path.rglob("*")) == before


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_shards_fail_safely_in_the_loader(ref, tmp_path, kind, monkeypatch):
    from frcnn_shard.loader import make_loader

    sentinel = tmp_path / "pwned"
    d = hostile_copy(ref, tmp_path / "shards", kind, sentinel)
    monkeypatch.chdir(d)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    loader = make_loader(d, batch_size=2, shuffle=False, num_workers=0)
    with pytest.raises(ShardFormatError, match=HOSTILE[kind]):
        for _ in loader:
            pass
    assert not sentinel.exists() and sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_shards_fail_safely_in_show(ref, tmp_path, kind, monkeypatch):
    pytest.importorskip("matplotlib")
    sentinel = tmp_path / "pwned"
    d = hostile_copy(ref, tmp_path / "shards", kind, sentinel)
    monkeypatch.chdir(d)
    out = tmp_path / "show.png"
    r = CliRunner().invoke(main, ["show", str(d), "--index", "0", "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert re.search(HOSTILE[kind], r.output), r.output
    assert not sentinel.exists() and not out.exists()


# ------------------------------------------------------------------------------ CLI refusals


@pytest.mark.parametrize("args,message", [
    (["--rows-per-shard", "0"], "--rows-per-shard must be >= 1"),
    (["--rows-per-shard", "-5"], "--rows-per-shard must be >= 1"),
    (["--max-rows", "0"], "--max-rows must be >= 1"),
    (["--part", "3/2"], "--part: must be I/N with 0 <= I < N"),
    (["--part", "x"], "--part: must be I/N"),
    (["--storage-options", "[1]"], "--storage-options: must be a JSON object"),
    (["--out", "nosuch://bucket/c"], "no storage here understands nosuch://"),
    (["--workers", "-1"], "workers"),
    (["--image-size", "-5"], "image size"),
    (["--image-size", "0"], "image size"),
    (["--image-size", "400x"], "image size"),
    (["--min-box-size", "-1"], "--min-box-size must be"),
    (["--max-bad-fraction", "1.5"], "max-bad-fraction"),
    (["--max-bad-fraction", "nan"], "max-bad-fraction"),
    (["--retries", "-1"], "retries"),
    (["--retry-backoff", "-1"], "retry-backoff"),
    (["--gpu-batch", "0"], "--gpu-batch must be >= 1"),
    (["--quality", "0"], "quality"),
    (["--anchor-preset", "yolo"], "'yolo' is not one of 'frcnn-fpn'"),
    (["--anchor-sizes", "32,abc"], "anchor-sizes"),
    (["--pos-iou", "0.2", "--neg-iou", "0.5"], "--neg-iou <= --pos-iou"),
])
def test_cli_refuses_nonsense_before_any_work(hub, tmp_path, args, message):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["build", "--source", str(hub), "--split", "train", "--out", str(out), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not out.exists()


def test_cli_refuses_an_output_path_that_is_a_file(hub, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    for out in (f, f / "sub"):
        r = CliRunner().invoke(main, ["build", "--source", str(hub), "--split", "train", "--out", str(out)])
        assert r.exit_code == 2 and "not a directory" in r.output, r.output
    assert f.read_text() == "x"


def test_cli_refuses_device_cuda_without_cuda_before_creating_anything(hub, ref, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here: --device cuda is valid")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["build", "--source", str(hub), "--split", "train", "--out", str(out),
                                  "--device", "cuda"])
    assert r.exit_code == 2, r.output
    assert "--device is cuda, but torch" in r.output and "sees no CUDA device" in r.output
    assert not out.exists()
    # Into a folder holding a finished build: refused the same way, and nothing in it touched.
    before = {p: p.read_bytes() for p in ref.rglob("*") if p.is_file()}
    r = CliRunner().invoke(main, ["build", "--source", str(hub), "--split", "train", "--out", str(ref.parent),
                                  "--device", "cuda", "--overwrite"])
    assert r.exit_code == 2 and "sees no CUDA device" in r.output, r.output
    assert {p: p.read_bytes() for p in ref.rglob("*") if p.is_file()} == before


def test_validating_device_auto_or_cpu_does_not_import_torch(tmp_path):
    code = ("import sys; from frcnn_shard.build import BuildOptions, validate_options; "
            f"[validate_options(BuildOptions(source='x', split='train', out={str(tmp_path / 'o')!r}, device=d)) "
            "for d in ('auto', 'cpu')]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "False"


def test_cli_refuses_an_unknown_split_without_creating_anything(hub, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["build", "--source", str(hub), "--split", "test", "--out", str(out),
                                  "--workers", "0"])
    assert r.exit_code == 1 and "unknown split 'test'" in r.output and "train" in r.output
    assert not out.exists()


def test_the_spool_file_of_a_killed_upload_is_removed_by_the_next_process(tmp_path):
    """A process killed while it spools a shard for object storage leaves its spool file; the next process
    that spools on this host removes it, and leaves those of running processes and of other hosts alone."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    spool = "from frcnn_shard.storage import open_store; up = open_store('memory://spool-test/x').open_upload('a.tar'); "
    killed = subprocess.run([sys.executable, "-c", spool + "up.write(b'x' * 4096); import os, signal; "
                             "os.kill(os.getpid(), signal.SIGKILL)"], env=env)
    assert killed.returncode == -signal.SIGKILL
    left = sorted(p.name for p in tmp_path.glob("frcnn-shard_*.part"))
    assert len(left) == 1  # the killed process's spool, named for this host and its pid
    _, host, dead_pid, _ = left[0].split("_", 3)
    others = [f"frcnn-shard_{host}_{os.getpid()}_live.part",  # a running process of this host: still spooling
              f"frcnn-shard_other-host_{dead_pid}_x.part"]  # another host sharing the folder: its pids mean nothing here
    for name in others:
        (tmp_path / name).write_bytes(b"y")
    out = subprocess.run([sys.executable, "-c", spool + "up.write(b'z'); up.publish(); import glob, os; "
                          "print(sorted(os.path.basename(p) for p in glob.glob(os.environ['TMPDIR'] + '/*.part')))"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert ast.literal_eval(out) == sorted(others)  # the killed one removed; the new one uploaded and removed
