"""Where shards live: a local directory, or any fsspec URL (s3://, gs://, memory://, ...).

A ``Store`` is one directory. Both kinds give the guarantees the build and the loader rely on:

- nothing partial under a final name: a local file is written as ``<name>.partial``, fsync'ed and
  renamed; an object is spooled to a local file while it is written and uploaded once whole (one PUT,
  or a multipart upload completed only at its end), so an interrupted upload leaves no object;
- small records (manifest, part records, drops) are replaced atomically (rename, or one PUT);
- reads stream, and a remote read that fails mid-way reopens at the same offset (bounded retries).

Credentials never pass through here as text that could be logged: fsspec and botocore read the
standard settings (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL), and
``storage_options`` go straight to the filesystem; ``Store.url`` is the location only.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterable

from .faults import fault_point

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")
PARTIAL_SUFFIX = ".partial"
READ_RETRIES = 5  # consecutive failures of one remote request before it gives up
READ_BACKOFF_S = 0.5  # first wait; doubles per consecutive failure
READ_DEADLINE_S = 60.0  # no new attempt of one remote request starts this long after its first
# Each attempt's own bound, as fsspec options of s3:// (the caller's storage_options win): botocore's and
# s3fs's own retries off, so that _retry's are the only ones and an attempt on a store that does not
# answer ends within about connect + read timeout per request (RELIABILITY.md, "A store that stays down").
S3_REQUEST_DEFAULTS = {"connect_timeout": 5, "read_timeout": 15, "retries": {"max_attempts": 1}}
S3FS_RETRIES = 1  # s3fs's own attempts per request (its default, 5, multiplies ours)
REMOTE_READ_BYTES = 8 << 20  # bytes per GET of a streaming read (memory: about two of these)
UPLOAD_PART_BYTES = 8 << 20  # multipart part size of an upload
_OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "r2")
_INSTALL_HINT = {"s3": "s3fs (pip install 'frcnn-shard[s3]')", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                 "abfs": "adlfs", "hf": "huggingface_hub"}


class StorageError(ValueError):
    """A location that cannot be used: an unknown scheme, a package missing, bad storage options."""


# Rule names of the read side (messages carry them; docs/RELIABILITY.md "Bounds" explains each).
RULE_REGULAR_FILE = "regular_file"  # readers open regular files only: no FIFO, device, socket, link, directory


class NotRegularFileError(OSError):
    """A path to read is not a regular file (a FIFO, a device, a socket, a directory, a symbolic link)."""


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"))


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    return next((words for test, words in _FILE_KINDS if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike, bufsize: int = 1 << 20) -> IO[bytes]:
    """A binary reader of ``path``, which must be a regular file (NotRegularFileError names it otherwise).

    O_NOFOLLOW refuses a symbolic link in the last component, O_NONBLOCK makes opening a FIFO return
    at once instead of waiting for a writer, and fstat of the opened descriptor (not of the path: it
    cannot change in between) tells a regular file from a FIFO, device, socket or directory.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise NotRegularFileError(errno.ELOOP, f"{path}: {RULE_REGULAR_FILE}: a symbolic link; only regular "
                                               "files are read") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, f"{path}: {RULE_REGULAR_FILE}: {_kind(mode)}; only regular "
                                                    "files are read")
        return os.fdopen(fd, "rb", buffering=bufsize)
    except BaseException:
        os.close(fd)
        raise


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def is_url(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (file:// included); False for plain local paths."""
    return bool(_URL.match(os.fspath(location)))


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Upload:
    """One file being written; ``publish()`` makes it appear under its final name at once, whole."""

    def __init__(self, spool: IO[bytes], publish: Callable[[], None], abort: Callable[[], None]):
        self.file = spool
        self._publish, self._abort = publish, abort

    def write(self, data: bytes) -> int:
        """Append bytes (to the local spool)."""
        return self.file.write(data)

    def publish(self) -> None:
        """Flush and make the file appear under its final name."""
        self._publish()

    def abort(self) -> None:
        """Drop the unfinished file: nothing is left behind under any name."""
        self._abort()


class LocalStore:
    """A directory on this machine's disk."""

    is_local = True

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.url = str(self.path)

    def sub(self, name: str) -> "LocalStore":
        """The store of a subdirectory."""
        return LocalStore(self.path / name)

    def location(self, name: str) -> str:
        """What to call a file of this store in messages and URL lists."""
        return str(self.path / name)

    def exists(self, name: str = "") -> bool:
        """Whether the file (or, with no name, this directory) exists."""
        return (self.path / name).exists() if name else self.path.is_dir()

    def names(self) -> list[str]:
        """The names in this directory, sorted ([] when it does not exist)."""
        return sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []

    def size(self, name: str) -> int:
        """Size in bytes of a regular file (NotRegularFileError for anything else, a link included)."""
        st = os.lstat(self.path / name)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(errno.EINVAL, f"{self.path / name}: {RULE_REGULAR_FILE}: {_kind(st.st_mode)}; "
                                                    "only regular files are read")
        return st.st_size

    def makedirs(self) -> None:
        """Create this directory (and its parents)."""
        self.path.mkdir(parents=True, exist_ok=True)

    def open_read(self, name: str, bufsize: int = 1 << 20) -> IO[bytes]:
        """A streaming binary reader of a regular file (NotRegularFileError for a FIFO, device, link, ...)."""
        return open_regular(self.path / name, bufsize)

    def read_bytes(self, name: str) -> bytes:
        """The whole regular file (NotRegularFileError for anything else)."""
        with self.open_read(name) as f:
            return f.read()

    def remove(self, name: str) -> None:
        """Delete a file (no error when it is already gone)."""
        (self.path / name).unlink(missing_ok=True)

    def open_upload(self, name: str) -> Upload:
        """Write ``<name>.partial`` here; publish = fsync + rename + fsync of the directory.

        The ``.partial`` is created exclusively: one that exists belongs to another writer (a build that
        does not hold this shard's lock) or to a dead one (its lock holder removes those before writing),
        and is never truncated: FileExistsError names it.
        """
        return self._upload(name, exclusive=True)

    def _upload(self, name: str, exclusive: bool) -> Upload:
        final = self.path / name
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        try:
            f = open(partial, "xb" if exclusive else "wb")
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "another writer's unfinished file is there (another build writing "
                                  "this split without its lock?); if no build is running, delete it", str(partial)
                                  ) from None

        def publish() -> None:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(partial, final)
            _fsync_dir(self.path)

        def abort() -> None:
            try:
                f.close()
            except OSError:
                pass  # flushing the buffer onto a full disk fails again; the file goes anyway
            finally:
                partial.unlink(missing_ok=True)

        return Upload(f, publish, abort)

    def write_atomic(self, name: str, data: bytes, before_rest: Callable[[], None] | None = None) -> None:
        """Replace a file with ``data`` atomically; on any failure the old file stays and no partial remains.

        ``before_rest`` runs with half of the bytes written (the test-only fault point uses it).
        The ``.partial`` of a small record is replaced when one exists: only the holder of a part's lock
        writes its record, and only a merge writes drops.jsonl and the manifest.
        """
        up = self._upload(name, exclusive=False)
        try:
            if before_rest is not None:
                up.write(data[: len(data) // 2])
                up.file.flush()
                before_rest()
                data = data[len(data) // 2:]
            up.write(data)
            up.publish()
        except BaseException:
            up.abort()
            raise

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create a file only if it does not exist, whole or not at all; False when it already exists.

        The bytes go to a temporary file of this host and process first, which is then hard-linked
        to ``name`` (link fails when ``name`` exists): a full disk or a crash never leaves ``name`` empty
        or cut. A crash can leave the temporary file; it is never read as a lock.
        """
        tmp = self.path / f"{name}.{socket.gethostname()}-{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                fault_point("lock_write", 0)  # test-only: the disk fills up with the lock half written
                os.fsync(f.fileno())
            _link_or_create(tmp, self.path / name, data)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.path)
        return True


def _link_or_create(tmp: Path, final: Path, data: bytes) -> None:
    """Hard-link ``tmp`` to ``final`` (FileExistsError when it exists); where the filesystem has no hard
    links, create ``final`` exclusively and write ``data`` into it."""
    try:
        os.link(tmp, final)
        return
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
        return bool(_retry(lambda: self.fs.exists(self._path(name)), f"a look at {self.location(name)}")) if name \
            else bool(self.names())

    def names(self) -> list[str]:
        """The names directly under this prefix, sorted ([] when there are none)."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = _retry(lambda: self.fs.ls(self.root, detail=False), f"a listing of {self.url}")
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def size(self, name: str) -> int:
        """Size in bytes."""
        return int(_retry(lambda: self.fs.size(self._path(name)), f"a look at {self.location(name)}"))

    def makedirs(self) -> None:
        """Create the prefix where the filesystem has directories (object stores create them with their objects)."""
        if self.scheme not in _OBJECT_STORES:
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
            _retry(lambda: self.fs.rm_file(self._path(name)), f"removal of {self.location(name)}")
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
                _retry(lambda: self._upload_file(spool.name, name), f"upload of {self.location(name)}")
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
        pending = _retry(lambda: self.fs.call_s3("list_multipart_uploads", Bucket=bucket,
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
        _retry(lambda: self.fs.pipe_file(self._path(name), data), f"write of {self.location(name)}")
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


def _transient(exc: BaseException) -> bool:
    """Errors of the network or the server worth a retry (not missing objects or denied access)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
    return type(exc).__module__.split(".")[0] in ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests",
                                                    "httpx", "fsspec", "s3fs", "gcsfs")


def _retry(fn: Callable[[], Any], what: str, retries: int = READ_RETRIES, backoff: float = READ_BACKOFF_S,
           deadline: float = READ_DEADLINE_S):
    """fn(), retried with doubling waits on transient errors; the last error is raised as OSError naming ``what``.

    No retry starts once ``deadline`` seconds have passed since the first attempt (nor one whose wait
    would end after it), so a request costs at most about deadline + one attempt.
    """
    start = time.monotonic()
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified by _transient
            wait = backoff * 2 ** attempt
            if not _transient(e) or attempt == retries or time.monotonic() + wait - start > deadline:
                if isinstance(e, OSError):
                    raise
                raise OSError(f"{what} failed: {type(e).__name__}: {e}") from e
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


class StoreOutage:
    """What one reader stream (a loader's rank and worker) knows of its store being down.

    A shard read that gave up on transient errors (its retries spent) marks the store down; while it
    is down, every later shard of the stream gets one attempt, without retries or waits, so a store
    that stays down costs one retried read and then one attempt per shard. The first shard read whole
    marks it up again, and reads retry as before.
    """

    def __init__(self) -> None:
        self.down = False

    def arm(self, reader: Any) -> None:
        """Give a freshly opened reader one attempt while the store is down (local files have no retries)."""
        if self.down and isinstance(reader, RetryingReader):
            reader.retries = 0

    def failed(self, exc: BaseException) -> None:
        """A shard read gave up with ``exc``: the store is down when that was a transient error."""
        if _transient(exc):
            self.down = True

    def succeeded(self) -> None:
        """A shard was read whole: the store is up."""
        self.down = False


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

        data = _retry(attempt, f"read of {self.path} at byte {at}", retries=self.retries)
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


def open_store(location: str | os.PathLike, storage_options: dict | None = None) -> LocalStore | FsspecStore:
    """The store of a local path or an fsspec URL; StorageError when the URL's scheme cannot be served here."""
    text = os.fspath(location)
    m = _URL.match(text)
    if m is None and re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/?[^/]", text):
        raise StorageError(f"{text!r} looks like a URL but is not one (a URL is scheme://bucket/path); "
                           "for a local path, start it with ./ or /")
    if m is None or m.group("scheme") == "file":
        if storage_options:
            raise StorageError(f"storage options apply to URLs such as s3://..., not to the local path {text!r}")
        return LocalStore(m.group("rest") if m else text)
    scheme = m.group("scheme")
    import fsspec

    if scheme not in fsspec.available_protocols():
        raise StorageError(f"{text}: no storage here understands {scheme}:// (fsspec knows no such protocol; "
                           "schemes are lower case, e.g. s3://bucket/path)")
    try:
        fs = _filesystem(scheme, storage_options or {})
    except ImportError as e:
        need = _INSTALL_HINT.get(scheme, f"the fsspec package for {scheme}://")
        raise StorageError(f"{text}: {scheme}:// needs {need}; install it to use this location ({e.msg})") from None
    except TypeError as e:  # an unknown option: the message names it, never a value
        raise StorageError(f"{text}: the storage options were refused ({e})") from None
    return FsspecStore(fs, fs._strip_protocol(text), scheme)


_FILESYSTEMS: dict = {}  # (pid, scheme, options) -> filesystem made in this process


def _filesystem(scheme: str, options: dict):
    """This process's filesystem for a scheme and options (fsspec's own instances are not fork-safe)."""
    import json

    import fsspec

    key = (os.getpid(), scheme, json.dumps(options, sort_keys=True, default=str))
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
