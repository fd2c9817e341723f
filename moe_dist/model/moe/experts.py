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

    The per-expert path (fp32; CPU, or a GPU without F.grouped_mm), one GEMM call per expert
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


# the public name where this torch has it (2.10+), else the private op it wraps (2.8+)
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def use_torch_grouped_mm(x: Tensor, impl: str) -> bool:
    # auto: bf16 where this torch has the kernel; the per-expert loop is exact everywhere else
    return impl == "grouped_mm" or (impl == "auto" and x.dtype == torch.bfloat16 and _grouped_mm is not None)


def expert_gemm(x: Tensor, impl: str):
    """The per-expert GEMM `impl` asks for on x (BlasGemm or OneDNNGemm); auto takes oneDNN for
    fp32 on x86 CPUs. Call only where use_torch_grouped_mm(x, impl) is false."""
    return OneDNNGemm if use_onednn(x, impl, "moe.grouped_mm") else BlasGemm


class _LoopGroupedMM(torch.autograd.Function):
    """out[rows of e] = x[rows of e] @ w[e].T, one BLAS call per expert, no copies: grouped_mm() where
    F.grouped_mm is not taken (the gpt-oss expert variants in fp32). Loops over experts, never tokens."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, counts: list[int]) -> Tensor:
        out = x.new_empty(x.shape[0], w.shape[1])
        for e, r0, n in _spans(counts):
            torch.mm(x[r0:r0 + n], w[e].t(), out=out[r0:r0 + n])
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
        for e, r0, n in _spans(ctx.counts):
            g = grad_out[r0:r0 + n]
            if need_x:
                torch.mm(g, w[e], out=grad_x[r0:r0 + n])
            if need_w:
                torch.mm(g.t(), x[r0:r0 + n], out=grad_w[e])
        return grad_x, grad_w, None


def grouped_mm(x: Tensor, w: Tensor, counts: Tensor, impl: str = "grouped_mm") -> Tensor:
    """x [N, K] rows sorted by expert, w [E, M, K], counts [E] rows per expert -> [N, M]: F.grouped_mm
    where use_torch_grouped_mm says so (offsets on the device: no host sync), else one torch.mm per expert
    (which needs the counts on the host)."""
    if use_torch_grouped_mm(x, impl):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        return _grouped_mm(x, w.transpose(-2, -1), offs=offs)
    return _LoopGroupedMM.apply(x, w, counts.tolist())


def clamped_swiglu(gate: Tensor, up: Tensor, alpha: float, limit: float) -> Tensor:
    """gpt-oss's expert activation: (clamp(u, -limit, limit) + 1) * g * sigmoid(alpha g), g = min(gate, limit)."""
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(alpha * gate)


class GroupedExperts(nn.Module):
    """E SwiGLU experts of width F on d_model H, stored stacked.

    gpt-oss's options: `bias` (gate_up_proj_bias [E, 2F], down_proj_bias [E, H]) and `act`
    clamped_swiglu. Off (the default) they cost nothing; on, the experts run through grouped_mm()
    (F.grouped_mm, or one torch.mm per expert) with the bias rows gathered per row's expert.
    """

    def __init__(self, n_experts: int, d_model: int, d_expert: int, impl: str = "auto", *, bias: bool = False,
                 act: str = "swiglu", alpha: float = 1.702, limit: float = 7.0):
        super().__init__()
        self.n_experts, self.d_model, self.d_expert, self.impl = n_experts, d_model, d_expert, impl
        self.act, self.alpha, self.limit = act, alpha, limit
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * d_expert, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(n_experts, 2 * d_expert)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.zeros(n_experts, d_model)) if bias else None
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        """x: [N, H] sorted by expert, counts: [E] -> [N, H]."""
        if self.gate_up_proj_bias is not None or self.act != "swiglu":
            return self._forward_variant(x, counts)
        gate_up, down = _local(self.gate_up_proj), _local(self.down_proj)
        if not use_torch_grouped_mm(x, self.impl):
            gemm = expert_gemm(x, self.impl)
            return _SwiGLUExperts.apply(x, gate_up, down, counts.tolist(), gemm)
        h = grouped_mm(x, gate_up, counts, self.impl)  # [N, 2F]
        gate, up = h.chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, down, counts, self.impl)

    def _activate(self, gate: Tensor, up: Tensor) -> Tensor:
        if self.act == "clamped_swiglu":
            return clamped_swiglu(gate, up, self.alpha, self.limit)
        return F.silu(gate) * up

    def _forward_variant(self, x: Tensor, counts: Tensor) -> Tensor:
        gate_up, down = _local(self.gate_up_proj), _local(self.down_proj)
        h = grouped_mm(x, gate_up, counts, self.impl)  # [N, 2F]
        E = gate_up.shape[0]  # this rank's experts
        if self.gate_up_proj_bias is not None:
            # each row's expert, without a host sync: the rows are sorted by expert
            row_expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=x.shape[0])
            h = h + _local(self.gate_up_proj_bias).index_select(0, row_expert)
        gate, up = h.chunk(2, dim=-1)
        y = grouped_mm(self._activate(gate, up), down, counts, self.impl)  # [N, H]
        return y + _local(self.down_proj_bias).index_select(0, row_expert) if self.down_proj_bias is not None else y


def _local(w: Tensor) -> Tensor:
    """This rank's experts of a weight that expert parallelism made a DTensor; a plain weight as it is."""
    return w.to_local() if hasattr(w, "to_local") else w
