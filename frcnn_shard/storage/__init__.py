"""Where shards live: a local directory, or any fsspec URL (s3://, gs://, memory://, ...).

A ``Store`` (``base.Store``) is one directory. Both kinds give the guarantees the build and the loader
rely on (docs/RELIABILITY.md is where they are stated in full):

- nothing partial under a final name: a local file is written as ``<name>.partial``, fsync'ed and
  renamed (``local``); an object is spooled to a local file while it is written and uploaded once
  whole (one PUT, or a multipart upload completed only at its end), so an interrupted upload leaves
  no object (``remote``);
- small records (manifest, part records, drops) are replaced atomically (rename, or one PUT);
- reads stream, and a remote read that fails mid-way reopens at the same offset (bounded retries,
  ``retry``: the one transient-error rule of the project).

Modules: ``base`` (the protocol, uploads, regular files), ``retry`` (the transient rule, bounded
retries, StoreOutage), ``local``, ``remote``, ``location`` (path or URL -> store), ``tar`` (the shard
writer, the one tar reader and framing), ``samples`` (a shard's samples), ``manifest_io`` (the manifest
and the one JSON writer).
"""
from __future__ import annotations

from .base import (
    PARTIAL_SUFFIX, RULE_REGULAR_FILE, NotRegularFileError, StorageError, Store, Upload, open_regular, pid_alive,
)
from .local import LocalStore, file_sha256
from .location import is_url, open_store, store_of
from .remote import (
    REMOTE_READ_BYTES, S3_REQUEST_DEFAULTS, S3FS_RETRIES, SPOOL_PREFIX, UPLOAD_PART_BYTES, FsspecStore, RetryingReader,
)
from .retry import READ_BACKOFF_S, READ_DEADLINE_S, READ_RETRIES, StoreOutage, is_transient, retry
from .manifest_io import json_bytes, jsonl_bytes, read_bounded, read_manifest, write_json_atomic
from .samples import iter_shard, iter_store_shard, iter_tar_samples, list_shard_keys
from .tar import ShardInfo, ShardWriter, plain_header, tar_members

__all__ = [
    "PARTIAL_SUFFIX", "READ_BACKOFF_S", "READ_DEADLINE_S", "READ_RETRIES", "REMOTE_READ_BYTES", "RULE_REGULAR_FILE",
    "S3FS_RETRIES", "S3_REQUEST_DEFAULTS", "SPOOL_PREFIX", "UPLOAD_PART_BYTES", "FsspecStore", "LocalStore",
    "NotRegularFileError", "RetryingReader", "StorageError", "Store", "StoreOutage", "Upload", "file_sha256",
    "is_transient", "is_url", "open_regular", "open_store", "pid_alive", "retry", "store_of",
    "json_bytes", "jsonl_bytes", "read_bounded", "read_manifest", "write_json_atomic", "iter_shard",
    "iter_store_shard", "iter_tar_samples", "list_shard_keys", "ShardInfo", "ShardWriter", "plain_header",
    "tar_members",
]
