"""A build in parts (`--part I/N`, then `merge`): byte-identical to one machine, whatever N and order;
merge refuses what is missing, unfinished or inconsistent; every part reads only its own rows."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

from frcnn_shard.build import BuildError, BuildOptions, LockedError, MergeError, build, merge_split
from frcnn_shard.cli import main
from frcnn_shard.build import parse_part
from frcnn_shard.format.layout import Layout
from frcnn_shard.shards import FAULT_ENV, MANIFEST_NAME, read_manifest
from frcnn_shard.sources.fixtures import make_sample_hub_folder
from frcnn_shard.transform import TransformConfig

RPS = 3  # rows per shard: 20 rows -> 7 shards, the last one short


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    return make_sample_hub_folder(tmp_path_factory.mktemp("parts_hub"), n_train=20, n_val=2, seed=5)


def opts(hub: Path, out: Path, **kw) -> BuildOptions:
    kw.setdefault("workers", 0)
    kw.setdefault("device", "cpu")
    kw.setdefault("rows_per_shard", RPS)
    kw.setdefault("transform", TransformConfig(image_size=(96, 96)))
    return BuildOptions(source=str(hub), split="train", out=str(out), **kw)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, hub) -> Path:
    """The one-machine build every split build must equal."""
    return build(opts(hub, tmp_path_factory.mktemp("whole"), workers=2)).out_dir


def same_output(a: Path, b: Path) -> None:
    """Identical shards, drops.jsonl and manifest, apart from the record of how the build was run."""
    ma, mb = read_manifest(a), read_manifest(b)
    assert {k: v for k, v in ma.items() if k != "run"} == {k: v for k, v in mb.items() if k != "run"}
    for s in ma["shards"]:
        assert (a / s["name"]).read_bytes() == (b / s["name"]).read_bytes(), s["name"]
    assert (a / "drops.jsonl").read_bytes() == (b / "drops.jsonl").read_bytes()


def test_layout_rows_and_part_ranges():
    lay = Layout(rows=20, rows_per_shard=3)
    assert lay.shards == 7 and lay.shard_rows(6) == (18, 20) and lay.shard_of(17) == 5
    for n in (1, 2, 3, 7, 9):  # every shard in exactly one part, contiguous, in order
        got = [i for p in range(n) for i in lay.part_shards(p, n)]
        assert got == list(range(7))
    assert Layout(0, 3).shards == 0


@pytest.mark.parametrize("n,order", [(2, [1, 0]), (3, [2, 0, 1]), (9, [8, 3, 0, 1, 2, 4, 5, 6, 7])])
def test_parts_in_any_order_then_merge_equal_one_machine(hub, whole, tmp_path, n, order):
    for i in order:
        res = build(opts(hub, tmp_path, part=(i, n)))
        assert res.part == (i, n) and res.status == "built"
        assert not (tmp_path / "train" / MANIFEST_NAME).exists()  # only merge writes it
    res = merge_split(tmp_path / "train")
    assert res.status == "merged" and res.samples == read_manifest(whole)["totals"]["samples"]
    same_output(tmp_path / "train", whole)
    assert read_manifest(tmp_path / "train")["run"]["parts"] == n


def test_merge_names_the_missing_and_the_unfinished_part(hub, tmp_path):
    build(opts(hub, tmp_path, part=(0, 3)))
    build(opts(hub, tmp_path, part=(2, 3)))
    with pytest.raises(MergeError, match=r"part\(s\) 1 of 3 have not run"):
        merge_split(tmp_path / "train")
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "train")])
    assert r.exit_code == 1 and "part(s) 1 of 3 have not run" in r.output
    # Part 1 killed after its first shard: recorded, not complete.
    pid = os.fork()
    if pid == 0:
        os.environ[FAULT_ENV] = "shard_done:2"
        try:
            build(opts(hub, tmp_path, part=(1, 3)))
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    with pytest.raises(MergeError, match=r"part 1 of 3 is not finished \(1 of 2 shards\)"):
        merge_split(tmp_path / "train")
    assert build(opts(hub, tmp_path, part=(1, 3))).status == "resumed"
    assert build(opts(hub, tmp_path, part=(1, 3))).status == "already complete"  # running a part twice: no harm
    merge_split(tmp_path / "train")


def test_merge_refuses_parts_built_with_other_options(hub, whole, tmp_path):
    build(opts(hub, tmp_path, part=(0, 2)))
    build(opts(hub, tmp_path, part=(1, 2), transform=TransformConfig(image_size=(96, 96), quality=80)))
    with pytest.raises(MergeError, match="part 1 of 2 differs from part 0 in options"):
        merge_split(tmp_path / "train")
    # Rebuilding that part with the right options (it must overwrite its own record) mends it.
    with pytest.raises(BuildError, match="different options"):
        build(opts(hub, tmp_path, part=(1, 2)))
    build(opts(hub, tmp_path, part=(1, 2), overwrite=True))
    merge_split(tmp_path / "train")
    same_output(tmp_path / "train", whole)


def test_a_split_built_another_way_is_taken_over(hub, whole, tmp_path):
    """The shards of a build split another way are kept (their bytes do not depend on the split)."""
    build(opts(hub, tmp_path, part=(0, 2)))  # shards 0..2 of 7
    res = build(opts(hub, tmp_path, part=(0, 3)))  # shards 0..1: both taken over, nothing to build
    assert res.status == "already complete" and res.resumed_shards == 2 and res.rows_read == 0
    left = json.loads((tmp_path / "train" / "_parts" / "part-000000-of-000002.json").read_text())
    assert [s["index"] for s in left["shards"]] == [2] and not left["complete"]  # listed once, by one record
    with pytest.raises(MergeError, match="ways are mixed"):
        merge_split(tmp_path / "train")
    res = build(opts(hub, tmp_path))
    assert res.status == "resumed" and res.resumed_shards == 3
    assert sorted(p.name for p in (tmp_path / "train" / "_parts").iterdir()) == ["part-000000-of-000001.json"]
    same_output(tmp_path / "train", whole)
    # Options that change the bytes still need the overwrite option.
    with pytest.raises(BuildError, match="different options"):
        build(opts(hub, tmp_path, part=(1, 2), transform=TransformConfig(image_size=(96, 96), quality=80)))


def test_each_part_reads_only_its_own_rows(hub, tmp_path):
    from frcnn_shard.sources import open_source as real

    asked: list[tuple[int, int | None]] = []

    def spying(*a, **k):
        src = real(*a, **k)
        rows = src.rows

        def spy(start=0, stop=None):
            asked.append((start, stop))
            return rows(start, stop)

        src.rows = spy
        return src

    build(opts(hub, tmp_path, part=(1, 3)), open_source=spying)  # shards 2..3 of 7: rows 6..11
    assert asked == [(6, 12)]


def test_hub_source_reads_only_the_files_of_a_range(tmp_path):
    from frcnn_shard.sources import open_source
    from frcnn_shard.sources.fixtures import sample_rows, write_hub_folder

    folder = write_hub_folder(tmp_path / "hub", {"train": sample_rows(12, seed=1)}, rows_per_file=4)
    src = open_source(str(folder), "train")
    every = [(r.index, r.image_id, r.image) for r in src.rows()]
    files = sorted((folder / "data").glob("train-*.parquet"))
    assert len(files) == 3 and src.num_rows == 12
    for f in (files[0], files[2]):
        f.unlink()  # only the middle file may be read for rows 4..7
    assert [(r.index, r.image_id, r.image) for r in src.rows(5, 8)] == every[5:8]


def test_part_from_the_environment():
    assert parse_part("3/16") == (3, 16)
    assert parse_part("auto", {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "8", "RANK": "1",
                               "WORLD_SIZE": "2"}) == (4, 8)
    assert parse_part("auto", {"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    for bad in ("auto", "2/2", "-1/4", "1", "a/b"):
        with pytest.raises(ValueError):
            parse_part(bad, {})


def test_cli_part_auto_and_merge(hub, whole, tmp_path, monkeypatch):
    base = ["build", "--source", str(hub), "--split", "train", "--out", str(tmp_path), "--workers", "0",
            "--device", "cpu", "--rows-per-shard", str(RPS), "--image-size", "96"]
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        r = CliRunner().invoke(main, base + ["--part", "auto"])
        assert r.exit_code == 0, r.output
        assert f"part {rank} of 2" in r.output and "frcnn-shard merge" in r.output
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "train")])
    assert r.exit_code == 0, r.output
    same_output(tmp_path / "train", whole)


def test_a_second_build_into_the_same_split_is_refused_and_the_first_finishes(hub, whole, tmp_path):
    """Two builds at once: the second refuses at once, naming the holder; the first finishes cleanly."""
    import multiprocessing as mp

    first = mp.get_context("fork").Process(
        target=lambda: (os.environ.__setitem__(FAULT_ENV, "shard_done:1:sleep=3"), build(opts(hub, tmp_path))))
    first.start()
    lock = tmp_path / "train" / "_parts" / "part-000000-of-000001.lock"
    for _ in range(200):
        if lock.exists():
            break
        first.join(0.05)
    holder = json.loads(lock.read_text())
    with pytest.raises(LockedError, match=rf"held by pid {holder['pid']} on {holder['host']}"):
        build(opts(hub, tmp_path))
    r = CliRunner().invoke(main, ["build", "--source", str(hub), "--split", "train", "--out", str(tmp_path),
                                  "--workers", "0", "--device", "cpu", "--rows-per-shard", str(RPS),
                                  "--image-size", "96"])
    assert r.exit_code == 1 and "another build is writing" in r.output
    first.join(60)
    assert first.exitcode == 0 and not lock.exists()
    same_output(tmp_path / "train", whole)


def test_a_stale_lock_of_a_dead_process_is_taken_over(hub, whole, tmp_path):
    import socket

    (tmp_path / "train" / "_parts").mkdir(parents=True)
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)  # a pid that no longer runs
    (tmp_path / "train" / "_parts" / "part-000000-of-000001.lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead, "since": "earlier"}))
    assert build(opts(hub, tmp_path)).status == "built"
    same_output(tmp_path / "train", whole)
