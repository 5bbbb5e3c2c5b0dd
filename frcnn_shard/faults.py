"""Test-only fault points: a no-op unless $FRCNN_SHARD_FAULT names one (docs/RELIABILITY.md lists them)."""
from __future__ import annotations

import errno
import os
import signal
import time

FAULT_ENV = "FRCNN_SHARD_FAULT"  # test-only fault injection; unset in normal use


def fault_point(name: str, n: int) -> None:
    """A no-op unless $FRCNN_SHARD_FAULT names this point.

    ``FRCNN_SHARD_FAULT="NAME:N"`` SIGKILLs this process at point NAME number N (a crash at a chosen
    moment); ``"NAME:N:sleep=S"`` sleeps S seconds there (so a test can send a signal at a known
    moment); ``"NAME:N:enospc"`` raises the OSError of a full disk there. Never set it in real use.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, rest = spec.partition(":")
    num, _, action = rest.partition(":")
    if point != name or num != str(n):
        return
    if action.startswith("sleep="):
        time.sleep(float(action[len("sleep="):]))
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    else:
        os.kill(os.getpid(), signal.SIGKILL)
