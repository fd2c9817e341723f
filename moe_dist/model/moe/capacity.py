"""Expert capacity and token dropping, per routing group (REFERENCE.md: Capacity and dropping).

Pure functions on flat assignment lists so tests can check them by hand and every
dispatcher (local or all-to-all) sees the same drops.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def capacity(capacity_factor: Optional[float], tokens: int, top_k: float, n_experts: int, min_capacity: int = 0) -> Optional[int]:
    """C = ceil(cf * T * k / E), at least min_capacity; None means dropless."""
    if capacity_factor is None or capacity_factor <= 0:
        return None
    # round first so float noise (1.25 * 8 * 2 / 4 = 5.000000001) never adds a slot
    return max(math.ceil(round(capacity_factor * tokens * top_k / n_experts, 9)), min_capacity)


def bucket_counts(bucket: Tensor, n_buckets: int) -> Tensor:
    """[n_buckets] assignments per bucket id. scatter_add_ into a fixed size: torch.bincount sizes its
    output from the largest id, which on a GPU is a device-to-host copy."""
    return torch.zeros(n_buckets, dtype=torch.long, device=bucket.device).scatter_add_(0, bucket, torch.ones_like(bucket))


def slot_positions(bucket: Tensor, priority: Optional[Tensor], n_buckets: int, counts: Optional[Tensor] = None) -> Tensor:
    """Position of each assignment inside its bucket, best priority first.

    bucket: [A] bucket id (group * E + expert); priority: [A] higher first, or None for
    position order (assignments are listed token-major, so earlier tokens come first);
    counts: [n_buckets] assignments per bucket where the caller has them (the router's one count).
    Returns [A] long: 0 for the first assignment of each bucket, 1 for the next, ...
    """
    A = bucket.numel()
    if priority is None:
        order = torch.argsort(bucket, stable=True)
    else:
        by_priority = torch.argsort(priority, descending=True, stable=True)
        order = by_priority[torch.argsort(bucket[by_priority], stable=True)]
    counts = bucket_counts(bucket, n_buckets) if counts is None else counts
    starts = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(A, device=bucket.device) - starts[bucket[order]]
    pos = torch.empty_like(pos_sorted)
    pos[order] = pos_sorted
    return pos


def capacity_keep(group: Tensor, expert: Tensor, priority: Optional[Tensor], n_groups: int, n_experts: int, cap: int) -> Tensor:
    """keep[a] = assignment a is among the first `cap` of its (group, expert) pair. [A] bool."""
    return slot_positions(group * n_experts + expert, priority, n_groups * n_experts) < cap
