"""Byte-identity: builds of fixed inputs give exactly the recorded shard bytes, for this format version.

The digests in tests/golden/digests.json were recorded by this file (`python tests/test_golden.py
--record`). A refactor must leave them unchanged; a deliberate format change bumps the format version
(docs/FORMAT.md) and records new digests in the same commit. The shard bytes depend on the JPEG and
zlib builds too, so the environment they were recorded in is stored with them.
"""
from __future__ import annotations

import hashlib
import json
import sys
import zlib
from pathlib import Path

import PIL
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import TINY_COCO, build_shards, require_tiny_coco  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "digests.json"

# name -> (source kind, build options). "coco" builds tiny_coco's train2017; "sample" the embedded
# synthetic sample (Hub layout, 24 rows).
CONFIGS: dict[str, tuple[str, dict]] = {
    "coco-default": ("coco", {"rows_per_shard": 16}),
    "coco-letterbox-png-torchvision": ("coco", {
        "rows_per_shard": 20, "anchor_preset": "torchvision-fpn",
        "transform": {"image_size": (320, 480), "resize": "letterbox", "image_format": "png", "min_box_size": 2.0},
        "matching": {"low_quality": "argmax", "crowd_ignore": True, "ignore_cross_boundary": True},
    }),
    "sample-c4-keep-empty": ("sample", {
        "rows_per_shard": 8, "anchor_preset": "c4", "flip_targets": False,  # the one-orientation layout
        "transform": {"keep_empty": True, "quality": 75},
    }),
}


def environment() -> dict:
    """What besides our code decides the bytes: the image codec and zlib builds."""
    from PIL import features

    return {"pillow": PIL.__version__, "libjpeg_turbo": features.version("libjpeg_turbo"),
            "zlib": zlib.ZLIB_RUNTIME_VERSION}


def build_config(name: str, out: Path, sample_dir: Path | None = None) -> Path:
    """Build one golden configuration into ``out``; returns the split directory."""
    from frcnn_shard.anchors import MatchConfig
    from frcnn_shard.transform import TransformConfig

    kind, opts = CONFIGS[name]
    kw = dict(opts)
    kw["transform"] = TransformConfig(**kw.get("transform", {}))
    kw["matching"] = MatchConfig(**kw.get("matching", {}))
    if kind == "coco":
        return build_shards(out, f"coco:{require_tiny_coco()}", "train2017", **kw).out_dir
    return build_shards(out, str(sample_dir), "train", **kw).out_dir


def digests(split_dir: Path) -> dict:
    """sha256 per shard file, in manifest order."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    return {s["name"]: hashlib.sha256((split_dir / s["name"]).read_bytes()).hexdigest() for s in manifest["shards"]}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shards_are_byte_identical_to_the_recorded_ones(name, tmp_path, sample_hub):
    golden = json.loads(GOLDEN.read_text())
    env = environment()
    if golden["environment"] != env:
        pytest.fail(f"the golden digests were recorded with {golden['environment']}, this environment has {env}: "
                    "install with `make install` (its constraints pin the codec), or re-record deliberately")
    got = digests(build_config(name, tmp_path, sample_hub))
    assert got == golden["configs"][name], f"{name}: shard bytes differ from the recorded ones"


def record() -> None:
    """Rebuild every configuration and write tests/golden/digests.json."""
    import tempfile

    from frcnn_shard.sources.fixtures import make_sample_hub_folder

    with tempfile.TemporaryDirectory() as tmp:
        sample = make_sample_hub_folder(Path(tmp) / "hub", n_train=24, n_val=8, seed=0)  # as conftest.sample_hub
        configs = {name: digests(build_config(name, Path(tmp) / name, sample)) for name in sorted(CONFIGS)}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"environment": environment(), "configs": configs}, indent=1) + "\n")
    print(f"recorded {GOLDEN} from {TINY_COCO}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    record()
