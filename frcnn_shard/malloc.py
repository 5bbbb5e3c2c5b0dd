"""Allocator settings for the worker processes frcnn-shard starts (the build's pool, the loader's workers)."""
from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
WORKER_HEAP_KEEP = 64 << 20  # free heap a worker keeps instead of returning it to the system
WORKER_MMAP_FROM = 16 << 20  # allocations from this size up get pages of their own


def tune_worker_malloc() -> bool:
    """Let this (worker) process reuse the memory it frees instead of faulting fresh pages in; glibc only.

    Every row of a build allocates and frees megabytes (the unpickled source image, PIL's decoded
    and resized images), every mirrored sample of the loader a decoded and a flipped image: with
    glibc's default thresholds those are handed back to the system and faulted in again each time,
    which cost a build worker much of its system time (docs/BENCHMARKS.md, "Build"). Only processes
    of our own call this (the build's pool, the loader's DataLoader workers): it changes the
    process's allocator. Returns whether the allocator took the settings.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows): its allocator as it is
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, WORKER_HEAP_KEEP)) and bool(mallopt(_M_MMAP_THRESHOLD, WORKER_MMAP_FROM))
