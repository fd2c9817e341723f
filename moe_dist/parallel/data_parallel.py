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
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.placement_types import _StridedShard

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


class _Bucket:
    """Gradients reduced together: one flat buffer, one async all-reduce. The buffer lives from launch
    to finish only (kept, it would hold a second copy of these gradients through the optimizer step)."""

    def __init__(self, params: list[nn.Parameter], group, scale: float):
        self.params, self.group, self.scale = params, group, scale
        self.ready = 0  # gradients final for this backward
        self.started = False
        self.flat: Optional[Tensor] = None
        self.work = None

    def launch(self) -> None:
        self.started = True
        if self.group is None:  # nothing to exchange (experts at edp = 1): finish scales in place
            return
        grads = [local(p.grad) for p in self.params]
        self.flat = torch.cat([g.reshape(-1) for g in grads])
        self.work = dist.all_reduce(self.flat, group=self.group, async_op=True)

    def finish(self) -> None:
        if self.flat is None:
            if self.scale != 1.0:
                torch._foreach_mul_([local(p.grad) for p in self.params], self.scale)
            self.ready, self.started = 0, False
            return
        self.work.wait()
        if self.scale != 1.0:
            self.flat.mul_(self.scale)
        offset = 0
        for p in self.params:
            g = local(p.grad)
            g.copy_(self.flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        self.ready, self.started, self.work, self.flat = 0, False, None, None


class GradReducer:
    """Reduce gradients: dense over dp (average), experts over edp (sum / dp), overlapping backward.

    Parameters are packed into buckets of about `bucket_mb` (in the reverse order of the model's
    parameters, roughly the order backward finishes them). After arm(), each parameter's
    post-accumulate-grad hook counts it ready, and a bucket whose gradients are all final starts its
    all-reduce at once (async) while backward goes on; reduce(), before the optimizer step, starts what
    is left (every bucket, when nothing was armed), waits and writes the results back. The trainer arms
    only the last micro-batch's backward, so accumulation stays local until then; under pipeline
    parallelism each stage's parameters are armed before that stage's last backward.
    """

    def __init__(self, model: nn.Module, pgm: ProcessGroupManager, bucket_mb: float = 25.0):
        self.pgm = pgm
        dense, expert = split_parameters(model)
        # expert_tp: tp peers hold different width shards of every expert, so the shards are reduced
        # like dense tp shards, over dp (not over edp = dp*tp)
        self.dense = dense + [p for p in expert if sharded_over(p, "tp")]
        self.expert = [p for p in expert if not sharded_over(p, "tp")]
        self.armed: set[int] = set()  # ids of the parameters whose next backward is their step's last
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        if pgm.dp == 1 and pgm.edp == 1:
            return
        limit = bucket_mb * 2 ** 20
        for params, group in ((self.dense, pgm.dp_group if pgm.dp > 1 else None),
                              (self.expert, pgm.edp_group if pgm.edp > 1 else None)):
            by_dtype: dict[torch.dtype, list[list[nn.Parameter]]] = {}
            for p in reversed(params):
                chunks = by_dtype.setdefault(p.dtype, [[]])
                if chunks[-1] and sum(q.numel() * q.element_size() for q in chunks[-1]) >= limit:
                    chunks.append([])
                chunks[-1].append(p)
            self.buckets += [_Bucket(c, group, 1.0 / pgm.dp) for cs in by_dtype.values() for c in cs if c]
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        for b in self.buckets:
            for p in b.params:
                p.register_post_accumulate_grad_hook(self._ready)

    def arm(self, params: Optional[Iterable[Tensor]] = None) -> None:
        """Reduce during the next backward (the last micro-batch's) of `params` (default: every parameter)."""
        ids = {id(p) for p in params} if params is not None else set(self._bucket_of)
        self.armed |= ids & set(self._bucket_of)

    def _ready(self, p: Tensor) -> None:
        if id(p) not in self.armed:
            return
        b = self._bucket_of[id(p)]
        b.ready += 1
        if b.ready == len(b.params):
            b.launch()

    @torch.no_grad()
    def reduce(self) -> None:
        for b in self.buckets:
            if not b.started:  # not started in backward
                for p in b.params:
                    if p.grad is None:  # every rank must reduce the same buffers
                        p.grad = torch.zeros_like(p)
                b.launch()
        for b in self.buckets:
            b.finish()
        self.armed = set()


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
def update_expert_bias(model: nn.Module, stats: list[dict[str, Tensor]], pgm: ProcessGroupManager) -> None:
    """Aux-loss-free balancing step with loads counted over the whole data-parallel batch; stats:
    MoEStats.layers() of the step."""
    model.update_expert_bias(reduce_expert_loads([s["load"] for s in stats], pgm))


def sharded_over(p: Tensor, mesh_dim: str) -> bool:
    """Whether tensor p is a DTensor split over the mesh dimension named `mesh_dim` ("tp", "ep", "dp", ...)."""
    if not isinstance(p, DTensor):
        return False
    names = p.device_mesh.mesh_dim_names or ()
    return mesh_dim in names and _shards(p.placements[names.index(mesh_dim)])


def _shards(placement) -> bool:
    """Shard or _StridedShard (not a Shard subclass): each rank holds a different part."""
    return placement.is_shard() or isinstance(placement, _StridedShard)


def _square_sums(params: Iterable[nn.Parameter]) -> tuple[list, dict]:
    """Sums of squared local gradients: (replicated plain tensors, {(mesh, shard dims): DTensor shards})."""
    plain, sharded = [], {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):
                g = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])
            dims = tuple(i for i, pl in enumerate(g.placements) if _shards(pl))
            sharded.setdefault((g.device_mesh, dims), []).append(g.to_local().float().square().sum())
        else:
            plain.append(g.float().square().sum())
    return plain, sharded


@torch.no_grad()
def grad_norm(model: nn.Module, pgm: ProcessGroupManager, split: Optional[tuple] = None) -> Tensor:
    """Global L2 norm of the (reduced) gradients: a DTensor gradient (expert-parallel, FSDP2) counts each
    shard once, summed over the mesh dimensions it is sharded on; a plain one is the same on every rank."""
    dense, expert = split or split_parameters(model)
    plain, sharded = _square_sums(dense + expert)
    total = torch.stack(plain).sum() if plain else torch.zeros((), device=pgm.device)
    for (mesh, dims), sums in sharded.items():
        sq = torch.stack(sums).sum()
        for d in dims:
            if mesh.size(d) > 1:
                dist.all_reduce(sq, group=mesh.get_group(d))
        total = total + sq
    if pgm.pp > 1:  # each pipeline stage holds other parameters: their squares add up
        dist.all_reduce(total, group=pgm.pp_group)
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


def apply_fsdp(model: nn.Module, pgm: ProcessGroupManager, bf16: bool, reshard_after_forward: bool = True,
               stages: Optional[list[nn.Module]] = None) -> nn.Module:
    """fully_shard every block (dense parameters over dp), the routed experts over edp, then the rest
    (embedding, final norm, head) at the root; as torchtitan does. Works on a meta-device model.

    Gradients: FSDP2 reduce-scatters and divides by the mesh size. Dense: the dp mean, as required. Routed
    experts: each rank's expert gradient already sums its ep group's tokens, so the edp sum is divided by
    dp, not edp (moe_dist.parallel.data_parallel's module docstring). reshard_after_forward=False keeps
    the gathered parameters from forward to backward: ZeRO-2's trade-off (more memory, one gather per step).
    Each block prefetches the next block's gather in forward and the previous one's in backward.
    Under pipeline parallelism the roots are the rank's `stages` (moe_dist.parallel.pipeline.StageModule,
    what the schedule runs), not the model, and prefetching stays within a stage."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..model.moe.layer import MoELayer

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    dp_mesh, edp_mesh = pgm.dense_mesh["dp"], pgm.expert_mesh["edp"]
    blocks = [block for _, block in model.blocks()]
    for block in blocks:
        if isinstance(block.ffn, MoELayer):
            experts = fully_shard(block.ffn.experts, mesh=edp_mesh, reshard_after_forward=reshard_after_forward,
                                  mp_policy=mp)
            if pgm.edp > 1:  # over a mesh of one FSDP2 divides by nothing: the runtime divides then
                experts.set_gradient_divide_factor(float(pgm.dp))
                if pgm.device.type != "cuda":  # gloo has no PREMUL_SUM: sum, then divide
                    experts.set_force_sum_reduction_for_comms(True)
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    tables = [t for t in (model.embed_tokens, model.lm_head) if t is not None]  # a pipeline stage may hold neither
    if not (len(tables) == 2 and model.lm_head.weight is model.embed_tokens.weight):
        # units of their own: the vocabulary tables (the largest dense tensors) are gathered only around
        # their own forward and backward, not through the whole step as the root's parameters are
        for table in tables:
            fully_shard(table, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    for root in stages or [model]:
        fully_shard(root, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
        chain = [block for _, block in root.blocks()]
        for before, after in zip(chain, chain[1:]):
            before.set_modules_to_forward_prefetch([after])
            after.set_modules_to_backward_prefetch([before])
    return model


def shard_of(p: Tensor):
    """(global shape, the global indices along each dim of this rank's slice, the local tensor) of a
    parameter (moe_dist.model.init, checkpoint.init_from). A DTensor's placements are applied mesh dim by
    mesh dim to index ranges, as DTensor splits a tensor: Shard(d) takes this rank's chunk of dim d;
    _StridedShard(d, sf) (FSDP2 over another split, expert_tp's gate and up) its chunk of each of sf pieces."""
    if not isinstance(p, DTensor):
        return p.shape, [torch.arange(n) for n in p.shape], p
    idx = [torch.arange(n) for n in p.shape]
    coords = p.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(p.placements):
        if not _shards(placement):
            continue
        d, n, c = placement.dim % p.dim(), p.device_mesh.size(mesh_dim), coords[mesh_dim]
        pieces = idx[d].chunk(placement.split_factor) if isinstance(placement, _StridedShard) else [idx[d]]
        idx[d] = torch.cat([piece.chunk(n)[c] if c < len(piece.chunk(n)) else piece[:0] for piece in pieces])
    return p.shape, idx, p.to_local()
