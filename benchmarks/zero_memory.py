"""Parameter, gradient and optimizer bytes per rank for ZeRO 0/1/2 at several world-4 layouts.

    PYTHONPATH=. python benchmarks/zero_memory.py        # CPU, gloo, 4 processes, fp32

Measured on rank 0 after one training step: parameters = this rank's tensors (tp/ep shards);
optimizer = the real Adam state tensors (ZeRO 0: torch AdamW; ZeRO 1/2: DeepSpeed's partitions)
plus DeepSpeed's fp32 master partition; gradients = the full local .grad tensors (ZeRO 0/1) or
DeepSpeed's fp32 gradient partition (ZeRO 1 and 2: DeepSpeed 0.19 frees each full .grad once it
is reduce-scattered at stage 1 too; its reduce bucket is not counted). Formula, with N_d dense and
N_e local expert elements per rank: params 4(N_d+N_e); grads 4(N_d+N_e), ZeRO 1/2:
4(N_d/dp + N_e/edp); Adam moments 8(N_d+N_e), ZeRO 1/2: 8(N_d/dp + N_e/edp) plus a 4-byte master.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "parallel"))
from dist_helper import optimizer_state_bytes, run_workers  # noqa: E402

from moe_dist.config import Config, ModelConfig, MoEConfig, ParallelConfig, TrainConfig  # noqa: E402
from moe_dist.model import MoETransformerLM  # noqa: E402
from moe_dist.parallel import GradReducer, ProcessGroupManager, parallelize  # noqa: E402
from moe_dist.parallel import zero as Z  # noqa: E402
from moe_dist.parallel.tensor import cross_entropy  # noqa: E402
from moe_dist.train.optimizer import param_groups  # noqa: E402

MODEL = ModelConfig(vocab_size=256, d_model=128, n_layer=4, n_head=4, d_ff=512, max_seq_len=32)
MOE = MoEConfig(n_experts=8, top_k=2, d_expert=256)
LAYOUTS = [("dp4 ep1", 1, 1), ("dp4 ep2", 1, 2), ("dp4 ep4", 1, 4), ("tp2 x ep2 (dp2)", 2, 2)]
MiB = 2 ** 20


def one_layout(tp, ep, stage):
    cfg = Config(model=MODEL, moe=MOE, parallel=ParallelConfig(tp=tp, ep=ep),
                 train=TrainConfig(micro_batch_size=2, zero_stage=stage, grad_clip=1.0))
    pgm = ProcessGroupManager(cfg.parallel, n_experts=MOE.n_experts)
    torch.manual_seed(0)
    model = parallelize(MoETransformerLM(MODEL, MOE), cfg, pgm)
    dense, expert = Z.zero_param_split(model, pgm)
    n_d, n_e = sum(p.numel() for p in dense), sum(p.numel() for p in expert)
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(pgm.dp_rank))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if stage == 0:
        opt = torch.optim.AdamW(model.parameters())
        loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], pgm.tp_group) + model.get_aux_loss()
        loss.backward()
        GradReducer(model, pgm).reduce()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        opt.step()
        st = optimizer_state_bytes(opt)
        state, master = st["dense"], 0
    else:
        engine, opt = Z.initialize_deepspeed(model, cfg, pgm, param_groups(model, cfg.train.weight_decay))
        loss = cross_entropy(engine(tokens[:, :-1]), tokens[:, 1:], pgm.tp_group) + model.get_aux_loss()
        engine.backward(loss)
        # DeepSpeed 0.19 frees each full .grad once it is reduce-scattered, at stage 1 as at stage 2:
        # what stays is the fp32 gradient partition (the size of the master partition)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        grads += sum(t.numel() * t.element_size() for t in opt.single_partition_of_fp32_groups)
        engine.step()
        st = optimizer_state_bytes(opt)
        state = st["dense"] + st["expert"]
        master = st.get("dense_master", 0) + st.get("expert_master", 0)
    share = (n_d / pgm.dp + n_e / pgm.edp) if stage else (n_d + n_e)
    formula = dict(params=4 * (n_d + n_e), grads=4 * share, state=8 * share,
                   master=4 * share if stage else 0)
    return dict(params=params, grads=grads, state=state, master=master, formula=formula, dp=pgm.dp, edp=pgm.edp)


def _worker(rank):
    return {(name, stage): one_layout(tp, ep, stage) for name, tp, ep in LAYOUTS for stage in (0, 1, 2)}


def main():
    res = run_workers(_worker, 4, timeout=900)[0]
    print("| layout | dp | edp | ZeRO | params MiB | grads MiB (formula) | Adam state MiB (formula) | fp32 master MiB | state+master vs ZeRO 0 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, _, _ in LAYOUTS:
        base = res[name, 0]["state"]
        for stage in (0, 1, 2):
            r = res[name, stage]
            f = r["formula"]
            print(f"| {name} | {r['dp']} | {r['edp']} | {stage} | {r['params'] / MiB:.2f} | "
                  f"{r['grads'] / MiB:.2f} ({f['grads'] / MiB:.2f}) | {r['state'] / MiB:.2f} ({f['state'] / MiB:.2f}) | "
                  f"{r['master'] / MiB:.2f} | {(r['state'] + r['master']) / base:.2f} |")


if __name__ == "__main__":
    main()
