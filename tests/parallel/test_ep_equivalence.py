"""Expert parallelism computes the one-device function: outputs and reduced gradients at ep = 1, 2, 4
(world 4) equal ONE process running the concatenated global batch with moe.routing_groups=4."""

import pytest
import torch
import torch.nn.functional as F

from dist_helper import run_workers
from moe_dist.config import ModelConfig, MoEConfig, ParallelConfig
from moe_dist.model import MoETransformerLM
from moe_dist.model.moe.layer import MoELayer
from moe_dist.model.moe.stats import MoEStats
from moe_dist.parallel import GradReducer, ProcessGroupManager, parallelize
from moe_dist.parallel.data_parallel import local

WORLD, H, FF, E, B, S = 4, 16, 24, 8, 2, 6
EPS = (1, 2, 4)
# fp32 sums in another order differ by ~1e-7 of the values' scale; a wrong formula by far more
RTOL_OF_SCALE = 1e-5


def assert_equal_fp32(got, want, msg):
    torch.testing.assert_close(got, want, atol=RTOL_OF_SCALE * float(want.abs().max()) + 1e-12, rtol=0, msg=msg)

LAYER_CASES = {
    "top1": dict(top_k=1),
    "top2": dict(top_k=2),
    "top2_shared": dict(top_k=2, n_shared_experts=1, shared_expert_gate=True),
    "top1_capacity": dict(top_k=1, capacity_factor=1.0),
    "top2_capacity": dict(top_k=2, capacity_factor=1.0),
    "top2_capacity_position_shared": dict(top_k=2, capacity_factor=1.0, drop_policy="position", n_shared_experts=2),
    "top2_capacity_per_sequence": dict(top_k=2, capacity_factor=1.0, routing_group="sequence"),
    "expert_choice": dict(router="expert_choice", capacity_factor=1.0),
    "top_p": dict(router="top_p", top_p=0.4),
    "sigmoid_global_balance": dict(top_k=2, score_func="sigmoid", norm_topk_prob=True, global_batch_balance=True),
    "group_limited_device_comm_losses": dict(top_k=2, n_groups=4, topk_groups=2, n_devices=4,
                                             device_loss_weight=0.1, comm_loss_weight=0.1, z_loss_weight=0.01),
    # gpt-oss: router and expert biases (sharded with their experts), the clamped SwiGLU
    "gpt_oss_experts": dict(top_k=2, topk_then_softmax=True, router_bias=True, expert_linear_bias=True,
                            expert_act="clamped_swiglu", swiglu_limit=0.5),
}
MODEL_CASES = {
    "top2": dict(top_k=2),
    "top1_capacity": dict(top_k=1, capacity_factor=1.0),
    "top2_capacity_shared": dict(top_k=2, capacity_factor=1.25, n_shared_experts=1),
}
MODEL = ModelConfig(vocab_size=64, d_model=H, n_layer=2, n_head=2, d_ff=32, max_seq_len=S)


def moe_cfg(kw: dict, groups: int = 1) -> MoEConfig:
    return MoEConfig(n_experts=E, routing_groups=groups, **kw)


def global_layer_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * B, S, H, generator=g), torch.randn(WORLD * B, S, H, generator=g)


def global_tokens():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, MODEL.vocab_size, (WORLD * B, S + 1), generator=g)


def layer_loss(layer: MoELayer, x, w, moe=None):
    moe = moe if moe is not None else MoEStats()
    y = layer(x, moe)
    return y, (y * w).sum() / (x.shape[0] * x.shape[1]) + moe.pop_aux_loss()


def model_loss(model, tokens):
    moe = MoEStats()
    logits = model(tokens[:, :-1], moe=moe)
    return logits, F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + moe.pop_aux_loss()


def make_layer(cfg):
    torch.manual_seed(0)
    return MoELayer(H, cfg, FF)


def make_model(cfg):
    torch.manual_seed(0)
    return MoETransformerLM(MODEL, cfg)


def grads_of(module):
    """This rank's gradients (an expert-parallel DTensor's local experts)."""
    return {n: local(p.grad).clone() for n, p in module.named_parameters() if p.grad is not None}


def _worker(rank):
    X, W = global_layer_data()
    tokens = global_tokens()
    mine = slice(rank * B, (rank + 1) * B)
    out = {}
    for ep in EPS:
        pgm = ProcessGroupManager(ParallelConfig(ep=ep), n_experts=E)
        for name, kw in LAYER_CASES.items():
            cfg = moe_cfg(kw)
            layer = parallelize(make_layer(cfg), cfg, pgm)
            moe = MoEStats()
            y, loss = layer_loss(layer, X[mine], W[mine], moe)
            loss.backward()
            GradReducer(layer, pgm).reduce()
            out["layer", name, ep] = dict(y=y.detach(), grads=grads_of(layer), dropped=int(moe.layers()[0]["dropped"]))
        for name, kw in MODEL_CASES.items():
            cfg = moe_cfg(kw)
            model = parallelize(make_model(cfg), cfg, pgm)
            logits, loss = model_loss(model, tokens[mine])
            loss.backward()
            GradReducer(model, pgm).reduce()
            out["model", name, ep] = dict(y=logits.detach(), grads=grads_of(model))
    return out


@pytest.fixture(scope="module")
def results():
    return run_workers(_worker, WORLD)


def reference(kind: str, kw: dict):
    cfg = moe_cfg(kw, groups=WORLD)
    if kind == "layer":
        module = make_layer(cfg)
        y, loss = layer_loss(module, *global_layer_data())
    else:
        module = make_model(cfg)
        y, loss = model_loss(module, global_tokens())
    loss.backward()
    return module, y.detach(), grads_of(module)


def check(results, kind, name, kw):
    module, y_ref, g_ref = reference(kind, kw)
    for ep in EPS:
        for rank in range(WORLD):
            got = results[rank][kind, name, ep]
            assert_equal_fp32(got["y"], y_ref[rank * B:(rank + 1) * B], msg=lambda m: f"output, ep={ep} rank={rank}: {m}")
            assert got["grads"].keys() == g_ref.keys()
            per = E // ep
            ep_rank = rank % ep
            for pname, g in got["grads"].items():
                want = g_ref[pname]
                if pname.endswith(("experts.gate_up_proj", "experts.down_proj", "experts.gate_up_proj_bias", "experts.down_proj_bias")):
                    want = want[ep_rank * per:(ep_rank + 1) * per]
                assert_equal_fp32(g, want, msg=lambda m: f"grad {pname}, ep={ep} rank={rank}: {m}")
    return module


@pytest.mark.parametrize("name", LAYER_CASES)
def test_moe_layer_matches_one_process(results, name):
    check(results, "layer", name, LAYER_CASES[name])
    if "capacity" in name:  # the drops are real and the same on every layout
        dropped = [results[r]["layer", name, 1]["dropped"] for r in range(WORLD)]
        assert sum(dropped) > 0
        for ep in EPS:
            assert [results[r]["layer", name, ep]["dropped"] for r in range(WORLD)] == dropped


@pytest.mark.parametrize("name", MODEL_CASES)
def test_model_matches_one_process(results, name):
    check(results, "model", name, MODEL_CASES[name])
