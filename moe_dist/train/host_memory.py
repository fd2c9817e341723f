"""CPU training: keep large freed blocks in the process heap instead of handing them back to the OS.

glibc serves allocations above its mmap threshold (at most 32 MiB by default) with fresh mmap'd
pages and unmaps them on free, so every step's large activations (the T*k gathered rows of an MoE
layer: 32 MiB at 4096 tokens, top-8, hidden 256) page-fault in anew: about 9 ms per 32 MiB here, as
long as the copy itself. Raising the thresholds lets freed blocks be reused, as PyTorch's caching
allocator does on GPUs. The price: the process keeps its peak heap size. With train.cpu_malloc_cache=false the opposite:
every block of 1 MiB or more is returned to the OS when freed (return_large_allocations), the lean choice
for models near the machine's memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _mallopt():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None


def cache_large_allocations(limit_bytes: int = 1 << 30) -> bool:
    """Serve allocations below `limit_bytes` from the heap and keep freed memory; True if applied (glibc)."""
    mallopt = _mallopt()
    return mallopt is not None and all(mallopt(opt, value) == 1 for opt, value in (
        (_M_MMAP_THRESHOLD, limit_bytes), (_M_TRIM_THRESHOLD, 2 * limit_bytes), (_M_TOP_PAD, 64 << 20)))


def return_large_allocations(threshold_bytes: int = 1 << 20) -> bool:
    """Serve every allocation of `threshold_bytes` or more with its own mapping, unmapped when freed; True
    if applied (glibc). glibc's default threshold grows after each large free (up to 32 MiB), after which
    the shards and gradients of a sharded model (1-32 MiB each) come from the heap and leave it
    fragmented: at world 4, zero_stage 3 (benchmarks/memory.py) the peak was 3.07 GiB against 2.26
    with a fixed threshold, for 1.5 GiB of model state. A fixed threshold stops that growth."""
    mallopt = _mallopt()
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1
