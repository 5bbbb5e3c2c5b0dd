"""The local cache of remote shards (issue 24), against a real S3 server on loopback (SeaweedFS, started here):
later epochs read the cache; every cached shard is checked against the manifest's sha256 before use, a
damaged, foreign or non-regular file is fetched again; the limit evicts the least recently used; workers and
ranks share it; with the server stopped (SIGSTOP), cached shards still serve."""
from __future__ import annotations

import hashlib
import os
import signal
import threading

import pytest

from conftest import running_s3
from frcnn_shard import make_loader
from frcnn_shard.format.members import ShardFormatError
from frcnn_shard.loader import LoaderError
from frcnn_shard.storage.manifest_io import read_manifest
from frcnn_shard.storage.location import store_of

s3server = pytest.importorskip("s3server")  # tests/s3server.py
BUCKET = "frcnn-cache"
FAST_FAIL = {"config_kwargs": {"connect_timeout": 2, "read_timeout": 3}}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server of this module's own, with its bucket (conftest.running_s3)."""
    with running_s3(tmp_path_factory, BUCKET) as srv:
        yield srv


@pytest.fixture(scope="module")
def remote(s3, tiny_shards) -> str:
    url = f"s3://{BUCKET}/tiny/train2017"
    fs = s3.filesystem()
    for p in sorted(tiny_shards.iterdir()):
        if p.is_file():
            fs.put(str(p), f"{url}/{p.name}")
    return url


def keys(loader, epoch: int) -> list[tuple]:
    loader.set_epoch(epoch)
    return [(t["key"], t["flipped"], int(t["anchor_labels"].sum())) for _, ts in loader for t in ts]


def cached_files(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def test_later_epochs_read_the_cache_even_with_the_server_stopped(s3, remote, tiny_shards, tmp_path):
    local = make_loader(tiny_shards, 4, num_workers=0, hflip=0.5)
    loader = make_loader(remote, 4, num_workers=0, hflip=0.5, cache_dir=tmp_path, storage_options=FAST_FAIL)
    assert keys(loader, 0) == keys(local, 0)
    files = cached_files(tmp_path)
    man = read_manifest(store_of(tiny_shards))
    assert files == {f"{s.sha256}.tar": s.sha256 for s in man.shards}
    loader.set_epoch(1)
    it = iter(loader)
    got = [(t["key"], t["flipped"], int(t["anchor_labels"].sum())) for t in next(it)[1]]
    os.kill(s3.proc.pid, signal.SIGSTOP)  # the store hangs: any request would time out, then fail
    try:
        got += [(t["key"], t["flipped"], int(t["anchor_labels"].sum())) for _, ts in it for t in ts]
    finally:
        os.kill(s3.proc.pid, signal.SIGCONT)
    assert got == keys(local, 1) and loader.skipped == 0


def test_a_damaged_foreign_or_non_regular_cached_file_is_fetched_again(remote, tiny_shards, tmp_path):
    local = make_loader(tiny_shards, 4, num_workers=0)
    loader = make_loader(remote, 4, num_workers=0, cache_dir=tmp_path)
    want = keys(local, 0)
    assert keys(loader, 0) == want
    good = cached_files(tmp_path)
    names = sorted(good)
    damaged = bytearray((tmp_path / names[0]).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size, one byte off
    (tmp_path / names[0]).write_bytes(bytes(damaged))
    (tmp_path / names[1]).write_bytes(os.urandom((tmp_path / names[1]).stat().st_size))  # foreign bytes
    (tmp_path / names[2]).unlink()
    (tmp_path / names[2]).symlink_to(tiny_shards / "manifest.json")  # not the shard, not a regular file
    (tmp_path / names[3]).write_bytes(b"")  # truncated to nothing
    assert keys(loader, 0) == want
    assert cached_files(tmp_path) == good and not any(p.is_symlink() for p in tmp_path.iterdir())


def test_the_limit_evicts_the_least_recently_used(remote, tiny_shards, tmp_path):
    man = read_manifest(store_of(tiny_shards))
    sizes = sorted(s.bytes for s in man.shards)
    limit = sizes[-1] + sizes[-2]  # room for two shards, whichever
    loader = make_loader(remote, 4, num_workers=0, shuffle=False, cache_dir=tmp_path, cache_limit=limit)
    keys(loader, 0)
    kept = cached_files(tmp_path)
    assert sum((tmp_path / n).stat().st_size for n in kept) <= limit
    recent, total = set(), 0
    for s in reversed(man.shards):  # read in manifest order: the most recent that fit are kept
        if total + s.bytes > limit:
            break
        recent.add(f"{s.sha256}.tar")
        total += s.bytes
    assert set(kept) == recent and 2 <= len(recent) < len(man.shards)
    too_small = make_loader(remote, 4, num_workers=0, cache_dir=tmp_path / "small", cache_limit=1)
    assert len(keys(too_small, 0)) == man.samples  # a shard over the limit is read from the store, not kept
    assert not (tmp_path / "small").exists() or not list((tmp_path / "small").iterdir())


def test_ranks_and_workers_share_one_cache(remote, tiny_shards, tmp_path):
    want = sorted(keys(make_loader(tiny_shards, 4, num_workers=0), 0))
    out: dict[int, list] = {}

    def rank(r: int) -> None:
        out[r] = keys(make_loader(remote, 4, num_workers=2, rank=r, world_size=2, cache_dir=tmp_path), 0)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(out[0] + out[1]) == want
    names = sorted(os.listdir(tmp_path))
    assert all(n.endswith(".tar") and len(n) == 68 for n in names) and len(names) == 4  # no temp file left


def test_a_store_whose_bytes_are_not_the_manifests_is_refused(remote, tiny_shards, tmp_path):
    man = dict(read_manifest(store_of(tiny_shards)))
    man["shards"] = [dict(s) for s in man["shards"]]
    man["shards"][0]["sha256"] = "0" * 64
    urls = [f"{remote}/{s['name']}" for s in man["shards"]]
    loader = make_loader(urls, 4, num_workers=0, shuffle=False, manifest=man, cache_dir=tmp_path)
    with pytest.raises(ShardFormatError, match="not the manifest's"):
        keys(loader, 0)
    assert not (tmp_path / f"{'0' * 64}.tar").exists()


def test_cache_options_are_checked(tiny_shards, tmp_path):
    with pytest.raises(LoaderError, match="cache_limit needs cache_dir"):
        make_loader(tiny_shards, 4, cache_limit=10)
    with pytest.raises(LoaderError, match="cache_limit must be"):
        make_loader(tiny_shards, 4, cache_dir=tmp_path, cache_limit=-1)
