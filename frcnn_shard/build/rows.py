"""The source rows a part reads: its row ranges, resumed at the failed row after a transient error
(storage.retry.is_transient: the one rule of what is worth a retry)."""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

from ..errors import SourceError
from ..records import SourceRow
from ..storage.retry import is_transient

MAX_RETRY_DELAY_S = 60.0  # the backoff doubles per consecutive failure, up to this
log = logging.getLogger("frcnn_shard.build")

def resilient_rows(source, start: int, stop: int, opts, sleep: Callable[[float], None] = time.sleep
                   ) -> Iterator[SourceRow]:
    """source.rows(start, stop), resumed at the failed row after a transient error (see is_transient).

    Up to ``opts.retries`` consecutive failures are retried, waiting retry_backoff * 2**k seconds
    (at most MAX_RETRY_DELAY_S); a row read successfully resets the count. Anything else, or one
    failure too many, raises SourceError naming the row.
    """
    next_index, failures = start, 0
    while True:
        try:
            for row in source.rows(next_index, stop):
                yield row
                next_index, failures = row.index + 1, 0
            return
        except Exception as e:  # noqa: BLE001 - classified below
            transient = is_transient(e)
            if not transient or failures >= opts.retries:
                tried = f" after {failures} retr{'y' if failures == 1 else 'ies'}" if failures else ""
                kind = "transient error" if transient else "error"
                raise SourceError(f"the source failed at row {next_index}{tried} ({kind}): "
                                  f"{type(e).__name__}: {e}") from e
            delay = min(opts.retry_backoff * 2.0 ** failures, MAX_RETRY_DELAY_S)
            failures += 1
            log.warning("source failed at row %d (%s: %s); retry %d of %d in %.3g s",
                        next_index, type(e).__name__, e, failures, opts.retries, delay)
            sleep(delay)
