"""resolve(cfg, world_size): every derived value filled in once, before any process builds anything.

The resolved config is what every module reads, what the run prints at start and what each
checkpoint saves (config.yaml). Values a user may leave to the layout (moe.n_groups: ep,
moe.n_devices: null, moe.comm_max_devices: null) become numbers here the first time, and a resume
takes them from the checkpoint's resolved config, so the model never changes with the layout.

`config_changes(saved, new)` says what a resume would change: the model or the data (refused), or
the schedule (allowed with checkpoint.allow_config_change=true).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from .schema import Config, resolved_d_expert, stage_layers
from .validate import validate, validate_layout

# Fields a resume may change freely: where and how the run computes, logs and saves, not what.
FREE = ("parallel.", "logging.", "checkpoint.", "train.zero_stage", "train.device", "train.eval_every",
        "train.eval_batches", "train.log_every", "train.max_nonfinite_steps", "train.apex", "train.cpu_malloc_cache",
        "data.cache_dir", "model.cpu_gemm", "model.activation_checkpointing", "moe.grouped_mm",
        # folded into the two batch figures below: a layout change may trade them for dp
        "train.micro_batch_size", "train.grad_accum_steps", "moe.routing_groups")
# Fields a resume changes only with checkpoint.allow_config_change=true: the optimisation schedule.
SCHEDULE = ("train.steps", "train.lr", "train.min_lr", "train.warmup_steps", "train.weight_decay", "train.beta1",
            "train.beta2", "train.grad_clip", "train.dtype", "global batch (sequences per step)",
            "tokens per routing group")


def layout(cfg: Config, world_size: int) -> dict[str, int]:
    """world = pp x dp x tp; ep carved out of dp x tp, edp = dp * tp / ep (REFERENCE.md: Parallel layout)."""
    tp, ep, pp = cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.pp
    dp = world_size // (pp * tp)
    return {"world_size": world_size, "pp": pp, "dp": dp, "tp": tp, "ep": ep, "edp": dp * tp // ep}


def resolve(cfg: Config, world_size: int, saved: Optional[Config] = None,
            cuda_available: Optional[bool] = None) -> Config:
    """A copy of `cfg` with every derived value a number or a name, for a job of world_size processes.

    `saved`: the resolved config of the checkpoint being resumed; layout-derived model values come
    from it. `cuda_available` decides train.device=auto (default: ask torch).
    """
    validate(cfg)
    validate_layout(cfg, world_size)
    m, moe, par, tr = cfg.model, cfg.moe, cfg.parallel, cfg.train
    lay = layout(cfg, world_size)
    if tr.device == "auto":
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        device = "cuda" if cuda_available else "cpu"
    else:
        device = tr.device
    dtype = tr.dtype if tr.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    backend = par.backend if par.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    before = saved.moe if saved is not None else None
    n_devices = moe.n_devices if moe.n_devices is not None else (before.n_devices if before else lay["ep"])
    n_groups = moe.n_groups if moe.n_groups != "ep" else (before.n_groups if before else lay["ep"])
    filled = dataclasses.replace(moe, n_groups=n_groups)
    comm_max = (before.comm_max_devices if moe.comm_max_devices is None and before is not None
                and before.comm_max_devices is not None else filled.comm_devices(n_devices))
    d_expert = resolved_d_expert(m, moe)
    out = dataclasses.replace(
        cfg,
        moe=dataclasses.replace(moe, d_expert=d_expert, d_shared_expert=moe.d_shared_expert or d_expert,
                                n_devices=n_devices, n_groups=n_groups, comm_max_devices=comm_max),
        parallel=dataclasses.replace(par, dp=lay["dp"], backend=backend),
        data=dataclasses.replace(cfg.data, seq_len=cfg.data.seq_len or m.max_seq_len),
        train=dataclasses.replace(tr, device=device, dtype=dtype),
    )
    validate(out)  # the filled values (n_devices, n_groups) against the model
    return out


def describe(cfg: Config, world_size: int) -> str:
    """The resolved values on one line, printed at the start of a run."""
    lay, moe = layout(cfg, world_size), cfg.moe
    pp = f"pp {lay['pp']} x " if lay["pp"] > 1 else ""
    parts = [f"world {world_size} = {pp}dp {lay['dp']} x tp {lay['tp']}", f"ep {lay['ep']} (edp {lay['edp']})",
             f"seq_len {cfg.data.seq_len}", f"{cfg.train.device} {cfg.train.dtype} {cfg.parallel.backend}"]
    if cfg.model.moe_layers():
        parts.insert(2, f"d_expert {moe.d_expert}, n_groups {moe.n_groups}, n_devices {moe.n_devices}")
    if lay["pp"] > 1:
        par = cfg.parallel
        parts.append(f"pipeline {par.pp_schedule}, {par.pp_virtual_stages} stage(s) per rank, layers per stage "
                     f"{stage_layers(cfg.model.n_layer, par.pp * par.pp_virtual_stages, par.pp_layers)}")
    if cfg.train.zero_stage:
        parts.append(f"zero_stage {cfg.train.zero_stage}")
    return "resolved: " + "; ".join(parts)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _batch_figures(cfg: Config, world_size: int) -> dict[str, int]:
    tr, dp = cfg.train, layout(cfg, world_size)["dp"]
    figures = {"global batch (sequences per step)": tr.micro_batch_size * tr.grad_accum_steps * dp}
    if cfg.model.moe_layers() and cfg.moe.routing_group == "batch":
        # capacity and balance losses are per routing group: the tokens of a group must stay the same
        figures["tokens per routing group"] = tr.micro_batch_size * cfg.data.seq_len // cfg.moe.routing_groups
    return figures


def config_changes(saved: Config, saved_world: int, new: Config, new_world: int) -> tuple[list, list]:
    """(refused, schedule): [(field, saved value, new value)] between two resolved configs."""
    old, now = _flat(saved.to_dict()), _flat(new.to_dict())
    old.update(_batch_figures(saved, saved_world))
    now.update(_batch_figures(new, new_world))
    refused, schedule = [], []
    for key in sorted(set(old) | set(now)):
        a, b = old.get(key), now.get(key)
        if a == b or key.startswith(FREE):
            continue
        (schedule if key in SCHEDULE else refused).append((key, a, b))
    return refused, schedule
