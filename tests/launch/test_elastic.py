"""torchrun --max-restarts: a worker SIGKILLed mid-run, or in the middle of an asynchronous checkpoint
write, is restarted with its peer; both resume from the latest complete checkpoint, and the run ends
with the losses of an undisturbed one, each step logged once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "fault_worker.py"
ARGS = ["model.vocab_size=256", "model.d_model=32", "model.n_layer=2", "model.n_head=2", "model.d_ff=64",
        "model.max_seq_len=16", "moe.n_experts=4", "moe.top_k=2", "train.micro_batch_size=4", "train.device=cpu",
        "train.steps=5", "train.eval_every=0", "train.eval_batches=1", "train.log_every=1", "checkpoint.every=2",
        "logging.progress_bar=false", "logging.tensorboard=false", "parallel.ep=2"]


def torchrun(run_dir: Path, cache: Path, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           str(WORKER), *ARGS, f"logging.run_dir={run_dir}", f"data.cache_dir={cache}"]
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, out.stdout + out.stderr


def losses(rows) -> dict:
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    rows, _ = torchrun(root / "run", root / "cache")
    return rows, root / "cache"


@pytest.mark.parametrize("fault, at, resumed", [("kill_before_step", 3, 2), ("kill_in_save", 4, 2)])
def test_killed_worker_is_restarted_and_resumes(tmp_path, plain, fault, at, resumed):
    plain_rows, cache = plain
    marker = tmp_path / "killed-once"
    rows, log = torchrun(tmp_path / "faulty", cache, MOE_DIST_TEST_FAULT=f"{fault}:1:{at}:{marker}")
    assert marker.read_text() == fault, log[-3000:]  # rank 1 really was killed there
    assert f"resuming from step_{resumed:08d}" in log
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5]  # each step once, none lost
    assert losses(rows) == losses(plain_rows)  # and the same losses
    assert [r["val_loss"] for r in rows if r["kind"] == "val"] == [r["val_loss"] for r in plain_rows if r["kind"] == "val"]
    (resume,) = [r for r in rows if r["kind"] == "resumed"]
    assert resume["step"] == resumed and resume["checkpoint"] == f"step_{resumed:08d}"
    assert resume["layout"] == resume["saved_layout"] == {"world_size": 2, "pp": 1, "dp": 2, "tp": 1, "ep": 2}
    ckdir = tmp_path / "faulty" / "checkpoints"
    assert (ckdir / "latest").read_text().strip() == "step_00000005" and not list(ckdir.glob(".tmp-*"))
