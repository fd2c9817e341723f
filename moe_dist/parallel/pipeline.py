"""Pipeline parallelism: the layers split into stages over the pp ranks, run by torch.distributed.pipelining.

    keep_stages(model, cfg, pp_rank)            # on the meta model, first: only this rank's layers stay
    stages = stage_modules(model, cfg, pp_rank)  # one StageModule per virtual stage (what the schedule runs)
    ... parallelize (ep, tp), FSDP2 with the stages as roots, materialize ...
    pipe = Pipeline(stages, cfg, pgm, loss_fn, hidden_dtype)
    ce_sum, aux_sum = pipe.step(inputs, targets, moe)   # one optimizer step's micro-batches, forward and backward

Stage s of the pp x pp_virtual_stages stages holds parallel.pp_layers[s] consecutive layers and runs on pp
rank s % pp (the loop placement of interleaved 1F1B); the embedding is stage 0's, the final norm, head and
loss the last stage's. Each rank keeps one model holding its stages' blocks under their whole-model
names (model.layers is a ModuleDict keyed by layer index), so initialisation, checkpoints (DCP reshards
pp=2 <-> pp=1 by name), the optimizer and gradient clipping see one module as without pipelining; a
StageModule is a view of its share of it.

The MoE aux losses: each stage's ride on its output activation into the backward (`_AuxLossOnActivation`,
as Megatron-Core's MoEAuxLossAutoScaler), so every stage's routers get the gradient of ce + aux. Both are
divided by the number of micro-batches before their backward, as the trainer does without pipelining (not
the gradients after the schedule: the data-parallel reduction starts during each stage's last backward).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from ..config import Config, stage_layers
from ..model.moe import MoEStats
from .groups import ProcessGroupManager


def stages_of(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """The stages pp rank `pp_rank` runs: pp_rank, pp_rank + pp, ... (loop placement)."""
    return [pp_rank + k * pp for k in range(virtual)]


def layer_ranges(cfg: Config) -> list[range]:
    """Each stage's layers, in stage order."""
    par = cfg.parallel
    counts = stage_layers(cfg.model.n_layer, par.pp * par.pp_virtual_stages, par.pp_layers)
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return [range(a, a + n) for a, n in zip(starts, counts)]


def keep_stages(model: nn.Module, cfg: Config, pp_rank: int) -> nn.Module:
    """Drop from `model` (meta-built, before any sharding) what pp rank `pp_rank`'s stages do not run."""
    par = cfg.parallel
    mine = stages_of(pp_rank, par.pp, par.pp_virtual_stages)
    ranges = layer_ranges(cfg)
    keep = sorted(i for s in mine for i in ranges[s])
    model.layers = nn.ModuleDict({str(i): model.layers[i] for i in keep})
    if 0 not in mine:
        model.embed_tokens = None
    if len(ranges) - 1 not in mine:
        model.norm, model.lm_head = None, None
    return model


class _AuxLossOnActivation(torch.autograd.Function):
    """y = h in forward; in backward h's gradient passes through and the aux loss gets gradient 1, so the
    stage's aux losses join the backward the schedule runs from the last stage's loss."""

    @staticmethod
    def forward(ctx, h: Tensor, aux: Tensor) -> Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


class StageModule(nn.Module):
    """One pipeline stage of a MoETransformerLM: its blocks (and the embedding on the first stage, the
    final norm and head on the last), registered under the model's names; the model itself is not a
    submodule, so the stage's parameters are its own share. forward(token ids or hidden) -> hidden or logits."""

    def __init__(self, model: nn.Module, index: int, n_stages: int, layers: range, seq_len: int):
        super().__init__()
        self.index, self.n_stages, self.seq_len = index, n_stages, seq_len
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        object.__setattr__(self, "model", model)  # a plain attribute: not this module's child
        self.embed_tokens = model.embed_tokens if self.is_first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.moe: Optional[MoEStats] = None  # the step's collector, set by Pipeline.step
        self.aux_scale = 1.0  # d(step loss) / d(aux loss): 1 / micro-batches (Pipeline)
        self.hidden_dtype: Optional[torch.dtype] = None  # what the next stage's receive buffer holds (Pipeline)
        self.aux_sum: Optional[Tensor] = None  # detached aux losses of this stage's forwards in the step

    def blocks(self) -> list[tuple[int, nn.Module]]:
        return [(int(i), block) for i, block in self.layers.items()]

    def forward(self, x: Tensor) -> Tensor:
        m = self.model
        cos, sin = m.rope_cos[:self.seq_len], m.rope_sin[:self.seq_len]
        h = m.embed(x) if self.is_first else x
        h = m.run_blocks(h, self.blocks(), cos, sin, moe=self.moe)
        if self.moe is not None:
            aux = self.moe.pop_aux_loss().to(h.device)
            self.aux_sum = aux.detach() if self.aux_sum is None else self.aux_sum + aux.detach()
            if aux.requires_grad:
                h = _AuxLossOnActivation.apply(h, aux * self.aux_scale)
        if self.is_last:
            return m.head(h)
        # the send copies raw bytes into a buffer of the declared dtype: never let autocast change it
        return h.to(self.hidden_dtype) if self.hidden_dtype is not None else h


def stage_modules(model: nn.Module, cfg: Config, pp_rank: int) -> list[StageModule]:
    """This rank's StageModules, in stage order, over a model keep_stages has cut."""
    par = cfg.parallel
    ranges = layer_ranges(cfg)
    return [StageModule(model, s, len(ranges), ranges[s], cfg.data.seq_len)
            for s in stages_of(pp_rank, par.pp, par.pp_virtual_stages)]


class _Stage(PipelineStage):
    """torch's PipelineStage, calling `on_last_backward(stage module)` before the stage's last micro-batch's
    backward (where the gradients' data-parallel reduction may start)."""

    on_last_backward: Optional[Callable[[nn.Module], None]] = None

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        if last_backward and self.on_last_backward is not None:
            self.on_last_backward(self.submod)
        return super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=full_backward,
                                          last_backward=last_backward)


class Pipeline:
    """This rank's stages under a torch.distributed.pipelining schedule (train.grad_accum_steps micro-batches).

    The shapes crossing stages are static (the residual stream [micro_batch, seq / tp under sequence
    parallelism, d_model] in `hidden_dtype`) and given to each PipelineStage, so no forward runs to infer them.
    """

    def __init__(self, stages: list[StageModule], cfg: Config, pgm: ProcessGroupManager,
                 loss_fn: Callable[[Tensor, Tensor], Tensor], hidden_dtype: torch.dtype,
                 on_last_backward: Optional[Callable[[nn.Module], None]] = None):
        par, tr = cfg.parallel, cfg.train
        self.modules, self.pgm, self.loss_fn = stages, pgm, loss_fn
        self.micro_batches = tr.grad_accum_steps
        self._ce: list[Tensor] = []  # the step's micro-batch cross entropies (last stage), detached
        B, S, H = tr.micro_batch_size, cfg.data.seq_len, cfg.model.d_model
        S_local = S // pgm.tp if pgm.tp > 1 and par.sequence_parallel else S
        self.hidden = (B, S_local, H)
        self.hidden_dtype = hidden_dtype
        for mod in stages:
            mod.hidden_dtype, mod.aux_scale = hidden_dtype, 1.0 / self.micro_batches
        dev = pgm.device
        # what crosses a stage boundary needs a gradient back
        hidden = torch.empty(self.hidden, dtype=hidden_dtype, device="meta", requires_grad=True)
        ids = torch.empty(B, S, dtype=torch.long, device="meta")
        logits = torch.empty(B, S, cfg.model.vocab_size, dtype=torch.float32, device="meta", requires_grad=True)
        self.stages = [_Stage(mod, mod.index, mod.n_stages, dev, input_args=ids if mod.is_first else hidden,
                              output_args=logits if mod.is_last else hidden, group=pgm.pp_group)
                       for mod in stages]
        for stage in self.stages:
            stage.on_last_backward = on_last_backward
        # the loss comes divided by the micro-batches, so the schedule leaves the gradients as they are
        kind = Schedule1F1B if par.pp_schedule == "1f1b" else ScheduleInterleaved1F1B
        self.schedule = kind(self.stages[0] if kind is Schedule1F1B else self.stages, self.micro_batches,
                             loss_fn=self._micro_batch_loss, scale_grads=False)
        self.holds_last = any(mod.is_last for mod in stages)

    def _micro_batch_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        ce = self.loss_fn(logits, targets)
        self._ce.append(ce.detach().float())
        return ce / self.micro_batches

    def step(self, inputs: Tensor, targets: Tensor, moe: Optional[MoEStats]) -> tuple[Tensor, Tensor]:
        """Forward and backward of one optimizer step's micro-batches ([grad_accum_steps * micro_batch, S] each);
        the gradients are those of the micro-batches' mean loss. Returns (sum of the micro-batches' cross
        entropy on the last stage's rank, else 0; sum of this rank's stages' aux losses), on the device."""
        for mod in self.modules:
            mod.moe, mod.aux_sum = moe, None
        self._ce = []
        first = any(mod.is_first for mod in self.modules)
        args = (inputs,) if first else ()
        try:
            if self.holds_last:
                self.schedule.step(*args, target=targets, return_outputs=False)
            else:
                self.schedule.step(*args, return_outputs=False)
        finally:
            for mod in self.modules:
                mod.moe = None
        zero = torch.zeros((), device=self.pgm.device)
        ce = torch.stack(self._ce).sum() if self._ce else zero
        aux = [mod.aux_sum for mod in self.modules if mod.aux_sum is not None]
        return ce, (torch.stack(aux).sum().float() if aux else zero)

    @torch.no_grad()
    def evaluate(self, batches, loss: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """Forward only, micro-batch by micro-batch through the stages in order (blocking sends and receives:
        validation is rare, and no schedule is kept for it). Returns the mean loss on the last stage's
        rank, 0 elsewhere."""
        group, pp = self.pgm.pp_group, self.pgm.pp
        peer = [dist.get_global_rank(group, r) for r in range(pp)]
        losses = []
        for inputs, targets in batches:
            for mod in self.modules:
                if mod.is_first:
                    h = inputs.to(self.pgm.device)
                else:
                    h = torch.empty(self.hidden, dtype=self.hidden_dtype, device=self.pgm.device)
                    dist.recv(h, src=peer[(mod.index - 1) % pp], group=group)
                out = mod(h)
                if mod.is_last:
                    losses.append(loss(out, targets.to(self.pgm.device)))
                else:
                    dist.send(out.contiguous(), dst=peer[(mod.index + 1) % pp], group=group)
        return torch.stack(losses).mean() if losses else torch.zeros((), device=self.pgm.device)
