"""GEMM backends for fp32 on a CPU: torch.mm (MKL or OpenBLAS) or oneDNN, and a Linear that uses them.

MKL's sgemm takes its AVX2 path on non-Intel CPUs: on an AMD EPYC with AVX-512, oneDNN runs the
model's matmuls at about twice its speed; on an AVX2-only CPU oneDNN is the slower one (0.8x).
So `auto` takes oneDNN only where the CPU (and oneDNN's ISA limit) has AVX-512
(benchmarks/cpu_gemm.py, benchmarks/RESULTS.md). Elsewhere (GPUs, bf16, AVX2 CPUs unless asked)
everything stays on torch's own matmul. oneDNN is reached through a private torch op, guarded by
`onednn_available`.
"""
from __future__ import annotations

import functools
import os
import platform
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config.preflight import onednn_available


class BlasGemm:
    """torch.mm: MKL or OpenBLAS on a CPU, cuBLAS on a GPU; writes straight into `out` slices.

    Operands are row windows of the expert-sorted tensors; only their first n rows count.
    """

    @staticmethod
    def rows(r0: int, n: int, total: int) -> int:
        """Rows to hand the GEMMs for an expert's rows [r0, r0 + n) of a [total, .] tensor."""
        return n

    @staticmethod
    def mm_t(a: Tensor, w: Tensor, n: int, out: Tensor | None = None) -> Tensor:
        """a[:n] @ w.T"""
        return torch.mm(a[:n], w.t()) if out is None else torch.mm(a[:n], w.t(), out=out)

    @staticmethod
    def mm_tn(a: Tensor, b: Tensor, n: int, out: Tensor) -> None:
        """out = a[:n].T @ b[:n], a contraction over rows (weight gradients)"""
        torch.mm(a[:n].t(), b[:n], out=out)


class OneDNNGemm:
    """oneDNN's fp32 GEMM, the kernel torch.compile uses for CPU linears.

    oneDNN compiles a kernel for every new shape (0.2-1 ms, then cached), and row counts change: an
    expert's every step, a prompt's in generation. So GEMMs read rows rounded up to a multiple of
    ROWS where the caller's tensor has them (BlasGemm.rows / OneDNNGemm.rows): a run sees at most
    N / ROWS shapes per GEMM, all cached after warm-up. For experts the extra rows are the next
    expert's: their results are dropped, and in weight gradients they meet zeros (a non-finite row
    there makes this expert's gradient non-finite too: that step is non-finite anyway). Where the
    tensor ends first (and for dense linears), oneDNN takes the multiple of ROWS and torch.mm the
    rest. oneDNN returns new tensors, so results bound for a slice are copied (one pass, small
    beside a GEMM).
    """

    ROWS = 64

    @staticmethod
    def rows(r0: int, n: int, total: int) -> int:
        p = -(-n // OneDNNGemm.ROWS) * OneDNNGemm.ROWS
        return p if r0 + p <= total else n

    @staticmethod
    def _linear(a: Tensor, w: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")

    @staticmethod
    def mm_t(a: Tensor, w: Tensor, n: int, out: Tensor | None = None) -> Tensor:
        p = a.shape[0]
        if p % OneDNNGemm.ROWS == 0 and p:
            y = OneDNNGemm._linear(a, w)[:n]
            return y if out is None else out.copy_(y)
        m = n // OneDNNGemm.ROWS * OneDNNGemm.ROWS  # exact rows at the tensor's end
        out = a.new_empty(n, w.shape[0]) if out is None else out
        if m:
            out[:m].copy_(OneDNNGemm._linear(a[:m], w))
        torch.mm(a[m:n], w.t(), out=out[m:])
        return out

    @staticmethod
    def mm_tn(a: Tensor, b: Tensor, n: int, out: Tensor) -> None:
        p = a.shape[0]
        if p % OneDNNGemm.ROWS or not p:  # exact rows at the tensor's end: the multiple of ROWS, then the rest
            m = n // OneDNNGemm.ROWS * OneDNNGemm.ROWS
            if m:
                OneDNNGemm.mm_tn(a[:m], b[:m], m, out)
                out.addmm_(a[m:n].t(), b[m:n])
            else:
                torch.mm(a[:n].t(), b[:n], out=out)
            return
        # oneDNN wants a row-major left operand: we transpose the narrower one, zero past row n
        swap = a.shape[1] > b.shape[1]
        narrow, other = (b, a) if swap else (a, b)
        t = narrow.new_empty(narrow.shape[1], p)
        t[:, :n].copy_(narrow[:n].t())
        t[:, n:].zero_()
        y = OneDNNGemm._linear(t, other.t())
        out.copy_(y.t() if swap else y)


def _avx512_allowed(onednn_max_isa: str) -> bool:
    """Whether ONEDNN_MAX_CPU_ISA (empty when unset) lets oneDNN use AVX-512."""
    isa = onednn_max_isa.strip().lower()
    return isa in ("", "all", "default") or isa.startswith(("avx512", "avx10")) or "amx" in isa


@functools.cache
def _onednn_by_default() -> bool:
    """auto's choice: oneDNN on x86 CPUs with AVX-512 (in ATen's dispatch and oneDNN's ISA limit),
    where it beats MKL's fp32 GEMMs; torch.mm on AVX2-only CPUs, where it does not."""
    return (platform.machine().lower() in ("x86_64", "amd64") and onednn_available()
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and _avx512_allowed(os.environ.get("ONEDNN_MAX_CPU_ISA", "")))


def use_onednn(x: Tensor, impl: str, field: str) -> bool:
    """Whether `impl` (the config value of `field`) runs x's matmuls on oneDNN: "onednn" always (fp32 on
    a CPU, or an error naming the field), "auto" for fp32 on x86 CPUs with AVX-512, anything else never."""
    cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32
    if impl == "onednn":
        if not (cpu_fp32 and onednn_available()):
            raise ValueError(f"{field}=onednn runs fp32 on a CPU with oneDNN; got {x.dtype} on {x.device.type} "
                             f"(oneDNN {'available' if onednn_available() else 'missing'}): use auto")
        return True
    return impl == "auto" and cpu_fp32 and _onednn_by_default() and not torch.is_autocast_enabled("cpu")


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ w.T + b on oneDNN, forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        n = x2.shape[0]
        y = OneDNNGemm.mm_t(x2, w, n)
        if b is not None:
            y = y.add_(b)
        ctx.save_for_backward(x2, w)
        ctx.x_shape, ctx.has_bias = x.shape, b is not None
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, w = ctx.saved_tensors
        g2 = grad.reshape(-1, w.shape[0]).contiguous()
        n = g2.shape[0]
        grad_x = OneDNNGemm.mm_t(g2, w.t(), n).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(w)
            OneDNNGemm.mm_tn(g2, x2, n, out=grad_w)
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, impl: str = "auto") -> Tensor:
    """F.linear, on oneDNN where use_onednn(x, impl) says so."""
    # a tensor-parallel weight (a DTensor: it has a device_mesh) runs through DTensor's own matmul
    if weight.dtype == x.dtype and not hasattr(weight, "device_mesh") and use_onednn(x, impl, "model.cpu_gemm"):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose fp32 CPU matmuls follow model.cpu_gemm."""

    gemm = "auto"  # the model sets model.cpu_gemm on every instance

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.gemm)
