"""The IterableDataset a DataLoader runs (``ShardStream``): in each worker process the streams that worker
runs, stream v in worker v % workers, a keep-ratio loader's streams with their canvas buckets."""
from __future__ import annotations

from typing import Iterator

import torch

from .canvas_stream import run_canvas_stream
from .collate import Batch
from .options import LoaderError
from .stream import StreamConfig, run_stream

class ShardStream(torch.utils.data.IterableDataset):
    """The batches of one rank; inside a DataLoader worker, of that worker's slot only."""

    def __init__(self, cfg: StreamConfig):
        super().__init__()
        self.cfg = cfg

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.cfg.workers:
            raise LoaderError(f"planned for {self.cfg.workers} workers, running in {info.num_workers}")
        return worker_batches(self.cfg, worker)


def worker_batches(cfg: StreamConfig, worker: int) -> Iterator[Batch]:
    """The batches of the streams worker ``worker`` runs (stream v runs in worker v % workers), taking
    turns as the global order does, so the consumer (``merge.in_stream_order``) rarely has to wait."""
    n = cfg.stream_count
    order = [(cfg.first + k) % n for k in range(n)]
    mine = [v for v in order if v % cfg.workers == worker and not (cfg.starts and cfg.starts[v].ended)]
    run = run_canvas_stream if cfg.dataset.keep_ratio is not None else run_stream
    running = [run(cfg, v, cfg.starts[v] if cfg.starts else None) for v in mine]
    k = 0
    while running:
        k %= len(running)
        try:
            item = next(running[k])
        except StopIteration:
            del running[k]
            continue
        yield item
        k += 1
