"""moe_dist.plan calibrated on what two gloo processes measure: all-to-all bytes equal the dispatcher's
CommStats.bytes_sent exactly (dropless, dropless with recompute, capacity), and per-rank parameter
counts equal the sharded model's at tp=2 (experts token-split or width-split) and ep=2."""
import dataclasses

import torch
import torch.distributed as dist

from dist_helper import run_workers
from moe_dist import plan as P
from moe_dist.config import Config, DataConfig, ModelConfig, MoEConfig, ParallelConfig, TrainConfig
from moe_dist.model import MoEStats, MoETransformerLM
from moe_dist.parallel import ProcessGroupManager, dispatchers, parallelize
from moe_dist.parallel.data_parallel import local

B, S = 3, 8  # micro-batch per rank
MODEL = ModelConfig(vocab_size=64, d_model=16, n_layer=2, n_head=2, d_ff=32, max_seq_len=S)
MOE = MoEConfig(n_experts=4, top_k=2, d_expert=24)
A2A_CASES = {"dropless": ({}, False), "dropless_recompute": ({}, True), "capacity": ({"capacity_factor": 1.0}, False)}


def a2a_cfg(case: str) -> Config:
    moe, ac = A2A_CASES[case]
    return Config(model=dataclasses.replace(MODEL, activation_checkpointing=ac), moe=dataclasses.replace(MOE, **moe),
                  parallel=ParallelConfig(ep=2), data=DataConfig(seq_len=S), train=TrainConfig(micro_batch_size=B))


def _a2a(rank):
    pgm = ProcessGroupManager(ParallelConfig(ep=2), n_experts=MOE.n_experts)
    out = {}
    for case in A2A_CASES:
        cfg = a2a_cfg(case)
        torch.manual_seed(0)
        model = parallelize(MoETransformerLM(cfg.model, cfg.moe), cfg, pgm)
        ids = torch.randint(0, MODEL.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(rank))
        moe = MoEStats()
        logits = model(ids[:, :-1], moe=moe)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + moe.pop_aux_loss()
        loss.backward()
        loads = []  # per MoE layer, [ep rank][expert]: assignments of each rank's tokens
        for stats in moe.layers():
            every = [torch.empty_like(stats["load"]) for _ in range(pgm.ep)]
            dist.all_gather(every, stats["load"], group=pgm.ep_group)
            loads.append([t.tolist() for t in every])
        out[case] = dict(measured=sum(d.stats.bytes_sent for d in dispatchers(model)), loads=loads)
    return out


def test_all_to_all_bytes_equal_the_dispatchers_count():
    got = run_workers(_a2a, 2)
    H = MODEL.d_model
    for rank, r in enumerate(got):
        for case, (_, ac) in A2A_CASES.items():
            passes = 2 if ac else 1
            # the formula, fed the routing each layer actually made
            planned = sum(P.a2a_bytes(*P.dropless_rows(loads, rank), H, 4, 4, passes) for loads in r[case]["loads"])
            if case == "capacity":  # fixed slots: the layout-level estimate itself is exact
                cfg = a2a_cfg(case)
                L = P.Layout(tp=1, ep=2, dp=2, expert_tp=False, zero_stage=0, micro_batch_size=B,
                             activation_checkpointing=False)
                est = P.evaluate(cfg, L, P.GPUS["h100"], gpus_per_node=2, device="cpu")["comm_bytes"]["a2a"]
                planned = est["nvlink"] + est["network"]
                assert planned == 2 * 4 * (4 // 2 * 12) * H * 4  # 2 layers x 4 passes x E_l*G*C rows (C = 24*2/4)
            assert r[case]["measured"] == planned, (rank, case)
        assert r["dropless_recompute"]["measured"] > r["dropless"]["measured"]  # the recomputed forward moves again


PARAM_CASES = {  # layout -> (model, moe) options with every kind of parameter tensor parallelism treats apart
    "tp2": dict(tp=2, ep=1, expert_tp=False),
    "tp2_expert_tp": dict(tp=2, ep=1, expert_tp=True),
    "ep2": dict(tp=1, ep=2, expert_tp=False),
}
PARAM_MODEL = dataclasses.replace(MODEL, n_layer=3, first_k_dense=1, qkv_bias=True, attn_out_bias=True, qk_norm=True,
                                  tie_embeddings=True)
PARAM_MOE = dataclasses.replace(MOE, n_shared_experts=1, d_shared_expert=8, shared_expert_gate=True, noisy_gating=True)


def _local_params(rank):
    out = {}
    for case, par in PARAM_CASES.items():
        cfg = Config(model=PARAM_MODEL, moe=PARAM_MOE, parallel=ParallelConfig(**par))
        pgm = ProcessGroupManager(cfg.parallel, n_experts=MOE.n_experts)
        torch.manual_seed(0)
        model = parallelize(MoETransformerLM(PARAM_MODEL, PARAM_MOE), cfg, pgm)
        out[case] = sum(local(p).numel() for p in model.parameters())  # this rank's shards
    return out


def test_per_rank_parameter_counts_equal_the_sharded_model():
    got = run_workers(_local_params, 2)
    counts = P.param_counts(PARAM_MODEL, PARAM_MOE)
    for case, par in PARAM_CASES.items():
        L = P.Layout(dp=2 // par["tp"], zero_stage=0, micro_batch_size=1, activation_checkpointing=False, **par)
        want = counts.dense_local(L) + counts.expert_local(L)
        assert [r[case] for r in got] == [want, want], case
