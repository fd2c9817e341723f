"""Expert-parallel MoE layer: step time and all-to-all bytes at ep = 1, 2, 4, with the exchanges overlapped
with compute and without, in one run.

    python benchmarks/ep_dispatch.py [--world 4] [--tokens 1024] [--device cpu|cuda] [--append benchmarks/RESULTS.md]

One MoE layer with a shared expert, forward + backward + gradient reduction per step, on `world` processes
(gloo on CPU, NCCL with --device cuda; forked here; under torchrun the script runs as the worker itself).
The global batch is fixed (world x tokens), so ep = 1 is pure data parallelism and ep > 1 moves tokens.
Each ep > 1 row times the same layer with the dispatcher's `overlap` on (the all-to-alls return at once,
and the shared expert and the balance losses run while tokens travel) and off (each all-to-all waited
for at once), alternating step by step. It reports the step time on over off, and the time hidden over
the shared expert's forward time (measured alone in the same run): (off - on) / shared. It stops if the
bytes differ between the two, or from what moe_dist.plan predicts for the step's routing.
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
from moe_dist.model.moe import MoEStats  # noqa: E402
from moe_dist.model.moe.layer import MoELayer  # noqa: E402
from moe_dist.parallel import GradReducer, ProcessGroupManager, dispatchers, parallelize  # noqa: E402


def planned_bytes(load, cfg: MoEConfig, pgm: ProcessGroupManager, tokens: int, d_model: int) -> int:
    """moe_dist.plan's all-to-all bytes for this rank's step: fixed slots with capacity, else the rows the
    step's routing sent (every ep rank's expert loads, gathered)."""
    if pgm.ep == 1:
        return 0
    if cfg.capacity_factor:
        groups, cap = plan.capacity_of(cfg, tokens, tokens)
        sent, received = plan.capacity_rows(cfg.n_experts, pgm.ep, groups, cap)
    else:
        loads = [torch.empty_like(load) for _ in range(pgm.ep)]
        dist.all_gather(loads, load, group=pgm.ep_group)
        sent, received = plan.dropless_rows([t.tolist() for t in loads], pgm.ep_rank)
    return int(plan.a2a_bytes(sent, received, d_model, 4, 4))


def _sync(pgm) -> None:
    if pgm.device.type == "cuda":
        torch.cuda.synchronize(pgm.device)


def bench(args, ep: int, capacity_factor) -> dict:
    pgm = ProcessGroupManager(ParallelConfig(ep=ep, backend=args.backend), n_experts=args.experts, device=args.device)
    cfg = MoEConfig(n_experts=args.experts, top_k=args.top_k, capacity_factor=capacity_factor,
                    n_shared_experts=1, d_shared_expert=args.d_shared)
    torch.manual_seed(0)
    layer = parallelize(MoELayer(args.d_model, cfg, args.d_expert), cfg, pgm).to(pgm.device)
    reducer = GradReducer(layer, pgm)
    # requires grad like a layer inside a model, so the dispatch all-to-all runs backward too
    x = torch.randn(args.tokens, args.d_model, generator=torch.Generator().manual_seed(pgm.rank)).to(pgm.device)
    x.requires_grad_()
    modes = (True, False) if ep > 1 else (True,)
    times = {m: [] for m in modes}
    nbytes = {m: [] for m in modes}
    planned, shared = [], []
    for it in range(args.warmup + args.iters):
        for overlap in modes:  # alternate, so both see the same machine load
            for d in dispatchers(layer):
                d.stats.reset()
                d.overlap = overlap
            layer.zero_grad(set_to_none=True)
            pgm.barrier()
            _sync(pgm)
            t0 = time.perf_counter()
            moe = MoEStats()
            y = layer(x, moe)
            reducer.arm()
            (y.square().mean() + moe.pop_aux_loss()).backward()
            reducer.reduce()
            _sync(pgm)
            dt = time.perf_counter() - t0
            if it >= args.warmup:
                times[overlap].append(dt)
                nbytes[overlap].append(sum(d.stats.bytes_sent for d in dispatchers(layer)))
                if overlap:
                    planned.append(planned_bytes(moe.layers()[0]["load"], cfg, pgm, args.tokens, args.d_model))
        with torch.no_grad():  # the work that can hide the dispatch: the shared expert's forward, alone
            _sync(pgm)
            t0 = time.perf_counter()
            layer.shared_experts(x)
            _sync(pgm)
            if it >= args.warmup:
                shared.append(time.perf_counter() - t0)
    for m in modes:  # every rank, every step: both modes send the bytes the planner counts
        if nbytes[m] and nbytes[m] != planned:
            raise SystemExit(f"rank {pgm.rank} ep={ep} capacity_factor={capacity_factor} overlap={m}: all-to-all "
                             f"bytes {nbytes[m]} but moe_dist.plan says {planned}")
    on = statistics.median(times[True])
    off = statistics.median(times[False]) if ep > 1 else on
    out = torch.tensor([on, off, statistics.median(shared), statistics.mean(nbytes[True]) if ep > 1 else 0.0,
                        statistics.mean(planned) if planned else 0.0], dtype=torch.float64, device=pgm.device)
    if pgm.distributed:  # the slowest rank sets the step time; bytes summed over ranks
        t = out[:3].clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        b = out[3:].clone()
        dist.all_reduce(b)
        out = torch.cat([t, b])
    on, off, sh, mb, plan_mb = out.tolist()
    return dict(ep=ep, capacity_factor=capacity_factor, on_ms=1e3 * on, off_ms=1e3 * off, shared_ms=1e3 * sh,
                mb_per_step=mb / 1e6, plan_mb_per_step=plan_mb / 1e6)


def worker(args) -> list[dict]:
    if args.device == "cpu":
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
    backend = args.backend if args.backend != "auto" else ("nccl" if args.device == "cuda" else "gloo")
    machine = (torch.cuda.get_device_name() if args.device == "cuda" else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs)")
    lines = ["## Expert-parallel dispatch, overlap on and off (benchmarks/ep_dispatch.py)", "",
             f"Machine: {machine}, torch {torch.__version__}, {backend}; {args.world} processes"
             + (f" x {args.threads} thread" if args.device == "cpu" else "") + ". "
             f"One MoE layer fwd+bwd+grad reduce: d_model {args.d_model}, d_expert {args.d_expert}, {args.experts} experts, "
             f"top-{args.top_k}, one shared expert of width {args.d_shared}, {args.tokens} tokens per rank "
             f"(global {args.world * args.tokens}), fp32; median of {args.iters} steps after {args.warmup} warm-up, the two "
             "modes alternating. on / off: step time with the all-to-alls overlapped over waited at once (below 1 = "
             "faster); hidden / shared: (off - on) over the shared expert's forward time alone (1 = all of it hidden). "
             "Bytes: all-to-all payload to other ranks, forward + backward, summed over ranks, equal in both modes "
             "and to moe_dist.plan's formula.", "",
             "| routing | ep | step ms, overlap off | step ms, overlap on | on / off | shared fwd ms | hidden / shared | all-to-all MB/step | plan MB/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        routing = "dropless" if r["capacity_factor"] is None else f"capacity {r['capacity_factor']}"
        ratio = r["on_ms"] / r["off_ms"]
        hidden = (r["off_ms"] - r["on_ms"]) / r["shared_ms"] if r["ep"] > 1 else 0.0
        lines.append(f"| {routing} | {r['ep']} | {r['off_ms']:.1f} | {r['on_ms']:.1f} | {ratio:.3f} | {r['shared_ms']:.1f} | "
                     f"{hidden:.2f} | {r['mb_per_step']:.2f} | {r['plan_mb_per_step']:.2f} |")
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
    p.add_argument("--d-shared", type=int, default=1024, help="width of the shared expert")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per process, NCCL")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
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
    print("all-to-all bytes equal moe_dist.plan's on every rank and step, overlap on and off")
    if args.append:
        path = Path(args.append)
        old = path.read_text() if path.exists() else "# Benchmark results\n"
        path.write_text(old.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
