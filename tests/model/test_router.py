"""Each routing variant against values computed by hand from REFERENCE.md."""
import math

import pytest
import torch
import torch.nn.functional as F

from moe_dist.config import MoEConfig
from moe_dist.model.moe.router import Router


def identity_router(E: int, **kw) -> Router:
    """Router whose logits equal its input (W_r = I), so tests choose logits directly."""
    r = Router(E, MoEConfig(n_experts=E, **kw))
    with torch.no_grad():
        r.weight.copy_(torch.eye(E))
    return r.eval()


LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0],
                       [0.0, 3.0, 1.0, 2.0]])


def by_token(routing):
    """{token: {expert: gate}} over the assignments."""
    out = {}
    for t, e, g in zip(routing.token.tolist(), routing.expert.tolist(), routing.gate.tolist()):
        out.setdefault(t, {})[e] = g
    return out


def test_softmax_top2():
    r = identity_router(4, top_k=2)(LOGITS)
    p = torch.softmax(LOGITS, -1)
    got = by_token(r)
    assert set(got[0]) == {0, 1} and set(got[1]) == {1, 3}
    assert got[0][0] == pytest.approx(p[0, 0].item()) and got[0][1] == pytest.approx(p[0, 1].item())
    assert got[1][3] == pytest.approx(p[1, 3].item())
    assert r.token.tolist() == [0, 0, 1, 1]  # token-major
    assert r.keep is None and r.k == 2


def test_norm_topk_prob_and_scaling():
    r = identity_router(4, top_k=2, norm_topk_prob=True, routed_scaling_factor=2.5)(LOGITS)
    g = by_token(r)
    e1, e0 = math.exp(1.0), math.exp(2.0)
    assert g[0][0] == pytest.approx(2.5 * e0 / (e0 + e1))
    assert g[0][1] == pytest.approx(2.5 * e1 / (e0 + e1))


def test_switch_top1():
    g = by_token(identity_router(4, top_k=1)(LOGITS))
    assert g == {0: {0: pytest.approx(torch.softmax(LOGITS[0], 0)[0].item())},
                 1: {1: pytest.approx(torch.softmax(LOGITS[1], 0)[1].item())}}


def test_topk_then_softmax():
    g = by_token(identity_router(4, top_k=2, topk_then_softmax=True)(LOGITS))
    # softmax over the chosen logits only: token 1 chose logits 3 and 2
    assert g[1][1] == pytest.approx(math.exp(3) / (math.exp(3) + math.exp(2)))
    assert g[1][3] == pytest.approx(math.exp(2) / (math.exp(3) + math.exp(2)))


def test_sigmoid_scores():
    r = identity_router(4, top_k=2, score_func="sigmoid", norm_topk_prob=True)(LOGITS)
    g = by_token(r)
    s0, s1 = torch.sigmoid(torch.tensor(2.0)).item(), torch.sigmoid(torch.tensor(1.0)).item()
    assert g[0][0] == pytest.approx(s0 / (s0 + s1))
    assert torch.allclose(r.scores, torch.sigmoid(LOGITS))


def test_expert_bias_changes_selection_not_gates():
    router = identity_router(4, top_k=1, expert_bias=True)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    g = by_token(router(LOGITS))
    p = torch.softmax(LOGITS, -1)
    assert g == {0: {2: pytest.approx(p[0, 2].item())}, 1: {2: pytest.approx(p[1, 2].item())}}


def test_expert_bias_update_rule():
    router = identity_router(3, top_k=1, expert_bias=True, bias_update_rate=0.1)
    router.update_bias(torch.tensor([3, 1, 2]))  # mean 2: overloaded goes down, underloaded up
    assert router.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.0])
    assert "expert_bias" in router.state_dict()  # checkpointed with the model


def test_group_limited_v2_max():
    # 4 groups of 2 experts; groups by max score: g1 (3.0) and g2 (2.95) kept, g0 (2.9) masked, so
    # the third expert is 5 (-1.0) where unrestricted top-3 would take expert 0 (2.9)
    logits = torch.tensor([[2.9, 2.85, 3.0, -2.0, 2.95, -1.0, 0.0, 0.0]])
    g = by_token(identity_router(8, top_k=3, n_groups=4, topk_groups=2, group_score="max")(logits))
    assert set(g[0]) == {2, 4, 5}
    assert set(by_token(identity_router(8, top_k=3)(logits))[0]) == {0, 2, 4}  # what group limiting changes


def test_group_limited_v3_top2_sum():
    # sigmoid scores (DeepSeek-V3); top-2 sums per group: g0 .731+.5=1.231, g1 .881+.269=1.150,
    # g2 .711+.690=1.401, g3 .924+.119=1.043 -> g2; max-score routing would pick g3 (.924)
    logits = torch.tensor([[1.0, 0.0, 2.0, -1.0, 0.9, 0.8, 2.5, -2.0]])
    r = identity_router(8, top_k=2, score_func="sigmoid", n_groups=4, topk_groups=1, group_score="top2_sum")
    assert set(by_token(r(logits))[0]) == {4, 5}
    r2 = identity_router(8, top_k=2, score_func="sigmoid", n_groups=4, topk_groups=1, group_score="max")
    assert set(by_token(r2(logits))[0]) == {6, 7}


def test_top_p_dynamic():
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05],
                          [0.3, 0.3, 0.2, 0.2]])
    r = identity_router(4, router="top_p", top_p=0.7, top_p_entropy_weight=0.5)(probs.log())
    g = by_token(r)
    # token 0: 0.6 < 0.7 so it also takes 0.25 (cumulative 0.85 exceeds p); token 1: 0.3, 0.3, 0.2
    assert set(g[0]) == {0, 1} and set(g[1]) == {0, 1, 2}
    assert g[0][0] == pytest.approx(0.6)
    assert r.k == pytest.approx(2.5)
    entropy = -(probs * probs.log()).sum(-1).mean()
    assert r.entropy_loss.item() == pytest.approx(0.5 * entropy.item(), rel=1e-5)
    capped = by_token(identity_router(4, router="top_p", top_p=0.99, max_k=2)(probs.log()))
    assert all(len(v) == 2 for v in capped.values())
    one = by_token(identity_router(4, router="top_p", top_p=0.01)(probs.log()))
    assert all(len(v) == 1 for v in one.values())  # at least one expert


def test_expert_choice():
    scores = torch.tensor([[0.7, 0.1, 0.1, 0.1],
                           [0.1, 0.7, 0.1, 0.1],
                           [0.4, 0.4, 0.1, 0.1],
                           [0.25, 0.25, 0.25, 0.25]])
    # C = ceil(1.0 * 4 tokens * 1 / 4 experts) = 1: each expert takes its best token
    r = identity_router(4, router="expert_choice", top_k=1, capacity_factor=1.0, eval_capacity_factor=1.0)(scores.log())
    g = by_token(r)
    assert g[0] == {0: pytest.approx(0.7)} and g[1] == {1: pytest.approx(0.7)}
    assert g[3] == {2: pytest.approx(0.25), 3: pytest.approx(0.25)}  # ties -> earliest best token
    assert 2 not in g  # a token may get no expert
    assert r.token.tolist() == sorted(r.token.tolist())


def test_capacity_drops_in_router_train_vs_eval():
    x = torch.tensor([[5.0, 0, 0, 0]] * 4)  # all four tokens want expert 0
    router = identity_router(4, top_k=1, capacity_factor=1.0, eval_capacity_factor=2.0)
    router.train()
    r = router(x)
    assert r.capacity == 1 and r.keep.tolist() == [True, False, False, False]
    router.eval()
    r = router(x)
    assert r.capacity == 2 and r.keep.sum().item() == 2


def test_noisy_topk_training_only():
    torch.manual_seed(0)
    router = identity_router(4, top_k=2, noisy_gating=True)
    with torch.no_grad():
        router.noise_weight.copy_(torch.eye(4))
    x = torch.randn(6, 4)
    assert torch.equal(router(x).logits, x)  # eval: no noise
    router.train()
    torch.manual_seed(1)
    got = router(x).logits
    torch.manual_seed(1)
    expected = x + torch.randn(6, 4) * F.softplus(x)
    assert torch.allclose(got, expected)


def test_jitter_training_only():
    router = identity_router(4, top_k=1, router_jitter=0.1)
    x = torch.randn(5, 4)
    assert torch.equal(router(x).logits, x)
    router.train()
    torch.manual_seed(3)
    got = router(x).logits
    torch.manual_seed(3)
    expected = x * torch.empty_like(x).uniform_(0.9, 1.1)
    assert torch.allclose(got, expected)
    ratio = got / x
    assert ((ratio >= 0.9 - 1e-6) & (ratio <= 1.1 + 1e-6)).all()
