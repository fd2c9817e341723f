"""Training started through each launcher: torchrun.sh, mpirun (mpi4py), and the Slurm script's dry run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_dist.config import ConfigError
from moe_dist.parallel.env import discover, expand_hostlist

REPO = Path(__file__).resolve().parents[2]
TRAIN_ARGS = ["--config", "configs/tiny.yaml", "train.steps=3", "train.eval_every=0", "train.micro_batch_size=4",
              "model.max_seq_len=32", "logging.progress_bar=false", "logging.tensorboard=false", "parallel.ep=2"]


def run(cmd, tmp_path, timeout=240):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_torchrun_two_processes(tmp_path):
    out = run(["bash", "launch/torchrun.sh", "--nproc-per-node", "2", "--", *TRAIN_ARGS,
               f"logging.run_dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "final validation loss" in out.stdout
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    assert len(train_losses(tmp_path / "run")) >= 1


def test_torchrun_sh_passes_sigterm_to_the_workers_which_save_and_it_exits_zero(tmp_path):
    """SIGTERM to launch/torchrun.sh (as Slurm's preemption warning arrives through train.sbatch):
    the workers get it, save and exit 0, and so does the script (torchrun signalled itself exits 1)."""
    import signal
    import time

    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(["bash", "launch/torchrun.sh", "--nproc-per-node", "2", "--stop-grace", "120", "--",
                             *TRAIN_ARGS, "train.steps=100000", "train.log_every=1", f"logging.run_dir={run_dir}",
                             f"data.cache_dir={tmp_path}/cache"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not ((run_dir / "metrics.jsonl").is_file() and '"kind": "train"' in (run_dir / "metrics.jsonl").read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert "launch/torchrun.sh: SIGTERM: the workers save a checkpoint and exit" in out
    assert "SIGTERM received; checkpoint saved, exiting" in out
    step = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / step / "COMPLETE").is_file()


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no MPI installed (.ci/run installs Open MPI)")
def test_mpirun_two_processes_with_mpi4py(tmp_path):
    pytest.importorskip("mpi4py")
    out = run(["bash", "launch/mpirun.sh", "-np", "2", "--", *TRAIN_ARGS,
               f"logging.run_dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache"], tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "final validation loss" in out.stdout
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_slurm_dry_run_two_nodes(tmp_path):
    env_vars = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8",
                "SLURM_JOB_ID": "4242"}
    env = {**os.environ, **env_vars, "PYTHON": sys.executable}
    out = subprocess.run(["bash", "launch/slurm/train.sbatch", "--dry-run", "--config", "configs/mixtral_8x7b.yaml",
                          "parallel.ep=8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "MASTER_ADDR=gpu07 MASTER_PORT=24242 NNODES=2 GPUS_PER_NODE=8 STOP_GRACE_S=270"
    srun = lines[1]
    assert srun.startswith("srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 ")
    assert "launch/torchrun.sh" in srun and "NODE_RANK=\\$SLURM_NODEID" in srun
    assert "--nnodes 2 --nproc-per-node 8 --rdzv-endpoint gpu07:24242 -- --config configs/mixtral_8x7b.yaml parallel.ep=8" in srun
    assert "scontrol requeue 4242" in lines[2]
    # the per-node command torchrun.sh builds from it: c10d rendezvous on the first node
    node = subprocess.run(["bash", "launch/torchrun.sh", "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "8",
                           "--rdzv-endpoint", "gpu07:24242", "--dry-run", "--", "--config", "c.yaml"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert node.stdout.split()[1:] == ["-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1",
                                       "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu07:24242", "--rdzv-id",
                                       "moe_dist", "--nproc-per-node", "8", "--max-restarts", "0", "-m",
                                       "moe_dist.train", "--config", "c.yaml"]


def test_slurm_dry_run_with_a_python_without_torch_is_one_message(tmp_path):
    """It used to fail with `HOSTS[0]: unbound variable`."""
    bare = tmp_path / "python-without-torch"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")  # -S: no site-packages, so no torch
    bare.chmod(0o755)
    env = {**os.environ, "SLURM_JOB_NODELIST": "gpu[07-08]", "PYTHON": str(bare)}
    out = subprocess.run(["bash", "launch/slurm/train.sbatch", "--dry-run", "--config", "configs/tiny.yaml"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "unbound variable" not in out.stderr
    assert f"PYTHON={bare} cannot import torch and moe_dist (ModuleNotFoundError: No module named 'torch')" in out.stderr
    assert "set PYTHON to the python of the environment" in out.stderr


def test_mpirun_without_mpi4py_and_master_addr_is_one_message(tmp_path):
    """Open MPI's variables, mpi4py not importable and no MASTER_ADDR: exit 2, one line, rank 0 only."""
    blocked = tmp_path / "no_mpi4py" / "mpi4py"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('mpi4py is not installed here')\n")
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    for rank, expect in (("0", 1), ("1", 0)):
        env = {**base, "PYTHONPATH": f"{blocked.parent}:{REPO}", "OMPI_COMM_WORLD_RANK": rank, "OMPI_COMM_WORLD_SIZE": "2",
               "OMPI_COMM_WORLD_LOCAL_RANK": rank}
        out = subprocess.run([sys.executable, "-m", "moe_dist.train", "--config", "configs/tiny.yaml"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr.count("moe-dist: error:") == expect and "Traceback" not in out.stderr
        if expect:
            assert "set MASTER_ADDR (rank 0's host) and MASTER_PORT, or install mpi4py" in out.stderr


def test_expand_hostlist():
    assert expand_hostlist("gpu[07-09,12],login1") == ["gpu07", "gpu08", "gpu09", "gpu12", "login1"]
    assert expand_hostlist("a1,b[1-2]-ib") == ["a1", "b1-ib", "b2-ib"]


def test_rank_discovery_from_launcher_variables():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "MASTER_ADDR": "node0"}
    before = dict(env)
    got = discover(env)
    assert (got.rank, got.world_size, got.local_rank, got.launcher) == (3, 4, 1, "openmpi")
    assert (got.master_addr, got.master_port, got.init_method) == ("node0", 29500, "tcp://node0:29500")
    assert env == before  # discovered, never written back
    slurm = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "n0"}
    assert discover(slurm).rank == 5
    # an interactive allocation (no srun step) is a plain single process
    assert discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}).launcher == "single"
    assert discover({"RANK": "1", "WORLD_SIZE": "2", "PMI_RANK": "0", "PMI_SIZE": "9"}).launcher == "torchrun"
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        discover({"PMI_RANK": "0", "PMI_SIZE": "2"})


LIBRARY_SCRIPT = """
import sys
from moe_dist.config import load_config
from moe_dist.train import Trainer
trainer = Trainer(load_config(None, sys.argv[1:]))
print(f"rank {trainer.rt.pgm.rank if trainer.rt.pgm else 0} of {trainer.rt.world_size}", flush=True)
trainer.fit()
trainer.rt.close()
"""


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no MPI installed (.ci/run installs Open MPI)")
def test_trainer_used_as_a_library_under_mpirun_runs_the_distributed_job(tmp_path):
    """No moe-dist CLI and no torchrun: Trainer(cfg) finds its rank and world from MPI itself."""
    pytest.importorskip("mpi4py")
    script = tmp_path / "train_lib.py"
    script.write_text(LIBRARY_SCRIPT)
    args = [a for a in TRAIN_ARGS if not a.startswith("--config") and a != "configs/tiny.yaml"]
    out = run(["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-x", "PATH", "-x", "PYTHONPATH",
               "-np", "2", sys.executable, str(script), *args, "model.d_model=32", "model.d_ff=64", "model.n_head=2",
               f"logging.run_dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache"], tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert sorted(line for line in out.stdout.splitlines() if line.startswith("rank ")) == ["rank 0 of 2", "rank 1 of 2"]
    assert "resolved: world 2 = dp 2 x tp 1; ep 2" in out.stdout
