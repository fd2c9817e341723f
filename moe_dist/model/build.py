"""The model a config describes, built anywhere (meta included) with layout-invariant initial values.

    model = build_model(cfg, device="meta")      # nothing allocated; parallelism is applied here, then
    materialize(model, device, seed, shard_of)   # each rank allocates only its shards and fills them
                                                 # with the one-device model's slices (model/init.py)
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn

from ..config import Config
from .init import ShardOf, init_weights
from .transformer import MoETransformerLM


def build_model(cfg: Config, device: Optional[torch.device | str] = None) -> MoETransformerLM:
    """The one-device model of a resolved config, initialised from cfg.train.seed; on device "meta"
    nothing is allocated or initialised (materialize does both)."""
    with torch.device(device) if device is not None else nullcontext():  # else torch's default device
        return MoETransformerLM(cfg.model, cfg.moe, seed=cfg.train.seed)


def materialize(model: nn.Module, device: torch.device | str, seed: int, shard_of: Optional[ShardOf] = None) -> nn.Module:
    """Allocate a meta-built (and possibly sharded) model's tensors on `device` and initialise them."""
    model.to_empty(device=device)
    model.tie_weights()
    init_weights(model, seed, shard_of)
    return model
