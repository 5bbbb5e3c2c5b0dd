"""`frcnn-shard stats` / `show`: PNGs of the promised size, and numbers equal to direct counts."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from frcnn_shard.cli import main
from frcnn_shard.labels import CLASS_NAMES
from frcnn_shard.shards import iter_shard, read_manifest
from frcnn_shard.inspect.show import render_samples
from frcnn_shard.inspect.stats import compute_stats, stats_table
from frcnn_shard.format.members import TARGETS_EXT
from frcnn_shard.format.targets import unpack_targets

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, checked against what PIL reads."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (w, h)
    return w, h


@pytest.fixture(scope="module")
def direct(tiny_shards) -> dict:
    """Counts computed straight from the tars, independently of frcnn_shard.viz."""
    m = read_manifest(tiny_shards)
    out = {"keys": [], "classes": Counter(), "boxes": [], "crowd": [], "pos": [], "neg": [], "ign": [], "rpn": []}
    for entry in m["shards"]:
        for key, members in iter_shard(tiny_shards / entry["name"]):
            meta = json.loads(members["json"])
            labels, _ = unpack_targets(members[TARGETS_EXT], m["anchors"]["count"]).dense(m["anchors"]["count"])
            out["keys"].append(key)
            out["classes"].update(meta["labels"])
            out["boxes"].append(len(meta["boxes"]))
            out["crowd"].append(len(meta["crowd_boxes"]))
            out["pos"].append(int((labels == 1).sum()))
            out["neg"].append(int((labels == 0).sum()))
            out["ign"].append(int((labels == -1).sum()))
            out["rpn"].append(meta["rpn"])
    return out


@pytest.fixture(scope="module")
def stats(tiny_shards) -> dict:
    return compute_stats(tiny_shards)


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


# ----------------------------------------------------------------------------------- stats


def test_stats_equal_direct_counts(stats, direct):
    assert stats["samples"] == len(direct["keys"]) == 49 and stats["keys"] == direct["keys"]
    assert {r["label"]: r["count"] for r in stats["classes"]} == dict(direct["classes"])
    assert all(r["name"] == CLASS_NAMES[r["label"]] for r in stats["classes"])
    assert stats["per_image"]["boxes"] == direct["boxes"] and stats["boxes"] == sum(direct["boxes"])
    assert stats["crowd_boxes"] == sum(direct["crowd"])
    assert stats["per_image"]["positive"] == direct["pos"]
    assert stats["per_image"]["negative"] == direct["neg"]
    assert stats["per_image"]["ignore"] == direct["ign"]
    from_targets = [{"positive": p, "ignore": i, "negative": n}
                    for p, i, n in zip(direct["pos"], direct["ign"], direct["neg"])]
    assert from_targets == [{k: r[k] for k in ("positive", "ignore", "negative")} for r in direct["rpn"]]
    assert stats["boxes_per_image"]["max"] == max(direct["boxes"])
    assert sum(stats["box_sizes"]["counts"]) == stats["boxes"] == sum(stats["box_sizes"]["coco_area"].values())


def test_sampled_counts_follow_the_batch_rule(stats, direct):
    # <= 128 positives (256 x 0.5), negatives fill the batch up to 256.
    want_pos = [min(p, 128) for p in direct["pos"]]
    want_neg = [min(n, 256 - p) for n, p in zip(direct["neg"], want_pos)]
    assert stats["per_image"]["sampled_positive"] == want_pos
    assert stats["per_image"]["sampled_negative"] == want_neg


def test_stats_limit(tiny_shards, direct):
    st = compute_stats(tiny_shards, limit=20)
    assert st["samples"] == 20 and st["keys"] == direct["keys"][:20]
    assert st["boxes"] == sum(direct["boxes"][:20])


def test_stats_table_shows_the_numbers(stats, direct):
    text = stats_table(stats, top=5)
    (label, count), = direct["classes"].most_common(1)
    top_line = next(line for line in text.splitlines() if line.strip().startswith(f"{label} "))
    assert str(count) in top_line
    assert f"boxes             {sum(direct['boxes'])} (+{sum(direct['crowd'])} crowd)" in text
    assert f"max {max(direct['pos'])}" in text
    class_lines = [line for line in text.splitlines() if line.endswith("%")]
    assert len(class_lines) == 5


def test_stats_cli_writes_png(tiny_shards, tmp_path):
    out = tmp_path / "stats.png"
    res = run_cli("stats", str(tiny_shards), "--out", str(out), "--top", "10")
    assert res.exit_code == 0, res.output
    assert "top 10 classes" in res.output
    assert png_size(out) == (1200, 900)
    assert run_cli("stats", str(tmp_path), "--out", str(out)).exit_code == 2


# ----------------------------------------------------------------------------------- show


def test_show_png_grid_size(tiny_shards, direct, tmp_path):
    out = tmp_path / "grid.png"
    res = run_cli("show", str(tiny_shards), "--key", direct["keys"][20], "--index", "0", "--index", "48",
                  "--index", "16", "--anchors", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert png_size(out) == (3 * 500, 2 * 500)  # 4 samples: 3 columns x 2 rows of 500 px
    assert f"{direct['keys'][20]}, {direct['keys'][0]}, {direct['keys'][48]}, {direct['keys'][16]}" in res.output


def test_show_finds_keys_and_indices(tiny_shards, direct, tmp_path):
    # Every shard boundary and keys given without their zero padding.
    idx = [0, 15, 16, 31, 32, 47, 48]
    keys = render_samples(tiny_shards, indices=idx, out=tmp_path / "a.png")
    assert keys == [direct["keys"][i] for i in idx]
    some = [direct["keys"][i] for i in (3, 22, 40)]
    assert render_samples(tiny_shards, keys=[k.lstrip("0") for k in some], out=tmp_path / "b.png") == some
    assert png_size(tmp_path / "b.png") == (1500, 500)


def test_show_errors(tiny_shards, tmp_path):
    with pytest.raises(KeyError, match=f"000000000007 not found in {tiny_shards}"):
        render_samples(tiny_shards, keys=["7"], out=tmp_path / "x.png")
    with pytest.raises(IndexError, match=r"0\.\.48"):
        render_samples(tiny_shards, indices=[49], out=tmp_path / "x.png")
    res = run_cli("show", str(tiny_shards), "--key", "000000000007", "--out", str(tmp_path / "x.png"))
    assert res.exit_code == 2 and "not found" in res.output
    assert run_cli("show", str(tiny_shards), "--index", "-1", "--out", str(tmp_path / "x.png")).exit_code == 2
    assert not (tmp_path / "x.png").exists()


def test_inspect_commands_import_neither_torch_nor_datasets():
    """check, info, stats and show start fast: no torch, no datasets (and pandas) behind the CLI's imports."""
    code = ("import sys, frcnn_shard.cli, frcnn_shard.inspect.check, frcnn_shard.inspect.info, "
            "frcnn_shard.inspect.stats, frcnn_shard.inspect.show; "
            "print(sorted(m for m in ('torch', 'datasets', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]", out


def test_viz_imports_without_matplotlib():
    code = "import sys; sys.modules['matplotlib'] = None; import frcnn_shard.inspect.show, frcnn_shard.inspect.stats, frcnn_shard.inspect.check, frcnn_shard.cli"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
