"""`frcnn-shard check` / `info`: every kind of damage is found, by rule name, in a copy of good shards."""
from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from frcnn_shard.inspect.check import RULES, Problem, check_shards
from frcnn_shard.inspect.info import info_rows
from frcnn_shard.cli import main
from frcnn_shard.format.members import TARGETS_EXT
from frcnn_shard.format.targets import pack_targets, unpack_targets
from frcnn_shard.shards import (
    MANIFEST_NAME, ShardWriter, file_sha256, iter_shard, read_manifest, write_json_atomic,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "INSPECT.md"
MEMBER_ORDER = ("jpg", "png", "json", TARGETS_EXT)


# ----------------------------------------------------------------------------------- helpers


@pytest.fixture
def shards(tmp_path, tiny_shards) -> Path:
    """A private copy of the session's good shards, free to damage."""
    dst = tmp_path / tiny_shards.name
    shutil.copytree(tiny_shards, dst)
    return dst


def manifest_of(d: Path) -> dict:
    return json.loads((d / MANIFEST_NAME).read_text())


def shard_path(d: Path, i: int) -> Path:
    return d / manifest_of(d)["shards"][i]["name"]


def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """member name -> (offset of its data in the file, size)."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}


def member_of(path: Path, ext: str, nth: int = 1) -> tuple[str, int, int]:
    """(key, data offset, size) of the ``nth`` sample's member with extension ``ext``."""
    names = [n for n in member_offsets(path) if n.split(".", 1)[1] == ext]
    name = names[nth]
    off, size = member_offsets(path)[name]
    return name.split(".", 1)[0], off, size


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def rules(report) -> set[str]:
    return {p.rule for p in report.problems}


def rewrite_shard(d: Path, index: int, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Replace shard ``index`` with ``samples`` and make its manifest entry and totals agree with the file.

    This isolates the rule under test: size, sha256, counts and first/last key all stay consistent.
    """
    m = manifest_of(d)
    entry = m["shards"][index]
    w = ShardWriter(d / entry["name"])
    for key, members in samples:
        w.add(key, [(e, members[e]) for e in MEMBER_ORDER if e in members])
    info = w.close()
    entry.update(samples=info.samples, bytes=info.bytes, sha256=info.sha256,
                 first_key=info.first_key, last_key=info.last_key)
    m["totals"]["samples"] = sum(s["samples"] for s in m["shards"])
    m["totals"]["bytes"] = sum(s["bytes"] for s in m["shards"])
    write_json_atomic(d / MANIFEST_NAME, m)


def read_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    return list(iter_shard(path))


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


# ----------------------------------------------------------------------------------- clean


def test_clean_build_passes_through_the_cli(shards):
    before = {p: (p.stat().st_mtime_ns, file_sha256(p)) for p in shards.rglob("*") if p.is_file()}
    res = run_cli("check", str(shards))
    assert res.exit_code == 0, res.output
    assert "checked 49 samples in 4 shards" in res.output and ": 0 problems" in res.output
    after = {p: (p.stat().st_mtime_ns, file_sha256(p)) for p in shards.rglob("*") if p.is_file()}
    assert after == before  # check never writes


def test_clean_report_counts(tiny_shards):
    m = read_manifest(tiny_shards)
    report = check_shards(tiny_shards, workers=0)
    assert report.ok and report.problems == []
    assert report.samples == m["totals"]["samples"] and report.shards == len(m["shards"])
    assert report.bytes == m["totals"]["bytes"]
    assert report.summary_line().endswith(": 0 problems")


def test_worker_pool_gives_the_same_report(shards):
    flip_byte(shard_path(shards, 1), member_of(shard_path(shards, 1), "json")[1])
    serial = check_shards(shards, workers=0)
    pooled = check_shards(shards, workers=2)
    assert [str(p) for p in pooled.problems] == [str(p) for p in serial.problems]
    assert pooled.samples == serial.samples and not pooled.ok


def test_no_manifest_exits_2(tmp_path):
    res = run_cli("check", str(tmp_path))
    assert res.exit_code == 2
    assert "no manifest" in res.output


def test_json_output_parses(shards):
    flip_byte(shard_path(shards, 0), member_of(shard_path(shards, 0), "json")[1])
    res = run_cli("check", "--json", str(shards))
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and doc["samples"] == 49
    assert doc["problem_counts"]["json_invalid"] == 1
    assert {"shard", "key", "rule", "detail"} <= set(doc["problems"][0])


def test_problem_line_format():
    p = Problem("train2017-000000.tar", "000000000139", "json_invalid", "not valid JSON")
    assert str(p) == "train2017-000000.tar 000000000139: json_invalid: not valid JSON"
    assert str(Problem("manifest.json", "", "manifest_totals", "x")) == "manifest.json -: manifest_totals: x"


# ----------------------------------------------------------------------------------- damage


@pytest.mark.parametrize("nth", [0, 5])
def test_truncated_tar(shards, nth):
    """The cut sample is named and not counted; every sample before it is (the first sample included)."""
    path = shard_path(shards, 2)
    key, off, size = member_of(path, "jpg", nth=nth)
    path.write_bytes(path.read_bytes()[: off + size // 2])  # cut inside an image member
    report = check_shards(shards)
    assert {"tar_unreadable", "shard_size", "shard_sha256", "shard_count"} <= rules(report)
    assert all(p.shard == path.name for p in report.problems)
    assert [p.key for p in report.problems if p.rule == "tar_unreadable"] == [key]
    assert next(p.detail for p in report.problems if p.rule == "shard_count").startswith(f"{nth} samples")
    res = run_cli("check", str(shards))
    assert res.exit_code == 1 and "tar_unreadable" in res.output


def test_damaged_tar_header(shards):
    path = shard_path(shards, 1)
    with tarfile.open(path) as tar:
        header = tar.getmembers()[9].offset  # the 4th sample's image header
    flip_byte(path, header + 5)  # inside the name: the header checksum no longer matches
    report = check_shards(shards)
    assert rules(report) == {"shard_sha256", "tar_unreadable", "shard_count", "shard_keys"}
    assert f"at byte {header}" in next(p.detail for p in report.problems if p.rule == "tar_unreadable")
    # The three samples before the broken header are whole: they count, and the problem says after which.
    assert next(p.detail for p in report.problems if p.rule == "shard_count").startswith("3 samples")
    assert f"after key {member_of(path, 'json', nth=2)[0]}" in next(
        p.detail for p in report.problems if p.rule == "tar_unreadable")


def test_flipped_byte_in_image_header(shards):
    path = shard_path(shards, 1)
    key, off, _ = member_of(path, "jpg")
    flip_byte(path, off)  # the JPEG SOI marker: Pillow cannot identify the image
    report = check_shards(shards)
    assert rules(report) == {"shard_sha256", "image_decode"}
    assert [p.key for p in report.problems if p.rule == "image_decode"] == [key]


def test_flipped_byte_in_image_scan_data(shards):
    path = shard_path(shards, 1)
    _, off, size = member_of(path, "jpg")
    flip_byte(path, off + size // 2)  # entropy-coded data: may still decode; the sha256 catches it
    report = check_shards(shards)
    assert "shard_sha256" in rules(report)
    assert rules(report) <= {"shard_sha256", "image_decode"}


def test_flipped_byte_in_json(shards):
    path = shard_path(shards, 3)  # the last shard: a single sample
    key, off, _ = member_of(path, "json", nth=0)
    flip_byte(path, off)  # '{' -> 0x84: not JSON (not even UTF-8)
    report = check_shards(shards)
    assert rules(report) == {"shard_sha256", "json_invalid"}
    assert [p.key for p in report.problems if p.rule == "json_invalid"] == [key]


def test_flipped_byte_in_targets(shards):
    path = shard_path(shards, 0)
    key, off, size = member_of(path, TARGETS_EXT)
    flip_byte(path, off + size // 2)  # inside the deflated array: CRC / zlib error
    report = check_shards(shards)
    assert rules(report) == {"shard_sha256", "targets_invalid"}
    assert [p.key for p in report.problems if p.rule == "targets_invalid"] == [key]


def test_undecodable_pixels(shards):
    """A truncated JPEG keeps a valid header: named where pixels get decoded (hash mismatch, --deep)."""
    samples = read_samples(shard_path(shards, 0))
    key, members = samples[2]
    samples[2] = (key, {**members, "jpg": members["jpg"][: len(members["jpg"]) // 2]})
    rewrite_shard(shards, 0, samples)  # manifest updated: the shard's bytes are "the published ones"
    assert check_shards(shards).ok  # by design: no pixel decoding where the sha256 matches
    deep = check_shards(shards, deep=True)
    assert rules(deep) == {"image_decode"} and deep.problems[0].key == key
    m = manifest_of(shards)
    m["shards"][0]["sha256"] = "0" * 64
    write_json_atomic(shards / MANIFEST_NAME, m)
    report = check_shards(shards)
    assert rules(report) == {"shard_sha256", "image_decode"}
    assert [p.key for p in report.problems if p.rule == "image_decode"] == [key]


def test_deleted_shard(shards):
    path = shard_path(shards, 1)
    path.unlink()
    report = check_shards(shards)
    assert rules(report) == {"shard_missing"}
    assert report.problems[0].shard == path.name and report.shards == 3


def test_extra_shard_and_partial_file(shards):
    shutil.copy(shard_path(shards, 0), shards / "train2017-000009.tar")
    (shards / "train2017-000004.tar.partial").write_bytes(b"")
    (shards / "notes.txt").write_text("unrelated files are fine")
    report = check_shards(shards)
    assert rules(report) == {"shard_extra", "partial_file"}
    assert {p.shard for p in report.problems} == {"train2017-000009.tar", "train2017-000004.tar.partial"}


def test_edited_manifest_shard_count(shards):
    m = manifest_of(shards)
    m["shards"][0]["samples"] += 1
    m["totals"]["samples"] += 1  # keep the totals consistent: only the per-shard count is wrong
    write_json_atomic(shards / MANIFEST_NAME, m)
    report = check_shards(shards)
    assert rules(report) == {"shard_count"}
    assert report.problems[0].shard == m["shards"][0]["name"]


def test_edited_manifest_totals(shards):
    m = manifest_of(shards)
    m["totals"]["samples"] -= 3
    write_json_atomic(shards / MANIFEST_NAME, m)
    assert rules(check_shards(shards)) == {"manifest_totals"}


def test_incomplete_manifest(shards):
    m = manifest_of(shards)
    m["complete"] = False
    write_json_atomic(shards / MANIFEST_NAME, m)
    assert rules(check_shards(shards)) == {"manifest_incomplete"}


def _drops_edits(lines: list[bytes]) -> dict[str, list[bytes] | None]:
    """Ways to break drops.jsonl (None: the file deleted), each with what the problem must say."""
    rec = json.loads(lines[0])
    other = {**rec, "reason": "corrupt_image"}
    return {
        "is not in the folder": None,
        "line(s), the manifest's drops.rows is": [],
        "is not a dropped row's record": [b"{not json"],
        "each dropped row is listed once, in row order": lines + [json.dumps(rec).encode()],
        "outside the split's rows": [json.dumps({**rec, "row": 10**6}).encode()],
        "whose manifest entry counts": [json.dumps(other).encode()],
        "row must be an integer": [json.dumps({**rec, "row": "5"}).encode()],
    }


def test_the_dropped_rows_file_agrees_with_the_manifest(shards):
    path = shards / "drops.jsonl"
    lines = path.read_bytes().splitlines()
    assert len(lines) == manifest_of(shards)["drops"]["rows"] >= 1  # tiny_coco has an image without boxes
    for says, edit in _drops_edits(lines).items():
        if edit is None:
            path.unlink()
        else:
            path.write_bytes(b"".join(line + b"\n" for line in edit))
        report = check_shards(shards)
        assert rules(report) == {"drops_file"}, (says, report.problems)
        assert any(says in p.detail for p in report.problems), (says, [p.detail for p in report.problems])
        path.write_bytes(b"".join(line + b"\n" for line in lines))
    assert check_shards(shards).problems == []


def test_duplicated_key_across_shards(shards):
    first = read_samples(shard_path(shards, 0))[0]
    rewrite_shard(shards, 2, read_samples(shard_path(shards, 2)) + [first])
    report = check_shards(shards)
    assert rules(report) == {"key_duplicate"}
    (p,) = report.problems
    assert p.key == first[0] and p.shard == shard_path(shards, 2).name and "also in" in p.detail


def test_duplicated_key_within_a_shard(shards):
    samples = read_samples(shard_path(shards, 1))
    rewrite_shard(shards, 1, samples + [samples[3]])
    report = check_shards(shards)
    assert rules(report) == {"key_duplicate"}
    assert report.problems[0].key == samples[3][0]


def test_sample_rules_on_edited_json(shards):
    """Edited (still valid) JSON: key/image_id mismatch, boxes outside, bad labels, wrong rpn counts."""
    samples = read_samples(shard_path(shards, 0))
    key0, m0 = samples[0]
    meta = json.loads(m0["json"])
    meta["image_id"] += 1
    meta["boxes"][0] = [10.0, 10.0, 500.0, 20.0]  # x2 beyond the 400 px image
    meta["labels"][0] = 81
    meta["rpn"]["positive"] += 1
    samples[0] = (key0, {**m0, "json": json.dumps(meta).encode()})
    key1, m1 = samples[1]
    samples[1] = (key1, {e: b for e, b in m1.items() if e != TARGETS_EXT})
    rewrite_shard(shards, 0, samples)
    report = check_shards(shards)
    by_key = {(p.key, p.rule) for p in report.problems}
    assert by_key == {(key0, "key_mismatch"), (key0, "box_invalid"), (key0, "label_invalid"),
                      (key0, "targets_counts"), (key1, "members")}


def test_data_after_the_archive(shards):
    path = shard_path(shards, 0)
    path.write_bytes(path.read_bytes() + b"junk" * 256)
    m = manifest_of(shards)
    m["shards"][0].update(bytes=path.stat().st_size, sha256=file_sha256(path))
    m["totals"]["bytes"] = sum(s["bytes"] for s in m["shards"])
    write_json_atomic(shards / MANIFEST_NAME, m)
    assert rules(check_shards(shards)) == {"tar_trailing"}


def test_pickle_member_is_refused_by_name(shards):
    samples = read_samples(shard_path(shards, 3))
    path = shard_path(shards, 3)
    w = ShardWriter(path)
    for i, (key, members) in enumerate(samples):  # the first sample gains a pickle-type member
        w.add(key, [(e, members[e]) for e in MEMBER_ORDER if e in members] + ([("pyd", b"cos\nsystem\n")] if i == 0 else []))
    info = w.close()
    m = manifest_of(shards)
    m["shards"][3].update(bytes=info.bytes, sha256=info.sha256)
    m["totals"]["bytes"] = sum(s["bytes"] for s in m["shards"])
    write_json_atomic(shards / MANIFEST_NAME, m)
    report = check_shards(shards)
    assert rules(report) == {"member_name"}
    assert "pickle" in report.problems[0].detail


# ----------------------------------------------------------------------------------- deep


def test_deep_passes_on_clean_shards(tiny_shards):
    report = check_shards(tiny_shards, deep=True)
    assert report.ok, [str(p) for p in report.problems]
    assert report.deep_samples == report.samples


def test_deep_fraction_is_deterministic(tiny_shards):
    a = check_shards(tiny_shards, deep=True, fraction=0.3)
    b = check_shards(tiny_shards, deep=True, fraction=0.3)
    assert 0 < a.deep_samples < a.samples and a.deep_samples == b.deep_samples
    assert check_shards(tiny_shards, deep=True, fraction=0.0).deep_samples == 0


def test_deep_finds_well_formed_but_wrong_targets(shards):
    m = read_manifest(shards)
    samples = read_samples(shard_path(shards, 1))
    key, members = samples[4]
    n = m["anchors"]["count"]
    labels, matched = unpack_targets(members[TARGETS_EXT], n).dense(n)
    mirrored = unpack_targets(members[TARGETS_EXT], n, flipped=True).dense(n)  # kept as built
    labels = labels.copy()
    flip = np.flatnonzero(labels == 0)[:7]
    labels[flip] = -1  # seven negatives become ignore: still a valid encoding
    meta = json.loads(members["json"])
    meta["rpn"] = {"positive": int((labels == 1).sum()), "ignore": int((labels == -1).sum()),
                   "negative": int((labels == 0).sum())}
    samples[4] = (key, {**members, TARGETS_EXT: pack_targets(labels, matched, flipped=mirrored),
                        "json": json.dumps(meta, separators=(",", ":")).encode()})
    rewrite_shard(shards, 1, samples)

    assert run_cli("check", str(shards)).exit_code == 0  # the fast check cannot see it
    res = run_cli("check", "--deep", str(shards))
    assert res.exit_code == 1
    report = check_shards(shards, deep=True)
    assert rules(report) == {"targets_deep"}
    (p,) = report.problems
    assert p.key == key and p.detail.startswith(f"stored: 7 of {n} anchor labels differ")


# ----------------------------------------------------------------------------------- info, docs


def test_info_rows_hold_the_manifest_values(tiny_shards):
    m = read_manifest(tiny_shards)
    rows = dict(info_rows(m))
    assert rows["source"].startswith(m["source"]["id"])
    assert rows["split"] == m["split"] == "train2017"
    assert rows["samples"] == str(m["totals"]["samples"])
    assert rows["shards"] == str(len(m["shards"]))
    assert rows["rows read"] == str(m["totals"]["rows"]) == "50"
    assert str(m["totals"]["bytes"]) in rows["bytes"]
    assert rows["images dropped"] == "no_boxes 1 (each row in drops.jsonl: 1 line)"
    assert rows["bbox format"].startswith(m["bbox_format"]["decision"])
    assert str(m["anchors"]["count"]) in rows["anchors"] and m["anchors"]["sha256"][:12] in rows["anchors"]
    assert "pos_iou 0.7" in rows["matching"]
    assert rows["image"].startswith("400x400") and "jpg quality 90" in rows["image"]
    assert rows["format version"] == m["format_version"] and rows["complete"] == "yes"
    res = run_cli("info", str(tiny_shards))
    assert res.exit_code == 0 and "no_boxes 1" in res.output
    assert run_cli("info", str(tiny_shards.parent / "nowhere")).exit_code == 2


def test_every_rule_is_documented():
    text = DOCS.read_text()
    documented = set(re.findall(r"`([a-z0-9_]+)`", text))
    assert set(RULES) <= documented, sorted(set(RULES) - documented)
