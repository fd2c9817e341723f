"""Every balance loss against values worked out by hand from REFERENCE.md."""
import math

import pytest
import torch

from moe_dist.config import MoEConfig
from moe_dist.model.moe import losses as L
from moe_dist.model.moe.layer import MoELayer
from moe_dist.model.moe.stats import MoEStats


def test_expert_level_loss_hand_value():
    scores = torch.tensor([[.8, .2], [.6, .4], [.3, .7], [.9, .1]])
    token, expert = torch.arange(4), torch.tensor([0, 0, 1, 0])  # top-1
    counts = L.group_counts(token, expert, 4, 1, 2)
    f = L.load_fraction(counts)  # 2/4 * [3, 1]
    assert f.tolist() == [[1.5, 0.5]]
    # P = [.65, .35]; 1.5 * .65 + .5 * .35
    assert L.expert_balance_loss(f, L.mean_scores(scores, 1)).item() == pytest.approx(1.15)


def test_expert_level_loss_is_one_when_uniform():
    scores = torch.full((4, 4), 0.25)
    f = L.load_fraction(L.group_counts(torch.arange(4), torch.arange(4), 4, 1, 4))
    assert L.expert_balance_loss(f, L.mean_scores(scores, 1)).item() == pytest.approx(1.0)


def test_loss_is_averaged_over_routing_groups():
    scores = torch.tensor([[.8, .2], [.6, .4], [.3, .7], [.9, .1]])
    token, expert = torch.arange(4), torch.tensor([0, 0, 1, 0])
    f = L.load_fraction(L.group_counts(token, expert, 2, 2, 2))  # groups {0,1}, {2,3}
    assert f.tolist() == [[2.0, 0.0], [1.0, 1.0]]
    # group 0: 2 * .7 = 1.4; group 1: .6 + .4 = 1.0
    assert L.expert_balance_loss(f, L.mean_scores(scores, 2)).item() == pytest.approx(1.2)


# E=4 experts on D=2 devices, T=2 tokens, k=2: token 0 -> {0, 1}, token 1 -> {1, 2}
DEV_SCORES = torch.tensor([[.4, .3, .2, .1], [.1, .5, .3, .1]])
DEV_TOKEN, DEV_EXPERT = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 2])


def test_device_level_loss_hand_value():
    f = L.load_fraction(L.group_counts(DEV_TOKEN, DEV_EXPERT, 2, 1, 4))  # [1, 2, 1, 0]
    P = L.mean_scores(DEV_SCORES, 1)  # [.25, .4, .25, .1]
    # f' = [1.5, .5], P' = [.65, .35]
    assert L.device_balance_loss(f, P, 2).item() == pytest.approx(1.5 * .65 + .5 * .35)


def test_communication_loss_hand_value():
    sends = L.device_token_counts(DEV_TOKEN, DEV_EXPERT, 2, 4, 2, 2)
    assert sends.tolist() == [[2, 1]]  # both tokens reach device 0, token 1 also device 1
    P = L.mean_scores(DEV_SCORES, 1)
    # f'' = D / (M T) * [2, 1] = [1, .5] with M = 2; P'' = [.65, .35]
    assert L.comm_balance_loss(sends, P, 2, 2, 2).item() == pytest.approx(.65 + .5 * .35)


def test_sequence_wise_loss_hand_value():
    scores = torch.tensor([[.8, .4], [.2, .2], [.5, .5], [.9, .3]])  # unnormalised (sigmoid-like)
    token, expert = torch.arange(4), torch.tensor([0, 0, 1, 0])
    # seq 0: s' = [2/3, 1/3], [.5, .5]; f = [2, 0] -> 2 * 7/12. seq 1: s' = [.5, .5], [.75, .25]; f = [1, 1] -> 1
    assert L.sequence_balance_loss(L.group_counts(token, expert, 2, 2, 2), scores).item() == pytest.approx((7 / 6 + 1) / 2)


def test_z_loss_hand_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert L.z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def _layer(**kw) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(8, MoEConfig(**kw), d_expert=16)


def test_layer_aux_loss_is_weighted_sum_of_terms():
    layer = _layer(n_experts=4, top_k=2, aux_loss_weight=0.01, device_loss_weight=0.02, comm_loss_weight=0.03,
                   seq_aux_loss_weight=0.04, z_loss_weight=0.05, n_devices=2)
    x = torch.randn(2, 6, 8)
    moe = MoEStats()
    layer(x, moe)
    r = layer.router(x.reshape(-1, 8), 6)
    counts = L.group_counts(r.token, r.expert, 12, 1, 4)
    f, P = L.load_fraction(counts), L.mean_scores(r.scores, 1)
    sends = L.device_token_counts(r.token, r.expert, 12, 4, 2, 12)
    expected = {
        "expert_loss": 0.01 * L.expert_balance_loss(f, P),
        "device_loss": 0.02 * L.device_balance_loss(f, P, 2),
        "comm_loss": 0.03 * L.comm_balance_loss(sends, P, 2, 2, 12),
        "seq_loss": 0.04 * L.sequence_balance_loss(L.group_counts(r.token, r.expert, 6, 2, 4), r.scores),
        "z_loss": 0.05 * L.z_loss(r.logits),
    }
    aux, stats = moe.pop_aux_loss(), moe.layers()[0]
    for name, value in expected.items():
        assert stats[name].item() == pytest.approx(value.item(), rel=1e-6), name
    assert aux.item() == pytest.approx(sum(v.item() for v in expected.values()), rel=1e-6)
    assert aux.requires_grad
    aux.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_global_batch_balance_equals_whole_batch_loss():
    x = torch.randn(16, 8)

    def aux(layer):
        moe = MoEStats()
        layer(x, moe)
        return moe.pop_aux_loss().item()
    whole = aux(_layer(n_experts=4, top_k=2, routing_groups=1))
    per_group = aux(_layer(n_experts=4, top_k=2, routing_groups=4))
    global_bal = aux(_layer(n_experts=4, top_k=2, routing_groups=4, global_batch_balance=True))
    assert global_bal == pytest.approx(whole, rel=1e-6)
    assert per_group != pytest.approx(whole, rel=1e-6)


def test_losses_off_when_weights_zero():
    layer = _layer(n_experts=4, top_k=2, aux_loss_weight=0.0)
    moe = MoEStats()
    layer(torch.randn(5, 8), moe)
    assert moe.pop_aux_loss().item() == 0.0
    assert set(moe.layers()[0]) == {"load", "dropped", "assignments", "router_entropy"}
