"""Routed experts: stacked SwiGLU weights computed with one grouped matmul over expert-sorted tokens.

Weights use the Hugging Face transformers 5.x layout ([E, out, in]): gate_up_proj [E, 2F, H]
(gate rows first, then up) and down_proj [E, H, F].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _LoopGroupedMM(torch.autograd.Function):
    """out[rows of e] = x[rows of e] @ w[e].T, one BLAS call per expert, no copies.

    The fallback where torch._grouped_mm has no kernel (fp32, CPU). It loops over experts,
    never over tokens, and writes each product straight into its slice of the output.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, counts: list[int]) -> Tensor:
        out = x.new_empty(x.shape[0], w.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(x[start:start + n], w[e].t(), out=out[start:start + n])
            start += n
        ctx.save_for_backward(x, w)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, w = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(w) if need_w else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if n:
                g = grad_out[start:start + n]
                if need_x:
                    torch.mm(g, w[e], out=grad_x[start:start + n])
                if need_w:
                    torch.mm(g.t(), x[start:start + n], out=grad_w[e])
            start += n
        return grad_x, grad_w, None


def _expert_blocks(counts: list[int], width: int, elems: int = 1 << 18) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """Consecutive experts grouped until a block holds about `elems` activations ([rows, width]).

    Returns (first row, rows, [(expert, first row inside the block, rows)]) per block. The
    elementwise SwiGLU work runs once per block: fine-grained experts (64 of width 128) would
    otherwise pay a few dispatcher calls per expert, wide ones get a block each.
    """
    blocks, members, start, rows = [], [], 0, 0
    for e, n in enumerate(counts):
        if n:
            members.append((e, rows, n))
            rows += n
            if rows * width >= elems:
                blocks.append((start, rows, members))
                members, start, rows = [], start + rows, 0
    if members:
        blocks.append((start, rows, members))
    return blocks


class _LoopSwiGLUExperts(torch.autograd.Function):
    """y[rows of e] = (silu(g) * u) @ down[e].T with [g, u] = x[rows of e] @ gate_up[e].T, per expert.

    The CPU/fp32 path. One Function for the whole expert FFN, one BLAS call per expert and
    matmul, writing with out= into slices; the activation and its gradient are computed a block
    of experts at a time in small scratch buffers that stay in cache (no chunk/cat, no [N, F]
    activation kept): forward saves x and h = [g, u] only, and the backward recomputes
    silu(g) * u for the down-projection's weight gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, gate_up: Tensor, down: Tensor, counts: list[int]) -> Tensor:
        N, F2 = x.shape[0], gate_up.shape[1]
        F_ = F2 // 2
        h = x.new_empty(N, F2)  # [N, 2F] gate then up, saved for backward
        out = x.new_empty(N, down.shape[1])
        blocks = _expert_blocks(counts, F_)
        act = x.new_empty(max((r for _, r, _ in blocks), default=0), F_)  # [rows, F] scratch
        for b0, R, members in blocks:
            hb, a = h[b0:b0 + R], act[:R]
            for e, r0, n in members:
                torch.mm(x[b0 + r0:b0 + r0 + n], gate_up[e].t(), out=hb[r0:r0 + n])
            torch.ops.aten.silu.out(hb[:, :F_], out=a)
            a.mul_(hb[:, F_:])
            for e, r0, n in members:
                torch.mm(a[r0:r0 + n], down[e].t(), out=out[b0 + r0:b0 + r0 + n])
        ctx.save_for_backward(x, gate_up, down, h)
        ctx.counts, ctx.blocks = counts, blocks
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, gate_up, down, h = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        F_ = h.shape[1] // 2
        R_max = max((r for _, r, _ in ctx.blocks), default=0)
        need_x = ctx.needs_input_grad[0]
        grad_x = torch.empty_like(x) if need_x else None
        # every expert with rows writes its whole slice; only experts without rows need zeros
        grad_gate_up = torch.empty_like(gate_up) if ctx.needs_input_grad[1] else None
        grad_down = torch.empty_like(down) if ctx.needs_input_grad[2] else None
        for e, n in enumerate(ctx.counts):
            if not n:
                for gw in (grad_gate_up, grad_down):
                    if gw is not None:
                        gw[e].zero_()
        # per-block scratch: d(act), silu(g), act then d(act) * u, d[g, u]
        g_act, s, tmp, g_h = (x.new_empty(R_max, F_), x.new_empty(R_max, F_), x.new_empty(R_max, F_),
                              x.new_empty(R_max, 2 * F_))
        for b0, R, members in ctx.blocks:
            go, hb, xb = grad_out[b0:b0 + R], h[b0:b0 + R], x[b0:b0 + R]
            ga, se, te, gh = g_act[:R], s[:R], tmp[:R], g_h[:R]
            gate, up = hb[:, :F_], hb[:, F_:]
            for e, r0, n in members:
                torch.mm(go[r0:r0 + n], down[e], out=ga[r0:r0 + n])  # d(act) [n, F]
            torch.ops.aten.silu.out(gate, out=se)
            if grad_down is not None:
                torch.mul(se, up, out=te)  # act, recomputed
                for e, r0, n in members:
                    torch.mm(go[r0:r0 + n].t(), te[r0:r0 + n], out=grad_down[e])
            torch.mul(ga, se, out=gh[:, F_:])  # d(up) = d(act) * silu(g)
            torch.mul(ga, up, out=te)
            torch.ops.aten.silu_backward.grad_input(te, gate, grad_input=gh[:, :F_])  # d(g)
            for e, r0, n in members:
                if need_x:
                    torch.mm(gh[r0:r0 + n], gate_up[e], out=grad_x[b0 + r0:b0 + r0 + n])
                if grad_gate_up is not None:
                    torch.mm(gh[r0:r0 + n].t(), xb[r0:r0 + n], out=grad_gate_up[e])
        return grad_x, grad_gate_up, grad_down, None


def use_torch_grouped_mm(x: Tensor, impl: str) -> bool:
    # auto: bf16 where this torch has the kernel (2.8+); the per-expert loop is exact everywhere else
    return impl == "grouped_mm" or (impl == "auto" and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"))


def grouped_mm(x: Tensor, w: Tensor, counts: Tensor, impl: str = "auto") -> Tensor:
    """x: [N, K] rows sorted by expert, w: [E, M, K], counts: [E] rows per expert -> [N, M]."""
    if use_torch_grouped_mm(x, impl):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    return _LoopGroupedMM.apply(x, w, counts.tolist())


class GroupedExperts(nn.Module):
    """E SwiGLU experts of width F on d_model H, stored stacked."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, impl: str = "auto"):
        super().__init__()
        self.n_experts, self.d_model, self.d_expert, self.impl = n_experts, d_model, d_expert, impl
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * d_expert, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        """x: [N, H] sorted by expert, counts: [E] -> [N, H]."""
        if not use_torch_grouped_mm(x, self.impl):
            return _LoopSwiGLUExperts.apply(x, self.gate_up_proj, self.down_proj, counts.tolist())
        h = grouped_mm(x, self.gate_up_proj, counts, self.impl)  # [N, 2F]
        gate, up = h.chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.down_proj, counts, self.impl)

    def reference_forward(self, x: Tensor, counts: Tensor) -> Tensor:
        """Naive per-expert loop with autograd through slices; for tests and benchmarks."""
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            xe = x[start:start + n]
            gate, up = (xe @ self.gate_up_proj[e].t()).chunk(2, dim=-1)
            outs.append((F.silu(gate) * up) @ self.down_proj[e].t())
            start += n
        return torch.cat(outs) if outs else x.new_zeros(0, self.d_model)
