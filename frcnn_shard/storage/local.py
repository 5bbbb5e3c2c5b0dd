"""A store on this machine's disk: ``.partial`` files fsync'ed and renamed, locks written whole then linked."""
from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
from pathlib import Path
from typing import IO, Callable, Iterable

from ..faults import fault_point
from .base import PARTIAL_SUFFIX, Upload, file_kind, not_regular, open_regular


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            raise not_regular(self.path / name, file_kind(st.st_mode))
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

    def abort_uploads(self, names: Iterable[str]) -> int:
        """Nothing to abort on a disk: an unfinished file is a ``.partial`` the lock holder removes; returns 0."""
        return 0


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


def file_sha256(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    """sha256 hex digest of a local file, read in blocks."""
    h = hashlib.sha256()
    with open_regular(path) as f:  # a FIFO or device would never end, a link could point anywhere
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()
