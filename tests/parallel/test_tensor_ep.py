"""Training steps on tp x ep layouts (world 4, gloo) reproduce one process on the global batch.

Each dp rank's micro-batch is one routing (capacity) group, so the one-process reference runs
the concatenated dp batches with moe.routing_groups = dp. Gradients are reduced with the ep
branch's GradReducer (dense: dp average; experts: edp sum / dp, which also sums the partial
expert gradients of the tp token split) and clipped by the global norm (tp-aware).
"""
import dataclasses

import pytest
import torch

from dist_helper import run_workers
from moe_dist.config import Config, ModelConfig, MoEConfig, ParallelConfig
from moe_dist.model import MoETransformerLM
from moe_dist.parallel import GradReducer, ProcessGroupManager, clip_grad_norm_, parallelize
from moe_dist.parallel.tensor import cross_entropy

WORLD, B, S, STEPS = 4, 2, 8, 6
MODEL = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=48, max_seq_len=S,
                    moe_layer_indices=[1])
MOE = dict(n_experts=4, top_k=2, capacity_factor=1.25, n_shared_experts=1, z_loss_weight=1e-3)


def batches(dp: int):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, MODEL.vocab_size, (dp * B, S + 1), generator=g)
    return [tokens] * STEPS  # one batch again and again: the loss must fall


def train(model, pgm, tokens_per_step, dp_rank, tp_group):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    reducer = GradReducer(model, pgm)
    losses = []
    for tokens in tokens_per_step:
        mine = tokens[dp_rank * B:(dp_rank + 1) * B] if pgm.dp > 1 else tokens
        logits = model(mine[:, :-1])
        loss = cross_entropy(logits, mine[:, 1:], tp_group) + model.get_aux_loss()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        reducer.reduce()
        clip_grad_norm_(model, pgm, 0.5)
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def model_cfg(tp: int) -> ModelConfig:
    return MODEL if MODEL.n_kv_head % tp == 0 else dataclasses.replace(MODEL, n_kv_head=None)


def _worker(rank, tp, ep, expert_tp):
    cfg = Config(model=model_cfg(tp), moe=MoEConfig(**MOE), parallel=ParallelConfig(tp=tp, ep=ep, expert_tp=expert_tp))
    pgm = ProcessGroupManager(cfg.parallel, n_experts=cfg.moe.n_experts)
    torch.manual_seed(0)
    model = parallelize(MoETransformerLM(cfg.model, cfg.moe), cfg, pgm)
    losses = train(model, pgm, batches(pgm.dp), pgm.dp_rank, pgm.tp_group)
    return pgm.dp_rank, losses


def reference(dp: int, tp: int):
    torch.manual_seed(0)
    model = MoETransformerLM(model_cfg(tp), MoEConfig(**MOE, routing_groups=dp))
    return train(model, ProcessGroupManager(ParallelConfig()), batches(dp), 0, None)


@pytest.mark.parametrize("tp,ep,expert_tp", [(2, 2, False), (2, 1, False), (2, 1, True), (4, 2, False)])
def test_tp_ep_training_matches_one_process(tp, ep, expert_tp):
    results = run_workers(_worker, WORLD, tp, ep, expert_tp)
    dp = WORLD // tp
    per_dp = {}
    for dp_rank, losses in results:  # tp peers report the same loss
        if dp_rank in per_dp:
            torch.testing.assert_close(losses, per_dp[dp_rank], atol=0, rtol=0)
        per_dp[dp_rank] = losses
    mean = torch.stack([per_dp[r] for r in range(dp)]).mean(0)
    ref = reference(dp, tp)
    torch.testing.assert_close(mean, ref, atol=2e-5, rtol=1e-5)
    assert ref[-1] < ref[0]  # it trains
