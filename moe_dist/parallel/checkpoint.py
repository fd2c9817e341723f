"""Checkpoints in the one-device format from an expert-parallel model, and back.

Saving gathers every expert slice over the ep group into the full stacked [E, ...] weights (and
the same for AdamW's per-parameter state), so a checkpoint written at any ep loads at any other
ep, or in one process (`moe-dist generate`). Loading slices this rank's experts out again.
Gathering is a collective: every rank calls the `full_*` functions, rank 0 writes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .data import split_parameters
from .groups import ProcessGroupManager


def expert_names(model: nn.Module) -> set[str]:
    ids = {id(p) for p in split_parameters(model)[1]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _gather(t: Tensor, pgm: ProcessGroupManager) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(pgm.ep)]
    dist.all_gather(parts, t.contiguous(), group=pgm.ep_group)
    return torch.cat(parts, 0)


def _slice(t: Tensor, pgm: ProcessGroupManager) -> Tensor:
    per = t.shape[0] // pgm.ep
    return t[pgm.ep_rank * per:(pgm.ep_rank + 1) * per]


def full_model_state(model: nn.Module, pgm: ProcessGroupManager) -> dict:
    state = model.state_dict()
    if pgm.ep > 1:
        for name in sorted(expert_names(model)):
            state[name] = _gather(state[name], pgm)
    return state


def load_full_model_state(model: nn.Module, state: dict, pgm: ProcessGroupManager) -> None:
    if pgm.ep > 1:
        state = dict(state)
        for name in expert_names(model):
            state[name] = _slice(state[name], pgm)
    model.load_state_dict(state)


def _expert_indices(optimizer: torch.optim.Optimizer, model: nn.Module) -> set[int]:
    """Positions (as in optimizer.state_dict()) of the expert parameters."""
    ids = {id(p) for p in split_parameters(model)[1]}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {i for i, p in enumerate(params) if id(p) in ids}


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, pgm: ProcessGroupManager) -> dict:
    state = optimizer.state_dict()
    if pgm.ep == 1:
        return state
    for i in sorted(_expert_indices(optimizer, model)):
        per_param = state["state"].get(i)
        if per_param is None:  # every rank steps the same parameters, so all lack it together
            continue
        state["state"][i] = {k: _gather(v, pgm) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in per_param.items()}
    return state


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict,
                              pgm: ProcessGroupManager) -> None:
    if pgm.ep > 1:
        state = {"state": dict(state["state"]), "param_groups": state["param_groups"]}
        for i in _expert_indices(optimizer, model):
            if i in state["state"]:
                state["state"][i] = {k: _slice(v, pgm) if torch.is_tensor(v) and v.dim() > 0 else v
                                     for k, v in state["state"][i].items()}
    optimizer.load_state_dict(state)
