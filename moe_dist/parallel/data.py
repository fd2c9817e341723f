"""Data parallelism for an expert-parallel model: gradient reduction, loads, norms, parameter sync.

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
        all_reduce_([p.grad for p in self.dense], pgm.dp_group if pgm.dp > 1 else None, 1.0 / pgm.dp)
        all_reduce_([p.grad for p in self.expert], pgm.edp_group if pgm.edp > 1 else None, 1.0 / pgm.dp)


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


@torch.no_grad()
def grad_norm(model: nn.Module, pgm: ProcessGroupManager, split: Optional[tuple] = None) -> Tensor:
    """Global L2 norm of the (reduced) gradients: dense ones are replicated, expert ones sharded over ep."""
    dense, expert = split or split_parameters(model)
    def sq(ps: Iterable[nn.Parameter]) -> Tensor:
        gs = [p.grad.float().square().sum() for p in ps if p.grad is not None]
        return torch.stack(gs).sum() if gs else torch.zeros((), device=pgm.device)
    # tensor parallel: sharded parameters (attribute tensor_model_parallel, set by
    # moe_dist.parallel.tensor) are summed over tp; replicated ones (norms, router, experts
    # under the token split) are identical on the tp ranks and counted once
    def tp_sharded(p) -> bool:
        return getattr(p, "tensor_model_parallel", False)
    e = sq(p for p in expert if not tp_sharded(p))
    if pgm.ep_group is not None and pgm.ep > 1:
        dist.all_reduce(e, group=pgm.ep_group)
    t = sq(p for p in dense + expert if tp_sharded(p))
    if pgm.tp_group is not None and pgm.tp > 1:
        dist.all_reduce(t, group=pgm.tp_group)
    return (sq(p for p in dense if not tp_sharded(p)) + e + t).sqrt()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, pgm: ProcessGroupManager, max_norm: float,
                    split: Optional[tuple] = None) -> Tensor:
    """Clip by the global norm over all shards; returns the norm before clipping (same on every rank)."""
    split = split or split_parameters(model)
    norm = grad_norm(model, pgm, split)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in split[0] + split[1]:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device))
    return norm
