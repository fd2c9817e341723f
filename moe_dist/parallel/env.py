"""Where this process sits in the job: rank discovery for torchrun, srun and mpirun.

torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a job started by
mpirun or srun without torchrun has only its launcher's variables, from which (or from MPI
itself, through mpi4py) we derive the same. `discover()` reads the environment once and returns
what it found; it never writes os.environ, and the process group is initialised from its answer.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional

from ..config import ConfigError

# (rank, world size, local rank) variables of each launcher, most specific first
_LAUNCHERS = {
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    # SLURM_STEP_NUM_TASKS exists only inside an srun step, not in an interactive allocation
    "slurm": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
}
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torchrun | openmpi | mpich | slurm | single
    master_addr: Optional[str] = None  # rank 0's host, for the rendezvous
    master_port: int = DEFAULT_PORT

    @property
    def init_method(self) -> str:
        """torch.distributed's init_method: torchrun's own store (env://), else rank 0 serves a TCP store."""
        return "env://" if self.launcher == "torchrun" else f"tcp://{self.master_addr}:{self.master_port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_comm(env):
    """mpi4py's COMM_WORLD when mpi4py is installed and this is an MPI job, else None."""
    if not any(env.get(v[0]) for k, v in _LAUNCHERS.items() if k != "slurm"):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def launcher_rank(environ: Optional[dict] = None) -> int:
    """This process's global rank from the launcher's variables alone (no MPI call): for messages."""
    env = os.environ if environ is None else environ
    for var in ("RANK", *(v[0] for v in _LAUNCHERS.values())):
        if var in env and (var != "SLURM_PROCID" or "SLURM_STEP_NUM_TASKS" in env):
            return int(env[var])
    return 0


def discover(environ: Optional[dict] = None) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous of this process.

    torchrun's variables win; then MPI (through mpi4py when it is installed, which also agrees on
    the rendezvous by broadcasting rank 0's host and a free port), then the launchers' own
    variables (MASTER_ADDR must then be set). A plain `python` run is a world of one.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun",
                         env.get("MASTER_ADDR"), int(env.get("MASTER_PORT", DEFAULT_PORT)))
    comm = _mpi_comm(env) if environ is None else None
    for launcher, (rank_var, size_var, local_var) in _LAUNCHERS.items():
        if rank_var in env and size_var in env:
            rank, world = int(env[rank_var]), int(env[size_var])
            local = int(env.get(local_var, 0))
            addr, port = env.get("MASTER_ADDR"), int(env.get("MASTER_PORT", DEFAULT_PORT))
            if comm is not None:
                rank, world = comm.Get_rank(), comm.Get_size()
                # every rank must use the same rendezvous: take rank 0's answer
                found = comm.bcast((socket.gethostname(), free_port()) if rank == 0 else None, root=0)
                if addr is None:
                    addr, port = found
                from mpi4py import MPI

                local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
            if addr is None:
                raise ConfigError(f"started by {launcher} without torchrun, and without mpi4py to agree on a "
                                  "rendezvous: set MASTER_ADDR (rank 0's host) and MASTER_PORT, or install mpi4py "
                                  "(pip install mpi4py), or launch with launch/torchrun.sh")
            return LaunchEnv(rank, world, local, launcher, addr, port)
    return LaunchEnv(0, 1, 0, "single")


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ('gpu[01-03,07],login1') -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1'].

    Used when `scontrol show hostnames` is not at hand (dry runs, tests).
    """
    hosts, i = [], 0
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):  # split on commas outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    items.append(nodelist[start:])
    for item in filter(None, items):
        if "[" not in item:
            hosts.append(item)
            continue
        prefix, ranges = item.split("[", 1)
        ranges, suffix = ranges.split("]", 1)
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}{suffix}")
    return hosts


if __name__ == "__main__":  # `python -m moe_dist.parallel.env hostnames LIST` for the Slurm script
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "hostnames":
        print("\n".join(expand_hostlist(sys.argv[2])))
