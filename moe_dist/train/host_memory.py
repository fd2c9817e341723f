"""CPU training: keep large freed blocks in the process heap instead of handing them back to the OS.

glibc serves allocations above its mmap threshold (at most 32 MiB by default) with fresh mmap'd
pages and unmaps them on free, so every step's large activations (the T*k gathered rows of an MoE
layer: 32 MiB at 4096 tokens, top-8, hidden 256) page-fault in anew: about 9 ms per 32 MiB here, as
long as the copy itself. Raising the thresholds lets freed blocks be reused, as PyTorch's caching
allocator does on GPUs. The price: the process keeps its peak heap size.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def cache_large_allocations(limit_bytes: int = 1 << 30) -> bool:
    """Serve allocations below `limit_bytes` from the heap and keep freed memory; True if applied (glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    return all(mallopt(opt, value) == 1 for opt, value in (
        (_M_MMAP_THRESHOLD, limit_bytes), (_M_TRIM_THRESHOLD, 2 * limit_bytes), (_M_TOP_PAD, 64 << 20)))
