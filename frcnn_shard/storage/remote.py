"""A store on an fsspec filesystem (object storage above all): uploads spooled and published whole,
streaming reads that reopen at the same offset after a dropped connection, each request bounded.

Credentials never pass through here as text that could be logged: fsspec and botocore read the
standard settings (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL), and
``storage_options`` go straight to the filesystem; ``FsspecStore.url`` is the location only.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable

from ..faults import fault_point
from .base import Upload, pid_alive
from .retry import READ_RETRIES, retry

# Each attempt's own bound, as fsspec options of s3:// (the caller's storage_options win): botocore's and
# s3fs's own retries off, so that retry.retry's are the only ones and an attempt on a store that does not
# answer ends within about connect + read timeout per request (RELIABILITY.md, "A store that stays down").
S3_REQUEST_DEFAULTS = {"connect_timeout": 5, "read_timeout": 15, "retries": {"max_attempts": 1}}
S3FS_RETRIES = 1  # s3fs's own attempts per request (its default, 5, multiplies ours)
REMOTE_READ_BYTES = 8 << 20  # bytes per GET of a streaming read (memory: about two of these)
UPLOAD_PART_BYTES = 8 << 20  # multipart part size of an upload
OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "r2")


SPOOL_PREFIX = "frcnn-shard_"
_SPOOL_NAME = re.compile(rf"^{re.escape(SPOOL_PREFIX)}(?P<host>[^_]+)_(?P<pid>\d+)_[^/]*\.part$")
_spools_swept = False


def _new_spool() -> IO[bytes]:
    """A spool file in the temporary folder, named for this host and process.

    The first one a process opens first removes the spool files left there by processes of this host
    that are gone (killed while spooling: nothing else would ever delete them). Files of other hosts
    (a temporary folder shared between containers) and of running processes are left alone.
    """
    global _spools_swept
    host = socket.gethostname().replace("_", "-")  # "_" separates the name's fields
    if not _spools_swept:
        _spools_swept = True
        for path in Path(tempfile.gettempdir()).glob(f"{SPOOL_PREFIX}*.part"):
            m = _SPOOL_NAME.match(path.name)
            if m and m["host"] == host and not pid_alive(int(m["pid"])):
                path.unlink(missing_ok=True)
    return tempfile.NamedTemporaryFile(prefix=f"{SPOOL_PREFIX}{host}_{os.getpid()}_", suffix=".part", delete=False)


class FsspecStore:
    """A directory of an fsspec filesystem (object storage above all)."""

    is_local = False

    def __init__(self, fs: Any, root: str, scheme: str):
        self.fs, self.root, self.scheme = fs, root.rstrip("/"), scheme
        self.url = f"{scheme}://{self.root}"

    def sub(self, name: str) -> "FsspecStore":
        """The store of a subdirectory (a key prefix)."""
        return FsspecStore(self.fs, f"{self.root}/{name}", self.scheme)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def location(self, name: str) -> str:
        """The URL of an object of this store."""
        return f"{self.scheme}://{self._path(name)}"

    def exists(self, name: str = "") -> bool:
        """Whether the object (or, with no name, any object under this prefix) exists."""
        self.fs.invalidate_cache(self.root)  # other machines write here: never trust a cached listing
        return bool(retry(lambda: self.fs.exists(self._path(name)), f"a look at {self.location(name)}")) if name \
            else bool(self.names())

    def names(self) -> list[str]:
        """The names directly under this prefix, sorted ([] when there are none)."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = retry(lambda: self.fs.ls(self.root, detail=False), f"a listing of {self.url}")
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def size(self, name: str) -> int:
        """Size in bytes."""
        return int(retry(lambda: self.fs.size(self._path(name)), f"a look at {self.location(name)}"))

    def makedirs(self) -> None:
        """Create the prefix where the filesystem has directories (object stores create them with their objects)."""
        if self.scheme not in OBJECT_STORES:
            self.fs.makedirs(self.root, exist_ok=True)

    def open_read(self, name: str, bufsize: int = REMOTE_READ_BYTES) -> IO[bytes]:
        """A streaming reader that reopens at the same offset after a transient error (bounded retries)."""
        return RetryingReader(self.fs, self._path(name), max(bufsize, REMOTE_READ_BYTES))

    def read_bytes(self, name: str) -> bytes:
        """The whole object, with the reader's retries."""
        with self.open_read(name) as f:
            return f.read()

    def remove(self, name: str) -> None:
        """Delete an object (no error when it is already gone)."""
        try:
            retry(lambda: self.fs.rm_file(self._path(name)), f"removal of {self.location(name)}")
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.root)

    def open_upload(self, name: str) -> Upload:
        """Spool to a local temporary file; publish uploads it whole (retried), so nothing appears before that."""
        spool = _new_spool()

        def publish() -> None:
            spool.flush()
            spool.close()
            try:
                retry(lambda: self._upload_file(spool.name, name), f"upload of {self.location(name)}")
            finally:
                os.unlink(spool.name)

        def abort() -> None:
            spool.close()
            Path(spool.name).unlink(missing_ok=True)

        return Upload(spool, publish, abort)

    def _upload_file(self, local: str, name: str) -> None:
        """One attempt to upload a whole file: completed at its end, aborted on any failure (s3: multipart)."""
        path = self._path(name)
        if self.scheme not in ("s3", "s3a"):
            self.fs.put_file(local, path)
            return
        f = self.fs.open(path, "wb", block_size=UPLOAD_PART_BYTES, autocommit=False)
        try:
            with open(local, "rb") as src:
                part = 0
                while chunk := src.read(UPLOAD_PART_BYTES):
                    f.write(chunk)
                    part += 1
                    fault_point("upload", part)  # test-only: a crash with parts uploaded, none completed
            f.close()
            f.commit()  # CompleteMultipartUpload: the object appears now, whole
        except BaseException:
            f.discard()  # AbortMultipartUpload: nothing is left behind, not even invisible parts
            f.closed = True  # a discarded s3fs file must not be closed again by its __del__
            raise
        finally:
            self.fs.invalidate_cache(self.root)

    def abort_uploads(self, names: Iterable[str]) -> int:
        """Abort unfinished multipart uploads to these names (left by a process killed mid-upload); returns how many."""
        if self.scheme not in ("s3", "s3a"):
            return 0
        wanted = {self._path(n) for n in names}
        bucket = self.root.split("/", 1)[0]
        pending = retry(lambda: self.fs.call_s3("list_multipart_uploads", Bucket=bucket,
                                                 Prefix=self.root.split("/", 1)[1] if "/" in self.root else ""),
                         f"a listing of the uploads of {self.url}")
        aborted = 0
        for up in pending.get("Uploads", []):
            if f"{bucket}/{up['Key']}" in wanted:
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                aborted += 1
        return aborted

    def write_atomic(self, name: str, data: bytes, before_rest: Callable[[], None] | None = None) -> None:
        """Replace an object with one PUT: readers see the old object or the new one, never a part."""
        if before_rest is not None:
            before_rest()
        retry(lambda: self.fs.pipe_file(self._path(name), data), f"write of {self.location(name)}")
        self.fs.invalidate_cache(self.root)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create an object only if none exists: a conditional PUT (If-None-Match) on S3."""
        path = self._path(name)
        self.fs.invalidate_cache(self.root)
        if self.scheme not in ("s3", "s3a"):
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return True
        try:
            self.fs.pipe_file(path, data, IfNoneMatch="*")
        except OSError as e:
            code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code")
            if isinstance(e, FileExistsError) or code == "PreconditionFailed":
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.root)
        return True


class RetryingReader:
    """A sequential binary reader of one remote object that survives dropped connections.

    It fetches ``bufsize`` bytes per request (an fsspec file opened without a cache, so memory stays
    within two buffers) and hands out what was asked for; on a transient error the object is reopened
    at the first byte not yet fetched, up to READ_RETRIES consecutive times.
    """

    def __init__(self, fs: Any, path: str, bufsize: int = REMOTE_READ_BYTES):
        self.fs, self.path, self.bufsize = fs, path, bufsize
        self.retries = READ_RETRIES  # of each request; StoreOutage sets 0 while the store is down
        self.offset = 0  # bytes handed out so far
        self._buf, self._pos, self._eof = b"", 0, False
        self._f = None

    def _fetch(self) -> None:
        """Append the next block of the object to the buffer."""
        at = self.offset + len(self._buf) - self._pos  # the first byte not fetched yet

        def attempt() -> bytes:
            if self._f is None:
                self._f = self.fs.open(self.path, "rb", block_size=self.bufsize, cache_type="none")
                if at:
                    self._f.seek(at)
            try:
                return self._f.read(self.bufsize)
            except BaseException:
                self._drop()
                raise

        data = retry(attempt, f"read of {self.path} at byte {at}", retries=self.retries)
        self._eof = not data
        self._buf, self._pos = self._buf[self._pos:] + data, 0

    def _drop(self) -> None:
        f, self._f = self._f, None
        try:
            f.close()
        except Exception:  # noqa: BLE001 - the connection is already broken
            pass

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes (all the rest for n < 0)."""
        if n is None or n < 0:
            chunks = []
            while chunk := self.read(self.bufsize):
                chunks.append(chunk)
            return b"".join(chunks)
        while len(self._buf) - self._pos < n and not self._eof:
            self._fetch()
        out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        self.offset += len(out)
        return out

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        """Close the underlying file."""
        if self._f is not None:
            self._drop()

    def __enter__(self) -> "RetryingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_FILESYSTEMS: dict = {}  # (pid, scheme, options, settings) -> filesystem made in this process


def _settings_digest() -> str:
    """A digest of the environment settings a filesystem reads when made (AWS_*, FSSPEC_*): a process that points
    them elsewhere (another endpoint, other credentials) gets a new filesystem, not one bound to the old ones."""
    items = sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "FSSPEC_")))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def filesystem(scheme: str, options: dict):
    """This process's filesystem for a scheme, options and settings (fsspec's own instances are not fork-safe)."""
    import fsspec  # here, not at the top: local-only use never pays for importing it

    key = (os.getpid(), scheme, json.dumps(options, sort_keys=True, default=str), _settings_digest())
    if key not in _FILESYSTEMS:
        fs = fsspec.filesystem(scheme, skip_instance_cache=True, **_bounded_requests(scheme, options))
        if options and callable(getattr(fs, "connect", None)):
            fs.connect()  # s3fs builds its session lazily: an unknown option would fail in the first request
        if scheme in ("s3", "s3a"):
            fs.retries = S3FS_RETRIES  # an attribute, not a constructor option, of s3fs
        _FILESYSTEMS[key] = fs
    return _FILESYSTEMS[key]


def _bounded_requests(scheme: str, options: dict) -> dict:
    """``options`` with S3_REQUEST_DEFAULTS under config_kwargs for s3:// (a key the caller gives wins)."""
    if scheme not in ("s3", "s3a"):
        return options
    config = dict(options.get("config_kwargs") or {})
    for k, v in S3_REQUEST_DEFAULTS.items():
        config.setdefault(k, v)
    return {**options, "config_kwargs": config}
