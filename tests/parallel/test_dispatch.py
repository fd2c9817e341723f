"""AllToAllDispatcher on hand-made routings: rows land on the right expert, bytes equal the theory,
the differentiable all-to-all sends gradients back, and gradient accumulation reduces once."""
import pytest
import torch

from dist_helper import run_workers
from moe_dist.config import MoEConfig, ParallelConfig
from moe_dist.model.moe.layer import MoELayer
from moe_dist.model.moe.router import Routing, count_routing
from moe_dist.model.moe.stats import MoEStats
from moe_dist.parallel import AllToAllDispatcher, GradReducer, ProcessGroupManager, all_to_all, parallelize
from moe_dist.parallel.data_parallel import local

WORLD, E, H, T = 4, 8, 5, 12


def known_routing(rank: int, capacity=None) -> Routing:
    """Top-1: token t of rank r goes to expert (t + r) % E with gate 1; capacity drops none of it."""
    token = torch.arange(T)
    expert = (token + rank) % E
    keep = torch.ones(T, dtype=torch.bool) if capacity else None
    r = Routing(torch.zeros(T, E), torch.zeros(T, E), token, expert, torch.ones(T), keep, 1, capacity, groups=1)
    if capacity:  # each token is alone in its (group, expert) pair but for t and t + 8: slots 0 and 1
        r.slot = token // E
    return count_routing(r, T)


def _bytes(rank):
    pgm = ProcessGroupManager(ParallelConfig(ep=WORLD), n_experts=E)
    out = {}
    for cap in (None, 3):
        d = AllToAllDispatcher(E, pgm.ep, pgm.ep_rank, pgm.ep_group)
        x = (torch.arange(T, dtype=torch.float32) + 100 * rank).unsqueeze(1).repeat(1, H).requires_grad_()
        state = d.dispatch(x, known_routing(rank, cap))
        rows, counts = d.arrived(state)
        arrived = rows[:, 0].tolist()
        y = d.combine(d.send_back(rows * 2, state), state)  # a known "expert": doubling
        fwd = d.stats.bytes_sent
        y.sum().backward()
        out[cap] = dict(arrived=arrived, counts=counts.tolist(), y=y.detach(), grad=x.grad.clone(),
                        fwd=fwd, total=d.stats.bytes_sent, stats=d.stats.as_dict())
    return out


def test_rows_reach_their_experts_and_bytes_match_theory():
    got = run_workers(_bytes, WORLD)
    El = E // WORLD
    for rank, r in enumerate(got):
        # dropless: rows for my experts {2r, 2r+1}, from every source rank s: tokens t with (t+s) % 8 in them
        mine = range(El * rank, El * (rank + 1))
        want = [(e - s) % E + 100 * s + E * j for e in mine for s in range(WORLD) for j in range(2)
                if (e - s) % E + E * j < T]
        d = r[None]
        assert sorted(d["arrived"]) == sorted(want)
        per_expert = [sum(1 for s in range(WORLD) for t in range(T) if (t + s) % E == e) for e in mine]
        assert d["counts"] == per_expert
        assert d["arrived"] == sorted(d["arrived"], key=lambda v: ((int(v) % 100 + int(v) // 100) % E))  # by expert
        torch.testing.assert_close(d["y"], 2 * (torch.arange(T, dtype=torch.float32) + 100 * rank).unsqueeze(1).repeat(1, H))
        torch.testing.assert_close(d["grad"], torch.full((T, H), 2.0))
        # bytes: rows to other ranks, each H fp32; dispatch + combine forward, the same again backward
        sent_remote = sum(1 for t in range(T) if (t + rank) % E // El != rank)
        recv_remote = sum(per_expert) - sum(1 for t in range(T) if (t + rank) % E // El == rank)
        assert d["fwd"] == (sent_remote + recv_remote) * H * 4
        assert d["total"] == 2 * d["fwd"]
        assert d["stats"]["rows_sent"] == T and d["stats"]["tokens_received"] == sum(per_expert)
        # capacity C=3: static slots, (ep - 1) ranks * El experts * G * C rows each way
        c = r[3]
        slots = (WORLD - 1) * El * 1 * 3
        assert c["fwd"] == 2 * slots * H * 4 and c["total"] == 4 * slots * H * 4
        assert c["counts"] == [WORLD * 3] * El
        torch.testing.assert_close(c["y"], d["y"])
        torch.testing.assert_close(c["grad"], d["grad"])


def _autograd(rank):
    pgm = ProcessGroupManager(ParallelConfig(ep=WORLD), n_experts=E)
    splits_in = [(rank + j) % 3 for j in range(WORLD)]  # uneven, some empty
    splits_out = [(j + rank) % 3 for j in range(WORLD)]  # what rank j sends me: (j + rank) % 3
    x = torch.randn(sum(splits_in), 3, requires_grad=True)
    y = all_to_all(x, splits_out, splits_in, pgm.ep_group)
    (y * (rank + 1)).sum().backward()
    # row sent to rank j is multiplied by j + 1 there
    want = torch.cat([torch.full((n, 3), float(j + 1)) for j, n in enumerate(splits_in)])
    return torch.equal(x.grad, want)


def test_all_to_all_backward_is_the_reverse_exchange():
    assert all(run_workers(_autograd, WORLD))


def _accumulate(rank, in_backward):
    """Two micro-batches, loss / 2 each, one reduce: the gradient of the mean over 2 * WORLD micro-batches.
    in_backward: the reducer exists before backward and is armed for the last micro-batch (as the trainer
    does), so its buckets' all-reduces start during that backward; else it reduces everything afterwards."""
    pgm = ProcessGroupManager(ParallelConfig(ep=2), n_experts=E)
    cfg = MoEConfig(n_experts=E, top_k=2, capacity_factor=1.0)
    torch.manual_seed(0)
    layer = parallelize(MoELayer(H * 2, cfg, 8), cfg, pgm)
    reducer = GradReducer(layer, pgm, bucket_mb=1e-4) if in_backward else None  # small: several buckets
    xs = torch.randn(2 * WORLD, 6, H * 2, generator=torch.Generator().manual_seed(3))
    started = []
    for micro in range(2):
        moe = MoEStats()
        y = layer(xs[micro * WORLD + rank], moe)
        if reducer is not None and micro == 1:
            reducer.arm()
        ((y.square().mean() + moe.pop_aux_loss()) / 2).backward()
        if reducer is not None:
            started.append(sum(b.flat is not None and b.ready == len(b.params) for b in reducer.buckets))
    (reducer or GradReducer(layer, pgm)).reduce()
    grads = {n: local(p.grad) for n, p in layer.named_parameters()}
    return grads, started, len(reducer.buckets) if reducer else 0


@pytest.mark.parametrize("in_backward", [False, True])
def test_gradient_accumulation_reduces_once(in_backward):
    got = run_workers(_accumulate, WORLD, in_backward)
    if in_backward:  # nothing launched in the first backward, every bucket during the second
        assert all(started == [0, n] and n > 2 for _, started, n in got)
    got = [grads for grads, *_ in got]
    cfg = MoEConfig(n_experts=E, top_k=2, capacity_factor=1.0, routing_groups=WORLD)
    torch.manual_seed(0)
    ref = MoELayer(H * 2, cfg, 8)
    xs = torch.randn(2 * WORLD, 6, H * 2, generator=torch.Generator().manual_seed(3))
    for micro in range(2):
        moe = MoEStats()
        y = ref(xs[micro * WORLD:(micro + 1) * WORLD], moe)
        ((y.square().mean() + moe.pop_aux_loss()) / 2).backward()
    for rank, grads in enumerate(got):
        for n, p in ref.named_parameters():
            want = p.grad
            if n.startswith("experts."):
                want = want[(rank % 2) * 4:(rank % 2 + 1) * 4]
            torch.testing.assert_close(grads[n], want, atol=1e-6 * float(want.abs().max()), rtol=0)
