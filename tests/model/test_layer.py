"""MoELayer against naive references: grouped matmul vs per-expert loop, dense weighted sum, drops."""
import pytest
import torch
import torch.nn.functional as F

from moe_dist.config import MoEConfig
from moe_dist.model.moe.experts import GroupedExperts, grouped_mm
from moe_dist.model.moe.layer import MoELayer
from moe_dist.model.moe.stats import MoEStats
from naive import naive_experts, per_expert_mm

H, FF = 16, 24


def make_layer(seed=0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    kw.setdefault("n_experts", 4)
    kw.setdefault("top_k", 2)
    return MoELayer(H, MoEConfig(**kw), d_expert=FF)


def expert_all(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """[T, E, H]: every expert applied to every token (the dense reference, test-only)."""
    ex = layer.experts
    h = torch.einsum("th,efh->tef", x, ex.gate_up_proj)
    gate, up = h.chunk(2, dim=-1)
    return torch.einsum("tef,ehf->teh", F.silu(gate) * up, ex.down_proj)


def test_grouped_matmul_equals_naive_loop_outputs_and_grads():
    torch.manual_seed(0)
    ex = GroupedExperts(5, H, FF)
    counts = torch.tensor([3, 0, 7, 1, 4])  # an expert with no tokens too
    x = torch.randn(int(counts.sum()), H, requires_grad=True)
    y = ex(x, counts)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, ex.gate_up_proj, ex.down_proj], g)
    y_ref = naive_experts(ex, x, counts)
    grads_ref = torch.autograd.grad(y_ref, [x, ex.gate_up_proj, ex.down_proj], g)
    assert torch.allclose(y, y_ref, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_torch_grouped_mm_in_bf16_is_the_per_expert_product():
    torch.manual_seed(0)
    counts = torch.tensor([16, 0, 32, 16])
    x = torch.randn(64, 32).bfloat16()
    w = torch.randn(4, 48, 32).bfloat16()
    try:
        fast = grouped_mm(x, w, counts)
    except RuntimeError as e:  # no kernel on this build/device
        pytest.skip(f"torch._grouped_mm unavailable: {e}")
    exact = per_expert_mm(x.double(), w.double(), counts)  # bf16 inputs, exact products and sums
    # one bf16 rounding of the output (2^-8 relative) on top of fp32 accumulation
    torch.testing.assert_close(fast.double(), exact, atol=1e-6, rtol=2 ** -8)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_k=2), dict(top_k=2, norm_topk_prob=True),
                                dict(top_k=3, score_func="sigmoid"), dict(top_k=2, n_groups=2, topk_groups=1)])
def test_dropless_layer_equals_dense_weighted_sum(kw):
    layer = make_layer(**kw)
    x = torch.randn(2, 5, H)
    moe = MoEStats()
    y = layer(x, moe)
    flat = x.reshape(-1, H)
    r = layer.router(flat, 5)
    dense_gates = torch.zeros(flat.shape[0], 4).index_put_((r.token, r.expert), r.gate)  # [T, E]
    expected = (dense_gates.unsqueeze(-1) * expert_all(layer, flat)).sum(1)
    assert torch.allclose(y.reshape(-1, H), expected, atol=1e-5)
    assert moe.layers()[0]["dropped"].item() == 0


def test_capacity_drops_zero_the_dropped_assignments():
    layer = make_layer(top_k=2, capacity_factor=0.5, drop_policy="probs").train()
    torch.manual_seed(1)
    x = torch.randn(12, H)
    torch.manual_seed(5)
    moe = MoEStats()
    y = layer(x, moe)
    r = layer.router(x)
    assert r.capacity == 3  # ceil(0.5 * 12 * 2 / 4)
    keep = r.keep
    assert keep.sum() < keep.numel()
    per_expert = torch.bincount(r.expert[keep], minlength=4)
    assert (per_expert <= 3).all()
    dense_gates = torch.zeros(12, 4).index_put_((r.token[keep], r.expert[keep]), r.gate[keep])
    expected = (dense_gates.unsqueeze(-1) * expert_all(layer, x)).sum(1)
    assert torch.allclose(y, expected, atol=1e-5)
    assert moe.layers()[0]["dropped"].item() == (~keep).sum().item()


def test_shared_experts_with_sigmoid_gate():
    layer = make_layer(n_shared_experts=2, d_shared_expert=8, shared_expert_gate=True)
    assert layer.shared_experts.gate_proj.out_features == 16  # 2 shared experts of width 8
    x = torch.randn(7, H)
    y = layer(x)
    expected_shared = torch.sigmoid(layer.shared_expert_gate(x)) * layer.shared_experts(x)
    layer.shared_experts = None
    routed = layer(x)
    assert torch.allclose(y - routed, expected_shared, atol=1e-6)


def test_routing_groups_emulate_separate_micro_batches():
    """One process with G groups drops exactly what G ranks with their own micro-batches would."""
    x = torch.randn(16, H)
    whole = make_layer(capacity_factor=1.0, routing_groups=4).train()
    moe = MoEStats()
    y = whole(x, moe)
    single = make_layer(capacity_factor=1.0, routing_groups=1).train()
    parts = torch.cat([single(chunk) for chunk in x.chunk(4)])
    assert torch.allclose(y, parts, atol=1e-6)
    assert moe.layers()[0]["dropped"] > 0


def test_sequence_routing_groups_stop_cross_sequence_drops():
    layer = make_layer(capacity_factor=1.0, routing_group="sequence").train()
    x = torch.randn(2, 8, H)
    y = layer(x)
    x2 = x.clone()
    x2[1] = 3 * torch.randn(8, H)  # another sequence in the batch changes
    y2 = layer(x2)
    assert torch.allclose(y[0], y2[0], atol=1e-6)  # sequence 0 is untouched
    batch = make_layer(capacity_factor=1.0).train()
    # with one batch-wide group some token of sequence 0 loses its slot to sequence 1
    x3 = x.clone()
    x3[1] = x[0] + 1e-3
    assert not torch.allclose(batch(x)[0], batch(x3)[0], atol=1e-6)


def test_top_p_and_expert_choice_layers_run_and_match_dense_sum():
    for kw in (dict(router="top_p", top_p=0.6), dict(router="expert_choice", top_k=2, capacity_factor=1.0,
                                                      eval_capacity_factor=1.0)):
        layer = make_layer(**kw).eval()
        x = torch.randn(10, H)
        y = layer(x)
        r = layer.router(x)
        dense_gates = torch.zeros(10, 4).index_put_((r.token, r.expert), r.gate)
        expected = (dense_gates.unsqueeze(-1) * expert_all(layer, x)).sum(1)
        assert torch.allclose(y, expected, atol=1e-5)


def test_layer_gradients_match_dense_reference():
    layer = make_layer(top_k=2, norm_topk_prob=True)
    x = torch.randn(9, H, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    params = [x, layer.router.weight, layer.experts.gate_up_proj, layer.experts.down_proj]
    grads = torch.autograd.grad(y, params, g)

    def dense(x):
        r = layer.router(x)
        gates = torch.zeros(9, 4).index_put((r.token, r.expert), r.gate)
        return (gates.unsqueeze(-1) * expert_all(layer, x)).sum(1)

    grads_ref = torch.autograd.grad(dense(x), params, g)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_stats_present():
    layer = make_layer()
    moe = MoEStats()
    layer(torch.randn(3, 4, H), moe)
    st = moe.layers()[0]
    assert st["load"].sum().item() == 3 * 4 * 2
    assert st["assignments"].item() == 24
    assert 0 < st["router_entropy"].item() <= torch.log(torch.tensor(4.0)).item() + 1e-6
