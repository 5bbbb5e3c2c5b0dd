"""The one rule for which errors are worth a retry, and the bounded retry loop of remote requests.

``is_transient`` is used by every retry of the project: the build's retries of its source
(``build.resilient_rows``), each request to object storage (``retry`` below) and the loader's
``StoreOutage``. docs/RELIABILITY.md ("Which errors are transient") describes it in words.
"""
from __future__ import annotations

import errno
import time
from typing import Any, Callable

READ_RETRIES = 5  # consecutive failures of one remote request before it gives up
READ_BACKOFF_S = 0.5  # first wait; doubles per consecutive failure
READ_DEADLINE_S = 60.0  # no new attempt of one remote request starts this long after its first

# Exceptions from these packages come from the network layer (Hub streaming, object storage): the
# union of what the source side (Hub, HTTP) and the storage side (fsspec, S3, GCS) can raise.
NETWORK_MODULES = ("aiohttp", "httpx", "httpcore", "urllib3", "requests", "huggingface_hub", "fsspec",
                   "botocore", "aiobotocore", "s3fs", "gcsfs")
# OSErrors about local files, access or the disk, not the network: retrying cannot help. Wrong
# credentials surface as PermissionError and a missing object as FileNotFoundError.
LOCAL_OSERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
LOCAL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def is_transient(exc: BaseException) -> bool:
    """True for an error worth retrying: ConnectionError, TimeoutError, other OSErrors except local-file,
    access and full-disk ones, and any exception of a network package (NETWORK_MODULES)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return not isinstance(exc, LOCAL_OSERRORS) and exc.errno not in LOCAL_ERRNOS
    return type(exc).__module__.split(".")[0] in NETWORK_MODULES


def retry(fn: Callable[[], Any], what: str, retries: int = READ_RETRIES, backoff: float = READ_BACKOFF_S,
          deadline: float = READ_DEADLINE_S, sleep: Callable[[float], None] = time.sleep) -> Any:
    """fn(), retried with doubling waits on transient errors; the last error is raised as OSError naming ``what``.

    No retry starts once ``deadline`` seconds have passed since the first attempt (nor one whose wait
    would end after it), so a request costs at most about deadline + one attempt.
    """
    start = time.monotonic()
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified by is_transient
            wait = backoff * 2 ** attempt
            if not is_transient(e) or attempt == retries or time.monotonic() + wait - start > deadline:
                if isinstance(e, OSError):
                    raise
                raise OSError(f"{what} failed: {type(e).__name__}: {e}") from e
            sleep(wait)
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
        """Give a freshly opened reader one attempt while the store is down.

        Only remote readers (``remote.RetryingReader``) have ``retries``; local files have no retries.
        """
        if self.down and hasattr(reader, "retries"):
            reader.retries = 0

    def failed(self, exc: BaseException) -> None:
        """A shard read gave up with ``exc``: the store is down when that was a transient error."""
        if is_transient(exc):
            self.down = True

    def succeeded(self) -> None:
        """A shard was read whole: the store is up."""
        self.down = False
