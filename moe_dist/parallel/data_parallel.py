"""Data parallelism for an expert-parallel model: gradient reduction (all-reduce at zero_stage 0, FSDP2
at zero_stage 3), norms over every shard, and the loads of the data-parallel batch.

Which gradient every rank must end with: the single-process gradient of the mean loss over the
global batch, L = (1/dp) * sum_r L_r, where L_r is rank r's loss on its own micro-batch (a mean
over its tokens; with gradient accumulation the trainer divides each micro-batch loss by the
number of micro-batches, and `reduce()` runs once after the last one).

- Dense parameter w: rank r's backward gives dL_r/dw, so grad = (1/dp) * sum over dp of them:
  an all-reduce average over the dp group.
- Expert parameter w_e (held by one ep rank of each ep group): the reverse all-to-all carries
  the gradient of every rank of the ep group, so after backward the rank holds
  sum_{s in ep group} dL_s/dw_e. The edp group holds the copies of w_e, one per ep group, and
  the ep groups partition the world, so summing over edp gives sum over ALL ranks of dL_s/dw_e:
  grad = (1/dp) * all_reduce_sum over edp. (An edp average alone would be off by a factor ep.)

Everything is the identity in a world of one.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor, Replicate

from ..model.moe.experts import GroupedExperts
from .groups import ProcessGroupManager


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) trainable parameters; expert = the stacked weights of GroupedExperts."""
    expert_ids = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    dense, expert, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (expert if id(p) in expert_ids else dense).append(p)
    return dense, expert


def local(t: Tensor) -> Tensor:
    """This rank's values of a (possibly DTensor) tensor, sharing its storage."""
    return t.to_local() if isinstance(t, DTensor) else t


def all_reduce_(tensors: list[Tensor], group, scale: float = 1.0) -> None:
    """Sum `tensors` in place over `group` (one flat buffer per dtype), then multiply by scale."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = _flatten_dense_tensors(ts)
        if group is not None:
            dist.all_reduce(flat, group=group)
        if scale != 1.0:
            flat.mul_(scale)
        for t, reduced in zip(ts, _unflatten_dense_tensors(flat, ts)):
            t.copy_(reduced)


class GradReducer:
    """Reduce gradients after the last micro-batch: dense over dp (average), experts over edp (sum / dp)."""

    def __init__(self, model: nn.Module, pgm: ProcessGroupManager):
        self.pgm = pgm
        self.dense, self.expert = split_parameters(model)
        # expert_tp (moe_dist.parallel.tensor, ep = 1): tp peers hold different shards of every
        # expert, so the shards are reduced like dense tp shards, over dp (not over edp = dp*tp)
        tp_split = [p for p in self.expert if getattr(p, "tensor_model_parallel", False)]
        if tp_split:
            self.dense += tp_split
            self.expert = [p for p in self.expert if not getattr(p, "tensor_model_parallel", False)]

    @torch.no_grad()
    def reduce(self) -> None:
        pgm = self.pgm
        if pgm.dp == 1 and pgm.edp == 1:
            return
        for p in self.dense + self.expert:
            if p.grad is None:  # every rank must reduce the same buffers
                p.grad = torch.zeros_like(p)
        all_reduce_([local(p.grad) for p in self.dense], pgm.dp_group if pgm.dp > 1 else None, 1.0 / pgm.dp)
        all_reduce_([local(p.grad) for p in self.expert], pgm.edp_group if pgm.edp > 1 else None, 1.0 / pgm.dp)


def reduce_counts_fn(pgm: ProcessGroupManager):
    """A function summing a tensor over the dp group (MoELayer.reduce_counts for global-batch balance)."""
    def reduce_counts(t: Tensor) -> Tensor:
        if pgm.dp_group is None or pgm.dp == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, group=pgm.dp_group)
        return t
    return reduce_counts


@torch.no_grad()
def reduce_expert_loads(loads: list[Tensor], pgm: ProcessGroupManager) -> list[Tensor]:
    """Per MoE layer [E] tokens per expert, summed over the dp batch (for the expert-bias update)."""
    if not loads or pgm.dp == 1:
        return loads
    stacked = torch.stack([l.float() for l in loads])
    dist.all_reduce(stacked, group=pgm.dp_group)
    return list(stacked.unbind(0))


@torch.no_grad()
def update_expert_bias(model: nn.Module, pgm: ProcessGroupManager) -> None:
    """Aux-loss-free balancing step with loads counted over the whole data-parallel batch."""
    loads = [s["load"] for s in model.moe_stats()]
    model.update_expert_bias(reduce_expert_loads(loads, pgm))


def _square_sums(params: Iterable[nn.Parameter]) -> tuple[Tensor, dict, Optional[Tensor]]:
    """Sums of squared local gradients: (replicated plain tensors, {(mesh, shard dims): DTensor shards},
    hand-sliced tensor-parallel shards)."""
    plain, sharded, tp_split = [], {}, []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):
                g = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])
            dims = tuple(i for i, pl in enumerate(g.placements) if pl.is_shard())
            sharded.setdefault((g.device_mesh, dims), []).append(g.to_local().float().square().sum())
        elif getattr(p, "tensor_model_parallel", False):
            tp_split.append(g.float().square().sum())
        else:
            plain.append(g.float().square().sum())
    return plain, sharded, tp_split


@torch.no_grad()
def grad_norm(model: nn.Module, pgm: ProcessGroupManager, split: Optional[tuple] = None) -> Tensor:
    """Global L2 norm of the (reduced) gradients: a DTensor gradient (expert-parallel, FSDP2) counts each
    shard once, summed over the mesh dimensions it is sharded on; a plain one is the same on every rank."""
    dense, expert = split or split_parameters(model)
    plain, sharded, tp_split = _square_sums(dense + expert)
    total = torch.stack(plain).sum() if plain else torch.zeros((), device=pgm.device)
    for (mesh, dims), sums in sharded.items():
        sq = torch.stack(sums).sum()
        for d in dims:
            if mesh.size(d) > 1:
                dist.all_reduce(sq, group=mesh.get_group(d))
        total = total + sq
    if tp_split:  # hand-sliced tensor-parallel shards (moe_dist.parallel.tensor): summed over tp
        sq = torch.stack(tp_split).sum()
        if pgm.tp_group is not None and pgm.tp > 1:
            dist.all_reduce(sq, group=pgm.tp_group)
        total = total + sq
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, pgm: ProcessGroupManager, max_norm: float,
                    split: Optional[tuple] = None) -> Tensor:
    """Clip by the global norm over all shards; returns the norm before clipping (same on every rank)."""
    split = split or split_parameters(model)
    norm = grad_norm(model, pgm, split)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in split[0] + split[1]:
        if p.grad is not None:
            local(p.grad).mul_(coef.to(p.grad.device))
    return norm


# ---------------------------------------------------------------------------------------------
# Fully sharded data parallelism (ZeRO-3), torch FSDP2


def apply_fsdp(model: nn.Module, pgm: ProcessGroupManager, bf16: bool, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard every block (dense parameters over dp), the routed experts over edp, then the rest
    (embedding, final norm, head) at the root; as torchtitan does. Works on a meta-device model.

    Gradients: FSDP2 reduce-scatters and divides by the mesh size. Dense: the dp mean, as required. Routed
    experts: each rank's expert gradient already sums its ep group's tokens, so the edp sum is divided by
    dp, not edp (moe_dist.parallel.data_parallel's module docstring). reshard_after_forward=False keeps
    the gathered parameters from forward to backward: ZeRO-2's trade-off (more memory, one gather per step).
    Each block prefetches the next block's gather in forward and the previous one's in backward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..model.moe.layer import MoELayer

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    dp_mesh, edp_mesh = pgm.dense_mesh["dp"], pgm.expert_mesh["edp"]
    blocks = list(model.layers)
    for block in blocks:
        if isinstance(block.ffn, MoELayer):
            experts = fully_shard(block.ffn.experts, mesh=edp_mesh, reshard_after_forward=reshard_after_forward,
                                  mp_policy=mp)
            experts.set_gradient_divide_factor(float(pgm.dp))
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    for before, after in zip(blocks, blocks[1:]):
        before.set_modules_to_forward_prefetch([after])
        after.set_modules_to_backward_prefetch([before])
    return model


def shard_of(p: Tensor):
    """(global shape, offset of this rank's slice, the local tensor) of a parameter (moe_dist.model.init)."""
    if isinstance(p, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return p.shape, offset, p.to_local()
    return p.shape, [0] * p.dim(), p
