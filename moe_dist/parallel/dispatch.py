"""All-to-all token dispatcher: expert parallelism behind LocalDispatcher's two methods.

Experts are placed contiguously: ep rank r holds experts [r*E_l, (r+1)*E_l), E_l = E / ep.

dispatch(x [T, H], routing) -> (rows [N, H] sorted by local expert, counts [E_l], state)
  1. permute the kept assignments by destination rank (= by global expert),
  2. dropless: exchange the rows-per-expert counts (all_to_all_single on [E] ints), then move
     the rows with a variable-split all_to_all_single;
     capacity: every (routing group, expert) pair owns C slots, so each rank sends exactly
     E_l * G * C rows to every rank (zero rows pad the free slots) and no counts travel,
  3. reorder what arrived from (source rank, local expert) to (local expert, source rank) so the
     local experts run as one grouped matmul.
combine(y [N, H], state) -> [T, H]: undo 3, reverse all-to-all, weight by the gates and sum
per token. torch.distributed's all_to_all_single has no autograd; `all_to_all` below does, its
backward being the reverse exchange.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from ..model.moe.router import Routing


@dataclass
class CommStats:
    """Cheap counters, summed over forward calls until reset(). Times only when `timing` is on."""

    rows_sent: int = 0  # rows leaving this rank in the dispatch (this rank's own included)
    rows_received: int = 0  # rows arriving for the local experts (padding slots included)
    tokens_received: int = 0  # real (not padding) rows for the local experts; dropless only
    bytes_sent: int = 0  # all-to-all payload to OTHER ranks, forward + backward, dispatch + combine
    comm_s: float = 0.0  # seconds in all-to-alls (forward and backward)
    compute_s: float = 0.0  # seconds between dispatch and combine (the local experts)
    calls: int = 0

    def reset(self) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, type(getattr(self, f))())

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def _remote_rows(splits: list[int], me: int) -> int:
    return sum(splits) - splits[me]


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; backward sends the gradient back the same way."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup,
                stats: Optional[CommStats], timing: bool) -> Tensor:
        ctx.splits, ctx.group, ctx.stats, ctx.timing = (out_splits, in_splits), group, stats, timing
        return _exchange(x, out_splits, in_splits, group, stats, timing)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return _exchange(grad.contiguous(), in_splits, out_splits, ctx.group, ctx.stats, ctx.timing), None, None, None, None, None


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup,
              stats: Optional[CommStats], timing: bool) -> Tensor:
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    t0 = _now(x, timing)
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    if stats is not None:
        me = dist.get_rank(group)
        stats.bytes_sent += _remote_rows(in_splits, me) * x[0:1].numel() * x.element_size()
        if timing:
            stats.comm_s += _now(x, True) - t0
    return out


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup,
               stats: Optional[CommStats] = None, timing: bool = False) -> Tensor:
    """Differentiable all_to_all_single: rows x[sum(in_splits[:j]) : ...] go to rank j of `group`."""
    return _AllToAll.apply(x, out_splits, in_splits, group, stats, timing)


def _now(x: Tensor, timing: bool) -> float:
    if not timing:
        return 0.0
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


@dataclass
class A2AState:
    token: Tensor  # [S] token of each sent row, in send order (by global expert)
    gate: Tensor  # [S] its combine weight
    n_tokens: int
    send_splits: list[int]  # rows to each ep rank
    recv_splits: list[int]  # rows from each ep rank
    unsort: Tensor  # [R] position of each received row in the expert-sorted rows
    send_slot: Optional[Tensor] = None  # capacity mode: [S] slot of each sent row in the padded buffer
    n_slots: int = 0  # capacity mode: slots sent in all
    t_dispatched: float = field(default=0.0)


class AllToAllDispatcher:
    """Moves each kept assignment to the rank holding its expert and its output back.

    n_experts: E routed experts in the whole model; the ep group has `ep` ranks and this rank
    is `ep_rank` in it (the PGM's coordinates). `stats` counts rows, bytes and (with
    `timing = True`, which synchronises CUDA) seconds in communication and in the experts.
    """

    def __init__(self, n_experts: int, ep: int, ep_rank: int, group: Optional[ProcessGroup]):
        if n_experts % ep:
            raise ValueError(f"n_experts={n_experts} is not divisible by ep={ep}")
        self.n_experts, self.ep, self.ep_rank, self.group = n_experts, ep, ep_rank, group
        self.n_local_experts = n_experts // ep
        self.stats = CommStats()
        self.timing = False

    def dispatch(self, x: Tensor, routing: Routing) -> tuple[Tensor, Tensor, A2AState]:
        """x: [T, H] -> (rows [R, H] sorted by local expert, counts [E_l], state)."""
        if routing.capacity is not None:
            return self._dispatch_capacity(x, routing)
        return self._dispatch_dropless(x, routing)

    def combine(self, y: Tensor, state: A2AState) -> Tensor:
        """y: [R, H] local expert outputs -> [T, H] gate-weighted sums for this rank's tokens."""
        st = self.stats
        st.compute_s += _now(y, self.timing) - state.t_dispatched if self.timing else 0.0
        y = y[state.unsort]  # back to (source rank, local expert) order
        back = all_to_all(y, state.send_splits, state.recv_splits, self.group, st, self.timing)
        if state.send_slot is not None:
            back = back[state.send_slot]  # drop the padding slots
        out = back.new_zeros(state.n_tokens, back.shape[-1])
        return out.index_add_(0, state.token, back * state.gate.unsqueeze(1).to(back.dtype))

    # -- dropless: variable splits -----------------------------------------------------------

    def _dispatch_dropless(self, x: Tensor, routing: Routing) -> tuple[Tensor, Tensor, A2AState]:
        E, El, D = self.n_experts, self.n_local_experts, self.ep
        token, expert, gate = routing.kept()
        order = torch.argsort(expert, stable=True)  # by expert = by destination rank
        token, gate = token[order], gate[order]
        counts = torch.bincount(expert, minlength=E)  # [E] rows this rank sends per expert
        recv_counts = torch.empty_like(counts)  # [D * El]: from rank s for local expert e at s*El + e
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        both = torch.stack([counts.view(D, El).sum(1), recv_counts.view(D, El).sum(1)]).tolist()  # one host sync
        send_splits, recv_splits = both
        rows = all_to_all(x[token], recv_splits, send_splits, self.group, self.stats, self.timing)
        # rows arrive grouped by (source rank, local expert); the experts want them by local expert
        local_expert = torch.arange(El, device=x.device).repeat(D).repeat_interleave(recv_counts)
        sort = torch.argsort(local_expert, stable=True)
        unsort = torch.empty_like(sort)
        unsort[sort] = torch.arange(sort.numel(), device=sort.device)
        local_counts = recv_counts.view(D, El).sum(0)
        st = self.stats
        st.calls += 1
        st.rows_sent += sum(send_splits)
        st.rows_received += sum(recv_splits)
        st.tokens_received += sum(recv_splits)
        state = A2AState(token, gate, x.shape[0], send_splits, recv_splits, unsort,
                         t_dispatched=_now(x, self.timing))
        return rows[sort], local_counts, state

    # -- capacity: fixed C slots per (routing group, expert) -------------------------------

    def _dispatch_capacity(self, x: Tensor, routing: Routing) -> tuple[Tensor, Tensor, A2AState]:
        E, El, D = self.n_experts, self.n_local_experts, self.ep
        G, C = routing.groups, routing.capacity
        T = x.shape[0]
        token, expert, gate = routing.kept()
        group = token // (T // G)
        # slot of each kept assignment: expert-major, then group, then its place among the kept
        # assignments of its (group, expert) pair (< C by construction of `keep`)
        bucket = expert * G + group
        order = torch.argsort(bucket, stable=True)
        token, gate, bucket = token[order], gate[order], bucket[order]
        n_per_bucket = torch.bincount(bucket, minlength=E * G)
        starts = torch.cumsum(n_per_bucket, 0) - n_per_bucket
        slot = bucket * C + torch.arange(bucket.numel(), device=x.device) - starts[bucket]
        n_slots = E * G * C
        buf = x.new_zeros(n_slots, x.shape[-1])
        buf = buf.index_copy(0, slot, x[token])  # [E*G*C, H], expert-major = destination-major
        per_rank = El * G * C
        splits = [per_rank] * D
        rows = all_to_all(buf, splits, splits, self.group, self.stats, self.timing)  # [D*El*G*C, H]
        # (source rank, local expert, G*C slots) -> (local expert, source rank, G*C slots): static
        H = x.shape[-1]
        sort = torch.arange(D * per_rank, device=x.device).view(D, El, G * C).transpose(0, 1).reshape(-1)
        unsort = torch.empty_like(sort)
        unsort[sort] = torch.arange(sort.numel(), device=sort.device)
        local_counts = torch.full((El,), D * G * C, dtype=torch.long, device=x.device)
        st = self.stats
        st.calls += 1
        st.rows_sent += D * per_rank
        st.rows_received += D * per_rank
        state = A2AState(token, gate, T, splits, splits, unsort, send_slot=slot, n_slots=n_slots,
                         t_dispatched=_now(x, self.timing))
        return rows[sort].view(-1, H), local_counts, state


class CommMetrics:
    """The all-to-all figures of one training step, gathered from every rank for the log (issue 4's
    metrics): MB sent, per layer the rows each rank received for its experts, and with
    logging.comm_timing the slowest rank's seconds in all-to-alls and in the experts."""

    def __init__(self, moe_dispatchers, pgm, timing: bool):
        self.dispatchers, self.pgm, self.timing = moe_dispatchers, pgm, timing
        for d in moe_dispatchers:
            d.timing = timing

    def reset(self) -> None:
        for d in self.dispatchers:
            d.stats.reset()

    def collect(self) -> dict:
        """Collective (every rank calls it); resets the counters."""
        if not self.dispatchers:
            return {}
        st = [d.stats for d in self.dispatchers]
        mine = torch.tensor([sum(s.bytes_sent for s in st), sum(s.comm_s for s in st), sum(s.compute_s for s in st),
                             *(s.rows_received for s in st)], dtype=torch.float64, device=self.pgm.device)
        self.reset()
        every = [torch.empty_like(mine) for _ in range(self.pgm.world_size)]
        dist.all_gather(every, mine)
        m = torch.stack(every).cpu()  # [world, 3 + layers]
        recv = m[:, 3:]  # rows received, [rank, layer]
        out = {"a2a_mb": float(m[:, 0].sum()) / 1e6,
               # busiest rank over the mean, averaged over layers: 1.0 = every rank's experts got equal work
               "a2a_recv_imbalance": float((recv.max(0).values / recv.mean(0).clamp(min=1e-9)).mean()),
               "a2a_rows_received": recv.t().long().tolist()}  # [layer][rank]
        if self.timing:
            out["a2a_comm_s"], out["a2a_expert_s"] = float(m[:, 1].max()), float(m[:, 2].max())
        return out
