"""Every command on a generated set of hostile splits: a message naming the file and the rule, never a traceback.

Each hostile split is a copy of a real (synthetic) build with one thing made hostile: a manifest field of the
wrong type, a name that is a command or a path outside the folder, JSON nested 100,000 deep, a record that breaks a
rule. The commands run in-process through click, so an exception that escapes a command shows up as itself
instead of as SystemExit.
"""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from frcnn_shard.cli import main
from frcnn_shard.loader import make_loader
from frcnn_shard.shards import ShardWriter, read_manifest
from frcnn_shard.storage import LocalStore

_DEEP = "[" * 100_000 + "]" * 100_000


def _set(path: str, value):
    """A manifest mutation: set the dotted ``path`` (list indices as numbers) to ``value``."""
    def mutate(m: dict) -> dict:
        node, keys = m, path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value
        return m
    return mutate


def _listed_twice(m: dict) -> dict:
    m["shards"] = [m["shards"][0], *m["shards"]]
    return m


# (id, mutation of the manifest dict, or the raw bytes of manifest.json)
HOSTILE_MANIFESTS = [
    ("pipe_name", _set("shards.0.name", "pipe:id > /tmp/frcnn_shard_hostile; cat train-000000.tar")),
    ("url_name", _set("shards.0.name", "http://127.0.0.1:9/x.tar")),
    ("traversal_name", _set("shards.0.name", "../../x.tar")),
    ("absolute_name", _set("shards.0.name", "/etc/passwd")),
    ("device_name", _set("shards.0.name", "/dev/zero")),
    ("other_split_name", _set("shards.0.name", "val-000000.tar")),
    ("index_name_mismatch", _set("shards.0.name", "train-000001.tar")),
    ("listed_twice", _listed_twice),
    ("shards_dict", _set("shards", {"train-000000.tar": 8})),
    ("shards_string", _set("shards", "train-000000.tar")),
    ("samples_string", _set("shards.0.samples", "many")),
    ("samples_float", _set("shards.0.samples", 1.5)),
    ("samples_huge", _set("shards.0.samples", 10 ** 30)),
    ("entry_list", _set("shards.0", [])),
    ("sha_dict", _set("shards.0.sha256", {})),
    ("rows_backwards", _set("shards.0.rows", [8, 0])),
    ("first_key_list", _set("shards.0.first_key", [1])),
    ("size_missing", _set("image", {"format": "jpg"})),
    ("size_negative", _set("image.size", [-1, 64])),
    ("size_huge", _set("image.size", [10 ** 9, 10 ** 9])),
    ("size_string", _set("image.size", "400x400")),
    ("format_gif", _set("image.format", "gif")),
    ("anchor_count_wrong", lambda m: _set("anchors.count", m["anchors"]["count"] + 1)(m)),
    ("anchor_count_huge", _set("anchors.count", 10 ** 12)),
    ("anchor_spec_huge", _set("anchors.spec.image_hw", [10 ** 7, 10 ** 7])),
    ("anchor_spec_many_ratios", _set("anchors.spec.ratios", [1.0] * 100_000)),
    ("anchor_spec_string", _set("anchors.spec", "frcnn-fpn")),
    ("drops_file_device", _set("drops.file", "/dev/zero")),
    ("drops_file_traversal", _set("drops.file", "../../etc/passwd")),
    ("classes_dict", _set("classes", {"1": "person"})),
    ("classes_empty", _set("classes", [])),
    ("classes_no_background", _set("classes.0", "person")),
    ("categories_name_differs", _set("categories.list.0.name", "not-the-class")),
    ("categories_duplicate_id", lambda m: _set("categories.list.1.id", m["categories"]["list"][0]["id"])(m)),
    ("categories_label_gap", _set("categories.list.0.label", 5)),
    ("categories_id_string", _set("categories.list.0.id", "1")),
    ("categories_id_list", _set("categories.list.0.id", [1])),
    ("categories_too_many", _set("categories.list", [{"label": 1}] * 70_000)),
    ("categories_string", _set("categories", "coco")),
    ("std_zero", _set("normalization.std", [0, 0, 0])),
    ("complete_string", _set("complete", "yes")),
    ("totals_list", _set("totals", [1, 2])),
    ("split_traversal", _set("split", "../x")),
    ("version_dict", _set("format_version", {"major": 2})),
    ("version_3", _set("format_version", "3.0")),
    ("top_level_list", lambda m: [m]),
    ("deep_json", _DEEP.encode()),
    ("deep_in_field", lambda m: _set("options", json.loads("[" * 50 + "]" * 50))(m)),
    ("not_json", b"\x89PNG\r\n\x1a\n garbage"),
    ("empty_file", b""),
    ("not_utf8", b'{"format_version": "\xff\xfe"}'),
]


def _copy_split(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _write_manifest(folder: Path, mutation) -> None:
    if isinstance(mutation, bytes):
        (folder / "manifest.json").write_bytes(mutation)
        return
    m = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(mutation(m)))


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _commands(folder: Path, tmp: Path) -> dict[str, list[str]]:
    return {
        "check": ["check", str(folder)],
        "info": ["info", str(folder)],
        "stats": ["stats", str(folder), "--out", str(tmp / "stats.png")],
        "show": ["show", str(folder), "--index", "0", "--out", str(tmp / "show.png")],
        "coco-gt": ["coco-gt", str(folder), "--out", str(tmp / "gt.json")],
    }


def _no_traceback(result, command: str) -> None:
    """The command ended through sys.exit (a message), not by an exception escaping it."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{command}: {type(result.exception).__name__} escaped: {result.exception}") \
            from result.exception
    assert "Traceback" not in result.output, f"{command}: {result.output}"


@pytest.mark.parametrize("name,mutation", HOSTILE_MANIFESTS, ids=[h[0] for h in HOSTILE_MANIFESTS])
def test_every_command_refuses_a_hostile_manifest_naming_the_file_with_exit_2(sample_shards, tmp_path, name, mutation):
    folder = _copy_split(sample_shards, tmp_path / "train")
    _write_manifest(folder, mutation)
    for command, args in _commands(folder, tmp_path).items():
        result = _run(*args)
        _no_traceback(result, command)
        assert result.exit_code == 2, f"{command} exited {result.exit_code}: {result.output}"
        assert "manifest.json" in result.output, f"{command}: {result.output}"
    with pytest.raises(ValueError, match="manifest.json"):  # ManifestError (a ValueError) or LoaderError
        make_loader(folder, 4, num_workers=0)
    assert not Path("/tmp/frcnn_shard_hostile").exists(), "a command from the manifest was run"


def test_the_untouched_copy_passes_every_command(sample_shards, tmp_path):
    """The sweep's baseline: the same commands on the unmodified copy succeed (the harness can pass)."""
    folder = _copy_split(sample_shards, tmp_path / "train")
    for command, args in _commands(folder, tmp_path).items():
        result = _run(*args)
        _no_traceback(result, command)
        assert result.exit_code == 0, f"{command}: {result.output}"
    assert sum(len(t) for _, t in make_loader(folder, 4, num_workers=0)) == read_manifest(folder)["totals"]["samples"]


# --------------------------------------------------------------------------- hostile samples inside shards


def _record_mutation(field: str, value):
    def mutate(record: dict) -> dict | str:
        record[field] = value
        return record
    return mutate


HOSTILE_RECORDS = [
    ("label_float", lambda r: {**r, "labels": [1.5] + r["labels"][1:]}),
    ("label_out_of_range", lambda r: {**r, "labels": [10 ** 6] + r["labels"][1:]}),
    ("label_negative", lambda r: {**r, "labels": [-3] + r["labels"][1:]}),
    ("box_outside", lambda r: {**r, "boxes": [[-500.0, -500.0, 9000.0, 9000.0]] + r["boxes"][1:]}),
    ("box_nan", lambda r: {**r, "boxes": [["NaN", 0, 1, 1]] + r["boxes"][1:]}),
    ("boxes_string", _record_mutation("boxes", "many")),
    ("image_id_other", lambda r: {**r, "image_id": r["image_id"] + 1}),
    ("image_id_string", _record_mutation("image_id", "../../etc")),
    ("record_list", lambda r: [r]),
    ("record_deep", lambda r: _DEEP),
    ("scale_zero", _record_mutation("scale", 0)),
    ("orig_size_dict", _record_mutation("orig_size", {})),
]


def _rewrite_first_sample(folder: Path, mutate_record) -> None:
    """Rewrite shard 0 with its first sample's record mutated; the manifest's size and sha256 follow, so only
    the record is hostile (check reads on past the sha256)."""
    man = json.loads((folder / "manifest.json").read_text())
    entry = man["shards"][0]
    path = folder / entry["name"]
    samples: list[tuple[str, list[tuple[str, bytes]]]] = []
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            key, ext = info.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, []))
            samples[-1][1].append((ext, tar.extractfile(info).read()))
    key, members = samples[0]
    changed = mutate_record(json.loads(dict(members)["json"]))
    data = changed.encode() if isinstance(changed, str) else json.dumps(changed).encode()
    samples[0] = (key, [(e, data if e == "json" else b) for e, b in members])
    path.unlink()
    writer = ShardWriter(LocalStore(folder), entry["name"])
    for k, m in samples:
        writer.add(k, m)
    info = writer.close()
    man["totals"]["bytes"] += info.bytes - entry["bytes"]
    entry.update(bytes=info.bytes, sha256=info.sha256)
    (folder / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("name,mutate", HOSTILE_RECORDS, ids=[h[0] for h in HOSTILE_RECORDS])
def test_every_command_names_a_hostile_record_without_a_traceback(sample_shards, tmp_path, name, mutate):
    folder = _copy_split(sample_shards, tmp_path / "train")
    _rewrite_first_sample(folder, mutate)
    first = read_manifest(folder)["shards"][0]["first_key"]
    for command, args in _commands(folder, tmp_path).items():
        result = _run(*args)
        _no_traceback(result, command)
        if command == "info":  # reads the manifest alone
            assert result.exit_code == 0, result.output
        elif command == "check":  # finds the problem and names the sample
            assert result.exit_code == 1 and first in result.output, result.output
        else:  # stats, show and coco-gt refuse the split, naming the sample
            assert result.exit_code == 2 and first in result.output, f"{command}: {result.output}"
    with pytest.raises(ValueError, match=first):  # ShardFormatError names the sample
        for _ in make_loader(folder, 4, num_workers=0, shuffle=False):
            pass
    loader = make_loader(folder, 4, num_workers=0, shuffle=False, on_error="skip")
    delivered = sum(len(t) for _, t in loader)
    assert (delivered, loader.skipped) == (read_manifest(folder)["totals"]["samples"] - 1, 1)


@pytest.mark.parametrize("field,value", [
    ("options", {"transform": "400", "anchors": 3, "max_rows": [1]}), ("source", {"id": {"a": 1}, "kind": 5}),
    ("bbox_format", {"evidence": 3, "decision": [], "rows_examined": "many"}), ("tool", {}),
    ("run", {"parts": "x", "part_runs": 5}), ("source_stats", {"x": [1]}),
])
def test_info_prints_informational_sections_of_any_shape(sample_shards, tmp_path, field, value):
    """source, options, tool, bbox_format and run are free-form objects to the manifest's rules: info words
    whatever they hold instead of failing on it."""
    folder = _copy_split(sample_shards, tmp_path / "train")
    _write_manifest(folder, _set(field, value))
    result = _run("info", str(folder))
    _no_traceback(result, "info")
    assert result.exit_code == 0 and "complete" in result.output, result.output
