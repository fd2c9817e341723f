"""What only a GPU runs: bf16 autocast, torch._grouped_mm, fused AdamW, FSDP2's bf16 policy and DeepSpeed's
bf16 ZeRO-1 (both at world 1). Skipped without CUDA (conftest.py)."""
import copy
import math

import pytest
import torch

from moe_dist.model.moe.experts import GroupedExperts, use_torch_grouped_mm
from moe_dist.train.optimizer import build_optimizer
from moe_dist.train.trainer import Trainer

CUDA = torch.device("cuda")


def train_steps(cfg) -> tuple[Trainer, list[float]]:
    """The real trainer's optimizer steps (no evaluation or checkpoint), then the runtime closed."""
    trainer = Trainer(cfg)
    try:
        losses = [trainer.train_step().loss for _ in range(cfg.train.steps)]
    finally:
        trainer.rt.close()
    return trainer, losses


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def test_bf16_autocast_training_step(small_cfg):
    trainer, bf16 = train_steps(small_cfg("train.dtype=bf16"))
    assert trainer.rt.bf16 and trainer.cfg.train.dtype == "bf16"
    assert next(trainer.model.parameters()).dtype == torch.float32  # autocast over fp32 weights
    _, fp32 = train_steps(small_cfg("train.dtype=fp32", run="fp32"))
    assert all(math.isfinite(v) for v in bf16)
    assert bf16[-1] < bf16[0]  # it learns
    assert abs(bf16[0] - fp32[0]) < 2e-2 * fp32[0]  # the same model and batch: only bf16 rounding differs


@pytest.mark.parametrize("counts", [[300, 0, 17, 64, 1, 500, 90, 52], [128] * 8])
def test_grouped_mm_matches_the_per_expert_loop_in_bf16(counts):
    torch.manual_seed(0)
    E, H, F = 8, 256, 384
    experts = GroupedExperts(E, H, F, impl="auto").to(CUDA, torch.bfloat16)
    x = torch.randn(sum(counts), H, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    assert use_torch_grouped_mm(x, experts.impl), "bf16 on CUDA should take torch._grouped_mm"
    c = torch.tensor(counts, device=CUDA)
    y = experts(x, c)
    g = torch.randn_like(y)
    y.backward(g)
    # reference: the same bf16 values, per expert, in float64
    w1, w2 = (p.detach().double().requires_grad_(True) for p in (experts.gate_up_proj, experts.down_proj))
    xr = x.detach().double().requires_grad_(True)
    outs, start = [], 0
    for e, n in enumerate(counts):
        gate, up = (xr[start:start + n] @ w1[e].t()).chunk(2, dim=-1)
        outs.append((torch.nn.functional.silu(gate) * up) @ w2[e].t())
        start += n
    ref = torch.cat(outs)
    ref.backward(g.double())
    for got, want in ((y, ref), (x.grad, xr.grad), (experts.gate_up_proj.grad, w1.grad),
                      (experts.down_proj.grad, w2.grad)):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < 1e-2  # bf16 operands: 1e-3 .. 1e-2
    for e in (e for e, n in enumerate(counts) if n == 0):  # an expert without rows gets a zero gradient
        assert (experts.gate_up_proj.grad[e] == 0).all() and (experts.down_proj.grad[e] == 0).all()


def test_fused_adamw_matches_the_unfused_step(small_cfg):
    cfg = small_cfg()
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)).to(CUDA)
    ref = copy.deepcopy(model)
    opt = build_optimizer(model, cfg.train, CUDA)
    assert opt.defaults.get("fused") is True
    ref_opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                 for g in build_optimizer(ref, cfg.train, CUDA).param_groups],
                                lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), eps=1e-8, foreach=False)
    for _ in range(3):
        x = torch.randn(32, 64, device=CUDA)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fsdp2_bf16_mixed_precision_at_world_1(small_cfg):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    cfg = small_cfg("train.dtype=bf16", "train.zero_stage=3", run="fsdp")
    trainer = Trainer(cfg)
    try:
        model = trainer.model
        assert isinstance(model.layers[0], FSDPModule) and isinstance(model.layers[0].ffn.experts, FSDPModule)
        assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.parameters())  # fp32 shards
        seen = []
        hook = model.layers[0].attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
        zero = [trainer.train_step().loss for _ in range(cfg.train.steps)]
        hook.remove()
    finally:
        trainer.rt.close()
    assert seen and set(seen) == {torch.bfloat16}  # MixedPrecisionPolicy(param_dtype=bf16) gathers bf16
    _, plain = train_steps(small_cfg("train.dtype=bf16", run="plain"))
    torch.testing.assert_close(torch.tensor(zero), torch.tensor(plain), rtol=3e-2, atol=0)


def test_deepspeed_zero1_bf16_at_world_1(small_cfg):
    pytest.importorskip("deepspeed")
    cfg = small_cfg("train.dtype=bf16", "train.zero_stage=1", run="ds")
    trainer, zero = train_steps(cfg)
    engine = trainer.engine
    assert engine is not None and engine.bfloat16_enabled() and engine.zero_optimization_stage() == 1
    _, plain = train_steps(small_cfg("train.dtype=bf16", run="plain"))
    torch.testing.assert_close(torch.tensor(zero), torch.tensor(plain), rtol=3e-2, atol=0)
