"""ZeRO (DeepSpeed stages 1 and 2) on our own process groups.

DeepSpeed-MoE's conventions, followed here so that DeepSpeed partitions and reduces expert
parameters over OUR expert-data-parallel group and dense ones over OUR dp group:
- an expert parameter carries `allreduce = False` and `group_name = "ep_size_<ep>"`, and the
  optimizer's parameter groups are split with deepspeed.moe.utils.
  split_params_into_different_moe_groups_for_optimizer (a group per group_name, `moe: True`);
- deepspeed.utils.groups' expert tables get our ProcessGroupManager's ep and edp groups under
  that name (DeepSpeed would otherwise build its own layout), and `mpu` hands DeepSpeed our dp
  and tp groups;
- DeepSpeed only turns its MoE path on when the model contains a deepspeed.moe.layer.MoE, so a
  parameterless marker subclass is attached to the model (no state, never called).
ZeRO stage 1/2 reduce-scatter divides every gradient by the dp size and sums expert gradients
over edp: the same (1/dp) * sum_edp rule as moe_dist.parallel.data.GradReducer.

Without DeepSpeed, stage 1 falls back to torch's ZeroRedundancyOptimizer (dense state sharded
over dp, expert state over edp; gradients still reduced by GradReducer) with a warning; stage 2
needs DeepSpeed and is refused at config time (`check_zero_available`).
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import Config, ConfigError
from ..config.preflight import INSTALL_DS
from .data import split_parameters
from .groups import ProcessGroupManager

MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's, under torch AdamW's names


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def check_zero_available(cfg: Config) -> None:
    """Config-time check: stage 2 needs DeepSpeed (stage 1 has a torch fallback)."""
    if cfg.train.zero_stage == 2 and not deepspeed_available():
        raise ConfigError(f"train.zero_stage: 2 needs DeepSpeed, which is not installed; install it with "
                          f"`{INSTALL_DS}`, or use zero_stage=1 (torch ZeroRedundancyOptimizer) or 0")


# ---------------------------------------------------------------------------------------------
# Which parameters are "expert" for ZeRO


def moe_group_name(pgm: ProcessGroupManager) -> str:
    return f"ep_size_{pgm.ep}"  # DeepSpeed parses the ep size out of this name


def zero_param_split(model: nn.Module, pgm: ProcessGroupManager) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) for ZeRO: expert = partitioned and reduced over edp instead of dp.

    Expert weights are replicas over edp = dp*tp/ep ranks. When edp is just dp (ep = tp = 1) or
    the experts are tp-sharded (expert_tp), they behave exactly like dense parameters.
    """
    dense, expert = split_parameters(model)
    if pgm.edp == pgm.dp and pgm.ep == 1:
        return dense + expert, []
    tp_split = [p for p in expert if getattr(p, "tensor_model_parallel", False)]
    return dense + tp_split, [p for p in expert if not getattr(p, "tensor_model_parallel", False)]


def mark_expert_params(expert: list[nn.Parameter], pgm: ProcessGroupManager) -> None:
    for p in expert:
        p.allreduce = False  # deepspeed.moe.utils.is_moe_param
        p.group_name = moe_group_name(pgm)
        if pgm.tp > 1:
            # DeepSpeed counts a parameter in the gradient norm only on tp rank 0 unless it is
            # "model parallel"; under the tp token split the tp ranks hold DIFFERENT expert slices
            # (ep groups are carved across tp), so each must count its own. DeepSpeed then sums the
            # expert norm over dp and tp, which covers every slice's edp partitions exactly once.
            p.model_parallel = True


# ---------------------------------------------------------------------------------------------
# DeepSpeed glue


def deepspeed_config(cfg: Config, pgm: ProcessGroupManager, device: Optional[torch.device] = None) -> dict:
    """The DeepSpeed JSON config from ours: batch, accumulation, clipping, AdamW, ZeRO stage, bf16."""
    tr = cfg.train
    device = device or pgm.device
    bf16 = device.type == "cuda" and tr.dtype in ("auto", "bf16")
    return {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum_steps,
        "train_batch_size": tr.micro_batch_size * tr.grad_accum_steps * pgm.dp,
        "gradient_clipping": tr.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": tr.lr, "betas": [tr.beta1, tr.beta2], "eps": 1e-8, "weight_decay": tr.weight_decay,
                       # DeepSpeed's CPU Adam is a C++ op (not built with DS_BUILD_OPS=0): torch's on CPU;
                       # on CUDA DeepSpeed's FusedAdam (JIT-built on first use)
                       "torch_adam": device.type != "cuda"},
        },
        "zero_optimization": {
            "stage": tr.zero_stage,
            "reduce_scatter": True,  # required by DeepSpeed for MoE parameter groups
            "overlap_comm": False,
            "contiguous_gradients": True,
        },
        "bf16": {"enabled": bf16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


class _MPU:
    """The Megatron-style `mpu` object DeepSpeed queries for our dp and tp groups."""

    def __init__(self, pgm: ProcessGroupManager):
        self.pgm = pgm

    def get_data_parallel_group(self):
        return self.pgm.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.pgm.dp

    def get_data_parallel_rank(self) -> int:
        return self.pgm.dp_rank

    def get_tensor_model_parallel_group(self):
        return self.pgm.tp_group

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.pgm.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self.pgm.tp_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.pgm.dp_rank * self.pgm.tp

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def register_deepspeed_groups(pgm: ProcessGroupManager) -> str:
    """Put our ep/edp groups into DeepSpeed's tables under DeepSpeed's name; returns the name."""
    from deepspeed.utils import groups as ds_groups

    name = moe_group_name(pgm)
    ep_ranks = pgm.ep_ranks()
    edp_ranks = [pgm.ep_rank + i * pgm.ep for i in range(pgm.edp)]
    ds_groups._EXPERT_PARALLEL_GROUP[name] = pgm.ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ep_ranks
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = pgm.edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = edp_ranks
    return name


def _moe_marker(n_experts: int, ep: int, name: str) -> nn.Module:
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEMarker(MoE):
        """Tells DeepSpeed 'this model has MoE layers'; no parameters, never called."""

        def __init__(self):
            nn.Module.__init__(self)
            self.num_experts, self.ep_size, self.expert_group_name = n_experts, ep, name

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
            pass  # our groups are registered already

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEMarker is a flag for DeepSpeed, not a layer")

    return DeepSpeedMoEMarker()


def initialize_deepspeed(model: nn.Module, cfg: Config, pgm: ProcessGroupManager, groups: list[dict]):
    """deepspeed.initialize on our groups; returns (engine, optimizer).

    `groups`: the one-device optimizer's parameter groups (weight decay on matrices only), so ZeRO
    changes memory, not maths. Use `engine(ids)`, `engine.backward(loss)`, `engine.step()`; the
    engine reduces, clips and steps. Set the learning rate through `optimizer.param_groups`.
    """
    check_zero_available(cfg)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if pgm.device.type == "cuda" else "gloo")
    dense, expert = zero_param_split(model, pgm)
    params: Any = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    if expert:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        mark_expert_params(expert, pgm)
        name = register_deepspeed_groups(pgm)
        n_experts = next(m.experts.n_experts for m in model.moe_layers()) * pgm.ep
        model.deepspeed_moe_marker = _moe_marker(n_experts, pgm.ep, name)
        params = split_params_into_different_moe_groups_for_optimizer(params)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, mpu=_MPU(pgm),
                                                   config=deepspeed_config(cfg, pgm))
    return engine, optimizer


# ---------------------------------------------------------------------------------------------
# Torch fallback for stage 1, and the optimizer choice (apex or torch)


class ZeroFallbackOptimizer(torch.optim.Optimizer):
    """ZeRO-1 without DeepSpeed: one ZeroRedundancyOptimizer over dp for dense parameters and
    one over edp for expert parameters. Gradients are reduced before step() (GradReducer)."""

    def __init__(self, dense: list, expert: list, pgm: ProcessGroupManager, **adamw):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        self.parts: dict[str, torch.optim.Optimizer] = {}
        for kind, params, group in (("dense", dense, pgm.dp_group), ("expert", expert, pgm.edp_group)):
            if params:
                self.parts[kind] = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW,
                                                           process_group=group, **adamw)
        groups = [g for opt in self.parts.values() for g in opt.param_groups]
        self.param_groups = groups  # lr schedules write here
        self._part = {id(p): opt for opt in self.parts.values() for g in opt.param_groups for p in g["params"]}
        self.defaults = dict(adamw)
        self.state = {}

    def step(self, closure=None):
        for opt in self.parts.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def gathered_state(self, params: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """Each parameter's AdamW state (step, exp_avg, exp_avg_sq), broadcast from the rank that owns
        it in its dp or edp group, so every rank holds its parameters' full state (for checkpoints)."""
        out = {}
        for name, p in params.items():
            zro = self._part[id(p)]
            owner = zro._param_to_rank[p]
            mine = owner == dist.get_rank(zro.process_group)
            st = zro.optim.state.get(p, {}) if mine else {}
            step = torch.tensor(float(st.get("step", 0)), device=p.device)
            moments = {k: st[k].clone() if k in st else torch.zeros_like(p) for k in MOMENTS}
            for t in (step, *moments.values()):
                dist.broadcast(t, dist.get_global_rank(zro.process_group, owner), group=zro.process_group)
            out[name] = {"step": step.cpu(), **moments}
        return out

    def load_gathered_state(self, params: dict[str, Tensor], state: dict[str, dict[str, Tensor]]) -> None:
        """The inverse: each rank keeps the state of the parameters it owns."""
        for name, p in params.items():
            zro = self._part[id(p)]
            if name in state and zro._param_to_rank[p] == dist.get_rank(zro.process_group):
                s = state[name]
                zro.optim.state[p] = {"step": s["step"].to(torch.float32).reshape(()).cpu(),
                                      **{k: s[k].clone() for k in MOMENTS}}

    def state_dict(self) -> dict:
        """This rank's partitions only (saved per rank; resumes at the same layout)."""
        return {kind: opt.optim.state_dict() for kind, opt in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for kind, opt in self.parts.items():
            opt.optim.load_state_dict(state[kind])


def zero1_fallback(model: nn.Module, groups: list[dict], cfg: Config, pgm: ProcessGroupManager) -> ZeroFallbackOptimizer:
    """The torch ZeRO-1 fallback for train.zero_stage=1 (DeepSpeed ZeRO goes through `initialize_deepspeed`);
    `groups` as for initialize_deepspeed."""
    tr = cfg.train
    if deepspeed_available():
        warnings.warn("train.zero_stage=1: DeepSpeed is installed; initialize_deepspeed is the primary path, "
                      "using torch ZeroRedundancyOptimizer as asked", stacklevel=2)
    else:
        warnings.warn(f"train.zero_stage=1 without DeepSpeed: falling back to torch ZeroRedundancyOptimizer "
                      f"(install DeepSpeed with `{INSTALL_DS}`)", stacklevel=2)
    expert_ids = {id(p) for p in zero_param_split(model, pgm)[1]}
    parts: dict[bool, list[dict]] = {False: [], True: []}  # is expert -> weight-decay groups
    for group in groups:
        for is_expert in (False, True):
            params = [p for p in group["params"] if (id(p) in expert_ids) == is_expert]
            if params:
                parts[is_expert].append({"params": params, "weight_decay": group["weight_decay"]})
    adamw = dict(lr=tr.lr, betas=(tr.beta1, tr.beta2), eps=1e-8)
    return ZeroFallbackOptimizer(parts[False], parts[True], pgm, **adamw)


__all__ = ["deepspeed_available", "check_zero_available", "zero_param_split", "deepspeed_config",
           "initialize_deepspeed", "register_deepspeed_groups", "ZeroFallbackOptimizer",
           "zero1_fallback", "MOMENTS"]
