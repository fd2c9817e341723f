"""What a checkpoint holds: this rank's shards of the model and of the optimizer state.

    state = sharded_state(model, optimizer, pgm)   # {"model.<fqn>": ..., "optim.<fqn>.<key>": ...}
    dcp.save(state) / dcp.load(state); apply_sharded_state(model, optimizer, state)

Every sharded parameter is a DTensor of the one-device tensor (routed experts over ep, FSDP2 shards over
dp / edp, tensor-parallel shards over tp), so DCP writes each rank's own slices and reads, at any other
layout, whichever slices it needs. The model's shards come from DCP's state-dict API
(get_model_state_dict); a torch optimizer's per-parameter state (AdamW's step, exp_avg, exp_avg_sq) from
get_optimizer_state_dict, which keeps each moment as sharded as its parameter: no rank ever holds more
than its shards. DeepSpeed ZeRO 1/2 keeps its state in flat partitions; it is regathered per parameter
under the same keys (each rank then holds its parameters' moments while saving), so a ZeRO checkpoint
loads into AdamW and back. Parameters DeepSpeed holds as plain local slices (its experts) are described
as DTensors here. Hyperparameters (lr, betas, ...) are the run's config's, not the checkpoint's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..parallel.data_parallel import local, split_parameters
from ..parallel.groups import ProcessGroupManager
from ..parallel.zero import MOMENTS

MODEL_PREFIX, OPTIM_PREFIX = "model.", "optim."
_OPTIONS = StateDictOptions(full_state_dict=False, strict=True)


def _plain_shard_layout(p: Tensor, expert_ids: set[int], pgm: Optional[ProcessGroupManager]):
    """(mesh, placements) of a parameter held as a plain local slice (DeepSpeed's experts, hand-sliced
    tensor-parallel weights), or None for one every rank holds in full (or a DTensor)."""
    if pgm is None or not pgm.distributed or isinstance(p, DTensor):
        return None
    if id(p) in expert_ids and pgm.ep > 1:
        return pgm.expert_mesh, (Replicate(), Shard(0))
    if getattr(p, "tensor_model_parallel", False) and pgm.tp > 1:
        return pgm.dense_mesh, (Replicate(), Shard(p.partition_dim))
    return None


def _wrap(t: Tensor, layout) -> Tensor:
    return t if layout is None else DTensor.from_local(t, *layout, run_check=False)


FP32_MASTER = "fp32_master"  # DeepSpeed's fp32 copy of a bf16 parameter


def deepspeed_zero(optimizer) -> bool:
    return type(optimizer).__module__.startswith("deepspeed")


def zero_optimizer(optimizer) -> bool:
    """DeepSpeed ZeRO 1/2: state partitioned over ranks in flat buffers, regathered per parameter for
    checkpoints (or saved per rank with checkpoint.zero_state=per_rank)."""
    return deepspeed_zero(optimizer)


def dcp_optimizer_supported(optimizer) -> bool:
    """Optimizers whose state checkpoints per parameter: torch AdamW/Adam (also on FSDP2 shards), apex
    FusedAdam and, regathered, DeepSpeed ZeRO."""
    return optimizer is not None and (type(optimizer).__name__ in {"AdamW", "Adam", "FusedAdam"}
                                      or zero_optimizer(optimizer))


def _zero_inner_states(optimizer) -> list[dict]:
    """The Adam states of DeepSpeed's inner optimizer, one per flat fp32 partition, linked to the
    parameters' fragments. The inner optimizer makes its state at its first step, and DeepSpeed links
    it then: a fresh engine gets a zero state here (what that first step would start from)."""
    inner = optimizer.optimizer
    torch_adam = type(inner).__module__.startswith("torch.")  # step: a tensor; DeepSpeed's FusedAdam: an int
    for group in inner.param_groups:
        for p in group["params"]:
            if not inner.state[p]:
                inner.state[p].update(step=torch.tensor(0.0) if torch_adam else 0, exp_avg=torch.zeros_like(p),
                                      exp_avg_sq=torch.zeros_like(p))
    optimizer._hp_optimizer_states_linked = False  # (re)link the fragments to the states
    optimizer._lazy_init_hp_params_optimizer_state()
    return [inner.state[p] for group in inner.param_groups for p in group["params"]]


def _zero_param_states(params: dict[str, Tensor], optimizer) -> dict[str, dict[str, Tensor]]:
    """DeepSpeed ZeRO 1/2's Adam state regathered per parameter (collectives over each partition group)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    step = float(_zero_inner_states(optimizer)[0]["step"])
    out = {}
    for name, p in params.items():
        out[name] = {"step": torch.tensor(step)}  # as torch AdamW keeps it
        out[name].update({k: safe_get_full_optimizer_state(p, k) for k in MOMENTS})
        if p.dtype != torch.float32:
            out[name][FP32_MASTER] = safe_get_full_fp32_param(p)
    return out


def _set_zero_param_states(params: dict[str, Tensor], optimizer, states: dict[str, dict[str, Tensor]]) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _zero_inner_states(optimizer)
    optimizer.refresh_fp32_params()  # master <- the loaded weights (exact in fp32; bf16 below if saved)
    steps = set()
    for name, st in states.items():
        for k, v in st.items():
            if k == "step":
                steps.add(float(v))
            elif k == FP32_MASTER:
                safe_set_full_fp32_param(params[name], v)
            else:
                safe_set_full_optimizer_state(params[name], v, k)
    if steps:  # ZeRO keeps one step for all; AdamW may have skipped frozen parameters
        step = max(steps)
        for inner in _zero_inner_states(optimizer):
            if torch.is_tensor(inner["step"]):
                inner["step"].fill_(step)
            else:
                inner["step"] = int(step)


def _param_states(model: nn.Module, optimizer) -> dict[str, dict[str, Tensor]]:
    """{parameter fqn: {state key: tensor}}: each parameter's optimizer state, as sharded as the parameter."""
    if deepspeed_zero(optimizer):
        return _zero_param_states(dict(model.named_parameters()), optimizer)
    return get_optimizer_state_dict(model, optimizer, options=_OPTIONS)["state"]  # made (zeros) if not yet


def _set_param_states(model: nn.Module, optimizer, states: dict[str, dict[str, Tensor]]) -> None:
    if deepspeed_zero(optimizer):
        _set_zero_param_states(dict(model.named_parameters()), optimizer, states)
        return
    current = get_optimizer_state_dict(model, optimizer, options=_OPTIONS)
    for name, st in states.items():
        current["state"][name].update(st)
    set_optimizer_state_dict(model, optimizer, current, options=_OPTIONS)


def _optim_key(key: str, params: dict) -> Optional[tuple[str, str]]:
    """("layers.0.attn.q_proj.weight", "exp_avg") for "optim.layers.0.attn.q_proj.weight.exp_avg" of a
    parameter in `params`; None for other keys."""
    name, _, k = key[len(OPTIM_PREFIX):].rpartition(".")
    return (name, k) if key.startswith(OPTIM_PREFIX) and name in params else None


def sharded_state(model: nn.Module, optimizer=None, pgm: Optional[ProcessGroupManager] = None) -> dict:
    """A flat DCP state dict {"model.<fqn>": ..., "optim.<fqn>.<key>": ...} of this rank's shards."""
    expert_ids = {id(p) for p in split_parameters(model)[1]}
    params = dict(model.named_parameters(remove_duplicate=False))
    state = {}
    for name, t in get_model_state_dict(model, options=_OPTIONS).items():
        p = params.get(name)
        state[MODEL_PREFIX + name] = _wrap(t, _plain_shard_layout(p, expert_ids, pgm) if p is not None else None)
    if dcp_optimizer_supported(optimizer):
        for name, st in _param_states(model, optimizer).items():
            layout = _plain_shard_layout(params[name], expert_ids, pgm)
            for k, v in st.items():
                state[f"{OPTIM_PREFIX}{name}.{k}"] = _wrap(v, layout) if v.dim() > 0 else v
    return state


def apply_sharded_state(model: nn.Module, optimizer, state: dict) -> None:
    """Copy a loaded `sharded_state` dict (optimizer keys the checkpoint lacks left out) back into the
    model and the optimizer."""
    params = dict(model.named_parameters(remove_duplicate=False))
    model_sd = {}
    for k, v in state.items():
        if k.startswith(MODEL_PREFIX):
            name = k[len(MODEL_PREFIX):]
            model_sd[name] = local(v) if not isinstance(params.get(name), DTensor) else v
    set_model_state_dict(model, model_sd, options=_OPTIONS)
    if not dcp_optimizer_supported(optimizer):
        return
    params = dict(model.named_parameters())
    states: dict[str, dict[str, Tensor]] = {}
    for key, v in state.items():
        if (found := _optim_key(key, params)) is not None:
            states.setdefault(found[0], {})[found[1]] = v if isinstance(params[found[0]], DTensor) else local(v)
    _set_param_states(model, optimizer, states)


def load_local_optimizer_state(optimizer, state: dict, world_size: int = 1) -> None:
    """Restore this rank's own DeepSpeed ZeRO partition, saved per rank (checkpoint.zero_state=per_rank):
    same layout only. A list indexed by the rank in each (dp or expert-dp) group, of which each rank reads
    its own entry; its fp32 partition is restored and copied into the model's parameters."""
    optimizer.load_state_dict([state] * world_size, load_optimizer_states=True, load_from_fp32_weights=True)
