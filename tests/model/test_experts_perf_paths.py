"""Fast compute paths of the experts and the dispatcher against the naive per-expert loop."""
import pytest
import torch

from moe_dist.config import MoEConfig
from moe_dist.model.moe.dispatch import LocalDispatcher
from moe_dist.model.moe.experts import GroupedExperts, _LoopSwiGLUExperts
from moe_dist.model.moe.router import Router

H, FF = 16, 24


def assert_matches_naive_loop(counts: list[int], d_model: int, d_expert: int, grad_atol: float) -> None:
    """The fused experts equal GroupedExperts.reference_forward in outputs and all gradients."""
    torch.manual_seed(0)
    ex = GroupedExperts(len(counts), d_model, d_expert, impl="loop")
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), d_model, requires_grad=True)
    y = ex(x, counts)
    g = torch.randn_like(y)
    params = [x, ex.gate_up_proj, ex.down_proj]
    grads = torch.autograd.grad(y, params, g)
    y_ref = ex.reference_forward(x, counts)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    assert torch.allclose(y, y_ref, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=grad_atol)


@pytest.mark.parametrize("counts", [[3, 0, 7, 1, 4], [0, 0, 5, 0, 0], [6, 6, 6, 6, 6]])
def test_fused_swiglu_experts_equal_naive_loop_outputs_and_grads(counts):
    assert_matches_naive_loop(counts, H, FF, grad_atol=1e-5)


def test_fused_swiglu_experts_gradcheck_float64():
    torch.manual_seed(0)
    counts = [2, 0, 3]
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: _LoopSwiGLUExperts.apply(a, b, c, counts), (x, w1, w2))


def test_fused_swiglu_experts_frozen_input_and_weights():
    torch.manual_seed(0)
    ex = GroupedExperts(3, H, FF, impl="loop")
    counts = torch.tensor([4, 2, 3])
    x = torch.randn(9, H)  # no grad for the input
    ex.down_proj.requires_grad_(False)
    ex(x, counts).square().sum().backward()
    ref = ex.gate_up_proj.grad.clone()
    ex.gate_up_proj.grad = None
    ex.reference_forward(x, counts).square().sum().backward()
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
    rows, counts, state = d.dispatch(x, routing)
    w = torch.randn(H, H)
    out = d.combine(torch.tanh(rows @ w), state)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, routing.gate], g)

    token, expert, gate = routing.kept()
    order = torch.argsort(expert, stable=True)
    assert torch.equal(counts, torch.bincount(expert, minlength=E))
    assert torch.equal(rows, x[token[order]])
    ref = torch.zeros(T, H).index_put((token[order],), torch.tanh(x[token[order]] @ w) * gate[order, None],
                                      accumulate=True)
    grads_ref = torch.autograd.grad(ref, [x, routing.gate], g)
    assert torch.allclose(out, ref, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_fused_swiglu_experts_across_several_expert_blocks():
    """Wide experts: the elementwise work is split into blocks of [e0, e2] and [e3]."""
    from moe_dist.model.moe.experts import _expert_blocks
    counts = [300, 0, 200, 500]
    assert [[e for e, _, _ in m] for _, _, m in _expert_blocks(counts, 600)] == [[0, 2], [3]]
    assert_matches_naive_loop(counts, 8, 600, grad_atol=1e-4)
