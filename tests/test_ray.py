"""The build on Ray (`--engine ray`), on a local cluster started here: byte-identical to one machine, a
killed worker's part retried, the GPU matching actor's code path run on the CPU."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import IN_CI

KILL_AT = 41  # fault point shard_done:41 sleeps: only the kill test builds that many shards


@pytest.fixture(scope="module")
def ray_cluster():
    try:
        import ray  # noqa: F401
    except ImportError as e:
        if IN_CI:
            pytest.fail(f"CI=true but ray is not installed ({e}); make install brings it")
        pytest.skip(f"ray is not installed: {e}")
    from frcnn_shard.build.ray_engine import init_ray

    os.environ["FRCNN_SHARD_FAULT"] = f"shard_done:{KILL_AT}:sleep=8"  # inherited by the cluster's workers
    try:
        ray = init_ray(num_cpus=2)
    finally:
        os.environ.pop("FRCNN_SHARD_FAULT")
    yield ray
    ray.shutdown()


def opts(tiny_coco: Path, out: Path, **kw):
    from frcnn_shard.build import BuildOptions

    kw.setdefault("workers", 0)
    kw.setdefault("device", "cpu")
    return BuildOptions(source=f"coco:{tiny_coco}", split="train2017", out=str(out), **kw)


def same_output(a: Path, b: Path) -> None:
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert {k: v for k, v in ma.items() if k != "run"} == {k: v for k, v in mb.items() if k != "run"}
    for s in ma["shards"]:
        assert (a / s["name"]).read_bytes() == (b / s["name"]).read_bytes(), s["name"]
    assert (a / "drops.jsonl").read_bytes() == (b / "drops.jsonl").read_bytes()


def test_ray_build_equals_one_machine(ray_cluster, tiny_coco, tmp_path):
    from frcnn_shard.build import build

    seen = []
    res = build(opts(tiny_coco, tmp_path / "ray", rows_per_shard=7, engine="ray"), progress=seen.append)
    local = build(opts(tiny_coco, tmp_path / "local", rows_per_shard=7, workers=2))
    same_output(res.out_dir, local.out_dir)
    run = json.loads((res.out_dir / "manifest.json").read_text())["run"]
    assert run["engine"] == "ray" and run["parts"] == 4 and len(run["part_runs"]) == 4
    assert seen and seen[-1]["rows_total"] == 50 and seen[-1]["shards_total"] == 8
    again = build(opts(tiny_coco, tmp_path / "ray", rows_per_shard=7, engine="ray"))
    assert again.status == "already complete"


def test_a_killed_worker_s_part_is_retried(ray_cluster, tiny_coco, tmp_path):
    from frcnn_shard.build import build

    out = tmp_path / "ray"
    lock = out / "train2017" / "_parts" / "part-000003-of-000004.lock"  # shards 37..49: the one that sleeps
    killed = {}

    def kill_when_asleep():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            rec = out / "train2017" / "_parts" / "part-000003-of-000004.json"
            if lock.exists() and rec.exists() and len(json.loads(rec.read_text())["shards"]) >= KILL_AT - 37 + 1:
                killed["pid"] = json.loads(lock.read_text())["pid"]
                os.kill(killed["pid"], signal.SIGKILL)
            time.sleep(0.1)

    t = threading.Thread(target=kill_when_asleep)
    t.start()
    res = build(opts(tiny_coco, out, rows_per_shard=1, engine="ray"))
    t.join()
    assert killed, "the sleeping part was never seen"
    local = build(opts(tiny_coco, tmp_path / "local", rows_per_shard=1, workers=2))
    same_output(res.out_dir, local.out_dir)
    runs = json.loads((res.out_dir / "manifest.json").read_text())["run"]["part_runs"]
    assert runs[3]["pid"] != killed["pid"]  # the part finished in a fresh worker


def test_matching_actor_path_writes_the_same_shards(ray_cluster, tiny_coco, tmp_path):
    """The --device cuda route (a matching actor per GPU) with an actor on the CPU: same bytes."""
    from dataclasses import replace

    from frcnn_shard.build import anchor_spec, build
    from frcnn_shard.build.ray_engine import MatchActor, _run_part

    o = opts(tiny_coco, tmp_path / "actor", rows_per_shard=25, part=(0, 1), gpu_batch=9)
    actor = ray_cluster.remote(num_cpus=0)(MatchActor).remote(anchor_spec(o), o.matching, "cpu")
    task = ray_cluster.remote(_run_part)
    ray_cluster.get(task.remote(o, (0, 1), actor))
    from frcnn_shard.build import merge_split

    merge_split(tmp_path / "actor" / "train2017")
    local = build(replace(o, out=str(tmp_path / "local"), part=None))
    same_output(tmp_path / "actor" / "train2017", local.out_dir)


def test_cuda_on_a_cluster_without_gpus_is_refused(ray_cluster, tiny_coco, tmp_path):
    from frcnn_shard.build import BuildError, build

    with pytest.raises(BuildError, match="no GPU"):
        build(opts(tiny_coco, tmp_path, rows_per_shard=25, engine="ray", device="cuda"))


def test_a_ray_build_resumed_on_fewer_cpus_keeps_the_shards(ray_cluster, tiny_coco, tmp_path):
    """Interrupted with 6 parts (3 CPUs), resumed with 4 (2 CPUs): the published shards are kept, not rebuilt."""
    from frcnn_shard.build import build

    out = tmp_path / "ray"
    for i in (0, 2):  # what the 6-part run had finished when it was stopped: shards 0 and 2..3
        build(opts(tiny_coco, out, rows_per_shard=7, part=(i, 6)))
    split = out / "train2017"
    kept = {p.name: p.stat().st_ino for p in split.glob("*.tar")}
    assert len(kept) == 3
    res = build(opts(tiny_coco, out, rows_per_shard=7, engine="ray"))
    assert {n: (split / n).stat().st_ino for n in kept} == kept
    assert res.rows_read == 50 - 3 * 7
    assert sorted(p.name for p in (split / "_parts").glob("*.json")) == [
        f"part-00000{i}-of-000004.json" for i in range(4)]
    local = build(opts(tiny_coco, tmp_path / "local", rows_per_shard=7, workers=2))
    same_output(res.out_dir, local.out_dir)
