"""What a new user hits first (issue 11): misread paths, unnamed bad rows, SIGTERM, the README snippet on
the demo's output, loader errors that point the right way. Each through the command or the API a user runs."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from frcnn_shard.cli import main
from frcnn_shard.loader import LoaderError, LoaderWarning, make_loader
from frcnn_shard.shards import FAULT_ENV, ManifestError, read_manifest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str):
    return CliRunner().invoke(main, list(args))


# ----------------------------------------------------------------------------- 1. paths vs Hub ids


@pytest.mark.parametrize("source", ["./nope", "nope/dir/deeper", "/no/such/folder", "~/no-such-folder-here"])
def test_a_missing_local_path_is_named_at_once(tmp_path, source):
    t0 = time.monotonic()
    r = run("build", "--source", source, "--split", "train", "--out", str(tmp_path / "x"), "--device", "cpu")
    assert r.exit_code == 2, r.output  # bad input: the source is none of the forms
    assert time.monotonic() - t0 < 10  # no network retries
    assert "no such folder" in r.output or "not a folder here, and not a Hub dataset id" in r.output
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").rglob("*.tar"))


def test_a_path_that_exists_is_a_path_even_without_dot(tmp_path, monkeypatch, sample_hub):
    monkeypatch.chdir(sample_hub.parent)
    r = run("build", "--source", sample_hub.name, "--split", "train", "--out", str(tmp_path), "--workers", "0",
            "--device", "cpu", "--max-rows", "3")
    assert r.exit_code == 0, r.output
    assert read_manifest(tmp_path / "train")["source"]["local"] is True


def test_a_file_given_as_source_is_refused(tmp_path):
    f = tmp_path / "data.parquet"
    f.write_bytes(b"x")
    r = run("build", "--source", str(f), "--split", "train", "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "a file, not a folder" in r.output


def test_a_malformed_hub_id_is_refused_before_any_network(tmp_path):
    r = run("build", "--source", "not a repo!", "--split", "train", "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "not a Hub dataset id" in r.output


def test_an_unreachable_hub_says_how_to_build_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine cannot reach the Hub anyway; offline fails at once
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    r = run("build", "--source", "someone/some-coco", "--split", "train", "--out", str(tmp_path / "o"))
    assert r.exit_code == 1
    assert "local folder in the Hub's layout" in r.output and "coco:DIR" in r.output


# ------------------------------------------------------------------------------------ 7. SIGTERM


def test_sigterm_to_the_whole_group_exits_quietly_and_resumes(tmp_path, sample_hub):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "frcnn_shard.cli", "build", "--source", str(sample_hub), "--split", "train",
           "--out", str(out), "--workers", "2", "--rows-per-shard", "4", "--image-size", "128", "--device", "cpu"]
    env = {**os.environ, FAULT_ENV: "worker_row:9:sleep=60"}  # a worker busy, the others idle
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "train" / "train-000001.tar").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler (Slurm, timeout, kill -TERM -PGID) sends
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert "interrupted" in err and "resume" in err
    assert not list((out / "train").glob("*.partial"))
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("resumed"), done.stdout + done.stderr


# ------------------------------------------------------------------- 5. the README snippet, as written


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- snippet:train -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its training snippet marker"
    return m.group(1)


def _demo_commands() -> list[list[str]]:
    """The sample and build commands of `make demo`, from the Makefile itself."""
    lines = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0].splitlines()
    cmds = [shlex.split(line.strip().replace("$(CLI)", "frcnn-shard").replace("$(DEMO)", "demo"))
            for line in lines if line.strip().startswith("$(CLI) sample") or line.strip().startswith("$(CLI) build")]
    assert len(cmds) == 2
    return cmds


def test_the_readme_training_snippet_runs_on_the_demo_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cmd in _demo_commands():
        r = run(*cmd[1:])
        assert r.exit_code == 0, r.output
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        namespace: dict = {}
        exec(compile(_readme_snippet(), "README.md", "exec"), namespace)
    assert namespace["seen"] == 2 * read_manifest(tmp_path / "demo" / "shards" / "train")["totals"]["samples"]
    feeds = [w for w in caught if issubclass(w.category, LoaderWarning)]
    assert len(feeds) == 1 and "using 2" in str(feeds[0].message)  # 2 shards feed 2 of the 4 workers, said once


# ------------------------------------------------------------------------------ 6. loader errors


def test_loader_names_a_missing_folder(tmp_path):
    with pytest.raises(LoaderError, match=r"no such folder: .*nothing-here"):
        make_loader(tmp_path / "nothing-here", 4)


def test_loader_given_the_out_root_names_its_splits(sample_shards):
    with pytest.raises(LoaderError, match=r"output root, not a split folder; its splits are train"):
        make_loader(sample_shards.parent, 4)


def test_loader_takes_manifest_json_as_the_source(sample_shards):
    a = make_loader(sample_shards / "manifest.json", 4, num_workers=0)
    assert a.num_samples == read_manifest(sample_shards)["totals"]["samples"]


def test_loader_on_an_unfinished_build_says_so(tmp_path, sample_hub):
    from frcnn_shard.build import BuildOptions, build

    build(BuildOptions(source=str(sample_hub), split="train", out=str(tmp_path), rows_per_shard=8, part=(0, 2),
                       workers=0, device="cpu"))
    with pytest.raises(ManifestError, match="not finished"):
        make_loader(tmp_path / "train", 4)


def test_skipped_counts_the_samples_a_truncated_shard_lost(sample_shards, tmp_path):
    import shutil

    d = tmp_path / "cut"
    shutil.copytree(sample_shards, d)
    m = read_manifest(d)
    first = d / m["shards"][0]["name"]
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 3])  # a third of shard 0 survives
    loader = make_loader(d, 4, num_workers=0, on_error="skip", shuffle=False)
    got = sum(len(t) for _, t in loader)
    assert got + loader.skipped == m["totals"]["samples"]  # every missing sample is counted
    assert loader.skipped > 1 and "lost" in loader.skip_log[0]
