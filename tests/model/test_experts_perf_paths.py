"""Fast compute paths of the experts and the dispatcher against the naive per-expert loop."""
import os
import platform

import pytest
import torch

from moe_dist.config import MoEConfig
from moe_dist.model.moe.dispatcher import LocalDispatcher
from moe_dist.model.gemm import BlasGemm, OneDNNGemm, _avx512_allowed, onednn_available
from moe_dist.model.moe.experts import GroupedExperts, _SwiGLUExperts, expert_gemm
from moe_dist.model.moe.router import Router
from naive import naive_experts

H, FF = 16, 24
IMPLS = ["loop", pytest.param("onednn", marks=pytest.mark.skipif(not onednn_available(), reason="no oneDNN"))]


def assert_matches_naive_loop(counts: list[int], d_model: int, d_expert: int, impl: str, grad_atol: float) -> None:
    """The fused experts equal tests/model/naive.py's naive_experts in outputs and all gradients."""
    torch.manual_seed(0)
    ex = GroupedExperts(len(counts), d_model, d_expert, impl=impl)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), d_model, requires_grad=True)
    y = ex(x, counts)
    g = torch.randn_like(y)
    params = [x, ex.gate_up_proj, ex.down_proj]
    grads = torch.autograd.grad(y, params, g)
    y_ref = naive_experts(ex, x, counts)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    assert torch.allclose(y, y_ref, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=grad_atol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("counts", [[3, 0, 7, 1, 4], [0, 0, 5, 0, 0], [6, 6, 6, 6, 6]])
def test_fused_swiglu_experts_equal_naive_loop_outputs_and_grads(counts, impl):
    assert_matches_naive_loop(counts, H, FF, impl, grad_atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d_model,d_expert,counts", [(8, 600, [300, 0, 200, 500]), (16, 6, [70, 130, 0, 2])])
def test_fused_swiglu_experts_wide_and_narrow(d_model, d_expert, counts, impl):
    """Experts wider and narrower than d_model: each weight gradient takes both of OneDNNGemm.mm_tn's
    branches (transposing the narrower operand) across the two cases."""
    assert_matches_naive_loop(counts, d_model, d_expert, impl, grad_atol=1e-4)


def test_fused_swiglu_experts_gradcheck_float64():
    torch.manual_seed(0)
    counts = [2, 0, 3]
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: _SwiGLUExperts.apply(a, b, c, counts, BlasGemm), (x, w1, w2))


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN")
def test_onednn_experts_equal_float64_experts():
    """oneDNN's fp32 GEMMs against the same maths in float64 (gradcheck-verified above)."""
    torch.manual_seed(0)
    counts = [37, 0, 64, 150]  # below, at and above OneDNNGemm.ROWS: torch.mm tails too
    x, w1, w2 = torch.randn(251, 32), torch.randn(4, 96, 32) / 6, torch.randn(4, 32, 48) / 7
    g = torch.randn(251, 32)

    def run(gemm, *ts):
        ts = [t.clone().requires_grad_(True) for t in ts]
        y = _SwiGLUExperts.apply(*ts, counts, gemm)
        return [y, *torch.autograd.grad(y, ts, g.to(y.dtype))]

    ours = run(OneDNNGemm, x, w1, w2)
    ref = run(BlasGemm, x.double(), w1.double(), w2.double())
    for a, b in zip(ours, ref):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_expert_gemm_choice():
    x32, x64 = torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.float64)
    assert expert_gemm(x32, "loop") is BlasGemm and expert_gemm(x64, "auto") is BlasGemm
    if onednn_available():
        assert expert_gemm(x32, "onednn") is OneDNNGemm
        avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512") and _avx512_allowed(
            os.environ.get("ONEDNN_MAX_CPU_ISA", ""))
        want = OneDNNGemm if platform.machine().lower() in ("x86_64", "amd64") and avx512 else BlasGemm
        assert expert_gemm(x32, "auto") is want  # oneDNN only where it wins (benchmarks/RESULTS.md)
        with pytest.raises(ValueError, match="moe.grouped_mm=onednn runs fp32 on a CPU"):
            expert_gemm(x64, "onednn")


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_swiglu_experts_frozen_input_and_weights(impl):
    torch.manual_seed(0)
    ex = GroupedExperts(3, H, FF, impl=impl)
    counts = torch.tensor([4, 2, 3])
    x = torch.randn(9, H)  # no grad for the input
    ex.down_proj.requires_grad_(False)
    ex(x, counts).square().sum().backward()
    ref = ex.gate_up_proj.grad.clone()
    ex.gate_up_proj.grad = None
    naive_experts(ex, x, counts).square().sum().backward()
    assert ex.down_proj.grad is None
    assert torch.allclose(ref, ex.gate_up_proj.grad, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(top_k=2), dict(top_k=3, norm_topk_prob=True), dict(router="top_p", top_p=0.6),
                                dict(top_k=2, capacity_factor=0.75)])
def test_dispatch_combine_equal_scatter_reference_outputs_and_grads(kw):
    """rows = x[token sorted by expert]; combine = sum over a token's rows of gate * y."""
    torch.manual_seed(0)
    E, T = 5, 12
    cfg = MoEConfig(n_experts=E, **kw)
    routing = Router(H, cfg)(torch.randn(T, H))
    x = torch.randn(T, H, requires_grad=True)
    d = LocalDispatcher(E)
    state = d.dispatch(x, routing)
    rows, counts = d.arrived(state)
    w = torch.randn(H, H)
    out = d.combine(d.send_back(torch.tanh(rows @ w), state), state)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, routing.gate], g)

    keep = routing.keep if routing.keep is not None else torch.ones_like(routing.token, dtype=torch.bool)
    token, expert, gate = routing.token[keep], routing.expert[keep], routing.gate[keep]
    order = torch.argsort(expert, stable=True)
    n = token.numel()
    per_expert = torch.bincount(expert, minlength=E)
    assert torch.equal(counts[:-1], per_expert[:-1])  # the dropped rows ride with the last expert's
    assert counts.sum() == routing.token.numel() and counts[-1] == per_expert[-1] + routing.token.numel() - n
    assert torch.equal(rows[:n], x[token[order]])
    ref = torch.zeros(T, H).index_put((token[order],), torch.tanh(x[token[order]] @ w) * gate[order, None],
                                      accumulate=True)
    grads_ref = torch.autograd.grad(ref, [x, routing.gate], g)
    assert torch.allclose(out, ref, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-5)
