"""Rotary position embedding: the cos/sin tables (plain or YaRN-scaled) and their application.

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension"), as DeepSeek-V2/V3 and Qwen
checkpoints use it and Hugging Face transformers computes it: each frequency is blended between
the original one (fast-rotating dimensions, extrapolated) and the one divided by `factor` (slow
dimensions, interpolated) along a linear ramp between the dimensions that make beta_fast and
beta_slow rotations over the original context; cos/sin are multiplied by an attention factor, and
with mscale_all_dim (DeepSeek) the softmax scale by mscale(factor, mscale_all_dim)^2.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..config import RopeScaling


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(s: RopeScaling) -> float:
    """Multiplier of cos/sin (so of both q and k's rotated part)."""
    if s.attention_factor is not None:
        return s.attention_factor
    if s.mscale and s.mscale_all_dim:
        return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return yarn_mscale(s.factor)


def softmax_scale_factor(s: RopeScaling) -> float:
    """Multiplier of the 1/sqrt(d) softmax scale: DeepSeek's mscale_all_dim correction under YaRN."""
    if s.type == "yarn" and s.mscale_all_dim:
        return yarn_mscale(s.factor, s.mscale_all_dim) ** 2
    return 1.0


def inverse_frequencies(dim: int, theta: float, s: RopeScaling) -> Tensor:
    """[dim / 2] float64 angular frequencies of the rotated pairs."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if s.type != "yarn":
        return inv_freq

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over the original context
        return dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    # ramp 0: keep the original frequency (extrapolate); ramp 1: divide it by factor (interpolate)
    return inv_freq / s.factor * ramp + inv_freq * (1 - ramp)


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                scaling: Optional[RopeScaling] = None) -> tuple[Tensor, Tensor]:
    """cos, sin: [max_seq_len, head_dim], the half-split (rotate_half) convention of HF Llama."""
    scaling = scaling or RopeScaling()
    inv_freq = inverse_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    mult = yarn_attention_factor(scaling) if scaling.type == "yarn" else 1.0
    return (angles.cos() * mult).float(), (angles.sin() * mult).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleave: bool = False) -> Tensor:
    """x: [B, heads, S, d]; cos/sin: [S, r], r <= d: the first r dims are rotated, the rest pass (partial rotary).

    interleave: x holds its rotated pairs as (x0, x1), (x2, x3), ... (DeepSeek) instead of the two
    halves (Llama). They are gathered into halves first, so the output is in the half layout; q and k
    get the same permutation, so q . k (all attention uses) is exactly that of the interleaved rotation.
    """
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :r], cos, sin, interleave), x[..., r:]], dim=-1)
    if interleave:
        x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
