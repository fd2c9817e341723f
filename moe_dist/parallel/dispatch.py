"""All-to-all token dispatcher: expert parallelism behind the TokenDispatcher protocol
(moe_dist.model.moe.dispatcher).

Experts are placed contiguously: ep rank r holds experts [r*E_l, (r+1)*E_l), E_l = E / ep.

dispatch(x [T, H], routing) -> state, the tokens under way
  1. permute the assignments by destination rank (= by global expert), dropped ones last,
  2. dropless: exchange the rows-per-expert counts (all_to_all_single on [E] ints) and read the split
     sizes on the host (the layer's one device-to-host transfer, as in every peer: the row exchange
     needs them), then start the variable-split exchange of the rows;
     capacity: every (routing group, expert) pair owns C slots, so each rank sends exactly
     E_l * G * C rows to every rank (zero rows pad the free slots; a dropped assignment is written to
     one extra slot that is never sent) and nothing reaches the host.
arrived(state) -> (rows [R, H] sorted by local expert, counts [E_l]): wait for the rows, reorder them from
  (source rank, local expert) to (local expert, source rank) so the local experts run as one grouped matmul.
send_back(y, state): undo that order and start the reverse exchange. combine(back, state) -> [T, H]: the
  gate-weighted sum per token (moe_dist.model.moe.dispatcher.weighted_combine, shared with one device).

The exchanges are torch's functional collectives (all_to_all_single_autograd: its backward is the reverse
exchange). With `overlap` (the default) they return at once and complete where their result is first
read, so the MoE layer's shared experts run while tokens travel out, and its balance losses while they
travel back; overlap off waits right after each launch (benchmarks/ep_dispatch.py compares the two).
"""
from __future__ import annotations

import math

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.distributed import ProcessGroup

from ..model.moe.dispatcher import dropped_last, weighted_combine
from ..model.moe.router import Routing


@dataclass
class CommStats:
    """Cheap counters, summed over forward calls until reset(). Times only when `timing` is on."""

    rows_sent: int = 0  # rows leaving this rank in the dispatch (this rank's own included)
    rows_received: int = 0  # rows arriving for the local experts (padding slots included)
    tokens_received: int = 0  # real (not padding) rows for the local experts; dropless only
    bytes_sent: int = 0  # all-to-all payload to OTHER ranks, forward + backward, dispatch + combine
    comm_s: float = 0.0  # seconds in all-to-alls (forward and backward; timing waits for each at once)
    compute_s: float = 0.0  # seconds between the rows' arrival and send_back (the local experts)
    calls: int = 0

    def reset(self) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, type(getattr(self, f))())

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup,
               stats: Optional[CommStats] = None, timing: bool = False, wait: bool = True) -> Tensor:
    """Differentiable all_to_all_single: rows x[sum(in_splits[:j]) : ...] go to rank j of `group`; the
    gradient goes back the same way. wait=False returns while the rows are under way (an
    AsyncCollectiveTensor: the first op that reads it waits). `stats` counts the bytes to other ranks,
    the forward's now and the backward's when it runs."""
    me = dist.get_rank(group)
    row_bytes = x[0:1].numel() * x.element_size()
    x = x.contiguous()
    started: list[float] = []  # timing: when the gradient reached the output, i.e. the backward exchange began
    if stats is not None and x.requires_grad:
        back_bytes = (sum(out_splits) - out_splits[me]) * row_bytes  # backward returns what arrived here

        def backward_done(grad: Tensor) -> None:
            stats.bytes_sent += back_bytes
            if started:
                stats.comm_s += _now(grad, True) - started.pop()
        x.register_hook(backward_done)
    t0 = _now(x, timing)
    y = funcol.all_to_all_single_autograd(x, out_splits, in_splits, group)
    if wait or timing:
        y = funcol.wait_tensor(y)
    if stats is not None:
        stats.bytes_sent += (sum(in_splits) - in_splits[me]) * row_bytes
        if timing:
            stats.comm_s += _now(y, True) - t0
            if y.requires_grad:
                y.register_hook(lambda g: started.append(_now(g, True)))
    return y


def _now(x: Tensor, timing: bool) -> float:
    if not timing:
        return 0.0
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


@dataclass
class A2AState:
    token: Tensor  # [S] token of each sent row, in send order (by global expert)
    gate: Tensor  # [S] its combine weight (0 for a dropped assignment)
    n_tokens: int
    send_splits: list[int]  # rows to each ep rank
    recv_splits: list[int]  # rows from each ep rank
    rows: Tensor  # [R, H] what arrives, by (source rank, local expert); in flight until read
    counts: Tensor  # [E_l] rows per local expert
    sort: Optional[Tensor] = None  # dropless, E_l > 1: [R] the arrived rows in local-expert order
    slot: Optional[Tensor] = None  # capacity mode: [S] slot of each assignment in the [E*G*C] buffer
    t_arrived: float = 0.0


class AllToAllDispatcher:
    """Moves each kept assignment to the rank holding its expert and its output back.

    n_experts: E routed experts in the whole model; the ep group has `ep` ranks and this rank
    is `ep_rank` in it (the PGM's coordinates). `stats` counts rows, bytes and (with
    `timing = True`, which waits for every exchange and synchronises CUDA) seconds in communication
    and in the experts. `overlap = False` waits for each exchange as soon as it is launched.
    """

    def __init__(self, n_experts: int, ep: int, ep_rank: int, group: Optional[ProcessGroup]):
        if n_experts % ep:
            raise ValueError(f"n_experts={n_experts} is not divisible by ep={ep}")
        self.n_experts, self.ep, self.ep_rank, self.group = n_experts, ep, ep_rank, group
        self.n_local_experts = n_experts // ep
        self.stats = CommStats()
        self.timing = False
        self.overlap = True

    def _a2a(self, x: Tensor, out_splits: list[int], in_splits: list[int]) -> Tensor:
        return all_to_all(x, out_splits, in_splits, self.group, self.stats, self.timing, wait=not self.overlap)

    def dispatch(self, x: Tensor, routing: Routing) -> A2AState:
        """x: [T, H] -> the state of the exchange, rows under way."""
        self.stats.calls += 1
        if routing.capacity is not None:
            return self._dispatch_capacity(x, routing)
        return self._dispatch_dropless(x, routing)

    def arrived(self, state: A2AState) -> tuple[Tensor, Tensor]:
        """(rows [R, H] sorted by local expert, counts [E_l]), once they are here."""
        rows = state.rows
        if state.slot is not None:  # (source rank, local expert, G*C slots) -> (local expert, source rank, ...)
            D, El = self.ep, self.n_local_experts
            rows = rows.view(D, El, -1, rows.shape[-1]).transpose(0, 1).reshape(-1, rows.shape[-1])
        elif state.sort is not None:
            rows = rows.index_select(0, state.sort)
        state.t_arrived = _now(rows, self.timing)
        return rows, state.counts

    def send_back(self, y: Tensor, state: A2AState) -> Tensor:
        """y: [R, H] local expert outputs -> on their way back, in the order they were sent."""
        st = self.stats
        st.compute_s += _now(y, self.timing) - state.t_arrived if self.timing else 0.0
        if state.slot is not None:
            D, El = self.ep, self.n_local_experts
            y = y.view(El, D, -1, y.shape[-1]).transpose(0, 1).reshape(-1, y.shape[-1])
        elif state.sort is not None:
            y = y.index_select(0, torch.argsort(state.sort))
        return self._a2a(y, state.send_splits, state.recv_splits)

    def combine(self, back: Tensor, state: A2AState) -> Tensor:
        """back: what send_back returned -> [T, H] gate-weighted sums for this rank's tokens."""
        row = None
        if state.slot is not None:  # a dropped assignment reads slot 0 with gate 0
            row = state.slot.clamp(max=back.shape[0] - 1)
        return weighted_combine(back, state.gate, state.token, state.n_tokens, row)

    # -- dropless: variable splits -----------------------------------------------------------

    def _dispatch_dropless(self, x: Tensor, routing: Routing) -> A2AState:
        El, D = self.n_local_experts, self.ep
        key, gate = dropped_last(routing)
        order = torch.argsort(key, stable=True)  # by expert = by destination rank; dropped (tp's others) last
        token, gate = routing.token[order], gate[order]
        counts = routing.kept_per_expert  # [E] rows this rank sends per expert
        recv_counts = funcol.all_to_all_single(counts, None, None, self.group)  # [D * El]: from rank s for local expert e at s*El + e
        send_splits, recv_splits = torch.stack([counts.view(D, El).sum(1), recv_counts.view(D, El).sum(1)]).tolist()
        n_send, n_recv = sum(send_splits), sum(recv_splits)
        token, gate = token[:n_send], gate[:n_send]
        rows = self._a2a(x.index_select(0, token), recv_splits, send_splits)
        sort = None
        if El > 1:  # rows arrive grouped by (source rank, local expert); the experts want them by local expert
            local_expert = torch.arange(El, device=x.device).repeat(D).repeat_interleave(recv_counts, output_size=n_recv)
            sort = torch.argsort(local_expert, stable=True)
        st = self.stats
        st.rows_sent += n_send
        st.rows_received += n_recv
        st.tokens_received += n_recv
        return A2AState(token, gate, x.shape[0], send_splits, recv_splits, rows, recv_counts.view(D, El).sum(0), sort)

    # -- capacity: fixed C slots per (routing group, expert) -------------------------------

    def _dispatch_capacity(self, x: Tensor, routing: Routing) -> A2AState:
        E, El, D = self.n_experts, self.n_local_experts, self.ep
        G, C = routing.groups, routing.capacity
        T, H = x.shape
        # slot of each assignment: expert-major (= destination-major), then group, then its place in its
        # (group, expert) pair; a dropped one goes to the extra slot n_slots, which is never sent
        n_slots = E * G * C
        slot = (routing.expert * G + routing.token // (T // G)) * C + routing.slot
        _, gate = dropped_last(routing)
        if routing.keep is not None:
            slot = slot.masked_fill(~routing.keep, n_slots)
        buf = x.new_zeros(n_slots + 1, H).index_copy(0, slot, x.index_select(0, routing.token))
        per_rank = El * G * C
        splits = [per_rank] * D
        rows = self._a2a(buf[:n_slots], splits, splits)  # [D*El*G*C, H]
        st = self.stats
        st.rows_sent += D * per_rank
        st.rows_received += D * per_rank
        counts = torch.full((El,), D * G * C, dtype=torch.long, device=x.device)
        return A2AState(routing.token, gate, T, splits, splits, rows, counts, slot=slot)


class CommMetrics:
    """The all-to-all figures of one training step, gathered from every rank for the log (issue 4's
    metrics): MB sent, per layer the rows each rank received for its experts, and with
    logging.comm_timing the slowest rank's seconds in all-to-alls and in the experts."""

    def __init__(self, moe_dispatchers, pgm, timing: bool, rows: Optional[list[int]] = None,
                 n_layers: Optional[int] = None):
        """rows: each dispatcher's MoE layer index in the whole model, of n_layers (pipeline parallelism: a
        rank holds its stages' layers only); default: this rank's dispatchers are all the layers."""
        self.dispatchers, self.pgm, self.timing = moe_dispatchers, pgm, timing
        self.rows = list(rows) if rows is not None else list(range(len(moe_dispatchers)))
        self.n_layers = n_layers if n_layers is not None else len(moe_dispatchers)
        for d in moe_dispatchers:
            d.timing = timing

    def reset(self) -> None:
        for d in self.dispatchers:
            d.stats.reset()

    def collect(self) -> dict:
        """Collective (every rank calls it); resets the counters."""
        if not self.n_layers:
            return {}
        st = [d.stats for d in self.dispatchers]
        rows = [math.nan] * self.n_layers  # NaN: a layer another pipeline stage holds
        for r, s in zip(self.rows, st):
            rows[r] = s.rows_received
        mine = torch.tensor([sum(s.bytes_sent for s in st), sum(s.comm_s for s in st), sum(s.compute_s for s in st),
                             *rows], dtype=torch.float64, device=self.pgm.device)
        self.reset()
        every = [torch.empty_like(mine) for _ in range(self.pgm.world_size)]
        dist.all_gather(every, mine)
        m = torch.stack(every).cpu()  # [world, 3 + layers]
        # rows received per layer by the ranks holding it (the stage's ranks): [layer][rank]
        recv = [col[~col.isnan()] for col in m[:, 3:].t()]
        out = {"a2a_mb": float(m[:, 0].sum()) / 1e6,
               # busiest rank over the mean, averaged over layers: 1.0 = every rank's experts got equal work
               "a2a_recv_imbalance": float(torch.stack([c.max() / c.mean().clamp(min=1e-9) for c in recv]).mean()),
               "a2a_rows_received": [c.long().tolist() for c in recv]}
        if self.timing:
            out["a2a_comm_s"], out["a2a_expert_s"] = float(m[:, 1].max()), float(m[:, 2].max())
        return out
