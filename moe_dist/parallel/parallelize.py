"""parallelize(model, cfg, pgm): turn a plain one-device model into this rank's expert-parallel shard.

The model is built the same way (same seed) on every rank, so every rank starts from the
one-device model; here each MoELayer keeps only its local experts' slice of the stacked weights
and gets the all-to-all dispatcher. The model's config is never rewritten: values that depend on
the layout (moe.n_groups, moe.n_devices) were fixed by moe_dist.config.resolve. Gradient reduction
lives in moe_dist.parallel.data_parallel.
"""
from __future__ import annotations

from typing import Union

from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ..config import Config, MoEConfig, ParallelConfig
from ..model.moe.layer import MoELayer
from .data_parallel import reduce_counts_fn
from .dispatch import AllToAllDispatcher
from .groups import ProcessGroupManager


def parallelize(model: nn.Module, cfg: Union[Config, MoEConfig], pgm: ProcessGroupManager) -> nn.Module:
    """Shard `model`'s experts over pgm's ep group (and apply tensor parallelism), in place; returns the model.

    Per MoELayer: keep experts [ep_rank*E/ep, (ep_rank+1)*E/ep) of gate_up_proj/down_proj, install
    AllToAllDispatcher (ep > 1), and sum expert counts over dp when moe.global_batch_balance.
    """
    moe = cfg.moe if isinstance(cfg, Config) else cfg
    par = cfg.parallel if isinstance(cfg, Config) else ParallelConfig()
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        E = layer.experts.n_experts
        if moe.global_batch_balance:
            layer.reduce_counts = reduce_counts_fn(pgm)
        if pgm.ep > 1:
            shard_experts(layer, pgm)
            layer.dispatcher = AllToAllDispatcher(E, pgm.ep, pgm.ep_rank, pgm.ep_group)
    if pgm.tp > 1:  # after EP: the tp wrapper wraps the all-to-all dispatcher
        from .tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, pgm.dense_mesh["tp"], expert_tp=par.expert_tp, sequence_parallel=par.sequence_parallel)
    return model


def shard_experts(layer: MoELayer, pgm: ProcessGroupManager) -> None:
    """Keep experts [ep_rank*E/ep, (ep_rank+1)*E/ep) of the layer's stacked weights (and biases), as DTensors
    sharded on dim 0 over the ep mesh (on a meta model nothing is allocated; see moe_dist.model.build)."""
    ex = layer.experts
    per = ex.n_experts // pgm.ep
    lo = pgm.ep_rank * per
    for name, p in list(ex.named_parameters(recurse=False)):  # all stacked [E, ...]
        local = p.detach()[lo:lo + per].clone()
        setattr(ex, name, nn.Parameter(DTensor.from_local(local, pgm.expert_mesh["ep"], [Shard(0)], run_check=False)))


def dispatchers(model: nn.Module) -> list[AllToAllDispatcher]:
    """The all-to-all dispatchers of `model` (for their CommStats)."""
    found = []
    for m in model.modules():
        if isinstance(m, MoELayer):
            d = getattr(m.dispatcher, "inner", m.dispatcher)  # under tensor parallelism: the wrapped one
            if isinstance(d, AllToAllDispatcher):
                found.append(d)
    return found
