"""Keep glibc's allocator from returning every large tensor to the kernel in dask workers.

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed memory
goes back to the OS quickly. Setting that variable also switches off glibc's dynamic
mmap threshold, so every allocation above 128 KiB (each activation tensor of a
network) becomes its own ``mmap`` and is unmapped when freed: the next forward call
page-faults all of it in again; the thresholds set here halve a CPU forward call's time
(docs/benchmarks.md, "Allocator thresholds"). They still let the heap shrink once more
than ``trim`` bytes are free at its top, so the worker's memory stays bounded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

__all__ = ["tune_allocator"]

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# 32 MiB is the largest mmap threshold every 64-bit glibc accepts.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20


@functools.cache
def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once; a no-op elsewhere).

    Args:
        mmap_threshold: Allocations at least this large are mmapped; smaller ones are
            served and reused from the heap.
        trim_threshold: Free bytes at the top of the heap before it is returned to the OS.

    Returns:
        Whether the thresholds were set (False off glibc, e.g. macOS or musl).
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    log.debug("glibc malloc thresholds: mmap %d, trim %d (%s)", mmap_threshold, trim_threshold, ok)
    return ok
