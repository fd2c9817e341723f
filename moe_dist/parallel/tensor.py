"""Megatron-style tensor parallelism, applied to a plain one-device model by swapping modules.

The model files never import torch.distributed; `apply_tensor_parallel(model, tp_group)` slices
the weights of an already built model, so a model built with the same seed on every rank
computes exactly the one-device function.

Regions (Megatron-LM, Shoeybi et al. 2019). Activations outside a region are replicated on the
tp ranks; a region is entered with `copy_to_tp` (identity forward, all-reduce of the gradient
backward) and left with `reduce_from_tp` (all-reduce forward, identity backward):
  attention   x -> copy -> q/k/v column-parallel (local heads) -> SDPA -> o row-parallel -> reduce
  SwiGLU      x -> copy -> gate/up column-parallel -> silu(g)*u -> down row-parallel -> reduce
  embedding   vocab-parallel rows, out-of-shard ids give 0 -> reduce
  lm_head     copy -> column-parallel over the vocabulary -> logits stay sharded [.., V/tp]
              -> vocab_parallel_cross_entropy (all-reduce of max, sum-exp and target logit)
  MoE         router and losses replicated (every tp rank routes the same tokens the same way,
              so capacity drops and balance losses equal the one-device ones); the routed path
              is a region entered with copy_to_tp on both the tokens and the gate weights and
              left with reduce_from_tp, inside which each tp rank does 1/tp of the work:
              expert_tp=False: experts unsplit; rank r takes the kept assignments of the r-th
                contiguous slice of the tokens (Megatron's token split), dispatches them through
                the (expert-parallel) dispatcher and writes their combined rows; the all-reduce
                assembles the full output. Expert gradients are then partial sums over tp: they
                are summed over the expert-data-parallel group (which contains the tp peers,
                edp = dp*tp/ep) and divided by dp, as Megatron-Core and DeepSpeed ZeRO do.
              expert_tp=True: every expert's gate/up rows and down columns are split over tp;
                each rank runs all tokens through its shard of every expert; the all-reduce sums
                the partial outputs. Expert shards carry the tp rank like dense shards.
              Shared experts are a SwiGLU and split like a dense FFN.
Replicated parameters (norms, router, shared-expert gate) get identical gradients on every tp
rank, so they need no reduction over tp. Sharded parameters are marked `tensor_model_parallel`
(the attribute Megatron and DeepSpeed read, e.g. to count them once in the gradient norm).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.gemm import linear
from ..model.mlp import SwiGLU
from ..model.moe import MoELayer
from ..model.moe.experts import GroupedExperts
from ..model.moe.router import Routing
from ..model.transformer import Attention, MoETransformerLM

# ---------------------------------------------------------------------------------------------
# Autograd functions at region boundaries


def _all_reduce(x: Tensor, group) -> Tensor:
    x = x.clone()  # never write into a tensor autograd may have saved
    dist.all_reduce(x, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce backward: a replicated input used by every shard."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad.contiguous(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward: partial sums become the replicated output."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        return _all_reduce(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather on the last dim forward, keep my slice backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        n, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(n, dim=-1)[r].contiguous(), None


def copy_to_tp(x: Tensor, group) -> Tensor:
    return _CopyToTP.apply(x, group) if _size(group) > 1 else x


def reduce_from_tp(x: Tensor, group) -> Tensor:
    return _ReduceFromTP.apply(x, group) if _size(group) > 1 else x


def gather_from_tp(x: Tensor, group) -> Tensor:
    return _GatherFromTP.apply(x, group) if _size(group) > 1 else x


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _shard(n: int, group, what: str) -> tuple[int, int]:
    """(start, size) of this rank's contiguous 1/tp of n."""
    tp, r = _size(group), dist.get_rank(group)
    if n % tp:
        raise ValueError(f"{what}={n} is not divisible by tp={tp}; pick sizes divisible by parallel.tp")
    return r * (n // tp), n // tp


def _mark(p: nn.Parameter, dim: int) -> nn.Parameter:
    p.tensor_model_parallel = True  # Megatron / DeepSpeed attribute names
    p.partition_dim = dim
    return p


# ---------------------------------------------------------------------------------------------
# Layers built from an existing one-device layer


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W[rows of this rank].T; W's output rows split over tp.

    `rows`: the output rows this rank keeps (default: its contiguous 1/tp). `copy_input`
    enters the tp region here; turn it off when the enclosing module already did (one
    all-reduce per block instead of one per projection). `gather_output` all-gathers y.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], group, copy_input: bool = True,
                 gather_output: bool = False):
        super().__init__()
        self.group, self.copy_input, self.gather_output = group, copy_input, gather_output
        self.weight = _mark(nn.Parameter(weight.detach().clone()), 0)
        self.bias = _mark(nn.Parameter(bias.detach().clone()), 0) if bias is not None else None
        self.gemm = "auto"  # model.cpu_gemm, from the Linear it replaces

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, rows: Optional[Tensor] = None, **kw) -> "ColumnParallelLinear":
        if rows is None:
            start, n = _shard(linear.out_features, group, "out_features")
            rows = torch.arange(start, start + n)
        bias = linear.bias[rows] if linear.bias is not None else None
        out = cls(linear.weight[rows], bias, group, **kw)
        out.gemm = getattr(linear, "gemm", "auto")
        return out

    def forward(self, x: Tensor) -> Tensor:
        if self.copy_input:
            x = copy_to_tp(x, self.group)
        y = linear(x, self.weight, self.bias, self.gemm)
        return gather_from_tp(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out_local={self.weight.shape[0]}, tp={_size(self.group)}"


class RowParallelLinear(nn.Module):
    """y = reduce_tp(x_local @ W[:, cols of this rank].T) + b; x arrives already split."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], group):
        super().__init__()
        self.group = group
        self.weight = _mark(nn.Parameter(weight.detach().clone()), 1)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None  # replicated
        self.gemm = "auto"  # model.cpu_gemm, from the Linear it replaces

    @classmethod
    def from_linear(cls, linear: nn.Linear, group) -> "RowParallelLinear":
        start, n = _shard(linear.in_features, group, "in_features")
        out = cls(linear.weight[:, start:start + n], linear.bias, group)
        out.gemm = getattr(linear, "gemm", "auto")
        return out

    def forward(self, x: Tensor) -> Tensor:
        y = reduce_from_tp(linear(x, self.weight, None, self.gemm), self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_local={self.weight.shape[1]}, out={self.weight.shape[0]}, tp={_size(self.group)}"


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V/tp) of the table on this rank; other ids look up zeros, then all-reduce."""

    def __init__(self, embedding: nn.Embedding, group):
        super().__init__()
        self.group = group
        self.num_embeddings = embedding.num_embeddings
        self.start, n = _shard(embedding.num_embeddings, group, "model.vocab_size")
        self.weight = _mark(nn.Parameter(embedding.weight[self.start:self.start + n].detach().clone()), 0)

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(y, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token -log softmax(logits)[target] with the vocabulary split over tp (Megatron).

    Numerically stable: subtract the global max (all-reduce MAX), then all-reduce the local
    sum of exp and the target logit (found on exactly one rank). Backward: softmax - onehot,
    computed on the local shard only.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, group, ignore_index: int) -> Tensor:
        logits = logits.float()
        V_local = logits.shape[-1]
        start = dist.get_rank(group) * V_local
        gmax = logits.max(dim=-1).values
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - gmax.unsqueeze(-1)
        local_t = target - start
        mine = (local_t >= 0) & (local_t < V_local)
        local_t = local_t.masked_fill(~mine, 0)
        target_logit = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = shifted.exp_()  # reuse the buffer; becomes the softmax below
        sum_exp = exp.sum(dim=-1)
        both = torch.stack([target_logit, sum_exp])
        dist.all_reduce(both, group=group)
        target_logit, sum_exp = both[0], both[1]
        loss = sum_exp.log() - target_logit
        ignored = target == ignore_index
        loss = loss.masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_t, mine, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        softmax, local_t, mine, ignored = ctx.saved_tensors
        g = softmax.clone()
        flat = g.view(-1, g.shape[-1])
        rows = torch.arange(flat.shape[0], device=g.device)
        flat[rows, local_t.view(-1)] -= mine.view(-1).to(g.dtype)
        g.mul_(grad.masked_fill(ignored, 0.0).unsqueeze(-1))
        return g, None, None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, group, ignore_index: int = -100,
                                 reduction: str = "mean") -> Tensor:
    """logits: [..., V/tp] this rank's vocabulary shard; target: [...] global ids."""
    if _size(group) == 1:
        return F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), ignore_index=ignore_index,
                               reduction=reduction).view(target.shape if reduction == "none" else ())
    loss = _VocabParallelCrossEntropy.apply(logits, target, group, ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum().clamp_min(1)


def cross_entropy(logits: Tensor, target: Tensor, group=None, **kw) -> Tensor:
    """The LM loss for a model that may be tensor-parallel: pass the tp group (or None)."""
    return vocab_parallel_cross_entropy(logits, target, group, **kw)


# ---------------------------------------------------------------------------------------------
# Blocks


def _enter_region(module: nn.Module, group) -> None:
    """Apply copy_to_tp to the module's first input once (its column-parallel layers then skip it)."""

    def hook(_mod, args):
        return (copy_to_tp(args[0], group),) + tuple(args[1:])

    module.register_forward_pre_hook(hook)


def parallelize_attention(attn: Attention, group) -> None:
    """Split heads over tp: q/k/v column-parallel by whole heads, o row-parallel."""
    tp = _size(group)
    if attn.n_head % tp:
        raise ValueError(f"model.n_head={attn.n_head} is not divisible by parallel.tp={tp}")
    if attn.n_kv_head % tp:
        raise ValueError(f"model.n_kv_head={attn.n_kv_head} is not divisible by parallel.tp={tp}; "
                         "pick tp dividing n_kv_head (replicating kv heads is not supported)")
    attn.q_proj = ColumnParallelLinear.from_linear(attn.q_proj, group, copy_input=False)
    attn.k_proj = ColumnParallelLinear.from_linear(attn.k_proj, group, copy_input=False)
    attn.v_proj = ColumnParallelLinear.from_linear(attn.v_proj, group, copy_input=False)
    attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, group)
    attn.n_head, attn.n_kv_head = attn.n_head // tp, attn.n_kv_head // tp  # local heads
    _enter_region(attn, group)


def parallelize_swiglu(mlp: SwiGLU, group) -> None:
    mlp.gate_proj = ColumnParallelLinear.from_linear(mlp.gate_proj, group, copy_input=False)
    mlp.up_proj = ColumnParallelLinear.from_linear(mlp.up_proj, group, copy_input=False)
    mlp.down_proj = RowParallelLinear.from_linear(mlp.down_proj, group)
    _enter_region(mlp, group)


@torch.no_grad()
def shard_experts(experts: GroupedExperts, group) -> None:
    """expert_tp: keep this rank's 1/tp of every expert's width (gate rows, up rows, down columns)."""
    F_ = experts.d_expert
    start, n = _shard(F_, group, "moe.d_expert")
    gate_up = experts.gate_up_proj
    rows = torch.cat([torch.arange(start, start + n), F_ + torch.arange(start, start + n)])
    experts.gate_up_proj = _mark(nn.Parameter(gate_up[:, rows].clone()), 1)  # [E, 2F/tp, H]
    experts.down_proj = _mark(nn.Parameter(experts.down_proj[:, :, start:start + n].clone()), 2)  # [E, H, F/tp]
    experts.d_expert = n


class TensorParallelDispatcher:
    """Wraps the MoE layer's dispatcher (local or expert-parallel) to make the routed path a tp region.

    split_tokens=True (experts unsplit): this rank handles the kept assignments of its token slice.
    split_tokens=False (expert_tp): this rank handles every assignment with its expert shards.
    Either way the combined [T, H] output holds partial sums that reduce_from_tp completes.
    """

    def __init__(self, inner, group, split_tokens: bool):
        self.inner, self.group, self.split_tokens = inner, group, split_tokens
        self.n_experts = inner.n_experts
        self.n_local_experts = inner.n_local_experts

    def dispatch(self, x: Tensor, routing: Routing):
        x = copy_to_tp(x, self.group)
        gate = copy_to_tp(routing.gate, self.group)
        keep = routing.keep
        if self.split_tokens:
            T, tp, r = x.shape[0], _size(self.group), dist.get_rank(self.group)
            per = -(-T // tp)  # ceil: rank r owns tokens [r*per, (r+1)*per)
            mine = (routing.token // per) == r
            keep = mine if keep is None else keep & mine
        return self.inner.dispatch(x, dataclasses.replace(routing, gate=gate, keep=keep))

    def combine(self, y: Tensor, state) -> Tensor:
        return reduce_from_tp(self.inner.combine(y, state), self.group)


def parallelize_moe(layer: MoELayer, group, expert_tp: bool) -> None:
    """Router replicated; routed experts token-split (default) or width-split (expert_tp)."""
    if expert_tp:
        shard_experts(layer.experts, group)
    else:
        for p in layer.experts.parameters():
            p.tp_partial_grad = True  # summed over tp via the edp reduction (see module docstring)
    layer.dispatcher = TensorParallelDispatcher(layer.dispatcher, group, split_tokens=not expert_tp)
    if layer.shared_experts is not None:
        parallelize_swiglu(layer.shared_experts, group)


# ---------------------------------------------------------------------------------------------
# Whole model


def apply_tensor_parallel(model: MoETransformerLM, tp_group, expert_tp: bool = False) -> MoETransformerLM:
    """Swap the modules of a built model for their tp shards, in place; returns the model.

    Call it after expert parallelism has installed its dispatcher (the tp wrapper wraps it).
    The model's output is then this rank's vocabulary shard of the logits; compute the loss
    with `cross_entropy(logits, targets, tp_group)`.
    """
    if _size(tp_group) == 1:
        return model
    cfg = model.config
    tied = cfg.tie_embeddings
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, tp_group)
    for block in model.layers:
        parallelize_attention(block.attn, tp_group)
        if isinstance(block.ffn, MoELayer):
            parallelize_moe(block.ffn, tp_group, expert_tp)
        else:
            parallelize_swiglu(block.ffn, tp_group)
    model.lm_head = ColumnParallelLinear.from_linear(model.lm_head, tp_group)
    if tied:  # both are rows [start, start + V/tp) of the same table
        model.lm_head.weight = model.embed_tokens.weight
    model.tp_group = tp_group
    return model
