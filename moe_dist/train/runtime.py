"""Where the training loop runs: its device, its data shard, and the few collectives it needs.

`Runtime` is one process (every collective the identity); `DistributedRuntime` is one rank of a
job, on the process groups of moe_dist.parallel. The trainer calls the same methods on either.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from ..config import Config
from ..model.transformer import lm_loss
from ..parallel.data_parallel import GradReducer, clip_grad_norm_, local, split_parameters
from ..parallel.dispatch import CommMetrics
from ..parallel.groups import ProcessGroupManager
from ..parallel.parallelize import dispatchers


class Runtime:
    """One process: the whole batch is this rank's, every reduction is the identity."""

    pgm = None
    dp_rank, dp_world, world_size, is_main = 0, 1, 1, True

    def __init__(self, cfg: Config, device: torch.device):
        self.device = device
        self.bf16 = cfg.train.dtype == "bf16"

    def autocast(self):
        """bf16 autocast where the resolved train.dtype says so."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The LM loss, a plain scalar (inside loss_context)."""
        loss = lm_loss(logits, targets)
        return loss.to_local() if isinstance(loss, DTensor) else loss

    def loss_context(self):
        """Where loss() and the backward from it run."""
        return nullcontext()

    def reduce_sum(self, t: Tensor) -> Tensor:
        """Sum over data-parallel ranks."""
        return t

    def reduce_mean(self, t: Tensor) -> Tensor:
        return self.reduce_sum(t) / self.dp_world

    def reduce_stages(self, t: Tensor) -> Tensor:
        """Sum over pipeline stages (each rank's share of a figure: the loss on the last, its layers' rows)."""
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank's flag is."""
        return flag

    def reduce_gradients_in_backward(self, params=None) -> None:
        """Before the last micro-batch's backward (of `params`, default all): its gradients may be reduced
        as they are produced."""

    def reduce_gradients(self, model: nn.Module) -> None:
        """Between the last backward and the optimizer step."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> Tensor:
        """Clip by the global norm; returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def comm_stats(self) -> dict:
        """Expert parallelism: this step's all-to-all figures (a collective); resets them."""
        return {}

    def reset_comm_stats(self) -> None:
        pass

    def close(self) -> None:
        """Leave the job (every rank together)."""


def _sum_over(t: Tensor, size: int, group) -> Tensor:
    """A detached copy of t summed over `group` (of `size` ranks; t itself when alone)."""
    if size == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, group=group)
    return t


class DistributedRuntime(Runtime):
    """One rank of a job: dp/tp/ep groups from `pgm`, gradients reduced dense over dp and experts over edp
    (after backward at zero_stage 0; by FSDP2 during backward with `fsdp`)."""

    def __init__(self, cfg: Config, pgm: ProcessGroupManager, model: nn.Module, fsdp: bool = False):
        super().__init__(cfg, pgm.device)
        self.pgm = pgm
        self.dp_rank, self.dp_world, self.world_size, self.is_main = pgm.dp_rank, pgm.dp, pgm.world_size, pgm.is_main
        self.reducer = None if fsdp else GradReducer(model, pgm)  # FSDP2 reduce-scatters in backward itself
        # FSDP2 over a mesh of one (edp = 1) reduces nothing, and apply_fsdp leaves it no divide factor: the
        # experts' gradients (each rank's ep group's sum) get their 1/dp here (moe_dist.parallel.data_parallel)
        self.undivided = split_parameters(model)[1] if fsdp and pgm.edp == 1 and pgm.dp > 1 else []
        self.split = split_parameters(model)
        moe_layers = cfg.model.moe_layers()
        rows = [moe_layers.index(i) for i, block in model.blocks() if i in moe_layers]  # this rank's MoE layers
        self.comm = CommMetrics(dispatchers(model), pgm, timing=cfg.logging.comm_timing, rows=rows,
                                n_layers=len(moe_layers) if pgm.ep > 1 else 0)
        self._control = None  # a gloo group for host-side flags, made on first use off a CPU

    def loss_context(self):
        # tensor parallelism: the logits are sharded over the vocabulary, and the loss (forward and backward)
        # runs on the shards
        return loss_parallel() if self.pgm.tp > 1 else nullcontext()

    def reduce_sum(self, t: Tensor) -> Tensor:
        return _sum_over(t, self.pgm.dp, self.pgm.dp_group)

    def reduce_stages(self, t: Tensor) -> Tensor:
        return _sum_over(t, self.pgm.pp, self.pgm.pp_group)

    def any(self, flag: bool) -> bool:
        # asked every step (stop requests): over gloo on host memory, so a GPU's queue never waits for it
        if self._control is None and self.device.type != "cpu":
            self._control = dist.new_group(backend="gloo")
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        return bool(t.item())

    def reduce_gradients_in_backward(self, params=None) -> None:
        if self.reducer is not None:
            self.reducer.arm(params)

    def reduce_gradients(self, model: nn.Module) -> None:
        if self.reducer is not None:
            self.reducer.reduce()
        for p in self.undivided:
            if p.grad is not None:
                local(p.grad).div_(self.pgm.dp)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> Tensor:
        return clip_grad_norm_(model, self.pgm, max_norm, self.split)

    def comm_stats(self) -> dict:
        return self.comm.collect()

    def reset_comm_stats(self) -> None:
        self.comm.reset()

    def close(self) -> None:
        # Leave together and tear gloo/NCCL down before interpreter exit: a rank whose peer has
        # already exited can otherwise abort in the process group's destructor (SIGABRT,
        # "terminate called without an active exception") after a successful run.
        self.pgm.barrier()
        self.pgm.destroy()
