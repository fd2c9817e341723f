"""Tensor parallelism on DTensor with sequence parallelism computes the one-device function: losses and every
gradient at tp=2, tp=2 x ep=2, tp=2 x dp=2 with zero_stage=3 (FSDP2 on the 2-D mesh) and tp=2 with expert_tp
equal one process on the global batch, for a GQA (with per-head q/k norms) and an MLA model, each with a
dense first layer, shared experts and tied embeddings. World 4, gloo."""
import contextlib

import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from dist_helper import run_workers
from moe_dist.config import load_config, resolve
from moe_dist.model import MoEStats
from moe_dist.model.build import build_model, materialize
from moe_dist.model.transformer import lm_loss
from moe_dist.parallel import GradReducer, ProcessGroupManager, parallelize
from moe_dist.parallel.data_parallel import apply_fsdp, grad_norm, shard_of
from moe_dist.train.runtime import DistributedRuntime

WORLD, B, S = 4, 2, 8
BASE = ["model.vocab_size=256", "model.d_model=32", "model.n_layer=3", "model.first_k_dense=1", "model.d_ff=48",
        f"model.max_seq_len={S}", "model.tie_embeddings=true", "moe.n_experts=4", "moe.top_k=2",
        "moe.n_shared_experts=1", "moe.d_expert=24", "moe.z_loss_weight=0.01", "train.device=cpu"]
MODELS = {"gqa": ["model.n_head=4", "model.n_kv_head=2", "model.qk_norm=true"],
          "mla": ["model.n_head=4", "model.attention=mla", "model.q_lora_rank=8", "model.kv_lora_rank=12",
                  "model.qk_nope_head_dim=4", "model.qk_rope_head_dim=4", "model.v_head_dim=4"]}
LAYOUTS = {"tp2": ["parallel.tp=2"], "tp2_ep2": ["parallel.tp=2", "parallel.ep=2"],
           "tp2_zero3": ["parallel.tp=2", "train.zero_stage=3"], "tp2_expert_tp": ["parallel.tp=2", "parallel.expert_tp=true"],
           # FSDP2 alone: experts over edp = 2, and over edp = 1 (each rank its own experts, gradients / dp)
           "ep2_zero3": ["parallel.ep=2", "train.zero_stage=3"], "ep4_zero3": ["parallel.ep=4", "train.zero_stage=3"],
           # plain tp, for comparison: activations replicated, every tp rank dispatching every assignment
           "tp2_ep2_no_sp": ["parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=false"],
           "tp2_no_sp_expert_tp": ["parallel.tp=2", "parallel.expert_tp=true", "parallel.sequence_parallel=false"]}
RTOL_OF_SCALE = 1e-5  # fp32 sums in other orders differ by ~1e-7 of the values' scale


def tokens():
    return torch.randint(0, 256, (WORLD * B, S + 1), generator=torch.Generator().manual_seed(3))


def loss_of(model, ids):
    moe = MoEStats()
    logits = model(ids[:, :-1], moe=moe)
    tp = isinstance(logits, DTensor)
    with loss_parallel() if tp else contextlib.nullcontext():
        ce = lm_loss(logits, ids[:, 1:])
        ce = ce.to_local() if tp else ce
        loss = ce + moe.pop_aux_loss()
        loss.backward()
    return float(loss)


def _worker(rank):
    out = {}
    for model_name, model in MODELS.items():
        for layout, overrides in LAYOUTS.items():
            cfg = resolve(load_config(None, BASE + model + overrides), WORLD)
            pgm = ProcessGroupManager(cfg.parallel, n_experts=cfg.moe.n_experts)
            net = parallelize(build_model(cfg, device="meta"), cfg, pgm)
            fsdp = cfg.train.zero_stage == 3
            if fsdp:
                apply_fsdp(net, pgm, bf16=False)
            materialize(net, "cpu", cfg.train.seed, shard_of)
            ids = tokens()[pgm.dp_rank * (WORLD * B // pgm.dp):(pgm.dp_rank + 1) * (WORLD * B // pgm.dp)]
            loss = loss_of(net, ids)
            if not fsdp:
                GradReducer(net, pgm).reduce()
            else:
                DistributedRuntime(cfg, pgm, net, fsdp=True).reduce_gradients(net)
            norm = float(grad_norm(net, pgm))
            grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                     for n, p in net.named_parameters()}  # the same order on every rank: collectives line up
            out[model_name, layout] = dict(loss=loss, norm=norm, grads=grads, dp=pgm.dp)
    return out


@pytest.fixture(scope="module")
def results():
    return run_workers(_worker, WORLD, timeout=600)


def reference(model, dp):
    cfg = resolve(load_config(None, BASE + model + [f"moe.routing_groups={dp}", f"train.micro_batch_size={WORLD * B}"]), 1)
    net = build_model(cfg)
    ids = tokens()
    loss = loss_of(net, ids)
    return loss, {n: p.grad for n, p in net.named_parameters()}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model", MODELS)
def test_tensor_parallel_equals_one_process(results, model, layout):
    dp = results[0][model, layout]["dp"]
    loss, grads = reference(MODELS[model], dp)
    norm = torch.stack([g.square().sum() for g in grads.values()]).sum().sqrt()
    # each rank's loss is its dp rank's micro-batch's; their mean (tp ranks repeat it) is the global batch's
    assert sum(r[model, layout]["loss"] for r in results) / WORLD == pytest.approx(loss, rel=1e-5)
    for rank in range(WORLD):
        got = results[rank][model, layout]
        assert got["norm"] == pytest.approx(float(norm), rel=1e-5), rank
        assert sorted(got["grads"]) == sorted(grads)
        for name, want in grads.items():
            torch.testing.assert_close(got["grads"][name], want, rtol=0,
                                       atol=RTOL_OF_SCALE * float(want.abs().max()) + 1e-12,
                                       msg=lambda m: f"{model} {layout} rank {rank} {name}: {m}")
