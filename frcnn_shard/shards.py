"""The names tests, scripts and older code import from ``frcnn_shard.shards``, now homed in ``storage``.

Shard and manifest I/O lives in ``frcnn_shard.storage``: ``storage.tar`` (the writer, the one reader and
its framing), ``storage.samples`` (a shard's samples), ``storage.manifest_io`` (the manifest and the one
JSON writer); the file names are ``format.names``'. New code imports from there.
"""
from __future__ import annotations

from .faults import FAULT_ENV, fault_point
from .format import FORMAT_VERSION
from .format.manifest import ManifestError
from .format.members import ShardFormatError
from .format.names import MANIFEST_NAME, PARTS_DIR, SHARD_RE, shard_name
from .storage.base import PARTIAL_SUFFIX
from .storage.local import file_sha256
from .storage.location import store_of
from .storage.manifest_io import json_bytes, jsonl_bytes, read_bounded, read_manifest, write_json_atomic
from .storage.samples import (
    iter_shard, iter_store_shard, iter_tar_samples, list_shard_keys, sample_error, sample_record, sample_targets,
)
from .storage.tar import ShardInfo, ShardWriter, header_checksum, member_header, plain_header, tar_members

__all__ = [
    "FAULT_ENV", "FORMAT_VERSION", "MANIFEST_NAME", "PARTIAL_SUFFIX", "PARTS_DIR", "SHARD_RE", "ManifestError", "ShardFormatError",
    "ShardInfo", "ShardWriter", "fault_point", "file_sha256", "header_checksum", "iter_shard", "iter_store_shard",
    "iter_tar_samples", "json_bytes", "jsonl_bytes", "list_shard_keys", "member_header", "plain_header",
    "read_bounded", "read_manifest", "sample_error", "sample_record", "sample_targets", "shard_name", "store_of",
    "tar_members", "write_json_atomic",
]
