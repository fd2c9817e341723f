"""SIGTERM to a training process: it saves a checkpoint at the next step boundary and exits 0;
running the same command again resumes from that checkpoint."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TINY


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path, data_cache):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "moe_dist.train", *TINY, f"data.cache_dir={data_cache}", f"logging.run_dir={run}", "train.eval_batches=1"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([*args, "train.steps=100000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    out = []
    for line in proc.stdout:  # the first line is printed when training starts
        out.append(line)
        if line.startswith("moe-dist:"):
            break
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(out) + rest
    assert "SIGTERM received; checkpoint saved" in rest and "stopped at step" in rest
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and (run / "checkpoints" / "latest").read_text().strip() == ckpts[0]
    step = int(ckpts[0].split("_")[1])
    assert 0 < step < 100000
    again = subprocess.run([*args, f"train.steps={step + 1}", "checkpoint.allow_config_change=true"], capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming from {ckpts[0]} at step {step}" in again.stdout
