"""An expert/tensor-parallel model's state for checkpoints.

`sharded_state` describes each rank's shards as DTensors for torch.distributed.checkpoint, so
every rank writes only its own slice and a checkpoint loads at any layout
(moe_dist.checkpoint.manager has the save/verify/load protocol).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..parallel.data import split_parameters
from ..parallel.groups import ProcessGroupManager
from ..parallel.zero import MOMENTS


# Distributed checkpoints (torch.distributed.checkpoint): every rank writes only its own shards.
#
# Each rank's tensors are described as DTensors of the *global* one-device tensor:
#   expert params (ep > 1):  expert_mesh (edp, ep), placements (Replicate(), Shard(0))
#   tp-sharded params:       dense_mesh (dp, tp),   placements (Replicate(), Shard(partition_dim))
#   everything else:         a plain tensor (replicated; DCP writes one copy)
# AdamW's exp_avg / exp_avg_sq follow their parameter, and so do ZeRO's: each rank gathers its
# parameters' moments from the partitions under the same keys (DeepSpeed ZeRO 1/2 through
# deepspeed.utils.safe_get_full_optimizer_state, plus the fp32 master copy for low-precision
# parameters; the torch ZeRO-1 fallback by broadcast from each parameter's owner). Loading builds the same
# dict for the *current* layout, and DCP reads whichever slices of the saved shards it needs, so a
# checkpoint written at one (dp, tp, ep) loads at any other, or in one process, with ZeRO or AdamW.

MODEL_PREFIX, OPTIM_PREFIX = "model.", "optim."


def _layout_of(p: Tensor, expert_ids: set[int], pgm: Optional[ProcessGroupManager]):
    """(mesh, placements) of a sharded parameter, or None for one every rank holds in full."""
    if pgm is None or not pgm.distributed:
        return None
    from torch.distributed.tensor import Replicate, Shard

    if id(p) in expert_ids and pgm.ep > 1:  # tp > 1 with ep > 1 keeps experts whole (parallelize)
        return pgm.expert_mesh, (Replicate(), Shard(0))
    if getattr(p, "tensor_model_parallel", False) and pgm.tp > 1:
        return pgm.dense_mesh, (Replicate(), Shard(p.partition_dim))
    return None


def _wrap(t: Tensor, layout) -> Tensor:
    if layout is None:
        return t
    from torch.distributed.tensor import DTensor

    mesh, placements = layout
    return DTensor.from_local(t, mesh, placements, run_check=False)


def _unwrap(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


FP32_MASTER = "fp32_master"  # DeepSpeed's fp32 copy of a bf16 parameter


def deepspeed_zero(optimizer) -> bool:
    return type(optimizer).__module__.startswith("deepspeed")


def zero_optimizer(optimizer) -> bool:
    """DeepSpeed ZeRO 1/2 or the torch ZeRO-1 fallback: state partitioned over ranks, regathered per
    parameter for checkpoints (or saved per rank with checkpoint.zero_state=per_rank)."""
    return deepspeed_zero(optimizer) or type(optimizer).__name__ == "ZeroFallbackOptimizer"


def dcp_optimizer_supported(optimizer) -> bool:
    """Optimizers whose state checkpoints per parameter: torch AdamW/Adam, apex FusedAdam and, regathered,
    the ZeRO ones."""
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


def _param_states(params: dict[str, Tensor], optimizer) -> dict[str, dict[str, Tensor]]:
    """{parameter name: {state key: tensor}}: each parameter's full optimizer state on this rank."""
    if deepspeed_zero(optimizer):
        return _zero_param_states(params, optimizer)
    if zero_optimizer(optimizer):  # the torch fallback
        return optimizer.gathered_state(params)
    return {name: {k: v for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)}
            for name, p in params.items()}


def _set_param_states(params: dict[str, Tensor], optimizer, states: dict[str, dict[str, Tensor]]) -> None:
    if deepspeed_zero(optimizer):
        _set_zero_param_states(params, optimizer, states)
    elif zero_optimizer(optimizer):
        optimizer.load_gathered_state(params, states)
    else:
        for name, st in states.items():
            optimizer.state[params[name]].update(st)


def _optim_key(key: str, params: dict) -> Optional[tuple[str, str]]:
    """("layers.0.attn.q_proj.weight", "exp_avg") for "optim.layers.0.attn.q_proj.weight.exp_avg" of a
    parameter in `params`; None for other keys."""
    name, _, k = key[len(OPTIM_PREFIX):].rpartition(".")
    return (name, k) if key.startswith(OPTIM_PREFIX) and name in params else None


def sharded_state(model: nn.Module, optimizer=None, pgm: Optional[ProcessGroupManager] = None) -> dict:
    """A flat DCP state dict {"model.<name>": ..., "optim.<param name>.<key>": ...} of this rank's shards."""
    expert_ids = {id(p) for p in split_parameters(model)[1]}
    params = dict(model.named_parameters(remove_duplicate=False))
    state = {}
    for name, t in model.state_dict().items():
        p = params.get(name)
        state[MODEL_PREFIX + name] = _wrap(t, _layout_of(p, expert_ids, pgm) if p is not None else None)
    if dcp_optimizer_supported(optimizer):
        # named_parameters() dedups tied weights: one state per parameter
        for name, st in _param_states(dict(model.named_parameters()), optimizer).items():
            layout = _layout_of(params[name], expert_ids, pgm)
            for k, v in st.items():
                state[f"{OPTIM_PREFIX}{name}.{k}"] = _wrap(v, layout) if v.dim() > 0 else v
    return state


def empty_optimizer_state(model: nn.Module, optimizer, saved: dict) -> None:
    """Allocate the optimizer's per-parameter state for the keys a checkpoint holds (AdamW creates it
    lazily at its first step), so DCP has tensors of the current layout to load into.
    `saved`: the checkpoint's {key: TensorStorageMetadata}."""
    if zero_optimizer(optimizer):  # sharded_state gathers its current state to load into
        return
    params = dict(model.named_parameters())
    for key, meta in saved.items():
        name, k = _optim_key(key, params) or (None, None)
        if name is not None and k != FP32_MASTER and k not in optimizer.state[params[name]]:
            p = params[name]
            on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")  # step on p's device
            optimizer.state[p][k] = (torch.zeros((), dtype=meta.properties.dtype, device=p.device if on_device else "cpu")
                                     if len(meta.size) == 0 else torch.zeros_like(p, memory_format=torch.preserve_format))


def apply_sharded_state(model: nn.Module, optimizer, state: dict) -> None:
    """Copy a loaded `sharded_state` dict back into the model and the optimizer."""
    model.load_state_dict({k[len(MODEL_PREFIX):]: _unwrap(v) for k, v in state.items() if k.startswith(MODEL_PREFIX)})
    if not dcp_optimizer_supported(optimizer):
        return
    params = dict(model.named_parameters())
    states: dict[str, dict[str, Tensor]] = {}
    for key, v in state.items():
        if (found := _optim_key(key, params)) is not None:
            states.setdefault(found[0], {})[found[1]] = _unwrap(v)
    _set_param_states(params, optimizer, states)


def load_local_optimizer_state(optimizer, state: dict, world_size: int = 1) -> None:
    """Restore this rank's own ZeRO partition, saved per rank (checkpoint.zero_state=per_rank, and
    checkpoints written before ZeRO state was regathered): same layout only."""
    if type(optimizer).__module__.startswith("deepspeed"):
        # DeepSpeed ZeRO 1/2: a list indexed by the rank in each (dp or expert-dp) group, of which each rank
        # reads its own entry; its fp32 partition is restored and copied into the model's parameters
        optimizer.load_state_dict([state] * world_size, load_optimizer_states=True, load_from_fp32_weights=True)
    else:  # torch optimizers and the torch ZeRO-1 fallback (its own per-rank state_dict)
        optimizer.load_state_dict(state)
