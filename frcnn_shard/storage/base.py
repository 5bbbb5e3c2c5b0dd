"""What every store is: the ``Store`` protocol, an ``Upload`` in progress, the read side's regular-file rule."""
from __future__ import annotations

import errno
import os
import stat
from typing import IO, Callable, Iterable, Protocol, runtime_checkable

from ..errors import FrcnnShardError

PARTIAL_SUFFIX = ".partial"
# Rule names of the read side (messages carry them; docs/RELIABILITY.md "Bounds" explains each).
RULE_REGULAR_FILE = "regular_file"  # readers open regular files only: no FIFO, device, socket, link, directory


class StorageError(FrcnnShardError, ValueError):
    """A location that cannot be used: an unknown scheme, a package missing, bad storage options."""


class NotRegularFileError(FrcnnShardError, OSError):
    """A path to read is not a regular file (a FIFO, a device, a socket, a directory, a symbolic link)."""


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


@runtime_checkable
class Store(Protocol):
    """One directory of shards and records: ``LocalStore`` (a disk) or ``FsspecStore`` (object storage).

    Both give the guarantees in the package docstring; the build, the loader and inspect use only these.
    """

    is_local: bool
    url: str

    def sub(self, name: str) -> "Store":
        """The store of a subdirectory."""

    def location(self, name: str) -> str:
        """What to call a file of this store in messages and URL lists."""

    def exists(self, name: str = "") -> bool:
        """Whether the file (or, with no name, this directory) exists."""

    def names(self) -> list[str]:
        """The names in this directory, sorted ([] when it does not exist)."""

    def size(self, name: str) -> int:
        """Size in bytes of a file."""

    def makedirs(self) -> None:
        """Create this directory where the storage has directories."""

    def open_read(self, name: str, bufsize: int = ...) -> IO[bytes]:
        """A streaming binary reader of a file."""

    def read_bytes(self, name: str) -> bytes:
        """The whole file."""

    def remove(self, name: str) -> None:
        """Delete a file (no error when it is already gone)."""

    def open_upload(self, name: str) -> Upload:
        """A file being written, published whole under ``name`` or not at all."""

    def write_atomic(self, name: str, data: bytes, before_rest: Callable[[], None] | None = None) -> None:
        """Replace a file with ``data`` atomically."""

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create a file only if none exists, whole; False when it already exists."""

    def abort_uploads(self, names: Iterable[str]) -> int:
        """Abort unfinished uploads to these names (a process killed mid-upload); returns how many."""


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    return next((words for test, words in _FILE_KINDS if test(mode)), "not a regular file")


def not_regular(path: str | os.PathLike, what: str, err: int = errno.EINVAL) -> NotRegularFileError:
    """The error a reader raises for a path that is not a regular file (one message for every reader)."""
    return NotRegularFileError(err, f"{path}: {RULE_REGULAR_FILE}: {what}; only regular files are read")


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
        raise not_regular(path, "a symbolic link", errno.ELOOP) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, file_kind(mode))
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
