"""Expert-parallel MoE layer: step time, all-to-all bytes, communication vs expert compute at ep = 1, 2, 4.

    python benchmarks/ep_dispatch.py [--world 4] [--tokens 1024] [--append benchmarks/RESULTS.md]

One MoE layer, forward + backward + gradient reduction per step, on `world` gloo CPU processes
(forked here; under torchrun the script runs as the worker itself). The global batch is fixed
(world x tokens), so ep = 1 is pure data parallelism and ep > 1 moves tokens. It stops if the bytes
moe_dist.plan predicts for a step's routing differ from what the dispatcher counted.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_dist import plan  # noqa: E402
from moe_dist.config import MoEConfig, ParallelConfig  # noqa: E402
from moe_dist.model.moe.layer import MoELayer  # noqa: E402
from moe_dist.parallel import GradReducer, ProcessGroupManager, dispatchers, parallelize  # noqa: E402


def planned_bytes(layer: MoELayer, cfg: MoEConfig, pgm: ProcessGroupManager, tokens: int, d_model: int) -> int:
    """moe_dist.plan's all-to-all bytes for this rank's step: fixed slots with capacity, else the rows the
    step's routing sent (every ep rank's expert loads, gathered)."""
    if pgm.ep == 1:
        return 0
    if cfg.capacity_factor:
        groups, cap = plan.capacity_of(cfg, tokens, tokens)
        sent, received = plan.capacity_rows(cfg.n_experts, pgm.ep, groups, cap)
    else:
        loads = [torch.empty_like(layer.stats["load"]) for _ in range(pgm.ep)]
        dist.all_gather(loads, layer.stats["load"], group=pgm.ep_group)
        sent, received = plan.dropless_rows([t.tolist() for t in loads], pgm.ep_rank)
    return int(plan.a2a_bytes(sent, received, d_model, 4, 4))


def bench(args, ep: int, capacity_factor) -> dict:
    pgm = ProcessGroupManager(ParallelConfig(ep=ep), n_experts=args.experts)
    cfg = MoEConfig(n_experts=args.experts, top_k=args.top_k, capacity_factor=capacity_factor)
    torch.manual_seed(0)
    layer = parallelize(MoELayer(args.d_model, cfg, args.d_expert), cfg, pgm)
    reducer = GradReducer(layer, pgm)
    # requires grad like a layer inside a model, so the dispatch all-to-all runs backward too
    x = torch.randn(args.tokens, args.d_model, generator=torch.Generator().manual_seed(pgm.rank)).requires_grad_()
    times, comm, compute, nbytes, planned = [], [], [], [], []
    for it in range(args.warmup + args.iters):
        for d in dispatchers(layer):
            d.stats.reset()
            d.timing = args.timing
        layer.zero_grad(set_to_none=True)
        pgm.barrier()
        t0 = time.perf_counter()
        y = layer(x)
        (y.square().mean() + layer.aux_loss).backward()
        reducer.reduce()
        dt = time.perf_counter() - t0
        if it >= args.warmup:
            times.append(dt)
            st = [d.stats for d in dispatchers(layer)]
            comm.append(sum(s.comm_s for s in st))
            compute.append(sum(s.compute_s for s in st))
            nbytes.append(sum(s.bytes_sent for s in st))
            planned.append(planned_bytes(layer, cfg, pgm, args.tokens, args.d_model))
    if nbytes and nbytes != planned:  # every rank, every step: the planner must count what the dispatcher sends
        raise SystemExit(f"rank {pgm.rank} ep={ep} capacity_factor={capacity_factor}: all-to-all bytes {nbytes} "
                         f"but moe_dist.plan says {planned}")
    out = torch.tensor([statistics.median(times), statistics.median(comm) if comm else 0.0,
                        statistics.median(compute) if compute else 0.0, statistics.mean(nbytes) if nbytes else 0.0,
                        statistics.mean(planned)])
    if pgm.distributed:  # the slowest rank sets the step time; bytes summed over ranks
        t = out[:3].clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        b = out[3:].clone()
        dist.all_reduce(b)
        out = torch.cat([t, b])
    return dict(ep=ep, capacity_factor=capacity_factor, step_ms=1e3 * out[0].item(), comm_ms=1e3 * out[1].item(),
                compute_ms=1e3 * out[2].item(), mb_per_step=out[3].item() / 1e6, plan_mb_per_step=out[4].item() / 1e6)


def worker(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    rows = []
    for cf in (None, 1.25):
        for ep in args.eps:
            rows.append(bench(args, ep, cf))
    return rows


def _forked(rank: int, world: int, port: int, out_dir: str, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    rows = worker(args)
    if rank == 0:
        torch.save(rows, os.path.join(out_dir, "rows.pt"))
    dist.destroy_process_group()


def table(args, rows: list[dict]) -> str:
    lines = ["## Expert-parallel dispatch (benchmarks/ep_dispatch.py)", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), "
             f"torch {torch.__version__}, gloo; {args.world} processes x {args.threads} thread. "
             f"One MoE layer fwd+bwd+grad reduce: d_model {args.d_model}, d_expert {args.d_expert}, {args.experts} experts, "
             f"top-{args.top_k}, {args.tokens} tokens per rank (global {args.world * args.tokens}), fp32; "
             f"median of {args.iters} steps after {args.warmup} warm-up. "
             "Bytes: all-to-all payload to other ranks, forward + backward, summed over ranks; plan: "
             "moe_dist.plan's formula (docs/planning.md) for the same routing. "
             "comm: seconds inside all-to-alls (fwd + bwd); experts: forward expert compute between dispatch and combine "
             "(per step, slowest rank).", "",
             "| routing | ep | step ms | comm ms | experts fwd ms | all-to-all MB/step | plan MB/step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        routing = "dropless" if r["capacity_factor"] is None else f"capacity {r['capacity_factor']}"
        lines.append(f"| {routing} | {r['ep']} | {r['step_ms']:.1f} | {r['comm_ms']:.1f} | {r['compute_ms']:.1f} | {r['mb_per_step']:.2f} | {r['plan_mb_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--eps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-expert", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-timing", dest="timing", action="store_false", help="skip the comm/compute timers")
    p.add_argument("--append", default=None, help="append the table to this markdown file")
    args = p.parse_args()
    if "RANK" in os.environ:  # under torchrun
        args.world = int(os.environ["WORLD_SIZE"])
        rows = worker(args)
        if int(os.environ["RANK"]) != 0:
            return
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as d:
            mp.start_processes(_forked, args=(args.world, port, d, args), nprocs=args.world, start_method="fork")
            rows = torch.load(os.path.join(d, "rows.pt"))
    text = table(args, rows)
    print(text)
    print("all-to-all bytes equal moe_dist.plan's on every rank and step")
    if args.append:
        path = Path(args.append)
        old = path.read_text() if path.exists() else "# Benchmark results\n"
        path.write_text(old.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
