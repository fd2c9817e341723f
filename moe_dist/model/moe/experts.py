"""Routed experts: stacked SwiGLU weights computed with one grouped matmul over expert-sorted tokens.

Weights use the Hugging Face transformers 5.x layout ([E, out, in]): gate_up_proj [E, 2F, H]
(gate rows first, then up) and down_proj [E, H, F].
"""
from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BlasGemm:
    """torch.mm: MKL or OpenBLAS on a CPU, cuBLAS on a GPU; writes straight into `out` slices."""

    @staticmethod
    def mm_t(a: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
        """a @ w.T"""
        return torch.mm(a, w.t()) if out is None else torch.mm(a, w.t(), out=out)

    @staticmethod
    def mm_tn(a: Tensor, b: Tensor, out: Tensor) -> None:
        """out = a.T @ b, a contraction over rows (weight gradients)"""
        torch.mm(a.t(), b, out=out)


class OneDNNGemm:
    """oneDNN's fp32 GEMM, the kernel torch.compile uses for CPU linears.

    MKL's sgemm takes its AVX2 path on non-Intel CPUs; on the AMD EPYC (AVX-512) we measure on,
    oneDNN runs the expert matmuls at about twice its speed (benchmarks/RESULTS.md). Two costs
    shape the calls: oneDNN returns new tensors, so results bound for a slice are copied (one
    pass, small beside a GEMM); and it compiles a kernel for every new shape (0.2-1 ms, cached),
    while expert row counts change every step. So oneDNN gets the rows rounded down to a multiple
    of ROWS (at most N / ROWS shapes per GEMM, all cached after warm-up) and torch.mm the rest.
    """

    ROWS = 64

    @staticmethod
    def _linear(a: Tensor, w: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")

    @staticmethod
    def mm_t(a: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
        n = a.shape[0]
        m = n // OneDNNGemm.ROWS * OneDNNGemm.ROWS
        if m == n:
            y = OneDNNGemm._linear(a, w)
            return y if out is None else out.copy_(y)
        out = a.new_empty(n, w.shape[0]) if out is None else out
        if m:
            out[:m].copy_(OneDNNGemm._linear(a[:m], w))
        torch.mm(a[m:], w.t(), out=out[m:])
        return out

    @staticmethod
    def mm_tn(a: Tensor, b: Tensor, out: Tensor) -> None:
        n = a.shape[0]
        k = n // OneDNNGemm.ROWS * OneDNNGemm.ROWS
        if k == 0:
            torch.mm(a.t(), b, out=out)
            return
        # oneDNN wants a row-major left operand: transpose the narrower one ourselves
        a_k, b_k = a[:k], b[:k]
        if a.shape[1] <= b.shape[1]:
            out.copy_(OneDNNGemm._linear(a_k.t().contiguous(), b_k.t()))
        else:
            out.copy_(OneDNNGemm._linear(b_k.t().contiguous(), a_k.t()).t())
        if k < n:
            out.addmm_(a[k:].t(), b[k:])


@functools.cache
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _spans(counts: list[int]):
    """(expert, first row, rows) for every expert that has rows."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, n
        start += n


class _LoopGroupedMM(torch.autograd.Function):
    """out[rows of e] = x[rows of e] @ w[e].T, one BLAS call per expert, no copies.

    grouped_mm()'s fallback where torch._grouped_mm has no kernel. It loops over experts, never
    over tokens, and writes each product straight into its slice of the output.
    """

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


class _SwiGLUExperts(torch.autograd.Function):
    """y[rows of e] = (silu(g) * u) @ down[e].T with [g, u] = x[rows of e] @ gate_up[e].T, per expert.

    The per-expert path (fp32; CPU, or a GPU without torch._grouped_mm), one GEMM call per expert
    and matmul through `gemm` (BlasGemm or OneDNNGemm). One Function for the whole expert FFN:
    forward saves x and each expert's [g, u] only (no [N, F] activation), the SwiGLU and its
    gradient run in reused scratch buffers, and the backward recomputes silu(g) * u for the
    down-projection's weight gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, gate_up: Tensor, down: Tensor, counts: list[int], gemm) -> Tensor:
        F_ = gate_up.shape[1] // 2
        out = x.new_empty(x.shape[0], down.shape[1])
        act = x.new_empty(max(counts, default=0), F_)
        hs = []
        for e, r0, n in _spans(counts):
            h = gemm.mm_t(x[r0:r0 + n], gate_up[e])  # [n, 2F]: gate then up
            a = torch.ops.aten.silu.out(h[:, :F_], out=act[:n]).mul_(h[:, F_:])
            gemm.mm_t(a, down[e], out=out[r0:r0 + n])
            hs.append(h)
        ctx.save_for_backward(x, gate_up, down, *hs)
        ctx.counts, ctx.gemm = counts, gemm
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, gate_up, down, *hs = ctx.saved_tensors
        gemm, counts = ctx.gemm, ctx.counts
        grad_out = grad_out.contiguous()
        F_ = gate_up.shape[1] // 2
        need_x, need_gu, need_down = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        # every expert with rows writes its whole slice; only experts without rows need zeros
        grad_gate_up = torch.empty_like(gate_up) if need_gu else None
        grad_down = torch.empty_like(down) if need_down else None
        for e, n in enumerate(counts):
            for gw in (grad_gate_up, grad_down):
                if not n and gw is not None:
                    gw[e].zero_()
        n_max = max(counts, default=0)
        silu_g, act, grad_h = x.new_empty(n_max, F_), x.new_empty(n_max, F_), x.new_empty(n_max, 2 * F_)
        for (e, r0, n), h in zip(_spans(counts), hs):
            go, gate, up, gh = grad_out[r0:r0 + n], h[:, :F_], h[:, F_:], grad_h[:n]
            grad_act = gemm.mm_t(go, down[e].t())  # [n, F]
            s = torch.ops.aten.silu.out(gate, out=silu_g[:n])
            if need_down:
                gemm.mm_tn(go, torch.mul(s, up, out=act[:n]), out=grad_down[e])  # act recomputed
            torch.mul(grad_act, s, out=gh[:, F_:])  # d(up) = d(act) * silu(g)
            torch.ops.aten.silu_backward.grad_input(grad_act.mul_(up), gate, grad_input=gh[:, :F_])  # d(g)
            if need_x:
                gemm.mm_t(gh, gate_up[e].t(), out=grad_x[r0:r0 + n])
            if need_gu:
                gemm.mm_tn(gh, x[r0:r0 + n], out=grad_gate_up[e])
        return grad_x, grad_gate_up, grad_down, None, None


def use_torch_grouped_mm(x: Tensor, impl: str) -> bool:
    # auto: bf16 where this torch has the kernel (2.8+); the per-expert loop is exact everywhere else
    return impl == "grouped_mm" or (impl == "auto" and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"))


def expert_gemm(x: Tensor, impl: str):
    """The per-expert GEMM `impl` asks for on x (BlasGemm or OneDNNGemm); auto takes oneDNN for
    fp32 on x86 CPUs. Call only where use_torch_grouped_mm(x, impl) is false."""
    cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32
    if impl == "onednn":
        if not (cpu_fp32 and onednn_available()):
            raise ValueError(f"moe.grouped_mm=onednn runs fp32 experts on a CPU with oneDNN; got {x.dtype} on "
                             f"{x.device.type} (oneDNN {'available' if onednn_available() else 'missing'}): "
                             "use auto or loop")
        return OneDNNGemm
    if impl == "auto" and cpu_fp32 and platform.machine().lower() in ("x86_64", "amd64") and onednn_available():
        return OneDNNGemm
    return BlasGemm


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
            gemm = expert_gemm(x, self.impl)
            return _SwiGLUExperts.apply(x, self.gate_up_proj, self.down_proj, counts.tolist(), gemm)
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
