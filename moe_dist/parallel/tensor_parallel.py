"""Tensor parallelism on DTensor (torch.distributed.tensor.parallel), with sequence parallelism.

Between blocks every tp rank holds 1/tp of the sequence (the residual stream is its local Shard(1) slice);
norms run on those slices (SequenceParallel: their weight's gradient is a partial sum, which DTensor
reduces where it is used). Each
block's branch gathers the sequence, computes on 1/tp of the weights and reduce-scatters back:

  embedding   vocab-parallel rows (RowwiseParallel), output Shard(1)
  attention   input all-gathered; q/k/v (MLA: q or q_b, kv_b) column-parallel by whole heads, o row-parallel
              reduce-scattered to Shard(1); MLA's low-rank q_a / kv_a projections and their norms see the
              whole input and are replicated; its shared rope key enters the heads' region (`copy_to_tp`)
  dense FFN   input all-gathered, gate/up column-parallel, down row-parallel reduce-scattered
  MoE         input all-gathered (moe_input): the router, capacity and balance losses see the whole micro-batch
              exactly as on one device; each rank dispatches only the assignments of its own tokens (its
              sequence shard), so under ep the all-to-all bytes per rank drop by tp; with expert_tp every
              rank runs every assignment through its 1/tp of each expert's width instead. Shared experts are
              a column/row-parallel SwiGLU. The output is sliced back to this rank's shard (moe_output).
  head        column-parallel over the vocabulary; the loss runs on the sharded logits (loss_parallel)

Every sharded parameter is a DTensor on the tp mesh; parameters outside a split region (router, MLA's
q_a/kv_a, shared-expert gate) stay plain tensors with identical values and gradients on every tp rank.

sequence_parallel=False (parallel.sequence_parallel, for comparison) is plain Megatron tp: the residual
stream and the norms replicated on every tp rank, the row-parallel outputs all-reduced, and every tp rank
dispatching all of the micro-batch's assignments (tp times the all-to-all bytes); each rank then counts
1/tp of the routed branch's gradient, summed over tp where the ranks meet (the experts over edp, the
gates and the layer input through copy_to_tp).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel,
                                               parallelize_module)
from torch.distributed.tensor.placement_types import _StridedShard

from ..model.mlp import SwiGLU
from ..model.moe import MoELayer
from ..model.moe.capacity import bucket_counts
from ..model.moe.dispatcher import dropped_last
from ..model.transformer import MLAttention, RMSNorm


def copy_to_tp(t: Tensor, mesh) -> Tensor:
    """Identity forward; the gradient all-reduced over tp backward: a replicated tensor that each rank
    uses with its share of the heads (or experts), so each holds part of its gradient."""
    return DTensor.from_local(t, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def _gather_sequence(t, mesh) -> Tensor:
    """A Shard(1) activation as the whole sequence on every rank (its gradient: this rank's slice)."""
    if not isinstance(t, DTensor):
        t = DTensor.from_local(t, mesh, [Shard(1)], run_check=False)
    return t.redistribute(mesh, [Replicate()]).to_local()


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _scatter_sequence(t: Tensor, mesh) -> Tensor:
    """The whole sequence, the same on every rank -> this rank's Shard(1) slice (its gradient: all-gathered)."""
    return DTensor.from_local(t, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()


class TensorParallelDispatcher:
    """Wraps a MoE layer's dispatcher (local or all-to-all) inside the tp region.

    expert_tp=False, sequence_parallel: this rank dispatches the assignments of its own tokens only (its
    sequence shard of the gathered micro-batch): for top-k (k per token, token-major) a static slice of the
    assignment list, for top-p and expert choice a keep mask; the combined output holds those tokens' rows,
    zeros elsewhere, and moe_output's slice keeps exactly them. expert_tp=True: every rank takes every
    assignment through its width shard of each expert; the partial sums are all-reduced in combine.
    expert_tp=False without sequence parallelism: every rank dispatches every assignment to whole experts
    (the same output everywhere) and takes 1/tp of its gradient. The gate weights enter the region
    through copy_to_tp (each rank's share of their gradient is summed)."""

    def __init__(self, inner, mesh, expert_tp: bool, sequence_parallel: bool = True):
        self.inner, self.mesh, self.expert_tp, self.sequence_parallel = inner, mesh, expert_tp, sequence_parallel
        self.n_experts, self.n_local_experts = inner.n_experts, inner.n_local_experts
        self.seq_len = None  # set by moe_input for each forward

    def dispatch(self, x: Tensor, routing):
        routing = dataclasses.replace(routing, gate=copy_to_tp(routing.gate, self.mesh))
        if self.expert_tp or not self.sequence_parallel:
            return self.inner.dispatch(copy_to_tp(x, self.mesh), routing)
        return self.inner.dispatch(x, self._own(routing))

    def _own(self, r):
        """The routing restricted to this rank's sequence shard, with its own rows per expert."""
        tp, rank, S = self.mesh.size(), self.mesh.get_local_rank(), self.seq_len
        T, E = r.scores.shape
        A = r.token.numel()
        if isinstance(r.k, int) and A == T * r.k:  # top-k: assignment t*k + j, a slice by shapes alone
            lo, hi = rank * S // tp, (rank + 1) * S // tp
            idx = torch.arange(A, device=r.token.device).view(T // S, S, r.k)[:, lo:hi].reshape(-1)
            pick = (lambda t: None if t is None else t.index_select(0, idx))
            r = dataclasses.replace(r, token=pick(r.token), expert=pick(r.expert), gate=pick(r.gate),
                                    keep=pick(r.keep), slot=pick(r.slot))
        else:
            own = (r.token % S) // (S // tp) == rank
            r = dataclasses.replace(r, keep=own if r.keep is None else r.keep & own)
        key, _ = dropped_last(r)
        return dataclasses.replace(r, kept_per_expert=bucket_counts(key, E + 1)[:E])

    def arrived(self, state):
        return self.inner.arrived(state)

    def send_back(self, y: Tensor, state):
        return self.inner.send_back(y, state)

    def combine(self, back: Tensor, state) -> Tensor:
        out = self.inner.combine(back, state)
        if self.expert_tp:  # partial sums over the width shards
            out = DTensor.from_local(out, self.mesh, [Partial()], run_check=False).redistribute(
                self.mesh, [Replicate()]).to_local()
        elif not self.sequence_parallel:  # the same output on every rank: each takes 1/tp of the gradient
            out = _ScaleGrad.apply(out, 1.0 / self.mesh.size())
        return out


def _moe_input(layer: MoELayer, mesh):
    def hook(module, args):
        x = _gather_sequence(args[0], mesh)
        layer.dispatcher.seq_len = x.shape[1]
        return (x,) + tuple(args[1:])
    return hook


def _moe_output(mesh):
    def hook(module, args, out):
        return _scatter_sequence(out, mesh)
    return hook


def _rope_key_into_heads(mesh, rope: int):
    """MLA: the shared rope key (the last `rope` columns of kv_a_proj_with_mqa) serves this rank's heads only."""
    def hook(module, args, out):
        latent, k_rope = out[..., :-rope], out[..., -rope:]
        return torch.cat([latent, copy_to_tp(k_rope, mesh)], dim=-1)
    return hook


def _per_head_norm(norm: RMSNorm, mesh) -> None:
    """A norm over each head's dims, shared by all heads: each rank normalises its own heads, so the
    weight's gradient is a partial sum (the rows are declared as this rank's: Shard(0) of the flattened heads)."""
    norm.weight = nn.Parameter(distribute_tensor(norm.weight.detach(), mesh, [Replicate()]))
    shape = []

    def into(module, args):
        x = args[0]
        shape[:] = x.shape
        return (DTensor.from_local(x.reshape(-1, x.shape[-1]), mesh, [Shard(0)], run_check=False),)

    norm.register_forward_pre_hook(into)
    norm.register_forward_hook(lambda module, args, out: out.to_local().view(shape))


def _attention_plan(attn, sequence_parallel: bool) -> dict:
    plan = {}
    if sequence_parallel:  # the whole sequence in, this rank's slice of the output out
        plan[""] = PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                      desired_input_layouts=(Replicate(), None, None, None), use_local_output=True)
    plan["o_proj"] = RowwiseParallel(output_layouts=Shard(1) if sequence_parallel else Replicate())
    if isinstance(attn, MLAttention):
        q = {"q_proj": ColwiseParallel()} if attn.q_lora_rank is None else {"q_b_proj": ColwiseParallel()}
        return {**plan, **q, "kv_b_proj": ColwiseParallel()}
    return {**plan, "q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel()}


def _swiglu_plan(sequence_parallel: bool) -> dict:
    """A SwiGLU split by width: on the sequence shards (a dense FFN under sequence parallelism) or on
    tokens every rank holds (shared experts; any FFN without sequence parallelism)."""
    plan = {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel()}
    if sequence_parallel:
        plan[""] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        plan["down_proj"] = RowwiseParallel(output_layouts=Shard(1))
    else:
        plan["down_proj"] = RowwiseParallel()
    return plan


def _plan(module: nn.Module, plan: dict, mesh) -> None:
    """parallelize_module with "" meaning the module itself."""
    if "" in plan:
        parallelize_module(module, mesh, plan.pop(""))
    if plan:
        parallelize_module(module, mesh, plan)


def apply_tensor_parallel(model: nn.Module, mesh, expert_tp: bool = False, sequence_parallel: bool = True) -> nn.Module:
    """Shard `model` (meta-built or materialised; its experts possibly ep-sharded already) over the tp mesh,
    in place; see the module docstring. The model's logits are then DTensors sharded over the vocabulary:
    compute the loss under torch.distributed.tensor.parallel.loss_parallel (train.runtime)."""
    between = Shard(1) if sequence_parallel else Replicate()  # the residual stream's layout between blocks
    top = {"embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=between),
           "lm_head": ColwiseParallel(input_layouts=between, output_layouts=Shard(-1), use_local_output=False)}
    if sequence_parallel:
        top["norm"] = SequenceParallel(use_local_output=True)
    _plan(model, {name: style for name, style in top.items() if getattr(model, name) is not None}, mesh)  # pipeline: a stage's
    for _, block in model.blocks():
        for name in ("attn_norm", "attn_out_norm", "ffn_norm", "ffn_out_norm"):
            if sequence_parallel and isinstance(getattr(block, name), RMSNorm):
                parallelize_module(getattr(block, name), mesh, SequenceParallel(use_local_output=True))
        _plan(block.attn, _attention_plan(block.attn, sequence_parallel), mesh)
        attn = block.attn
        if isinstance(attn, MLAttention):
            attn.kv_a_proj_with_mqa.register_forward_hook(_rope_key_into_heads(mesh, attn.rope))
        else:
            for norm in (attn.q_norm, attn.k_norm):
                if norm is not None:
                    _per_head_norm(norm, mesh)
        ffn = block.ffn
        if isinstance(ffn, SwiGLU):
            _plan(ffn, _swiglu_plan(sequence_parallel), mesh)
            continue
        if ffn.shared_experts is not None:
            _plan(ffn.shared_experts, _swiglu_plan(sequence_parallel=False), mesh)
        if expert_tp:  # each rank keeps its 1/tp of every expert's width: gate and up rows, down columns
            ex = ffn.experts
            ex.gate_up_proj = nn.Parameter(distribute_tensor(ex.gate_up_proj.detach(), mesh, [_StridedShard(1, split_factor=2)]))
            ex.down_proj = nn.Parameter(distribute_tensor(ex.down_proj.detach(), mesh, [Shard(2)]))
        ffn.dispatcher = TensorParallelDispatcher(ffn.dispatcher, mesh, expert_tp, sequence_parallel)
        if sequence_parallel:
            ffn.register_forward_pre_hook(_moe_input(ffn, mesh))
            ffn.register_forward_hook(_moe_output(mesh))
    model.tie_weights()  # both tables are rows of the vocabulary: the same DTensor shards
    return model
