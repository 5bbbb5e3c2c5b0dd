"""Read frcnn-shard shards back as training batches: (images, targets) with RPN anchor targets.

Pipeline per (rank, worker) stream, one module per stage: the epoch's shard plan (``plan``) over the
shards a source names (``sources``) -> tar members grouped into samples by the format's one group-by-key,
no unpickling, checked member names (``stream``) -> sample-level shuffle buffer over the still-encoded
samples (``stream``) -> decode: image, JSON record, sparse anchor targets, anchor sampling (``decode``)
-> batch (``collate``); ``workers`` runs the streams in the DataLoader's processes. Keep-ratio shards (a
canvas per sample): ``buckets`` (a bucket per canvas) and ``canvas_stream`` (batches of one canvas).
``options`` checks what make_loader is asked for; ``make`` holds make_loader, ``shard_loader`` ShardLoader.
For long runs: ``resume`` (the state_dict's form and checks), ``replay``
(a stream resumed without decoding what it delivered), ``merge`` (the streams' turns, whichever
workers ran them), ``repeat`` (repeat-factor sampling) and ``cache`` (the local cache of remote shards). Targets stay sparse until the consumer: a batch carries the sampled
anchor indices and the positives' boxes, and ``Batch.unpack`` in the training process expands them
to the dense per-anchor tensors the RPN loss takes.

Everything random is derived from (seed, epoch, ...) only (``frcnn_shard.seeds``): the shard
permutation from (seed, epoch), the shuffle buffer from (seed, epoch, rank, worker), and the anchor
sampling and the horizontal-flip decision of a sample from (seed, epoch, key), each its own stream.
Hence an epoch repeats exactly across runs, and the per-sample targets do not depend on the worker count.
"""
from __future__ import annotations

from ..seeds import hflip_decision
from .collate import Batch, collate, normalize_batch
from .decode import DecodeOptions, Decoded, decode_sample
from .options import (
    DEFAULT_SHUFFLE_BUFFER, ON_ERROR_CHOICES, DatasetFacts, ImageTransformError, LoaderError, LoaderOptions,
    LoaderWarning,
)
from .plan import EpochPlan, feedable_workers, plan_epoch
from .make import make_loader
from .shard_loader import MAX_SKIP_LOG, ShardLoader
from .sources import Source, expand_urls, manifest_folder, resolve_source
from .stream import iter_raw_samples, shuffle_buffer

__all__ = [
    "Batch", "DEFAULT_SHUFFLE_BUFFER", "DatasetFacts", "DecodeOptions", "Decoded", "EpochPlan", "ImageTransformError",
    "LoaderError", "LoaderOptions", "LoaderWarning", "MAX_SKIP_LOG", "ON_ERROR_CHOICES", "ShardLoader", "Source",
    "collate", "decode_sample", "expand_urls", "feedable_workers", "hflip_decision", "iter_raw_samples",
    "make_loader", "manifest_folder", "normalize_batch", "plan_epoch", "resolve_source", "shuffle_buffer",
]
