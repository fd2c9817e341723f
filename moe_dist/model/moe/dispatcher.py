"""How tokens reach their experts: the TokenDispatcher protocol, the one-device dispatcher, and the one
weighted combine every dispatcher ends with.

The MoE layer calls a dispatcher in four steps, so that work can run while tokens travel:

    state = d.dispatch(x, routing)                    # the tokens start to move
    ... shared experts ...
    rows, counts = d.arrived(state)                   # [N, H] sorted by local expert, [E_l] rows per expert
    back = d.send_back(experts(rows, counts), state)  # expert outputs on their way home
    ... balance losses and statistics ...
    out = d.combine(back, state)                      # [T, H] gate-weighted sums per token

The expert-parallel dispatcher (moe_dist.parallel.dispatch) implements the same protocol with all-to-alls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torch import Tensor

from .router import Routing


class TokenDispatcher(Protocol):
    n_experts: int  # routed experts of the whole model
    n_local_experts: int  # those whose rows this dispatcher hands to the local experts

    def dispatch(self, x: Tensor, routing: Routing) -> Any:
        """x [T, H] -> the state of the dispatch, its rows possibly still under way."""

    def arrived(self, state: Any) -> tuple[Tensor, Tensor]:
        """(rows [N, H] sorted by local expert, rows per local expert [E_l] on the device)."""

    def send_back(self, y: Tensor, state: Any) -> Tensor:
        """The experts' outputs y [N, H] -> rows in the order combine() reads them."""

    def combine(self, back: Tensor, state: Any) -> Tensor:
        """-> [T, H]: each token's rows weighted by their gates and summed."""


def _row_chunks(n_rows: int, width: int, elems: int = 1 << 18):
    """Slices of about `elems` elements (1 MiB of fp32): temporaries that size are reused by the
    allocator, where one [N, H] temporary is a fresh mmap whose page faults cost more than the maths."""
    step = max(1, elems // max(width, 1))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


class _WeightedCombine(torch.autograd.Function):
    """out[t] = sum over assignments a of token t of gate[a] * y[row[a]]; y: [R, H], gate, token, row: [N]
    -> [T, H] (row None: row[a] = a).

    Autograd through `y[row] * gate` and index_add_ would allocate the [N, H] gather and product and
    three more [N, H] tensors in backward. Here the products are formed a chunk of rows at a time, and
    the backward gathers the output gradient once, reads d(gate) off it as row-wise dot products and
    scales it in place into d(y).
    """

    @staticmethod
    def forward(ctx, y: Tensor, gate: Tensor, token: Tensor, n_tokens: int, row: Optional[Tensor]) -> Tensor:
        w = gate.to(y.dtype).unsqueeze(1)
        out = y.new_zeros(n_tokens, y.shape[1])
        chunks = _row_chunks(token.shape[0], y.shape[1]) if y.device.type == "cpu" else [slice(None)]
        for c in chunks:
            out.index_add_(0, token[c], _rows(y, row, c) * w[c])
        ctx.save_for_backward(y, gate, token, row)
        ctx.chunks = chunks
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        y, gate, token, row = ctx.saved_tensors
        g = grad_out.index_select(0, token)  # [N, H]
        grad_gate = grad_y = None
        if ctx.needs_input_grad[1]:
            grad_gate = y.new_empty(token.shape[0])
            for c in ctx.chunks:
                torch.linalg.vecdot(g[c], _rows(y, row, c), out=grad_gate[c])
            grad_gate = grad_gate.to(gate.dtype)
        if ctx.needs_input_grad[0]:
            grad_y = g.mul_(gate.to(y.dtype).unsqueeze(1))
            if row is not None:
                grad_y = torch.zeros_like(y).index_add_(0, row, grad_y)
        return grad_y, grad_gate, None, None, None


def _rows(y: Tensor, row: Optional[Tensor], c: slice) -> Tensor:
    return y[c] if row is None else y.index_select(0, row[c])


def weighted_combine(y: Tensor, gate: Tensor, token: Tensor, n_tokens: int, row: Optional[Tensor] = None) -> Tensor:
    """out [n_tokens, H]: out[token[a]] += gate[a] * y[row[a]] (row None: y[a]), without an [N, H] product."""
    return _WeightedCombine.apply(y, gate, token, n_tokens, row)


def dropped_last(routing: Routing) -> tuple[Tensor, Tensor]:
    """(sort key, gate): dropped assignments get key E, so sorting puts them after every kept row, and
    gate 0 (a constant: no gradient reaches their router scores). Static shapes instead of a nonzero."""
    if routing.keep is None:
        return routing.expert, routing.gate
    E = routing.scores.shape[-1]
    return routing.expert.masked_fill(~routing.keep, E), routing.gate.masked_fill(~routing.keep, 0.0)


@dataclass
class DispatchState:
    token: Tensor  # [N] token of each expert-sorted row
    gate: Tensor  # [N] its combine weight (0 for a dropped row)
    n_tokens: int
    rows: Tensor  # [N, H] the rows, sorted by expert
    counts: Tensor  # [E] rows per expert


class LocalDispatcher:
    """One device: dispatching is sorting the assignments by expert. Dropped assignments ride at the end
    of the last expert's rows with gate 0, so every shape is [A] and the grouped GEMM's offsets end at A
    (rows past the last offset would come back undefined)."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.n_local_experts = n_experts

    def dispatch(self, x: Tensor, routing: Routing) -> DispatchState:
        key, gate = dropped_last(routing)
        order = torch.argsort(key, stable=True)
        token = routing.token[order]
        counts = routing.kept_per_expert
        if routing.keep is not None:  # the dropped rows count as the last expert's
            counts = torch.cat([counts[:-1], (token.shape[0] - counts[:-1].sum()).view(1)])
        # index_select: its backward is index_add_, far cheaper on CPU than x[token]'s index_put_
        return DispatchState(token, gate[order], x.shape[0], x.index_select(0, token), counts)

    def arrived(self, state: DispatchState) -> tuple[Tensor, Tensor]:
        return state.rows, state.counts

    def send_back(self, y: Tensor, state: DispatchState) -> Tensor:
        return y

    def combine(self, back: Tensor, state: DispatchState) -> Tensor:
        return weighted_combine(back, state.gate, state.token, state.n_tokens)
