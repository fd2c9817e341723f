"""The trainer's Runtime for a multi-process job: process groups, the sharded model and its hooks.

    torchrun --nproc_per_node=4 -m moe_dist.train --config configs/tiny.yaml parallel.ep=2

moe_dist.train.trainer.setup() hands over to `setup_parallel` when WORLD_SIZE > 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import Config
from . import tensor, zero
from .data import GradReducer, clip_grad_norm_, split_parameters
from .groups import ProcessGroupManager
from .parallelize import dispatchers, parallelize


def setup_parallel(cfg: Config):
    from ..train.trainer import Runtime, build_model, lm_loss  # the trainer imports us lazily; no cycle at import time

    pgm = ProcessGroupManager(cfg.parallel, n_experts=cfg.moe.n_experts if cfg.model.moe_layers() else None,
                              device=cfg.train.device)
    torch.manual_seed(cfg.train.seed)  # the same one-device model on every rank, then sharded
    plain = build_model(cfg)
    n_params = sum(p.numel() for p in plain.parameters())
    model = parallelize(plain, cfg, pgm).to(pgm.device)
    reducer = GradReducer(model, pgm)
    split = split_parameters(model)
    engine = optimizer = None
    if cfg.train.zero_stage and zero.deepspeed_available():
        engine, optimizer = zero.initialize_deepspeed(model, cfg, pgm)
    elif cfg.train.zero_stage or cfg.train.apex:
        optimizer = zero.build_optimizer(model, cfg, pgm)  # torch ZeRO-1 fallback, or apex

    comm = CommMetrics(dispatchers(model), pgm, timing=cfg.logging.comm_timing)

    def reduce_sum(t: Tensor) -> Tensor:
        if pgm.dp == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, group=pgm.dp_group)
        return t

    return Runtime(
        model=model, device=pgm.device, dp_rank=pgm.dp_rank, dp_world=pgm.dp, is_main=pgm.is_main, n_params=n_params,
        reduce_gradients=lambda m: reducer.reduce(),
        reduce_sum=reduce_sum,
        reduce_mean=lambda t: reduce_sum(t) / pgm.dp,
        clip_grad_norm=lambda m, max_norm: clip_grad_norm_(m, pgm, max_norm, split),
        pgm=pgm,
        loss_fn=(lambda logits, targets: tensor.cross_entropy(logits.float(), targets, pgm.tp_group)) if pgm.tp > 1
        else lm_loss,
        optimizer=optimizer,
        engine=engine,
        comm_stats=comm.collect,
        reset_comm_stats=comm.reset,
    )


class CommMetrics:
    """The all-to-all figures of one training step, gathered from every rank for the log (issue 4's
    metrics): MB sent, per layer the rows each rank received for its experts, and with
    logging.comm_timing the slowest rank's seconds in all-to-alls and in the experts."""

    def __init__(self, moe_dispatchers, pgm, timing: bool):
        self.dispatchers, self.pgm, self.timing = moe_dispatchers, pgm, timing
        for d in moe_dispatchers:
            d.timing = timing

    def reset(self) -> None:
        for d in self.dispatchers:
            d.stats.reset()

    def collect(self) -> dict:
        """Collective (every rank calls it); resets the counters."""
        if not self.dispatchers:
            return {}
        st = [d.stats for d in self.dispatchers]
        mine = torch.tensor([sum(s.bytes_sent for s in st), sum(s.comm_s for s in st), sum(s.compute_s for s in st),
                             *(s.rows_received for s in st)], dtype=torch.float64, device=self.pgm.device)
        self.reset()
        every = [torch.empty_like(mine) for _ in range(self.pgm.world_size)]
        dist.all_gather(every, mine)
        m = torch.stack(every).cpu()  # [world, 3 + layers]
        recv = m[:, 3:]  # rows received, [rank, layer]
        out = {"a2a_mb": float(m[:, 0].sum()) / 1e6,
               # busiest rank over the mean, averaged over layers: 1.0 = every rank's experts got equal work
               "a2a_recv_imbalance": float((recv.max(0).values / recv.mean(0).clamp(min=1e-9)).mean()),
               "a2a_rows_received": recv.t().long().tolist()}  # [layer][rank]
        if self.timing:
            out["a2a_comm_s"], out["a2a_expert_s"] = float(m[:, 1].max()), float(m[:, 2].max())
        return out
