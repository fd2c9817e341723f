"""Local token dispatcher: on one device, dispatching is sorting the kept assignments by expert.

The expert-parallel dispatcher (moe_dist.parallel.dispatch) has the same two methods, so
MoELayer never knows whether tokens travel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .router import Routing


@dataclass
class DispatchState:
    token: Tensor  # [N] token of each expert-sorted row
    gate: Tensor  # [N] its combine weight
    n_tokens: int


class LocalDispatcher:
    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.n_local_experts = n_experts

    def dispatch(self, x: Tensor, routing: Routing) -> tuple[Tensor, Tensor, DispatchState]:
        """x: [T, H] -> (rows [N, H] sorted by expert, counts [E], state for combine)."""
        token, expert, gate = routing.kept()
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=self.n_experts)
        token = token[order]
        # index_select: its backward is index_add_, far cheaper on CPU than x[token]'s index_put_
        return x.index_select(0, token), counts, DispatchState(token, gate[order], x.shape[0])

    def combine(self, y: Tensor, state: DispatchState) -> Tensor:
        """y: [N, H] expert outputs -> [T, H], each row weighted by its gate and summed per token."""
        out = y.new_zeros(state.n_tokens, y.shape[-1])
        return out.index_add_(0, state.token, y * state.gate.unsqueeze(1).to(y.dtype))
