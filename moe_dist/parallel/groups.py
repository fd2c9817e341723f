"""ProcessGroupManager: the one owner of torch.distributed state, process groups and rank coordinates.

Layout (REFERENCE.md: Parallel layout). world = dp x tp, tp fastest:

    rank = dp_rank * tp + tp_rank

Expert parallelism is carved out of the same dp*tp ranks, ep fastest:

    rank = edp_rank * ep + ep_rank          (edp = dp * tp / ep)

so an ep group is `ep` consecutive ranks (on one node whenever ep <= GPUs per node, where the
all-to-all is cheapest) and an edp group holds the replicas of one expert slice, `ep` apart.

Pipeline parallelism (parallel.pp) is the slowest dimension: world = pp x dp x tp, and each pipeline
stage's dp x tp ranks are laid out as above (every ep group within one stage):

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

World 8, pp 2, ep 2: stage 0 is ranks 0-3, stage 1 ranks 4-7; pp groups {0,4} {1,5} {2,6} {3,7};
ep groups {0,1} {2,3} {4,5} {6,7}; edp groups {0,2} {1,3} {4,6} {5,7}.
Example, world 8, tp 2, ep 4:

    rank      0 1 2 3 4 5 6 7
    dp_rank   0 0 1 1 2 2 3 3     dp groups: {0,2,4,6} {1,3,5,7}
    tp_rank   0 1 0 1 0 1 0 1     tp groups: {0,1} {2,3} {4,5} {6,7}
    ep_rank   0 1 2 3 0 1 2 3     ep groups: {0,1,2,3} {4,5,6,7}
    edp_rank  0 0 0 0 1 1 1 1     edp groups: {0,4} {1,5} {2,6} {3,7}

Every group is built here, once; no other module calls new_group. A world of one (plain
`python`, no torchrun) never touches torch.distributed: every group is None, every coordinate 0
and every collective in moe_dist.parallel is the identity, so the trainer always uses a manager.
Asked with `process_group=True` (train.zero_stage > 0: FSDP2 and DeepSpeed need a process group) it
initialises a world of one instead, with groups and meshes of size 1.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ConfigError, ParallelConfig
from .env import LaunchEnv, discover, free_port


def check_layout(world: int, tp: int, ep: int, dp: Optional[int] = None, n_experts: Optional[int] = None,
                 pp: int = 1) -> int:
    """Validate world = pp x dp x tp and the ep carving; returns dp. Raises ConfigError naming the field."""
    if tp < 1 or ep < 1 or pp < 1:
        raise ConfigError(f"parallel.tp={tp}, parallel.ep={ep}, parallel.pp={pp}: all must be >= 1")
    if world % (pp * tp):
        raise ConfigError(f"parallel.tp: pp x tp = {pp * tp} does not divide the world size {world}; launch a multiple "
                          "of pp x tp processes")
    stage = world // pp
    dp_ = stage // tp
    if dp is not None and dp != dp_:
        raise ConfigError(f"parallel.dp: {dp} but world {world} is not pp*dp*tp = {pp}*{dp}*{tp}; "
                          f"drop parallel.dp (it defaults to world/(pp*tp) = {dp_}) or launch {pp * dp * tp} processes")
    if stage % ep:
        raise ConfigError(f"parallel.ep: {ep} does not divide dp*tp = {stage}; pick ep dividing it")
    if n_experts is not None and n_experts % ep:
        raise ConfigError(f"parallel.ep: moe.n_experts={n_experts} is not divisible by ep={ep}; pick ep dividing n_experts")
    return dp_


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("parallel.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
    return backend


class ProcessGroupManager:
    """Rank coordinates and process groups of one training job.

    `ProcessGroupManager(cfg.parallel, n_experts=cfg.moe.n_experts, launch=discover())` initialises
    torch.distributed from where the launcher put this process (torchrun, or mpirun/srun through
    moe_dist.parallel.env; discovered here when not given) unless it is initialised already, then builds
    the pp, dp, tp, ep and edp groups. Attributes: world_size, rank, local_rank, device, pp/dp/tp/ep/edp
    (sizes), pp_rank/dp_rank/tp_rank/ep_rank/edp_rank, pp_group/dp_group/tp_group/ep_group/edp_group (the
    dp, tp, ep and edp groups and meshes are this rank's pipeline stage's).
    """

    def __init__(self, cfg: Optional[ParallelConfig] = None, n_experts: Optional[int] = None,
                 device: Optional[str] = None, launch: Optional[LaunchEnv] = None, process_group: bool = False):
        cfg = cfg or ParallelConfig()
        launch = launch or discover()
        self.world_size = dist.get_world_size() if dist.is_initialized() else launch.world_size
        self.local_rank = launch.local_rank
        self.device = self._pick_device(device, launch.local_rank)
        self.pp = cfg.pp
        self.dp = check_layout(self.world_size, cfg.tp, cfg.ep, cfg.dp, n_experts, pp=cfg.pp)
        self.tp, self.ep = cfg.tp, cfg.ep
        self.stage_size = self.world_size // self.pp  # the dp x tp ranks of one pipeline stage
        self.edp = self.stage_size // cfg.ep
        self.owns_init = False
        self.pp_group = None
        if self.world_size == 1 and not process_group:
            self.rank = 0
            self.dp_group = self.tp_group = self.ep_group = self.edp_group = None
            self.dense_mesh = self.expert_mesh = None
        else:
            if not dist.is_initialized():
                backend = resolve_backend(cfg.backend, self.device)
                from .faults import elastic_store  # restarts under torchrun get fresh rendezvous keys

                store = elastic_store(timedelta(seconds=cfg.timeout_s)) if launch.launcher == "torchrun" else None
                init_method = launch.init_method
                if launch.launcher == "single":  # a plain `python` process of its own: a private rendezvous
                    init_method = f"tcp://127.0.0.1:{free_port()}"
                where = dict(store=store) if store is not None else dict(init_method=init_method)
                dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s), rank=launch.rank,
                                        world_size=self.world_size,
                                        device_id=self.device if self.device.type == "cuda" else None, **where)
                self.owns_init = True
            self.rank = dist.get_rank()
            from torch.distributed.device_mesh import init_device_mesh

            mesh_device = "cuda" if self.device.type == "cuda" else "cpu"
            # row-major meshes: the last dimension is the fastest-varying rank
            if self.pp == 1:
                self.dense_mesh = init_device_mesh(mesh_device, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))
                self.expert_mesh = init_device_mesh(mesh_device, (self.edp, self.ep), mesh_dim_names=("edp", "ep"))
            else:  # this stage's dp x tp and edp x ep meshes, sliced from meshes over all stages
                dense = init_device_mesh(mesh_device, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))
                expert = init_device_mesh(mesh_device, (self.pp, self.edp, self.ep), mesh_dim_names=("pp", "edp", "ep"))
                self.dense_mesh, self.expert_mesh = dense["dp", "tp"], expert["edp", "ep"]
                self.pp_group = dense.get_group("pp")
            self.dp_group = self.dense_mesh.get_group("dp")
            self.tp_group = self.dense_mesh.get_group("tp")
            self.ep_group = self.expert_mesh.get_group("ep")
            self.edp_group = self.expert_mesh.get_group("edp")
        self.pp_rank, in_stage = divmod(self.rank, self.stage_size)
        self.dp_rank, self.tp_rank = divmod(in_stage, self.tp)
        self.edp_rank, self.ep_rank = divmod(in_stage, self.ep)

    @staticmethod
    def _pick_device(device: Optional[str], local_rank: int) -> torch.device:
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
        return torch.device(device)

    # -- helpers ---------------------------------------------------------------------------

    @property
    def distributed(self) -> bool:
        """Whether torch.distributed is in use (every world of several, and a world of one with process_group)."""
        return self.dense_mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def ep_ranks(self) -> list[int]:
        """Global ranks of this rank's ep group, in ep_rank order."""
        first = self.pp_rank * self.stage_size + self.edp_rank * self.ep
        return list(range(first, first + self.ep))

    def local_experts(self, n_experts: int) -> range:
        """Experts held here: rank r of the ep group holds [r*E/ep, (r+1)*E/ep)."""
        per = n_experts // self.ep
        return range(self.ep_rank * per, (self.ep_rank + 1) * per)

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: pp {self.pp_rank}/{self.pp} dp {self.dp_rank}/{self.dp} tp {self.tp_rank}/{self.tp} "
                f"ep {self.ep_rank}/{self.ep} edp {self.edp_rank}/{self.edp}")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def destroy(self) -> None:
        """Tear down torch.distributed if this manager started it."""
        if self.owns_init and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_init = False

    def __repr__(self) -> str:
        return f"ProcessGroupManager({self.describe()})"
