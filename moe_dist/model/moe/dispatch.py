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


def _row_chunks(n_rows: int, width: int, elems: int = 1 << 18):
    """Slices of about `elems` elements (1 MiB of fp32): temporaries that size are reused by the
    allocator, where one [N, H] temporary is a fresh mmap whose page faults cost more than the maths."""
    step = max(1, elems // max(width, 1))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


class _WeightedCombine(torch.autograd.Function):
    """out[t] = sum over rows r of token t of gate[r] * y[r]; y: [N, H], gate: [N], token: [N] -> [T, H].

    Autograd through `y * gate` and index_add_ would allocate the [N, H] product and three more
    [N, H] tensors in backward. Here the products are formed a chunk of rows at a time, and the
    backward gathers the output gradient once, reads d(gate) off it as row-wise dot products and
    scales it in place into d(y).
    """

    @staticmethod
    def forward(ctx, y: Tensor, gate: Tensor, token: Tensor, n_tokens: int) -> Tensor:
        w = gate.to(y.dtype).unsqueeze(1)
        out = y.new_zeros(n_tokens, y.shape[1])
        if y.device.type == "cpu":
            for c in _row_chunks(y.shape[0], y.shape[1]):
                out.index_add_(0, token[c], y[c] * w[c])
        else:
            out.index_add_(0, token, y * w)
        ctx.save_for_backward(y, gate, token)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        y, gate, token = ctx.saved_tensors
        g = grad_out.index_select(0, token)  # [N, H]
        grad_gate = None
        if ctx.needs_input_grad[1]:
            if y.device.type == "cpu":
                grad_gate = y.new_empty(y.shape[0])
                for c in _row_chunks(y.shape[0], y.shape[1]):
                    torch.linalg.vecdot(g[c], y[c], out=grad_gate[c])
            else:
                grad_gate = torch.linalg.vecdot(g, y)
            grad_gate = grad_gate.to(gate.dtype)
        grad_y = g.mul_(gate.to(y.dtype).unsqueeze(1)) if ctx.needs_input_grad[0] else None
        return grad_y, grad_gate, None, None


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
        return _WeightedCombine.apply(y, state.gate, state.token, state.n_tokens)
