"""Checkpoint save and load time at world 2 (gloo, CPU): moe_dist's protocol against a plain dcp.save.

    python benchmarks/checkpoint.py [--d-model 1024 --layers 6 --experts 8 --d-expert 2048 --vocab 8192]

An MoE model (about 340M parameters at the defaults: 302M in experts, split over the two ranks by
ep=2) and its AdamW state after one step, as `moe-dist train` checkpoints them. In the same run, on
the same disk, each row is timed (the slowest rank; median of --repeats) and divided by the time of
a plain `dcp.save` of the same state:

  dcp.save                 torch.distributed.checkpoint.save of the sharded state dict, nothing else
  save, async (blocking)   Checkpointer.save with checkpoint.async_save: until training may go on
  save, async (total)      ... until `wait` returns: written, fsynced, sealed (COMPLETE), `latest` moved
  save, sync               checkpoint.async_save=false
  save + SHA256SUMS        checkpoint.checksums=true: until the background hashing is done too
  dcp.load                 a plain dcp.load of the same state
  load (sizes + metadata)  what a resume does: latest() (the completeness check) and load()
  load after ckpt verify   `moe-dist ckpt verify`'s sha256 of every byte (one process), then the load
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
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
from moe_dist.checkpoint import Checkpointer  # noqa: E402
from moe_dist.checkpoint.manager import audit  # noqa: E402
from moe_dist.checkpoint.state import sharded_state  # noqa: E402
from moe_dist.config import load_config  # noqa: E402


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return _slowest(time.perf_counter() - t0)


def worker(args, root: Path) -> dict:
    import torch.distributed.checkpoint as dcp

    from moe_dist.train.setup import build_run

    cfg = load_config(None, [f"model.d_model={args.d_model}", f"model.n_layer={args.layers}", "model.n_head=8",
                             f"model.d_ff={args.d_expert}", f"moe.n_experts={args.experts}", "moe.top_k=2",
                             f"model.vocab_size={args.vocab}", "model.max_seq_len=64", "train.device=cpu",
                             "parallel.ep=2", "checkpoint.resume=false", "logging.tensorboard=false",
                             "logging.progress_bar=false", f"logging.run_dir={root}/unused",
                             f"data.cache_dir={root}/cache"], world_size=2)
    run = build_run(cfg)
    model, optimizer, pgm = run.model, run.optimizer, run.runtime.pgm
    for p in model.parameters():
        p.grad = p.detach() * 1e-3  # of the parameter's own type (experts are DTensors over ep)
    optimizer.step()  # AdamW state exists now, as in training
    optimizer.zero_grad(set_to_none=True)
    n_params = run.n_params
    times: dict[str, list[float]] = {}

    def fresh(name: str) -> Path:
        path = root / name
        if pgm.is_main:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()
        return path

    def add(row: str, seconds: float) -> None:
        times.setdefault(row, []).append(seconds)

    cfg_dict = cfg.to_dict()
    for _ in range(args.repeats):
        plain = fresh("plain")
        add("dcp.save", _timed(lambda: dcp.save(sharded_state(model, optimizer, pgm), checkpoint_id=plain)))
        add("dcp.load", _timed(lambda: dcp.load(sharded_state(model, optimizer, pgm), checkpoint_id=plain)))
        for row, kwargs in (("save, async", {}), ("save, sync", {"async_save": False}),
                            ("save + SHA256SUMS", {"checksums": True})):
            ck = Checkpointer(fresh(row.replace(" ", "_").replace(",", "").replace("+", "")), **kwargs)
            dist.barrier()
            t0 = time.perf_counter()
            ck.save(1, model, optimizer, None, cfg_dict, pgm=pgm)
            blocking = time.perf_counter() - t0
            ck.wait(pgm)
            total = _slowest(time.perf_counter() - t0)
            if row == "save, async":
                add("save, async (blocking)", _slowest(blocking))
                add("save, async (total)", total)
            else:
                add(row, total)
        ck = Checkpointer(root / "save_async")
        add("load (sizes + metadata)", _timed(lambda: ck.load(ck.latest(pgm), model, optimizer, pgm)))

        def verify_then_load():
            if pgm.is_main:
                reason = audit(ck.latest())[0]
                assert reason is None, reason
            dist.barrier()
            ck.load(ck.latest(pgm), model, optimizer, pgm)

        add("load after ckpt verify", _timed(verify_then_load))
    size = sum(f.stat().st_size for f in (root / "save_async" / "checkpoints" / "step_00000001").iterdir())
    return {"times": {k: statistics.median(v) for k, v in times.items()}, "n_params": n_params, "bytes": size}


def _forked(rank: int, world: int, port: int, out: str, args) -> None:
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    result = worker(args, Path(out))
    if rank == 0:
        torch.save(result, os.path.join(out, "result.pt"))
    dist.barrier()
    dist.destroy_process_group()


ORDER = ["dcp.save", "save, async (blocking)", "save, async (total)", "save, sync", "save + SHA256SUMS", "dcp.load",
         "load (sizes + metadata)", "load after ckpt verify"]


def table(args, result: dict) -> str:
    t = result["times"]
    base = t["dcp.save"]
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, gloo; world 2 "
             f"(ep=2) x {args.threads} thread. Model: d_model {args.d_model}, {args.layers} layers, {args.experts} "
             f"experts of width {args.d_expert}, vocab {args.vocab}: {result['n_params'] / 1e6:.0f}M parameters; "
             f"checkpoint with AdamW state {result['bytes'] / 2**30:.2f} GiB; median of {args.repeats}.", "",
             "| operation | seconds | / dcp.save |", "|---|---|---|"]
    for row in ORDER:
        lines.append(f"| {row} | {t[row]:.2f} | {t[row] / base:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--d-expert", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        mp.start_processes(_forked, args=(2, port, d, args), nprocs=2, start_method="fork")
        result = torch.load(os.path.join(d, "result.pt"))
    print(table(args, result))


if __name__ == "__main__":
    main()
