"""The build's worker pool: started before the source is opened, fed in source order with bounded memory,
watched for workers that die, and wound down without ever hanging; SIGTERM made an interruption like Ctrl-C.
"""
from __future__ import annotations

import multiprocessing
import signal
import threading
from collections import deque
from typing import Iterator

from ..errors import BuildError, SourceError
from ..records import SourceRow
from .worker import ProcessRow, init_worker, process_chunk

POLL_S = 0.5  # how often a wait on the worker pool checks that no worker died
TEARDOWN_S = 3.0  # the longest a stopped build waits for its worker pool to wind down before killing it


def start_pool(workers: int, initargs: tuple, process: ProcessRow):
    """A forked pool of ``workers`` processes, each set up by init_worker(*initargs); None (and this process
    set up instead) for workers=0.

    Fork happens before the source is opened, so no reader thread exists yet in the parent; the
    workers keep the default SIGTERM (a quiet death), the parent catches it (interrupt_on_sigterm).
    """
    if workers == 0:
        init_worker(*initargs, pool_worker=False, process=process)
        return None
    return multiprocessing.get_context("fork").Pool(
        workers, initializer=init_worker, initargs=(*initargs, True, process))


def chunks(rows, n: int) -> Iterator[list[SourceRow]]:
    """Group rows into lists of n (the last may be shorter; so is the one before a SourceError)."""
    chunk: list[SourceRow] = []
    try:
        for row in rows:
            chunk.append(row)
            if len(chunk) == n:
                yield chunk
                chunk = []
    except SourceError:
        if chunk:  # the rows read before the source failed are still processed and written
            yield chunk
        raise
    if chunk:
        yield chunk


def _worker_pids(pool) -> set[int]:
    return {p.pid for p in pool._pool}


def _get(result, pool, pids: set[int]):
    """result.get(), but raise BuildError when a worker died meanwhile (its task would never finish).

    multiprocessing.Pool silently replaces a worker that was killed (e.g. by the out-of-memory killer)
    and the chunk it held is lost, so a plain get() would wait forever.
    """
    while True:
        try:
            return result.get(POLL_S)
        except multiprocessing.TimeoutError:
            if _worker_pids(pool) != pids:
                raise BuildError(
                    "a worker process died unexpectedly (killed by a signal, e.g. by the system for lack of "
                    "memory); the rows it held are lost"
                ) from None


def ordered_results(pool, jobs: Iterator, max_inflight: int):
    """Map jobs (chunks of rows) over the pool in source order with at most max_inflight of them in the air.

    Pool.imap would read the whole input ahead (its feeder thread is unbounded); this keeps memory
    flat whatever the dataset size.
    """
    pids = _worker_pids(pool)
    pending: deque = deque()
    try:
        for job in jobs:
            pending.append(pool.apply_async(process_chunk, (job,)))
            if len(pending) >= max_inflight:
                yield from _get(pending.popleft(), pool, pids)
    except SourceError:
        while pending:  # rows read before the source failed are written before the build stops
            yield from _get(pending.popleft(), pool, pids)
        raise
    while pending:
        yield from _get(pending.popleft(), pool, pids)


def stop_pool(pool, finished: bool) -> None:
    """Wind the worker pool down: gently after a finished build, at once (and never hanging) otherwise.

    A worker killed by a signal sent to the whole process group (Slurm, timeout) may die holding a
    lock of the pool's task queue, and Pool.terminate() then waits for that lock forever: it gets
    TEARDOWN_S, then the workers are killed and the build goes on with its report.
    """
    if finished:
        pool.close()
        pool.join()
        return
    stopper = threading.Thread(target=pool.terminate, daemon=True, name="frcnn-shard-pool-stop")
    stopper.start()
    stopper.join(TEARDOWN_S)
    if stopper.is_alive():
        for p in list(getattr(pool, "_pool", ())):
            if p.exitcode is None:
                p.kill()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the build was (the handler of interrupt_on_sigterm)."""


def interrupt_on_sigterm():
    """Make SIGTERM stop the build like Ctrl-C (the open shard dropped, a resume hint); returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, stop)


def signum(e: BaseException) -> int:
    """The signal behind an interruption: SIGTERM or SIGINT."""
    return signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
