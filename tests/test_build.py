"""End to end: real COCO (tiny_coco) through every source kind into shards, checked against the JSON."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from conftest import build_shards
from frcnn_shard.build import BuildError, BuildInterrupted, BuildOptions, build
from frcnn_shard.shards import MANIFEST_NAME, iter_shard, read_manifest

SIZE = 400.0
MIN_BOX = 1.0


def expected_from_json(coco_dir: Path, crowd_as_objects: bool) -> dict[int, dict]:
    """Boxes and labels computed straight from instances_train2017.json, independently of the package."""
    data = json.loads((coco_dir / "annotations" / "instances_train2017.json").read_text())
    label_of = {c["id"]: i + 1 for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    images = {im["id"]: im for im in data["images"]}
    out = {i: {"boxes": [], "labels": [], "crowd": []} for i in images}
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        sx, sy = SIZE / im["width"], SIZE / im["height"]
        x, y, w, h = ann["bbox"]
        if w <= 0 or h <= 0:
            continue
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, im["width"]), min(y + h, im["height"])
        box = [x1 * sx, y1 * sy, x2 * sx, y2 * sy]
        if ann["iscrowd"] and not crowd_as_objects:
            out[ann["image_id"]]["crowd"].append(box)
            continue
        if box[2] - box[0] < MIN_BOX or box[3] - box[1] < MIN_BOX:
            continue
        out[ann["image_id"]]["boxes"].append(box)
        out[ann["image_id"]]["labels"].append(label_of[ann["category_id"]])
    return out


def read_all(shard_dir: Path) -> dict[str, dict]:
    samples = {}
    for s in read_manifest(shard_dir)["shards"]:
        for key, members in iter_shard(shard_dir / s["name"]):
            samples[key] = json.loads(members["json"])
    return samples


def assert_matches_json(shard_dir: Path, expected: dict[int, dict]) -> None:
    samples = read_all(shard_dir)
    with_boxes = {i for i, e in expected.items() if e["boxes"]}
    assert {int(k) for k in samples} == with_boxes
    for key, meta in samples.items():
        exp = expected[int(key)]
        assert meta["labels"] == exp["labels"], key
        np.testing.assert_allclose(np.array(meta["boxes"]).reshape(-1, 4), np.array(exp["boxes"]), atol=0.01)
        np.testing.assert_allclose(np.array(meta["crowd_boxes"]).reshape(-1, 4),
                                   np.array(exp["crowd"]).reshape(-1, 4), atol=0.01)
        assert meta["size"] == [400, 400]
        assert key == f"{meta['image_id']:012d}"


def test_coco_source_equals_annotations(tiny_shards, tiny_coco):
    expected = expected_from_json(tiny_coco, crowd_as_objects=False)
    assert_matches_json(tiny_shards, expected)
    m = read_manifest(tiny_shards)
    assert m["complete"] and m["totals"]["rows"] == 50
    assert m["bbox_format"]["decision"] == "xywh"
    no_boxes = sum(1 for e in expected.values() if not e["boxes"])
    assert m["drops"]["images"].get("no_boxes", 0) == no_boxes
    assert m["totals"]["samples"] + sum(m["drops"]["images"].values()) == 50
    crowd = sum(len(e["crowd"]) for e in expected.values())
    assert crowd == 5 and sum(len(s["crowd_boxes"]) for s in read_all(tiny_shards).values()) == crowd
    # Shard i holds the rows [16 i, 16 (i + 1)): the no_boxes row 46 leaves shard 2 one sample short.
    assert [s["rows"] for s in m["shards"]] == [[0, 16], [16, 32], [32, 48], [48, 50]]
    assert [s["samples"] for s in m["shards"]] == [16, 16, 15, 2]


@pytest.fixture(scope="module")
def hub_folders(tmp_path_factory, tiny_coco):
    from frcnn_shard.sources.fixtures import coco_to_hub_rows, write_hub_folder

    out = {}
    for fmt in ("xywh", "xyxy"):
        root = tmp_path_factory.mktemp(f"hub_{fmt}")
        rows = list(coco_to_hub_rows(tiny_coco, "train2017", bbox_format=fmt))
        out[fmt] = write_hub_folder(root, {"train": rows, "val": rows[:5]}, rows_per_file=20)
    return out


@pytest.mark.parametrize("fmt, hub_crowd", [("xywh", "auto"), ("xyxy", "auto"), ("xywh", "off")])
def test_hub_layout_auto_detects_and_equals_annotations(hub_folders, tiny_coco, tmp_path, fmt, hub_crowd):
    res = build_shards(tmp_path, str(hub_folders[fmt]), "train", hub_crowd=hub_crowd)
    assert res.bbox_format["decision"] == fmt and res.bbox_format["requested"] == "auto"
    # The Hub drops iscrowd; its COCO annotation ids say which boxes are crowd regions (--hub-crowd auto).
    assert_matches_json(res.out_dir, expected_from_json(tiny_coco, crowd_as_objects=hub_crowd == "off"))


def test_explicit_wrong_format_is_recorded_with_its_evidence(hub_folders, tmp_path):
    # xyxy rows forced to be read as xywh: honoured, but the evidence against it is in the manifest.
    res = build_shards(tmp_path, str(hub_folders["xyxy"]), "train", bbox_format="xywh")
    bf = read_manifest(res.out_dir)["bbox_format"]
    assert (bf["requested"], bf["decision"]) == ("xywh", "xywh")
    assert bf["evidence"]["xywh_violations"] > 0


def test_worker_count_does_not_change_a_byte(hub_folders, tmp_path):
    shas = []
    for workers in (0, 1, 2):
        res = build_shards(tmp_path / f"w{workers}", str(hub_folders["xywh"]), "train", workers=workers)
        shas.append([s["sha256"] for s in read_manifest(res.out_dir)["shards"]])
    assert shas[0] == shas[1] == shas[2] and len(shas[0]) == -(-res.rows // 16) > 1


def _part_record(out_dir: Path, part: int = 0, parts: int = 1) -> dict:
    return json.loads((out_dir / "_parts" / f"part-{part:06d}-of-{parts:06d}.json").read_text())


def test_interrupted_build_resumes_to_identical_shards(hub_folders, tmp_path):
    src = str(hub_folders["xywh"])
    ref = build_shards(tmp_path / "ref", src, "train")
    ref_shards = read_manifest(ref.out_dir)["shards"]

    def stop_after_40_rows(counts):
        if counts["rows"] >= 40:
            raise KeyboardInterrupt

    opts = BuildOptions(source=src, split="train", out=str(tmp_path / "run"), workers=0, rows_per_shard=16,
                        device="cpu")
    with pytest.raises(BuildInterrupted, match="resume"):
        build(opts, progress=stop_after_40_rows)
    out_dir = tmp_path / "run" / "train"
    assert not (out_dir / MANIFEST_NAME).exists()  # the manifest is written last, once the build is whole
    done = _part_record(out_dir)["shards"]
    assert not _part_record(out_dir)["complete"] and 1 <= len(done) < len(ref_shards)
    assert not list(out_dir.glob("*.partial"))
    # A shard published just before the crash, which the record never listed, is rebuilt identically.
    shutil.copy(ref.out_dir / ref_shards[len(done)]["name"], out_dir)
    (out_dir / "train-000009.tar.partial").write_bytes(b"junk")
    res = build(opts)
    assert res.status == "resumed" and res.resumed_shards == len(done)
    got = read_manifest(out_dir)
    assert [(s["name"], s["sha256"], s["rows"]) for s in got["shards"]] == \
        [(s["name"], s["sha256"], s["rows"]) for s in ref_shards]
    assert got["drops"] == read_manifest(ref.out_dir)["drops"]
    assert (out_dir / "drops.jsonl").read_bytes() == (ref.out_dir / "drops.jsonl").read_bytes()
    assert not list(out_dir.glob("*.partial"))
    assert build(opts).status == "already complete"


def test_different_options_refused_unless_overwrite(hub_folders, tmp_path):
    src = str(hub_folders["xywh"])
    build_shards(tmp_path, src, "train", max_rows=10)
    with pytest.raises(BuildError, match="different options.*options"):
        build_shards(tmp_path, src, "train", max_rows=12)
    res = build_shards(tmp_path, src, "train", max_rows=12, overwrite=True)
    assert res.rows == 12 and read_manifest(res.out_dir)["totals"]["rows"] == 12


def test_split_alias_and_unknown_split(hub_folders, tmp_path):
    res = build_shards(tmp_path, str(hub_folders["xywh"]), "validation")
    assert res.out_dir.name == "val" and read_manifest(res.out_dir)["split"] == "val"
    with pytest.raises(ValueError, match="train.*val|val.*train"):
        build_shards(tmp_path, str(hub_folders["xywh"]), "test")


def test_bad_options_refused_before_work(tmp_path, hub_folders):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BuildError, match="not a directory"):
        build_shards(tmp_path / "file", str(hub_folders["xywh"]), "train")
    with pytest.raises(BuildError, match="rows_per_shard"):
        build_shards(tmp_path, str(hub_folders["xywh"]), "train", rows_per_shard=0)
    assert not (tmp_path / "train").exists()


def test_synthetic_sample_builds_through_hub_path(sample_shards):
    m = read_manifest(sample_shards)
    assert m["complete"] and m["source"]["kind"] == "hub" and m["totals"]["samples"] == 24
    per_key = defaultdict(int)
    for s in m["shards"]:
        for key, members in iter_shard(sample_shards / s["name"]):
            per_key[key] += 1
            assert set(members) == {"jpg", "json", "rpn.npz"}
    assert len(per_key) == 24 and set(per_key.values()) == {1}
    assert (sample_shards / MANIFEST_NAME).exists()


def test_batched_device_path_writes_the_same_shards(hub_folders, tmp_path):
    """The --device cuda code path (buffering, batched torch matching, packing) run on the CPU."""
    from frcnn_shard.build import BuildOptions, anchor_spec, batch_matcher

    src = str(hub_folders["xywh"])
    cpu = build_shards(tmp_path / "cpu", src, "train")
    calls = []
    opts = BuildOptions()
    real = batch_matcher(anchor_spec(opts), opts.matching, "cpu")  # the GPU path's matcher, on the CPU

    def on_cpu(boxes, crowd, canvases):
        calls.append(len(boxes))
        return real(boxes, crowd, canvases)

    for workers in (0, 2):
        dev = build_shards(tmp_path / f"dev{workers}", src, "train", workers=workers, gpu_batch=7, match_batch=on_cpu)
        assert dev.device == "cuda"
        assert [s["sha256"] for s in read_manifest(dev.out_dir)["shards"]] == \
            [s["sha256"] for s in read_manifest(cpu.out_dir)["shards"]]
    # Batched: 7 samples a call, each in both orientations (stored, mirrored); every sample once per build.
    assert calls and max(calls) == 2 * 7 and sum(calls) == 2 * 2 * cpu.samples


def test_device_auto_gives_torchs_answer():
    import torch

    from frcnn_shard.build import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("kind", ["coco", "hub"])
def test_a_cpu_only_build_through_the_cli_does_not_import_torch(tiny_coco, sample_hub, tmp_path, kind):
    """device=auto asks torch only where a GPU device node exists, and the Hub source's `datasets` is
    kept from importing it; a coco: source needs no `datasets` either."""
    import glob
    import subprocess
    import sys

    if sys.platform.startswith("linux") and any(glob.glob(p) for p in ("/dev/nvidia*", "/dev/dxg", "/dev/kfd")):
        pytest.skip("a GPU device node exists: device=auto must ask torch")
    code = ("import sys; from frcnn_shard.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'datasets') if m in sys.modules))")
    source, split = (f"coco:{tiny_coco}", "train2017") if kind == "coco" else (str(sample_hub), "train")
    args = ["build", "--source", source, "--split", split, "--out", str(tmp_path), "--max-rows", "4",
            "--workers", "2"]
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=300).stdout
    assert out.strip().splitlines()[-1] == ("[]" if kind == "coco" else "['datasets']"), out
    assert [r["device"] for r in read_manifest(tmp_path / split)["run"]["part_runs"]] == ["cpu"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings: Linux only")
def test_pool_workers_keep_the_memory_they_free():
    # In a fresh interpreter: the settings change the process's allocator. With them, the few megabytes
    # a row frees stay in the heap: allocating them again faults no new pages in.
    code = """
import resource, sys
from frcnn_shard.malloc import tune_worker_malloc
tuned = tune_worker_malloc() if sys.argv[1] == "tuned" else None
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def row():
    blocks = [bytearray(1 << 21) for _ in range(4)]  # 4 x 2 MiB, written (zeroed), then freed
for _ in range(3):
    row()
before = faults()
for _ in range(50):
    row()
print(tuned, faults() - before)
"""
    runs = {}
    for mode in ("tuned", "plain"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True).stdout
        tuned, faults = out.split()
        runs[mode] = (tuned, int(faults))
    assert runs["tuned"][0] == "True"
    assert runs["tuned"][1] < 50 < runs["plain"][1], runs  # plain glibc trims the heap and faults the pages in again
