"""torchrun --max-restarts: a worker SIGKILLed mid-run is restarted with its peer, both resume from the
latest checkpoint, and the run ends with the same losses as an undisturbed one and no lost steps."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARGS = ["model.vocab_size=256", "model.d_model=32", "model.n_layer=2", "model.n_head=2", "model.d_ff=64",
        "model.max_seq_len=16", "moe.n_experts=4", "moe.top_k=2", "train.micro_batch_size=4", "train.device=cpu",
        "train.steps=5", "train.eval_every=0", "train.eval_batches=1", "train.log_every=1", "checkpoint.every=2",
        "logging.progress_bar=false", "logging.tensorboard=false", "parallel.ep=2"]


def torchrun(run_dir: Path, cache: Path, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           "-m", "moe_dist.train", *ARGS, f"logging.run_dir={run_dir}", f"data.cache_dir={cache}"]
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}  # a re-run step overwrites its first try
    val = [r["val_loss"] for r in rows if r["kind"] == "val"][-1]
    return losses, val, out.stdout + out.stderr


def test_killed_worker_is_restarted_and_resumes(tmp_path):
    cache = tmp_path / "cache"
    plain, plain_val, _ = torchrun(tmp_path / "plain", cache)
    marker = tmp_path / "killed-once"
    losses, val, log = torchrun(tmp_path / "faulty", cache, MOE_DIST_TEST_KILL=f"1:3:{marker}")
    assert marker.exists(), log[-3000:]  # rank 1 really was killed after step 3
    assert "resuming from step_00000002" in log
    assert sorted(losses) == [1, 2, 3, 4, 5] and losses == plain  # no lost steps, same losses
    assert val == plain_val
