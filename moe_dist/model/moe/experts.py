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


def grouped_mm(x: Tensor, w: Tensor, counts: Tensor, impl: str = "auto") -> Tensor:
    """x: [N, K] rows sorted by expert, w: [E, M, K], counts: [E] rows per expert -> [N, M]."""
    use_torch = impl == "grouped_mm" or (impl == "auto" and x.dtype == torch.bfloat16)
    if use_torch:
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
