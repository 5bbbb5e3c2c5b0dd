"""Shard and manifest I/O: reproducible tars, atomic publication, safe reading."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from frcnn_shard.shards import (
    FORMAT_VERSION, MANIFEST_NAME, ManifestError, ShardFormatError, ShardWriter, file_sha256,
    iter_shard, iter_tar_samples, list_shard_keys, read_manifest, shard_name, tar_members, write_json_atomic,
)

SAMPLES = [
    ("000000000001", [("jpg", b"\xff\xd8fake-jpeg-1"), ("json", b'{"a":1}'), ("rpn.npz", b"npz1")]),
    ("000000000002", [("jpg", b"\xff\xd8fake-jpeg-2"), ("json", b'{"a":2}'), ("rpn.npz", b"npz2")]),
]


def write(path, samples=SAMPLES):
    w = ShardWriter(path)
    for key, members in samples:
        w.add(key, members)
    return w.close()


def test_shard_name():
    assert shard_name("train", 0) == "train-000000.tar"
    assert shard_name("val", 123) == "val-000123.tar"


def test_writer_publishes_atomically_and_reports_hash(tmp_path):
    final = tmp_path / "train-000000.tar"
    w = ShardWriter(final)
    w.add(*SAMPLES[0])
    assert not final.exists() and (tmp_path / "train-000000.tar.partial").exists()
    info = w.close()
    assert final.exists() and not (tmp_path / "train-000000.tar.partial").exists()
    assert info.sha256 == file_sha256(final)
    assert info.bytes == final.stat().st_size
    assert (info.samples, info.first_key, info.last_key) == (1, "000000000001", "000000000001")


def test_abort_leaves_nothing(tmp_path):
    w = ShardWriter(tmp_path / "x-000000.tar")
    w.add(*SAMPLES[0])
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_tars_are_reproducible_and_plain(tmp_path):
    a, b = write(tmp_path / "a.tar"), write(tmp_path / "b.tar")
    assert a.sha256 == b.sha256
    with tarfile.open(tmp_path / "a.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [f"{k}.{e}" for k, ms in SAMPLES for e, _ in ms]
    assert all(i.mtime == 0 and i.uid == 0 and i.gid == 0 and i.uname == "" and i.mode == 0o644 for i in infos)


def test_iter_shard_round_trip(tmp_path):
    write(tmp_path / "s.tar")
    got = list(iter_shard(tmp_path / "s.tar"))
    assert [k for k, _ in got] == [k for k, _ in SAMPLES]
    assert got[1][1] == dict(SAMPLES[1][1])
    assert list_shard_keys(tmp_path / "s.tar") == [k for k, _ in SAMPLES]


def _raw_tar(members: list[tuple[str, bytes]], kind=tarfile.REGTYPE) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.type = kind
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


@pytest.mark.parametrize("name, rule", [
    ("000001.pickle", "pickle"),
    ("000001.pyd", "pickle"),
    ("000001.pth", "pickle"),
    ("../000001.jpg", "path traversal"),
    ("/etc/000001.jpg", "path traversal"),
    ("sub/000001.jpg", "path traversal"),
])
def test_unsafe_members_are_refused(name, rule):
    with pytest.raises(ShardFormatError, match=rule):
        list(iter_tar_samples(_raw_tar([(name, b"x")]), "bad.tar"))


def test_non_regular_and_oversized_members_are_refused():
    with pytest.raises(ShardFormatError, match="not a regular file"):
        list(iter_tar_samples(_raw_tar([("000001.jpg", b"")], kind=tarfile.SYMTYPE), "bad.tar"))
    with pytest.raises(ShardFormatError, match="limit"):
        list(iter_tar_samples(_raw_tar([("000001.jpg", b"x" * 100)]), "big.tar", max_member_bytes=10))


def test_unknown_members_ignored_and_truncation_named(tmp_path):
    got = list(iter_tar_samples(_raw_tar([("k.jpg", b"1"), ("k.txt", b"2"), ("k.json", b"{}")]), "t"))
    assert got == [("k", {"jpg": b"1", "json": b"{}"})]
    write(tmp_path / "s.tar")
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:700])
    with pytest.raises(ShardFormatError, match="cut.tar"):
        list(iter_shard(tmp_path / "cut.tar"))


def test_manifest_atomic_write_and_version_rules(tmp_path, sample_shards):
    sound = read_manifest(sample_shards)  # a real manifest: read_manifest checks its structure
    write_json_atomic(tmp_path / MANIFEST_NAME, {**sound, "x": 1})
    assert read_manifest(tmp_path)["x"] == 1  # a field a reader does not know is kept and ignored
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]
    major = int(FORMAT_VERSION.split(".")[0])
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**sound, "format_version": f"{major}.99"}))
    read_manifest(tmp_path)  # a newer minor version stays readable
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**sound, "format_version": f"{major + 1}.0"}))
    with pytest.raises(ManifestError, match="not readable"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable"):
        read_manifest(tmp_path)
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(tmp_path / "nowhere")


def _tarfile_shard(samples) -> bytes:
    """The bytes tarfile itself writes for ShardWriter's members (the reference for the template)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_writer_bytes_are_exactly_tarfiles(tmp_path):
    from frcnn_shard.shards import member_header

    sizes = (0, 1, 511, 512, 513, 10239, 10240, 42_000)
    samples = [(f"{i:012d}", [("jpg", b"\xab" * n), ("json", b"{}" * (n % 7)), ("rpn.npz", b"z" * (n // 3))])
               for i, n in enumerate(sizes)]
    info = write(tmp_path / "t-000000.tar", samples)
    data = (tmp_path / "t-000000.tar").read_bytes()
    assert data == _tarfile_shard(samples)
    assert info.bytes == len(data) and info.sha256 == file_sha256(tmp_path / "t-000000.tar")
    # The template against tarfile's own header, including names and sizes it hands back to tarfile.
    for name in ("a.jpg", "x" * 100, "k" * 60 + "/" + "z" * 60 + ".jpg", "\u00e9t\u00e9.json", "000000000001.rpn.npz"):
        for size in (0, 1, 512, 123_456_789, 8 ** 11 - 1):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
            info.uname = info.gname = ""
            assert member_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT), (name, size)


# ------------------------------------------------------------------ streaming reader vs tarfile


def _tarfile_reference(data: bytes) -> tuple[list, str | None]:
    """What tarfile's own "r|" stream gives: every member's (name, size, regular, bytes), then the error."""
    out: list = []
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r|")
        for info in tar:
            out.append((info.name, info.size, info.isreg(), tar.extractfile(info).read() if info.isreg() else b""))
    except tarfile.TarError as e:
        return out, f"{type(e).__name__}: {e}"
    return out, None


class _Trickle(io.RawIOBase):
    """A stream that returns at most 7 bytes per read, as a pipe or a socket may."""

    def __init__(self, data: bytes):
        self._f = io.BytesIO(data)

    def read(self, n=-1):
        return self._f.read(7 if n is None or n < 0 else min(n, 7))


def _streamed(data: bytes, trickle: bool = False) -> tuple[list, str | None]:
    out: list = []
    try:
        for m in tar_members(_Trickle(data) if trickle else io.BytesIO(data)):
            out.append((m.name, m.size, m.regular, m.read() if m.regular else b""))
    except tarfile.TarError as e:
        return out, f"{type(e).__name__}: {e}"
    return out, None


def _odd_archives(tmp_path) -> dict[str, bytes]:
    """Plain shards, archives tarfile writes with special members, and damaged ones."""
    plain = (write(tmp_path / "plain.tar"), (tmp_path / "plain.tar").read_bytes())[1]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, body in (("a.jpg", b"x" * 700), ("k" * 150 + ".json", b"{}"), ("dir", None), ("ln.jpg", "a.jpg"),
                           ("b.rpn.npz", b"")):
            info = tarfile.TarInfo(name)
            if body is None:
                info.type = tarfile.DIRTYPE
            elif isinstance(body, str):
                info.type, info.linkname = tarfile.SYMTYPE, body
            else:
                info.size = len(body)
            tar.addfile(info, io.BytesIO(body) if isinstance(body, bytes) else None)
    gnu = buf.getvalue()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("c.jpg", "c.jsön"):  # a non-ASCII name gets a pax header
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    pax = buf.getvalue()
    bad_sum = bytearray(plain)
    bad_sum[1024 + 148] ^= 1  # the second member's checksum
    junk_head = bytearray(plain)
    junk_head[1024 + 124:1024 + 136] = b"zzzzzzzzzzz\0"  # the second member's size field
    return {"plain": plain, "gnu": gnu, "pax": pax, "bad_checksum": bytes(bad_sum), "bad_size": bytes(junk_head),
            "empty": b"", "short": plain[:300], "no_end_blocks": plain[:plain.index(b"npz2") + 512],
            "trailing_junk": plain + b"junk", "bad_first": b"\x01" * 512 + plain}


def test_streaming_tar_reader_gives_tarfiles_members_and_errors(tmp_path):
    archives = _odd_archives(tmp_path)
    plain = archives["plain"]
    # Every cut of a plain shard: inside headers, data, padding and the end blocks.
    cuts = sorted(set(range(0, len(plain), 97)) | {k * 512 + d for k in range(len(plain) // 512) for d in (0, 1, 511)})
    for cut in cuts:
        archives[f"cut at {cut}"] = plain[:cut]
    for name, data in archives.items():
        ref = _tarfile_reference(data)
        assert _streamed(data) == ref, name
        assert _streamed(data, trickle=True) == ref, name
    assert _streamed(archives["gnu"])[0][1][0] == "k" * 150 + ".json"  # handed to tarfile: the long name
    assert _streamed(archives["plain"])[1] is None and len(_streamed(archives["plain"])[0]) == 6


def test_streaming_tar_reader_skips_unread_members_in_bounded_reads(tmp_path):
    data = write(tmp_path / "s.tar") and (tmp_path / "s.tar").read_bytes()
    reads: list[int] = []

    class Counting(io.BytesIO):
        def read(self, n=-1):
            reads.append(n)
            return super().read(n)

    names = [m.name for m in tar_members(Counting(data))]  # no member read: every one skipped
    assert names == [f"{k}.{e}" for k, ms in SAMPLES for e, _ in ms]
    assert max(reads) <= 1 << 20


def test_the_manifest_view_gives_the_checked_fields_typed(tiny_shards):
    """read_manifest returns the typed view: each accessor is the JSON field it names, typed."""
    import pickle

    from frcnn_shard.format.manifest import Manifest, ShardEntry

    man = read_manifest(tiny_shards)
    raw = json.loads((tiny_shards / MANIFEST_NAME).read_text())
    assert isinstance(man, Manifest) and man == raw  # every field as written
    assert man.image_hw == tuple(raw["image"]["size"]) and man.num_anchors == raw["anchors"]["count"]
    assert man.classes == tuple(raw["classes"]) and man.num_classes == len(raw["classes"]) == 81
    assert man.split == raw["split"] and man.complete is True and man.flip_targets is raw["anchors"]["flip_targets"]
    assert man.samples == raw["totals"]["samples"] == sum(s.samples for s in man.shards)
    assert [ShardEntry.of(e) for e in raw["shards"]] == list(man.shards)
    assert [(s.name, s.rows) for s in man.shards] == [(e["name"], tuple(e["rows"])) for e in raw["shards"]]
    assert man.mean_std == (tuple(raw["normalization"]["mean"]), tuple(raw["normalization"]["std"]))
    assert pickle.loads(pickle.dumps(man)).shards == man.shards  # DataLoader workers receive it
