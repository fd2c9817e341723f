"""Routed experts: stacked SwiGLU weights computed with one grouped matmul over expert-sorted tokens.

Weights use the Hugging Face transformers 5.x layout ([E, out, in]): gate_up_proj [E, 2F, H]
(gate rows first, then up) and down_proj [E, H, F].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gemm import BlasGemm, OneDNNGemm, use_onednn


def _spans(counts: list[int]):
    """(expert, first row, rows) for every expert that has rows."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, n
        start += n


class _SwiGLUExperts(torch.autograd.Function):
    """y[rows of e] = (silu(g) * u) @ down[e].T with [g, u] = x[rows of e] @ gate_up[e].T, per expert.

    The per-expert path (fp32; CPU, or a GPU without torch._grouped_mm), one GEMM call per expert
    and matmul through `gemm` (BlasGemm or OneDNNGemm), each over a window of gemm.rows() rows.
    One Function for the whole expert FFN: forward saves x and each expert's [g, u] only (no
    [N, F] activation), the SwiGLU and its gradient run in reused scratch buffers (zeroed once:
    rows a window reads past an expert's own must hold finite numbers), and the backward
    recomputes silu(g) * u for the down-projection's weight gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, gate_up: Tensor, down: Tensor, counts: list[int], gemm) -> Tensor:
        N, F_ = x.shape[0], gate_up.shape[1] // 2
        spans = [(e, r0, n, gemm.rows(r0, n, N)) for e, r0, n in _spans(counts)]
        out = x.new_empty(N, down.shape[1])
        act = x.new_zeros(max((p for *_, p in spans), default=0), F_)
        hs = []
        for e, r0, n, p in spans:
            h = gemm.mm_t(x[r0:r0 + p], gate_up[e], n)  # [n, 2F]: gate then up
            torch.ops.aten.silu.out(h[:, :F_], out=act[:n]).mul_(h[:, F_:])
            gemm.mm_t(act[:p], down[e], n, out=out[r0:r0 + n])
            hs.append(h)
        ctx.save_for_backward(x, gate_up, down, *hs)
        ctx.counts, ctx.spans, ctx.gemm = counts, spans, gemm
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, gate_up, down, *hs = ctx.saved_tensors
        gemm, spans = ctx.gemm, ctx.spans
        grad_out = grad_out.contiguous()
        F_ = gate_up.shape[1] // 2
        need_x, need_gu, need_down = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        # every expert with rows writes its whole slice; only experts without rows need zeros
        grad_gate_up = torch.empty_like(gate_up) if need_gu else None
        grad_down = torch.empty_like(down) if need_down else None
        for e, n in enumerate(ctx.counts):
            for gw in (grad_gate_up, grad_down):
                if not n and gw is not None:
                    gw[e].zero_()
        p_max = max((p for *_, p in spans), default=0)
        silu_g, act, grad_h = x.new_empty(p_max, F_), x.new_zeros(p_max, F_), x.new_zeros(p_max, 2 * F_)
        for (e, r0, n, p), h in zip(spans, hs):
            go, gate, up, gh = grad_out[r0:r0 + p], h[:, :F_], h[:, F_:], grad_h[:n]
            grad_act = gemm.mm_t(go, down[e].t(), n)  # [n, F]
            s = torch.ops.aten.silu.out(gate, out=silu_g[:n])
            if need_down:
                torch.mul(s, up, out=act[:n])  # act, recomputed
                gemm.mm_tn(go, act[:p], n, out=grad_down[e])
            torch.mul(grad_act, s, out=gh[:, F_:])  # d(up) = d(act) * silu(g)
            torch.ops.aten.silu_backward.grad_input(grad_act.mul_(up), gate, grad_input=gh[:, :F_])  # d(g)
            if need_x:
                gemm.mm_t(grad_h[:p], gate_up[e].t(), n, out=grad_x[r0:r0 + n])
            if need_gu:
                gemm.mm_tn(grad_h[:p], x[r0:r0 + p], n, out=grad_gate_up[e])
        return grad_x, grad_gate_up, grad_down, None, None


def use_torch_grouped_mm(x: Tensor, impl: str) -> bool:
    # auto: bf16 where this torch has the kernel (2.8+); the per-expert loop is exact everywhere else
    return impl == "grouped_mm" or (impl == "auto" and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"))


def expert_gemm(x: Tensor, impl: str):
    """The per-expert GEMM `impl` asks for on x (BlasGemm or OneDNNGemm); auto takes oneDNN for
    fp32 on x86 CPUs. Call only where use_torch_grouped_mm(x, impl) is false."""
    return OneDNNGemm if use_onednn(x, impl, "moe.grouped_mm") else BlasGemm


def grouped_mm(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """torch._grouped_mm: x [N, K] rows sorted by expert, w [E, M, K], counts [E] rows per expert -> [N, M]."""
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)


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
        gate_up, down = _local(self.gate_up_proj), _local(self.down_proj)
        if not use_torch_grouped_mm(x, self.impl):
            gemm = expert_gemm(x, self.impl)
            return _SwiGLUExperts.apply(x, gate_up, down, counts.tolist(), gemm)
        h = grouped_mm(x, gate_up, counts)  # [N, 2F]
        gate, up = h.chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, down, counts)


def _local(w: Tensor) -> Tensor:
    """This rank's experts of a weight that expert parallelism made a DTensor; a plain weight as it is."""
    return w.to_local() if hasattr(w, "to_local") else w
