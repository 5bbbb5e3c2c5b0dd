"""Every script in scripts/ runs end to end on a tiny input, so none can rot: a renamed function, a moved module or
a changed option breaks this test, not the next benchmark run. Nothing is measured here and no document is
written (``--no-md``); the scripts' data goes to a temporary folder (FRCNN_SHARD_BENCH_DATA)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_tiny_coco

ROOT = Path(__file__).resolve().parents[1]

# (script, arguments that make it small), each a whole run of the script's main path.
SCRIPTS = [
    ("bench_build.py", ["--images", "24", "--rss-images", "24", "--workers", "1", "--build-repeats", "1",
                        "--component-rows", "8", "--repeats", "1", "--no-md"]),  # 3 chunks of 8: a steady state
    ("bench_loader.py", ["--images", "16", "--stream-images", "8", "--workers", "0", "--rounds", "1",
                         "--stage-images", "8", "--repeats", "1", "--flip-rounds", "1", "--no-md"]),
    ("bench_check.py", ["--images", "16", "--more-images", "16", "--repeats", "1", "--cold-repeats", "0", "--no-md"]),
    ("bench_torchvision.py", ["--steps", "1", "--warmup-steps", "0", "--assign-repeats", "1", "--batch-size", "1",
                              "--no-md"]),
    ("bench_gpu.py", ["--device", "cpu", "--rows", "8", "--workers", "1", "--batch-sizes", "1,2",
                      "--min-seconds", "0.05", "--no-md"]),
    ("bench_scale.py", ["--images", "16", "--workers", "1", "--rounds", "1", "--no-md"]),
    ("bench_resume.py", ["--images", "16", "--workers", "0", "--rounds", "1", "--batch-size", "2", "--no-md"]),
    ("bench_keep_ratio.py", ["--images", "8", "--workers", "0", "--repeats", "1", "--seeds", "2", "--match-images", "4",
                             "--no-md"]),
]


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory) -> Path:
    require_tiny_coco()
    return tmp_path_factory.mktemp("bench_data")


@pytest.mark.slow
@pytest.mark.parametrize("script,args", SCRIPTS, ids=[s for s, _ in SCRIPTS])
def test_the_script_runs_on_a_tiny_input(bench_data, script, args):
    env = {**os.environ, "FRCNN_SHARD_BENCH_DATA": str(bench_data), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert not (ROOT / "bench_data" / "hub_24").exists() and not (ROOT / "bench_data" / "hub_16").exists()
