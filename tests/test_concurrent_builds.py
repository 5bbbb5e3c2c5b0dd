"""Builds that meet in one split folder: at once (whatever their part counts), one after another with
another part count (the published shards are kept), and the bookkeeping they leave (part records, locks)
when it is malformed, cut by a full disk, or does not match the shards."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from frcnn_shard.build import (
    BuildError, BuildOptions, LockedError, MergeError, PartRecordError, build, merge_split,
)
from frcnn_shard.cli import main
from frcnn_shard.shards import FAULT_ENV, MANIFEST_NAME, read_manifest
from frcnn_shard.sources.fixtures import make_sample_hub_folder
from frcnn_shard.transform import TransformConfig
from test_parts import opts as parts_opts

RPS = 4  # 16 rows -> 4 shards; part 0 of 2 builds shards 0 and 1
RACE_ROUNDS = 5


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    return make_sample_hub_folder(tmp_path_factory.mktemp("race_hub"), n_train=16, n_val=2, seed=11)


def opts(hub: Path, out: Path | str, **kw) -> BuildOptions:
    kw.setdefault("rows_per_shard", RPS)
    return parts_opts(hub, out, **kw)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, hub) -> Path:
    return build(opts(hub, tmp_path_factory.mktemp("race_ref"))).out_dir


def same_as_ref(split: Path, ref: Path) -> None:
    ma, mb = read_manifest(split), read_manifest(ref)
    assert {k: v for k, v in ma.items() if k != "run"} == {k: v for k, v in mb.items() if k != "run"}
    for s in mb["shards"]:
        assert (split / s["name"]).read_bytes() == (ref / s["name"]).read_bytes(), s["name"]


def _child(o: BuildOptions, go, fault: str | None) -> None:
    """A build in a forked process: exit 0 built, 3 refused by a lock, 4 another BuildError, 5 anything else."""
    if fault:
        os.environ[FAULT_ENV] = fault
    go.wait(30)
    try:
        build(o)
    except LockedError:
        os._exit(3)
    except BuildError:
        os._exit(4)
    except BaseException:  # noqa: BLE001 - the parent reports the code
        os._exit(5)
    os._exit(0)


def race(*builds: BuildOptions, fault: str | None = "worker_row:0:sleep=1.5") -> list[int]:
    """Start the builds at the same moment, each in its own process; their exit codes. Each sleeps at its
    first row (``fault``), after taking its lock: their runs overlap however fast each one starts."""
    ctx = mp.get_context("fork")
    go = ctx.Event()
    procs = [ctx.Process(target=_child, args=(o, go, fault)) for o in builds]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
    return [p.exitcode for p in procs]


def test_a_whole_build_and_a_part_build_at_once_exclude_each_other(hub, ref, tmp_path):
    """The two write the same shard names under different lock files: one backs off, none tears a shard,
    and the split can always be finished without --overwrite."""
    for i in range(RACE_ROUNDS):
        out = tmp_path / f"r{i}"
        codes = race(opts(hub, out), opts(hub, out, part=(0, 2)))
        assert 3 in codes and set(codes) <= {0, 3}, codes  # at least one refused by the other's lock
        split = out / "train"
        assert not list((split / "_parts").glob("*.lock"))
        res = build(opts(hub, out))  # finishes what the winner left, keeping its shards
        assert res.status in ("built", "resumed", "already complete")
        same_as_ref(split, ref)


def test_parts_of_different_counts_whose_shards_do_not_overlap_both_run(hub, ref, tmp_path):
    codes = race(opts(hub, tmp_path, part=(0, 2)), opts(hub, tmp_path, part=(3, 4)))  # shards 0-1 and 3
    assert codes == [0, 0]
    build(opts(hub, tmp_path))
    same_as_ref(tmp_path / "train", ref)


def test_a_resume_with_another_part_count_keeps_the_published_shards(hub, ref, tmp_path):
    build(opts(hub, tmp_path, part=(0, 2)))  # shards 0, 1
    build(opts(hub, tmp_path, part=(3, 4)))  # shard 3
    split = tmp_path / "train"
    kept = {n: (split / n).stat().st_ino for n in ("train-000000.tar", "train-000001.tar", "train-000003.tar")}
    res = build(opts(hub, tmp_path))  # re-cut: one part
    assert res.status == "resumed" and res.resumed_shards == 3 and res.rows_read == RPS  # only shard 2 was read
    assert {n: (split / n).stat().st_ino for n in kept} == kept  # not rewritten
    assert sorted(p.name for p in (split / "_parts").iterdir()) == ["part-000000-of-000001.json"]
    same_as_ref(split, ref)


def test_a_job_array_re_cut_merges_each_shard_once(hub, ref, tmp_path):
    build(opts(hub, tmp_path, part=(1, 2)))  # shards 2, 3 by a 2-way split
    for i in (2, 0, 1):  # then a 3-way split: shards 0 | 1 | 2-3
        build(opts(hub, tmp_path, part=(i, 3)))
    split = tmp_path / "train"
    assert sorted(p.name for p in (split / "_parts").glob("*.json")) == [
        f"part-00000{i}-of-000003.json" for i in range(3)]
    merge_split(split)
    same_as_ref(split, ref)


def test_merge_refuses_a_shard_whose_bytes_differ_from_its_record(hub, tmp_path):
    build(opts(hub, tmp_path, part=(0, 2)))
    build(opts(hub, tmp_path, part=(1, 2)))
    split = tmp_path / "train"
    rec_path = split / "_parts" / "part-000001-of-000002.json"
    rec = json.loads(rec_path.read_text())
    rec["shards"][0]["sha256"] = "0" * 64
    rec_path.write_text(json.dumps(rec))
    with pytest.raises(MergeError, match=r"train-000002\.tar has sha256 .* its record says 0000"):
        merge_split(split)
    assert not (split / MANIFEST_NAME).exists()
    rec["shards"][0]["bytes"] += 512
    rec_path.write_text(json.dumps(rec))
    r = CliRunner().invoke(main, ["merge", str(split)])
    assert r.exit_code == 1 and "train-000002.tar has" in r.output and "bytes, its record says" in r.output


MALFORMED = [
    ({}, "part: missing"),
    ([], "must be a JSON object"),
    ("drop header", "header: missing"),
    ("shards as a string", "shards: must be a list"),
    ("foreign name", "is not a shard name of split"),
    ("outside the range", "outside shard_range"),
    ("deep", "nested deeper"),
]


def _malformed(rec: dict, how) -> object:
    if not isinstance(how, str):
        return how
    if how == "drop header":
        return {k: v for k, v in rec.items() if k != "header"}
    if how == "shards as a string":
        return {**rec, "shards": "many"}
    if how == "foreign name":
        return {**rec, "shards": [{**rec["shards"][0], "name": "../../etc/x.tar"}]}
    if how == "outside the range":
        return {**rec, "shards": [{**rec["shards"][0], "index": 0, "name": "train-000000.tar"}]}
    return "[" * 100_000 + "]" * 100_000  # written as it is: json cannot even encode it


def _write_malformed(path: Path, how) -> None:
    bad = _malformed(json.loads(path.read_text()), how)
    path.write_text(bad if how == "deep" else json.dumps(bad))


@pytest.mark.parametrize("how,rule", MALFORMED, ids=[m[1] for m in MALFORMED])
def test_a_malformed_part_record_is_named_never_a_traceback(hub, tmp_path, how, rule):
    build(opts(hub, tmp_path, part=(0, 2)))
    build(opts(hub, tmp_path, part=(1, 2)))
    split = tmp_path / "train"
    rec_path = split / "_parts" / "part-000001-of-000002.json"
    _write_malformed(rec_path, how)
    r = CliRunner().invoke(main, ["merge", str(split)])
    assert r.exit_code == 2 and str(rec_path) in r.output and rule in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    with pytest.raises(PartRecordError, match=rule):  # a BuildError: the build command exits 1 with it
        build(opts(hub, tmp_path, part=(1, 2)))
    with pytest.raises(PartRecordError, match=str(rec_path)):
        build(opts(hub, tmp_path))


def test_disk_full_while_taking_the_lock_leaves_no_lock(hub, ref, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "lock_write:0:enospc")
    lock = tmp_path / "train" / "_parts" / "part-000000-of-000001.lock"
    with pytest.raises(BuildError, match=rf"{lock}: could not write the lock: .*No space left.*run the same command"):
        build(opts(hub, tmp_path))
    assert not list(lock.parent.iterdir())  # neither the lock nor its temporary file
    monkeypatch.delenv(FAULT_ENV)
    build(opts(hub, tmp_path))
    same_as_ref(tmp_path / "train", ref)


@pytest.mark.parametrize("content", [b"", b"{\"host\": \"x\"", b"[1, 2]"])
def test_a_lock_that_does_not_parse_is_named_with_how_to_clear_it(hub, tmp_path, content):
    parts = tmp_path / "train" / "_parts"
    parts.mkdir(parents=True)
    (parts / "part-000000-of-000001.lock").write_bytes(content)
    r = CliRunner().invoke(main, ["build", "--source", str(hub), "--split", "train", "--out", str(tmp_path),
                                  "--workers", "0", "--device", "cpu", "--rows-per-shard", str(RPS),
                                  "--image-size", "96"])
    assert r.exit_code == 1 and "pid ?" not in r.output, r.output
    assert "not a lock this tool writes" in r.output and "delete" in r.output
    assert "part-000000-of-000001.lock" in r.output


def test_a_live_lock_of_another_count_on_another_host_blocks_an_overlapping_part(hub, tmp_path):
    parts = tmp_path / "train" / "_parts"
    parts.mkdir(parents=True)
    (parts / "part-000001-of-000002.lock").write_text(json.dumps(
        {"host": "elsewhere", "pid": 4242, "since": "then", "part": [1, 2], "shards": [2, 4]}))
    with pytest.raises(LockedError, match="held by pid 4242 on elsewhere"):
        build(opts(hub, tmp_path))
    assert sorted(p.name for p in parts.iterdir()) == ["part-000001-of-000002.lock"]  # nothing written
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    (parts / "part-000001-of-000002.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead, "since": "then", "part": [1, 2], "shards": [2, 4]}))
    assert build(opts(hub, tmp_path)).status == "built"  # a dead process's lock of another count: stale


def test_disk_full_in_the_merge_names_the_file_and_how_to_resume(hub, ref, tmp_path, monkeypatch):
    build(opts(hub, tmp_path, part=(0, 1)))
    split = tmp_path / "train"
    for n, name in ((0, "drops.jsonl"), (1, MANIFEST_NAME)):
        monkeypatch.setenv(FAULT_ENV, f"merge_write:{n}:enospc")
        r = CliRunner().invoke(main, ["merge", str(split)])
        assert r.exit_code == 1 and f"{split / name}: could not write it" in r.output, r.output
        assert "No space left on device" in r.output and f"frcnn-shard merge {split}" in r.output
        assert not (split / MANIFEST_NAME).exists() and not list(split.glob("*.partial"))
    monkeypatch.delenv(FAULT_ENV)
    merge_split(split)
    same_as_ref(split, ref)


def test_a_build_whose_every_row_drops_says_the_split_holds_no_samples(tmp_path):
    from frcnn_shard.sources.fixtures import sample_rows, write_hub_folder

    rows = list(sample_rows(6, seed=2))
    for r in rows:
        r["image"] = None  # every image missing
    src = write_hub_folder(tmp_path / "hub", {"train": rows})
    with pytest.raises(BuildError, match=r"holds no samples: all 6 rows were dropped, by reason: "
                                         r"\{'missing_image': 6\}"):
        build(opts(src, tmp_path / "out", max_bad_fraction=1.0, bbox_format="xywh"))


def test_the_same_split_under_another_name_or_a_trailing_slash_is_one_build(hub, tmp_path):
    from frcnn_shard.sources.fixtures import make_sample_hub_folder

    src = make_sample_hub_folder(tmp_path / "vhub", n_train=2, n_val=8, seed=4)
    first = build(BuildOptions(source=str(src), split="val", out=str(tmp_path / "o"), workers=0, device="cpu",
                               rows_per_shard=RPS, transform=TransformConfig(image_size=(96, 96))))
    for source, split in ((str(src), "validation"), (str(src) + "/", "val")):
        again = build(BuildOptions(source=source, split=split, out=str(tmp_path / "o"), workers=0, device="cpu",
                                   rows_per_shard=RPS, transform=TransformConfig(image_size=(96, 96))))
        assert again.status == "already complete" and again.out_dir == first.out_dir
        assert again.rows_read == 0
    r = CliRunner().invoke(main, ["build", "--source", str(src) + "/", "--split", "validation", "--out",
                                  str(tmp_path / "o"), "--workers", "0", "--device", "cpu", "--rows-per-shard",
                                  str(RPS), "--image-size", "96"])
    assert r.exit_code == 0 and "0 rows read, 0.0 rows/s" in r.output, r.output


def test_a_merge_holds_the_whole_build_lock_so_two_merges_never_run_at_once(hub, ref, tmp_path):
    """A merge takes the lock of part 0 of 1 (every shard): a live holder (another merge, a whole build) makes it
    stop before writing anything; a dead process's lock on this host is stale and taken over; the lock is
    released when the merge ends."""
    build(opts(hub, tmp_path, part=(0, 1)))  # a part: no merge yet
    split = tmp_path / "train"
    lock = split / "_parts" / "part-000000-of-000001.lock"
    live = mp.get_context("fork").Process(target=_sleep)
    live.start()
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid, "since": "then",
                                    "part": [0, 1], "shards": [0, 1 << 31]}))
        r = CliRunner().invoke(main, ["merge", str(split)])
        assert r.exit_code == 1 and f"held by pid {live.pid}" in r.output, r.output
        assert not (split / MANIFEST_NAME).exists() and not (split / "drops.jsonl").exists()
    finally:
        live.kill()
        live.join()
    assert merge_split(split).status == "merged"  # the holder is gone: its lock is stale
    assert not lock.exists() and read_manifest(split)["complete"] is True


def _sleep() -> None:
    import time

    time.sleep(60)
