"""AdamW with the usual parameter groups: weight decay on matrices only.

Groups are keyed by (expert?, decay?) so expert parallelism can later give expert parameters
their own treatment (reduced over the expert-data-parallel group, their own lr or ZeRO shard)
by looking at `group["name"]` without re-deriving which parameter is which.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from moe_dist.config import TrainConfig


def is_expert_param(name: str) -> bool:
    """Routed-expert weights (stacked [E, ...]); shared experts and routers are dense."""
    return ".experts." in f".{name}"


def uses_weight_decay(name: str, p: nn.Parameter) -> bool:
    """Matrices decay; norms, biases and embeddings do not (GPT-2 / Llama practice)."""
    if p.ndim < 2 or name.endswith(".bias") or "norm" in name:
        return False
    return "embed" not in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = uses_weight_decay(name, p)
        key = ("expert" if is_expert_param(name) else "dense") + ("_decay" if decay else "_no_decay")
        group = groups.setdefault(key, {"name": key, "params": [], "param_names": [],
                                        "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
        group["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), or apex's FusedAdam with train.apex on CUDA where apex is installed."""
    groups = param_groups(model, cfg.weight_decay)
    for g in groups:
        del g["param_names"]  # kept out of the optimizer state_dict
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if cfg.apex:
        if device.type == "cuda" and importlib.util.find_spec("apex") is not None:
            from apex.optimizers import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kw)
        warnings.warn("train.apex: apex is not installed or not on CUDA; using torch's AdamW (fused on CUDA)",
                      stacklevel=2)
    # fused: on CUDA always; on a CPU where no parameter is a DTensor (the fused kernel takes no mix of
    # plain and distributed tensors). A fused AdamW skips a non-finite step on the device (step_unless).
    plain = not any(isinstance(p, DTensor) for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=True if device.type == "cuda" or plain else None, **kw)


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """optimizer.step() unless found_inf (a 0-dim device tensor, 1.0 = skip). torch's fused AdamW reads
    the flag in its kernel, as under GradScaler, so no value reaches the host; any other optimizer
    copies it to the host first."""
    if isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused"):
        optimizer.found_inf = found_inf.float()  # moments, step count and weights untouched where set
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(found_inf):
        optimizer.step()
