"""Shards on S3-compatible object storage, against a real server on loopback (SeaweedFS, started here).

Builds, parts and merge, check, info and the loader through s3:// URLs; the guarantees the disk has
(nothing partial under a final name, the manifest last, resumable, sha256s verified remotely); faults:
a build killed mid-upload, the server restarted mid-build, a connection dropped under the loader.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import running_s3

s3server = pytest.importorskip("s3server")  # tests/s3server.py

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "frcnn"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server of this module's own, with its bucket (conftest.running_s3)."""
    with running_s3(tmp_path_factory, BUCKET) as srv:
        yield srv


@pytest.fixture
def fs(s3):
    return s3.filesystem()


@pytest.fixture(scope="module")
def local(tmp_path_factory, sample_hub):
    """The same build on local disk: the reference every S3 build must equal byte for byte."""
    from frcnn_shard.build import BuildOptions, build

    return build(BuildOptions(source=str(sample_hub), split="train", out=str(tmp_path_factory.mktemp("local")),
                              rows_per_shard=5, workers=0, device="cpu")).out_dir


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "frcnn_shard.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def build_args(src: Path, out: str, *extra: str) -> list[str]:
    return ["build", "--source", str(src), "--split", "train", "--out", out, "--rows-per-shard", "5",
            "--workers", "0", "--device", "cpu", *extra]


def same_as_local(fs, prefix: str, local: Path) -> None:
    """Shards, drops and manifest (apart from how it ran) equal the local build's."""
    fs.invalidate_cache()  # another process wrote these
    remote = json.loads(fs.cat(f"{prefix}/manifest.json"))
    ref = json.loads((local / "manifest.json").read_text())
    assert {k: v for k, v in remote.items() if k != "run"} == {k: v for k, v in ref.items() if k != "run"}
    for s in ref["shards"]:
        assert fs.cat(f"{prefix}/{s['name']}") == (local / s["name"]).read_bytes(), s["name"]
    assert fs.cat(f"{prefix}/drops.jsonl") == (local / "drops.jsonl").read_bytes()


def test_build_check_info_and_load_on_s3(s3, fs, sample_hub, local):
    r = cli(*build_args(sample_hub, f"s3://{BUCKET}/b1"))
    assert r.returncode == 0, r.stderr
    same_as_local(fs, f"{BUCKET}/b1/train", local)
    assert not [p for p in fs.find(f"{BUCKET}/b1") if p.endswith(".partial")]
    r = cli("check", f"s3://{BUCKET}/b1/train")
    assert r.returncode == 0 and ": 0 problems" in r.stdout, r.stdout + r.stderr
    r = cli("info", f"s3://{BUCKET}/b1/train")
    assert r.returncode == 0 and "drops.jsonl" in r.stdout
    from frcnn_shard.loader import make_loader

    kw = dict(num_workers=2, shuffle=False, rpn_batch_size=None, normalize=False)
    got = [(t["key"], img.sum().item()) for imgs, ts in make_loader(f"s3://{BUCKET}/b1/train", 4, **kw)
           for img, t in zip(imgs, ts)]
    want = [(t["key"], img.sum().item()) for imgs, ts in make_loader(local, 4, **kw) for img, t in zip(imgs, ts)]
    assert sorted(got) == sorted(want) and len(got) == read_total(local)


def test_stats_and_show_read_s3_as_they_read_a_folder(s3, fs, sample_hub, local, tmp_path):
    r = cli(*build_args(sample_hub, f"s3://{BUCKET}/st"))
    assert r.returncode == 0, r.stderr
    url = f"s3://{BUCKET}/st/train"
    from frcnn_shard.inspect.show import render_samples
    from frcnn_shard.inspect.stats import compute_stats

    remote, here = compute_stats(url), compute_stats(local)
    assert remote.pop("shard_dir") == url and here.pop("shard_dir") == str(local)
    assert remote == here and remote["samples"] == read_total(local)
    picks = dict(keys=[here["keys"][-1]], indices=[0, read_total(local) - 1], anchors=True)
    assert render_samples(url, out=tmp_path / "s3.png", **picks) == render_samples(local, out=tmp_path / "l.png", **picks)
    assert (tmp_path / "s3.png").read_bytes() == (tmp_path / "l.png").read_bytes()
    for cmd in (("stats", url, "--out", str(tmp_path / "st.png")), ("show", url, "--index", "1", "--out", str(tmp_path / "sh.png"))):
        r = cli(*cmd)
        assert r.returncode == 0, r.stdout + r.stderr


def read_total(local: Path) -> int:
    return json.loads((local / "manifest.json").read_text())["totals"]["samples"]


def test_parts_on_s3_then_merge(s3, fs, sample_hub, local):
    for i in (2, 0, 1):
        r = cli(*build_args(sample_hub, f"s3://{BUCKET}/p", "--part", f"{i}/3"))
        assert r.returncode == 0, r.stderr
        assert not fs.exists(f"{BUCKET}/p/train/manifest.json")
    r = cli("merge", f"s3://{BUCKET}/p/train")
    assert r.returncode == 0, r.stderr
    same_as_local(fs, f"{BUCKET}/p/train", local)


def test_check_verifies_sha256s_remotely(s3, fs, sample_hub):
    assert cli(*build_args(sample_hub, f"s3://{BUCKET}/dmg")).returncode == 0
    name = json.loads(fs.cat(f"{BUCKET}/dmg/train/manifest.json"))["shards"][1]["name"]
    data = bytearray(fs.cat(f"{BUCKET}/dmg/train/{name}"))
    data[700] ^= 0xFF
    fs.pipe_file(f"{BUCKET}/dmg/train/{name}", bytes(data))
    r = cli("check", f"s3://{BUCKET}/dmg/train")
    assert r.returncode == 1 and "shard_sha256" in r.stdout


def test_secrets_never_appear_in_outputs(s3, fs, sample_hub):
    assert cli(*build_args(sample_hub, f"s3://{BUCKET}/sec")).returncode == 0
    secret = s3.secret_key
    for p in fs.find(f"{BUCKET}/sec"):
        if not p.endswith(".tar"):
            assert secret not in fs.cat(p).decode(), p
    # Wrong credentials: the error says what failed, never the secret given.
    bad = {"AWS_SECRET_ACCESS_KEY": "wrong-" + secret}
    r = cli(*build_args(sample_hub, f"s3://{BUCKET}/sec2", "--retries", "0"), env=bad)
    assert r.returncode != 0 and "wrong-" not in r.stdout + r.stderr
    opts = json.dumps({"key": s3.access_key, "secret": "given-" + secret, "endpoint_url": s3.endpoint_url})
    r = cli(*build_args(sample_hub, f"s3://{BUCKET}/sec3", "--storage-options", opts))
    assert "given-" not in r.stdout + r.stderr


def test_a_scheme_nothing_serves_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(__import__("frcnn_shard.cli", fromlist=["main"]).main,
                           ["build", "--out", "s4://bucket/c", "--split", "train"])
    assert r.exit_code == 2 and "no storage here understands s4://" in r.output
    r = CliRunner().invoke(__import__("frcnn_shard.cli", fromlist=["main"]).main,
                           ["build", "--out", "s3:/bucket/c", "--split", "train"])
    assert r.exit_code == 2 and "looks like a URL but is not one" in r.output
    assert list(tmp_path.iterdir()) == []  # no local folder named "s3:" or "s4:"


def test_an_unknown_storage_option_is_refused_at_once(tmp_path, monkeypatch):
    """s3fs would only fail at its first request, with a TypeError traceback; the option is named, never a value."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-to-be-printed")
    r = CliRunner().invoke(__import__("frcnn_shard.cli", fromlist=["main"]).main,
                           ["build", "--out", "s3://bucket/c", "--split", "train", "--source", "./nowhere",
                            "--storage-options", '{"endpoint_url": "http://127.0.0.1:9", "bogus_option": "v4lue"}'])
    assert r.exit_code == 2 and "storage options were refused" in r.output and "bogus_option" in r.output, r.output
    assert "v4lue" not in r.output and "not-to-be-printed" not in r.output and list(tmp_path.iterdir()) == []


def test_killed_mid_upload_leaves_nothing_and_resumes_identically(s3, fs, sample_hub, tmp_path):
    """A shard bigger than one upload part, the build SIGKILLed after its first part went up."""
    from frcnn_shard.build import BuildOptions, build
    from frcnn_shard.transform import TransformConfig

    big = dict(rows_per_shard=16, workers=0, device="cpu",
               transform=TransformConfig(image_size=(560, 560), image_format="png"))
    ref = build(BuildOptions(source=str(sample_hub), split="train", out=str(tmp_path), **big)).out_dir
    assert max(s["bytes"] for s in json.loads((ref / "manifest.json").read_text())["shards"]) > 8 << 20
    args = build_args(sample_hub, f"s3://{BUCKET}/kill", "--image-format", "png", "--image-size", "560")
    args[args.index("--rows-per-shard") + 1] = "16"
    r = cli(*args, env={"FRCNN_SHARD_FAULT": "upload:1"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    prefix = f"{BUCKET}/kill/train"
    fs.invalidate_cache()
    assert not [p for p in fs.find(prefix) if p.endswith(".tar")]  # nothing under a final name
    pending = fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads", [])
    assert any(u["Key"].startswith("kill/train/") for u in pending)  # the parts are there, unfinished
    r = cli(*args)
    assert r.returncode == 0 and r.stdout.startswith("built"), r.stderr  # no shard had been published
    same_as_local(fs, prefix, ref)
    pending = fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads", [])
    assert not [u for u in pending if u["Key"].startswith("kill/train/")]  # aborted on resume


def build_paused_after_shard_1(fs, sample_hub, name: str, *extra: str) -> subprocess.Popen:
    """A build into s3://BUCKET/name, started and waited on until it sleeps after publishing shard 1."""
    proc = subprocess.Popen([sys.executable, "-m", "frcnn_shard.cli",
                             *build_args(sample_hub, f"s3://{BUCKET}/{name}", *extra)],
                            cwd=ROOT, env={**os.environ, "FRCNN_SHARD_FAULT": "shard_done:1:sleep=2"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not fs.exists(f"{BUCKET}/{name}/train/train-000001.tar"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
        fs.invalidate_cache()
    return proc


def test_server_restarted_mid_build(s3, fs, sample_hub, local):
    """The server goes away for a few seconds while a build runs: it waits, retries, and finishes identically."""
    proc = build_paused_after_shard_1(fs, sample_hub, "rs")
    s3.restart()  # stopped while the build sleeps after shard 1, back a few seconds later
    out, err = proc.communicate(timeout=240)
    if proc.returncode != 0:  # the outage outlasted the retries: the same command resumes
        assert "resume" in err, err
        assert cli(*build_args(sample_hub, f"s3://{BUCKET}/rs")).returncode == 0
    same_as_local(fs, f"{BUCKET}/rs/train", local)


def test_an_outage_that_outlasts_the_retries_says_resume(s3, fs, sample_hub, local):
    """The server stays down: the build gives up with the resume advice (not the lock's own failure to go
    away), and the same command finishes the build identically once the server is back."""
    # botocore's own retries off (a real option): only ours remain, so the outage is over sooner.
    quick = json.dumps({"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}})
    proc = build_paused_after_shard_1(fs, sample_hub, "out", "--storage-options", quick)
    s3.stop()
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        s3.start()
    assert proc.returncode == 1 and "resume" in err and "Traceback" not in err, err
    assert cli(*build_args(sample_hub, f"s3://{BUCKET}/out")).returncode == 0
    same_as_local(fs, f"{BUCKET}/out/train", local)


def test_loader_survives_a_dropped_connection(s3, fs, sample_hub, local, monkeypatch):
    """The server restarts while the loader is inside a shard: the read reopens where it was."""
    from frcnn_shard.loader import make_loader
    from frcnn_shard.storage import remote

    assert cli(*build_args(sample_hub, f"s3://{BUCKET}/ld")).returncode == 0
    monkeypatch.setattr(remote, "REMOTE_READ_BYTES", 64 << 10)  # many requests per shard
    loader = make_loader(f"s3://{BUCKET}/ld/train", 2, num_workers=0, shuffle=False, rpn_batch_size=None)
    keys = []
    for i, (_, targets) in enumerate(loader):
        keys += [t["key"] for t in targets]
        if i == 1:
            s3.restart()
    want = [t["key"] for _, ts in make_loader(local, 2, num_workers=0, shuffle=False) for t in ts]
    assert keys == want and loader.skipped == 0


def test_a_lock_on_object_storage_names_its_holder(s3, fs, sample_hub):
    prefix = f"{BUCKET}/lk/train/_parts"
    fs.pipe_file(f"{prefix}/part-000000-of-000001.lock",
                 json.dumps({"host": "other-machine", "pid": 4242, "since": "then"}).encode())
    r = cli(*build_args(sample_hub, f"s3://{BUCKET}/lk"))
    assert r.returncode == 1 and "held by pid 4242 on other-machine" in r.stderr, r.stderr
    assert not [p for p in fs.find(f"{BUCKET}/lk") if p.endswith(".tar")]


def test_a_whole_build_and_a_part_build_at_once_exclude_each_other_on_s3(s3, fs, sample_hub, local):
    """As on local disk (test_concurrent_builds): at least one backs off, nothing is torn, the split finishes."""
    from test_concurrent_builds import race

    from frcnn_shard.build import BuildOptions, build

    for i in range(4):
        out = f"s3://{BUCKET}/race{i}"
        o = BuildOptions(source=str(sample_hub), split="train", out=out, rows_per_shard=5, workers=0, device="cpu")
        codes = race(o, BuildOptions(**{**o.__dict__, "part": (0, 2)}))
        assert 3 in codes and set(codes) <= {0, 3}, codes
        fs.invalidate_cache()
        assert not [p for p in fs.find(f"{BUCKET}/race{i}") if p.endswith(".lock")]
        build(o)
        same_as_local(fs, f"{BUCKET}/race{i}/train", local)


# The loader in its own process, so that a hang is ended: it reads the manifest, says so, waits for a line
# on stdin (the server is gone by then), reads one epoch with on_error="skip" and prints what it got.
_EPOCH_WHILE_DOWN = """
import json, sys
from frcnn_shard.loader import make_loader
loader = make_loader(sys.argv[1], 2, num_workers=0, shuffle=False, on_error="skip", rpn_batch_size=None)
print("ready", flush=True)
sys.stdin.readline()
got = sum(len(targets) for _, targets in loader)
print(json.dumps({"delivered": got, "skipped": loader.skipped, "log": loader.skip_log[:2]}), flush=True)
"""
# Far more than the bounded epoch needs (one retried shard read, then one attempt per shard: RELIABILITY.md),
# far less than the 12 shards cost when each one spent every retry (about a minute each).
DOWN_EPOCH_WAIT_S = 240


def test_an_epoch_ends_when_the_store_stays_down_and_counts_every_sample(s3, fs, sample_hub, local):
    """The server is killed before the epoch and stays down: with on_error="skip" the epoch ends (a bounded
    wait, not a timing) with no sample delivered and every one of the manifest's samples counted as skipped."""
    args = build_args(sample_hub, f"s3://{BUCKET}/down")
    args[args.index("--rows-per-shard") + 1] = "2"  # 12 shards
    assert cli(*args).returncode == 0
    total = json.loads(fs.cat(f"{BUCKET}/down/train/manifest.json"))["totals"]["samples"]
    proc = subprocess.Popen([sys.executable, "-c", _EPOCH_WHILE_DOWN, f"s3://{BUCKET}/down/train"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=60)
        s3.kill()
        try:
            out, err = proc.communicate("go\n", timeout=DOWN_EPOCH_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"the epoch did not end within {DOWN_EPOCH_WAIT_S} s with the store down")
    finally:
        if proc.poll() is None:
            proc.kill()
        s3.start()
    assert proc.returncode == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["delivered"] == 0 and got["skipped"] == total, got
    assert "train-000000.tar" in got["log"][0], got


def test_a_process_that_points_its_settings_elsewhere_gets_another_filesystem(monkeypatch):
    """Filesystems are kept per process, options and AWS_* settings: one made for an endpoint is never reused
    for another (the next module's S3 server, a notebook that switches accounts)."""
    from frcnn_shard.storage.remote import filesystem

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    first = filesystem("s3", {})
    assert filesystem("s3", {}) is first
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    assert filesystem("s3", {}) is not first
