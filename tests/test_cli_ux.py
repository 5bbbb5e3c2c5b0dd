"""What a new user sees (issue 11): bars with totals, one wording of the bbox decision, "1 box",
integer counts on the plots, labels inside the picture, and an install without warnings."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from frcnn_shard.cli import main
from frcnn_shard.inspect.check import check_shards
from frcnn_shard.inspect.stats import compute_stats
from frcnn_shard.shards import iter_shard, read_manifest
from frcnn_shard.words import plural

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def samples_of(shard_dir: Path) -> list[tuple[str, dict]]:
    """(key, JSON record) of every sample, straight from the tars."""
    return [(key, json.loads(members["json"])) for e in read_manifest(shard_dir)["shards"]
            for key, members in iter_shard(shard_dir / e["name"])]


# ----------------------------------------------------------------------------------- progress


@pytest.mark.parametrize("limit", [None, 20])
def test_stats_reports_progress_against_the_total_known_in_advance(tiny_shards, limit):
    calls = []
    st = compute_stats(tiny_shards, limit=limit, progress=lambda done, total: calls.append((done, total)))
    want = 49 if limit is None else limit
    assert calls[0] == (0, want)  # the total comes before the first sample is read
    assert {t for _, t in calls} == {want} and calls[-1] == (st["samples"], want) == (want, want)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize("workers", [0, 2])
def test_check_reports_progress_against_the_manifest_total(tiny_shards, workers):
    calls = []
    report = check_shards(tiny_shards, workers=workers, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 49) and calls[-1] == (report.samples, 49) == (49, 49)
    assert {t for _, t in calls} == {49} and [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize("command,args,total", [
    ("stats", [], 49), ("stats", ["--limit", "7"], 7), ("check", [], 49),
    ("check", ["--deep", "--fraction", "0.1"], 49),
])
def test_the_bars_show_the_total_rate_and_eta(tiny_shards, tmp_path, command, args, total):
    pytest.importorskip("matplotlib")
    extra = ["--out", str(tmp_path / "s.png")] if command == "stats" else []
    r = run_cli(command, str(tiny_shards), *args, *extra)
    assert r.exit_code == 0, r.output
    assert re.search(rf"{command}:\s+0%\|.*\| 0/{total} \[", r.stderr), r.stderr  # the total from the start
    # Finished: the count of the total, the elapsed<remaining time and a rate.
    done = rf"{command}: 100%\|.*\| {total}/{total} \[\d\d:\d\d<\d\d:\d\d, +[\d.]+sample/s\]"
    assert re.search(done, r.stderr), r.stderr


def test_check_json_prints_no_bar(tiny_shards):
    r = run_cli("check", "--json", str(tiny_shards))
    assert r.exit_code == 0 and json.loads(r.stdout)["samples"] == 49
    assert r.stderr == ""


# ----------------------------------------------------------------------------------- wording


def test_plural():
    assert [plural(n, "box") for n in (0, 1, 2)] == ["0 boxes", "1 box", "2 boxes"]
    assert plural(1, "sample") == "1 sample" and plural(3, "class") == "3 classes"
    assert plural(2, "entry") == "2 entries" and plural(2, "key") == "2 keys"
    assert plural(1, "positive anchor") == "1 positive anchor" and plural(5, "index", "indices") == "5 indices"


def test_a_one_sample_build_is_worded_in_the_singular_and_its_bbox_decision_as_info_words_it(sample_hub, tmp_path):
    out = tmp_path / "one"
    r = run_cli("build", "--source", str(sample_hub), "--split", "train", "--out", str(out), "--max-rows", "1",
                "--workers", "0", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "  1 sample in 1 shard, " in r.stdout and "1 row read" in r.stdout
    (summary_bbox,) = [line.split("bbox format: ", 1)[1] for line in r.stdout.splitlines() if "bbox format: " in line]

    info = run_cli("info", str(out / "train"))
    assert info.exit_code == 0, info.output
    (info_bbox,) = [line.split("bbox format", 1)[1].strip() for line in info.stdout.splitlines()
                    if line.startswith("bbox format")]
    assert summary_bbox == info_bbox
    bf = read_manifest(out / "train")["bbox_format"]
    assert summary_bbox.startswith(f"{bf['decision']} (requested {bf['requested']}; {bf['rule']})")
    assert f"evidence ({bf['rows_examined']} rows): boxes_examined={bf['evidence']['boxes_examined']}" in summary_bbox

    check = run_cli("check", str(out / "train"))
    assert check.exit_code == 0 and "checked 1 sample in 1 shard (" in check.stdout, check.output


# ----------------------------------------------------------------------------------- plots


def test_count_axes_of_the_stats_figure_have_integer_ticks(tiny_shards):
    pytest.importorskip("matplotlib")
    from frcnn_shard.inspect.stats import stats_figure

    # Three samples: a handful of boxes, so counts are small and a default locator would pick 0.5 steps.
    st = compute_stats(tiny_shards, limit=3)
    fig = stats_figure(st, top=5)
    fig.canvas.draw()
    by_title = {ax.get_title(): ax for ax in fig.axes}
    count_axes = [(by_title["boxes per image"], "y"), (by_title["boxes per image"], "x"),
                  (by_title["box size, sqrt(w*h) (resized px)"], "y"),
                  (next(ax for t, ax in by_title.items() if t.startswith("top ")), "x")]
    for ax, axis in count_axes:
        ticks = ax.get_yticks() if axis == "y" else ax.get_xticks()
        labels = [t.get_text() for t in (ax.get_yticklabels() if axis == "y" else ax.get_xticklabels())]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), (ax.get_title(), axis, ticks)
        assert all(re.fullmatch(r"−?\d+", s) for s in labels if s), (ax.get_title(), axis, labels)
    assert fig.get_suptitle().endswith(f" - 3 samples, {plural(st['boxes'], 'box')}")


def _one_box_at_the_top_edge(tiny_shards) -> tuple[str, list]:
    return next((k, r["boxes"][0]) for k, r in samples_of(tiny_shards) if len(r["boxes"]) == 1 and r["boxes"][0][1] < 1)


def test_show_keeps_a_label_at_the_top_edge_inside_the_picture_and_says_1_box(tiny_shards):
    pytest.importorskip("matplotlib")
    from frcnn_shard.inspect.show import sample_figure

    key, box = _one_box_at_the_top_edge(tiny_shards)
    fig, shown = sample_figure(tiny_shards, keys=[key])
    assert shown == [key]
    ax = fig.axes[0]
    assert ax.get_title() == f"{key}: 1 box"
    renderer = fig.canvas.get_renderer()
    (label,) = ax.texts
    cell = ax.get_window_extent(renderer)
    text = label.get_window_extent(renderer)
    assert cell.y0 <= text.y0 and text.y1 <= cell.y1, (text, cell)  # not cut off above the image
    box_top = ax.transData.transform((box[0], box[1]))[1]
    assert text.y1 <= box_top + 1  # inside the box, hanging from its top edge


def test_show_keeps_labels_above_boxes_that_leave_room(tiny_shards):
    pytest.importorskip("matplotlib")
    from frcnn_shard.inspect.show import sample_figure

    key, record = next((k, r) for k, r in samples_of(tiny_shards)
                       if r["boxes"] and min(b[1] for b in r["boxes"]) > 100)
    fig, _ = sample_figure(tiny_shards, keys=[key])
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    assert ax.get_title() == f"{key}: {plural(len(record['boxes']), 'box')}"
    for box, label in zip(record["boxes"], ax.texts):
        box_top = ax.transData.transform((box[0], box[1]))[1]
        assert label.get_window_extent(renderer).y0 >= box_top - 1  # sits on the box's top edge, above it


# ----------------------------------------------------------------------------------- packaging


def test_pyproject_license_loads_without_a_deprecation_warning():
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates SPDX license strings (the build requires >= 77)")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SetuptoolsDeprecationWarning for a license table
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "MIT"
    requires = (ROOT / "pyproject.toml").read_text().split("[build-system]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'"setuptools>=(\d+)"', requires).group(1) == "77"  # the first that takes the SPDX form
