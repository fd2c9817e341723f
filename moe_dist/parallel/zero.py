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
Under pipeline parallelism (stage 1 only) the torch schedule runs the backward and the trainer then has
DeepSpeed reduce and step, as DeepSpeed's PipelineEngine does: gradient_accumulation_steps 1, and the mpu's
model-parallel group is the pp group, so the gradient norm DeepSpeed clips by is summed over the stages.
ZeRO stage 1/2 reduce-scatter divides every gradient by the dp size and sums expert gradients
over edp: the same (1/dp) * sum_edp rule as moe_dist.parallel.data_parallel.GradReducer.

Without DeepSpeed, zero_stage 1 and 2 run on FSDP2 with reshard_after_forward=False (parameters,
gradients and optimizer state sharded; one gather per step, as ZeRO-2 communicates), and zero_stage 3
always does (moe_dist.parallel.data_parallel.apply_fsdp).
"""
from __future__ import annotations

import importlib.util
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..config import Config, ConfigError
from .data_parallel import split_parameters
from .groups import ProcessGroupManager

MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's, under torch AdamW's names


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


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
    layouts = getattr(model, "shard_layouts", {})
    tp_split = {id(p) for name, p in model.named_parameters() if _over(layouts.get(name), "tp")}
    return dense + [p for p in expert if id(p) in tp_split], [p for p in expert if id(p) not in tp_split]


def _over(layout, mesh_dim: str) -> bool:
    """Whether a (mesh, placements) layout splits the tensor over the mesh dimension `mesh_dim`."""
    if layout is None:
        return False
    mesh, placements = layout
    names = mesh.mesh_dim_names or ()
    return mesh_dim in names and not placements[names.index(mesh_dim)].is_replicate()


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


def deepspeed_bf16(cfg: Config, device: torch.device) -> bool:
    """Whether DeepSpeed holds the weights in bf16 (then the pipeline's stage-to-stage activations are bf16)."""
    return device.type == "cuda" and cfg.train.dtype in ("auto", "bf16")


def deepspeed_config(cfg: Config, pgm: ProcessGroupManager, device: Optional[torch.device] = None) -> dict:
    """The DeepSpeed JSON config from ours: batch, accumulation, clipping, AdamW, ZeRO stage, bf16."""
    tr = cfg.train
    device = device or pgm.device
    # parallel.pp > 1: the schedule runs the step's micro-batches (their loss divided by them) and DeepSpeed
    # sees one backward per step, so every step is an accumulation boundary and nothing is rescaled again
    accum = 1 if pgm.pp > 1 else tr.grad_accum_steps
    micro = tr.micro_batch_size * tr.grad_accum_steps // accum
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * pgm.dp,
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
        "bf16": {"enabled": deepspeed_bf16(cfg, device)},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


class _MPU:
    """The Megatron-style `mpu` object DeepSpeed queries for our dp, tp and pp groups."""

    def __init__(self, pgm: ProcessGroupManager):
        if pgm.pp > 1 and pgm.tp > 1:
            raise ValueError("DeepSpeed ZeRO runs with parallel.tp=1 only (setup.zero_engine); got tp and pp > 1")
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

    # DeepSpeed sums the gradient norm's squares (and ORs overflow) over the model-parallel group: under pp it
    # spans the stages, each holding other parameters, as DeepSpeed's PipelineEngine grid's does (pipe x model)
    def get_model_parallel_group(self):
        return self.pgm.pp_group if self.pgm.pp > 1 else self.pgm.tp_group

    def get_model_parallel_world_size(self) -> int:
        return self.pgm.pp if self.pgm.pp > 1 else self.pgm.tp

    # the tp rank, not the pp rank: DeepSpeed counts a plain parameter in the norm on model-parallel rank 0
    # only, and every stage must count its own
    get_model_parallel_rank = get_tensor_model_parallel_rank

    def get_pipeline_model_parallel_group(self):
        return self.pgm.pp_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pgm.pp

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pgm.pp_rank


def register_deepspeed_groups(pgm: ProcessGroupManager) -> str:
    """Put our ep/edp groups into DeepSpeed's tables under DeepSpeed's name; returns the name."""
    from deepspeed.utils import groups as ds_groups

    name = moe_group_name(pgm)
    ep_ranks = pgm.ep_ranks()
    edp_ranks = [pgm.pp_rank * pgm.stage_size + pgm.ep_rank + i * pgm.ep for i in range(pgm.edp)]
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


def local_parameters(model: nn.Module, pgm: ProcessGroupManager) -> nn.Module:
    """DeepSpeed flattens plain tensors only: each DTensor parameter becomes a plain parameter of its local
    slice. `model.shard_layouts` ({name: (mesh, placements)}) keeps what the checkpoint needs to describe
    the slices; DeepSpeed learns which are tensor-parallel shards from its own attributes. A parameter
    replicated over tp whose gradient is a partial sum there (the sequence-parallel norms) gets that sum
    all-reduced as soon as it is accumulated, as Megatron does for its sequence-parallel norms."""
    layouts = {}
    for mod_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not isinstance(p, DTensor):
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            layouts[full] = (p.device_mesh, tuple(p.placements))
            plain = nn.Parameter(p.to_local(), requires_grad=p.requires_grad)
            if _over(layouts[full], "tp"):
                plain.tensor_model_parallel = True  # DeepSpeed: counted by every tp rank in the norm
            elif "tp" in (p.device_mesh.mesh_dim_names or ()):
                plain.register_post_accumulate_grad_hook(lambda q: dist.all_reduce(q.grad, group=pgm.tp_group))
            setattr(module, name, plain)
    model.tie_weights()
    model.shard_layouts = layouts
    return model


def _check_stage_groups(params: list[dict], pgm: ProcessGroupManager) -> None:
    """DeepSpeed sums each parameter group's norm over the stages one group at a time: every pp rank must
    hold the same groups, or the collectives pair different groups (or hang)."""
    mine = [(g.get("name"), bool(g.get("moe"))) for g in params]
    every: list = [None] * pgm.pp
    dist.all_gather_object(every, mine, group=pgm.pp_group)
    if any(groups != mine for groups in every):
        raise ConfigError(f"train.zero_stage=1 under parallel.pp={pgm.pp}: the pipeline stages hold different "
                         f"DeepSpeed parameter groups {every} (a stage without MoE layers); set parallel.pp_layers "
                         "so that every pp rank holds a MoE layer, or train.zero_stage=3 (FSDP2)")


def initialize_deepspeed(model: nn.Module, cfg: Config, pgm: ProcessGroupManager, groups: list[dict]):
    """deepspeed.initialize on our groups; returns (engine, optimizer).

    `groups`: the one-device optimizer's parameter groups (weight decay on matrices only), so ZeRO
    changes memory, not maths. Use `engine(ids)`, `engine.backward(loss)`, `engine.step()`; the
    engine reduces, clips and steps. Set the learning rate through `optimizer.param_groups`.
    """
    import os

    import deepspeed

    # DeepSpeed asserts that a launcher exported LOCAL_RANK; a plain `python` process of one (zero_stage
    # at world 1) has none: the rank is ours, from the manager
    os.environ.setdefault("LOCAL_RANK", str(pgm.local_rank))
    deepspeed.init_distributed(dist_backend="nccl" if pgm.device.type == "cuda" else "gloo")
    dense, expert = zero_param_split(model, pgm)
    params: Any = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    if expert:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        mark_expert_params(expert, pgm)
        name = register_deepspeed_groups(pgm)
        model.deepspeed_moe_marker = _moe_marker(cfg.moe.n_experts, pgm.ep, name)
        params = split_params_into_different_moe_groups_for_optimizer(params)
    if pgm.pp > 1:
        _check_stage_groups(params, pgm)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, mpu=_MPU(pgm),
                                                   config=deepspeed_config(cfg, pgm))
    return engine, optimizer


__all__ = ["deepspeed_available", "zero_param_split", "deepspeed_bf16", "deepspeed_config", "local_parameters",
           "initialize_deepspeed", "register_deepspeed_groups", "MOMENTS"]
