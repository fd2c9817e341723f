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


# -- one-device views of an expert-parallel model, to compare layouts in tests ----------------------


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_model_state(model, pgm) -> dict:
    """The one-device state dict: every shard (DTensor, or a plain slice DeepSpeed holds) gathered in full
    (a collective)."""
    from moe_dist.checkpoint.state import MODEL_PREFIX, sharded_state

    return {k[len(MODEL_PREFIX):]: _full(v) for k, v in sharded_state(model, None, pgm).items()}


def full_optimizer_state(optimizer, model, pgm) -> dict:
    """optimizer.state_dict() with every sharded (DTensor) moment gathered in full (a collective)."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: _full(v) if torch.is_tensor(v) else v for k, v in st.items()}
                      for i, st in state["state"].items()}
    return state


# -- memory held by an optimizer (ZeRO tests and benchmarks) -----------------------------------------


def optimizer_state_bytes(optimizer) -> dict[str, int]:
    """Bytes of optimizer state held by this rank, split dense / expert (DeepSpeed ZeRO's moments and fp32
    master partitions of each flat group), or all under "dense" for a torch optimizer (a DTensor moment
    counts its local shard)."""
    from moe_dist.parallel.data_parallel import local

    out = {"dense": 0, "expert": 0}
    inner = getattr(optimizer, "optimizer", None)
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # DeepSpeed stage 1/2
        for i, group in enumerate(inner.param_groups):
            kind = "expert" if group.get("moe", False) else "dense"
            master = optimizer.single_partition_of_fp32_groups[i]
            state = inner.state.get(master, {})
            out[kind] += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim())
            out[kind + "_master"] = out.get(kind + "_master", 0) + master.numel() * master.element_size()
        return out
    for state in optimizer.state.values():
        out["dense"] += sum(local(t).numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim())
    return out
