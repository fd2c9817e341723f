"""parallelize(model, cfg, pgm): turn a plain one-device model into this rank's expert-parallel shard.

The model is built the same way (same seed) on every rank, so every rank starts from the
one-device model; here each MoELayer keeps only its local experts' slice of the stacked weights
and gets the all-to-all dispatcher. Gradient reduction lives in moe_dist.parallel.data.
"""
from __future__ import annotations

import dataclasses
from typing import Union

from torch import nn

from ..config import Config, ConfigError, MoEConfig
from ..model.moe.layer import MoELayer
from .data import reduce_counts_fn
from .dispatch import AllToAllDispatcher
from .groups import ProcessGroupManager


def parallelize(model: nn.Module, cfg: Union[Config, MoEConfig], pgm: ProcessGroupManager) -> nn.Module:
    """Shard `model`'s experts over pgm's ep group, in place; returns the model.

    Per MoELayer: keep experts [ep_rank*E/ep, (ep_rank+1)*E/ep) of gate_up_proj/down_proj,
    install AllToAllDispatcher (ep > 1), set n_devices = ep for the device/comm losses (unless
    moe.n_devices is set), default group-limited routing's groups to the ep ranks (moe.topk_groups
    set, moe.n_groups = 0), and sum expert counts over dp when moe.global_batch_balance.
    """
    moe = cfg.moe if isinstance(cfg, Config) else cfg
    expert_tp = cfg.parallel.expert_tp if isinstance(cfg, Config) else False
    if pgm.tp > 1 and expert_tp and pgm.ep > 1:
        raise ConfigError("parallel.expert_tp: with ep > 1 the ep groups are the tp groups' ranks (groups.py layout), "
                          "so tp peers hold different experts and cannot split one; set expert_tp=false or ep=1")
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        E = layer.experts.n_experts
        if E % pgm.ep:
            raise ConfigError(f"parallel.ep: moe.n_experts={E} is not divisible by ep={pgm.ep}; pick ep dividing n_experts")
        layer_cfg = layer.cfg
        if layer_cfg.topk_groups and not layer_cfg.n_groups:
            layer_cfg = dataclasses.replace(layer_cfg, n_groups=pgm.ep)
            layer.cfg = layer.router.cfg = layer_cfg
        if moe.n_devices is None:
            layer.n_devices = pgm.ep
        if moe.global_batch_balance:
            layer.reduce_counts = reduce_counts_fn(pgm)
        if pgm.ep > 1:
            shard_experts(layer, pgm.ep, pgm.ep_rank)
            layer.dispatcher = AllToAllDispatcher(E, pgm.ep, pgm.ep_rank, pgm.ep_group)
    if pgm.tp > 1:  # after EP: the tp wrapper wraps the all-to-all dispatcher
        from .tensor import apply_tensor_parallel

        apply_tensor_parallel(model, pgm.tp_group, expert_tp=expert_tp)
    return model


def shard_experts(layer: MoELayer, ep: int, ep_rank: int) -> None:
    """Keep experts [ep_rank*E/ep, (ep_rank+1)*E/ep) of the layer's stacked weights (and biases)."""
    ex = layer.experts
    per = ex.n_experts // ep
    lo, hi = ep_rank * per, (ep_rank + 1) * per
    for name, p in list(ex.named_parameters(recurse=False)):  # all stacked [E, ...]
        setattr(ex, name, nn.Parameter(p.detach()[lo:hi].clone()))
    ex.n_experts = per
    ex.expert_offset = lo  # global id of the first local expert (for checkpoints and logs)


def dispatchers(model: nn.Module) -> list[AllToAllDispatcher]:
    """The all-to-all dispatchers of `model` (for their CommStats)."""
    found = []
    for m in model.modules():
        if isinstance(m, MoELayer):
            d = getattr(m.dispatcher, "inner", m.dispatcher)  # under tensor parallelism: the wrapped one
            if isinstance(d, AllToAllDispatcher):
                found.append(d)
    return found
