"""Run a function in N gloo worker processes on CPU and collect what each returns.

    results = run_workers(fn, world=4, arg1, ...)   # [fn(0, arg1, ...), ..., fn(3, arg1, ...)]

Each worker gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
on a free port), so ProcessGroupManager initialises torch.distributed exactly as under torchrun.
Workers are forked (a fresh interpreter per worker costs seconds of `import torch` on a small
machine); set MOE_DIST_TEST_START=spawn to use spawn instead (then `fn` must be importable).
A worker's exception fails the call with the worker's traceback; a hang fails after `timeout`.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

START_METHOD = os.environ.get("MOE_DIST_TEST_START", "fork")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn, world: int, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)  # N workers share a few cores; one intra-op thread each (and fork-safe)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        result = fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))


def run_workers(fn, world: int, *args, timeout: float = 120.0) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(fn, world, free_port(), out_dir, args), nprocs=world,
                                 join=False, start_method=START_METHOD)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{world} workers running {fn.__name__} did not finish in {timeout:.0f}s")
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world)]
