"""SIGTERM or Ctrl-C (SIGINT) to a training process: it saves a checkpoint at the next step boundary and
exits 0; running the same command again resumes from that checkpoint, with the losses of an
uninterrupted run and each step logged once. A second Ctrl-C aborts at once."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY
from moe_dist.train import Trainer
from moe_dist.train.metrics import keep_through
from moe_dist.train.signals import StopRequest

ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1")


def _args(run: Path, data_cache: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moe_dist.train", *TINY, f"data.cache_dir={data_cache}", f"logging.run_dir={run}",
            "train.eval_batches=1", *extra]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _signal_when_training(proc: subprocess.Popen, sig: int, run: Path, after_step: int) -> None:
    """Send `sig` once metrics.jsonl has a train record at `after_step` or later."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        path = run / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        if any(f'"kind": "train"' in line and json.loads(line)["step"] >= after_step for line in lines[:-1]):
            proc.send_signal(sig)
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not reach step {after_step}: {proc.poll()}")


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path, data_cache):
    run = tmp_path / "run"
    args = _args(run, data_cache)
    proc = subprocess.Popen([*args, "train.steps=100000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV)
    _signal_when_training(proc, signal.SIGTERM, run, 5)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM received; checkpoint saved" in out and "stopped at step" in out
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and (run / "checkpoints" / "latest").read_text().strip() == ckpts[0]
    step = int(ckpts[0].split("_")[1])
    assert 0 < step < 100000
    again = subprocess.run([*args, f"train.steps={step + 1}", "checkpoint.allow_config_change=true"], capture_output=True,
                           text=True, env=ENV, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming from {ckpts[0]} at step {step}" in again.stdout


def test_ctrl_c_saves_and_the_rerun_resumes_exactly(tmp_path, data_cache):
    """With the default checkpoint.every=0, Ctrl-C used to lose the run."""
    steps = ["train.steps=300", "train.log_every=1", "train.warmup_steps=2"]
    full = tmp_path / "full"
    subprocess.run(_args(full, data_cache, *steps), env=ENV, check=True, capture_output=True, timeout=300)
    run = tmp_path / "run"
    proc = subprocess.Popen(_args(run, data_cache, *steps), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV)
    _signal_when_training(proc, signal.SIGINT, run, 3)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGINT received; checkpoint saved" in out
    stopped = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped < 300, "the run ended before the interrupt reached it"
    again = subprocess.run(_args(run, data_cache, *steps), capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming from step_{stopped:08d}" in again.stdout
    rows, reference = _records(run), _records(full)
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    assert train == [(r["step"], r["loss"]) for r in reference if r["kind"] == "train"]  # each step once, same losses
    assert [r["step"] for r in rows if r["kind"] == "resumed"] == [stopped]
    assert [r["val_loss"] for r in rows if r["kind"] == "val"] == [r["val_loss"] for r in reference if r["kind"] == "val"]


def test_a_second_ctrl_c_aborts_at_once():
    stop = StopRequest()
    stop._handle(signal.SIGINT, None)
    assert stop.requested and stop.name() == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
    term = StopRequest()
    term._handle(signal.SIGTERM, None)
    term._handle(signal.SIGTERM, None)  # Slurm may repeat SIGTERM: still one request, no abort
    assert term.name() == "SIGTERM"


def test_a_resume_drops_the_records_of_replayed_steps(tiny_cfg, tmp_path):
    """A crash after step 6 with the last checkpoint at 4: the rerun logs steps 5 and 6 again, once."""
    cfg = tiny_cfg("train.steps=8", "train.log_every=1", "checkpoint.every=4")
    first = Trainer(cfg)
    first.fit(until_step=6)  # saves at 4, and at 6 as the stop
    ckdir = Path(cfg.logging.run_dir) / "checkpoints"
    (ckdir / "step_00000006" / "COMPLETE").unlink()  # as if the process died writing step 6
    with open(Path(cfg.logging.run_dir) / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "kind": "tr')  # and a line cut short
    with pytest.warns(UserWarning, match="falling back to step_00000004"):
        second = Trainer(cfg)
    second.fit()
    rows = _records(Path(cfg.logging.run_dir))
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))
    (resumed,) = [r for r in rows if r["kind"] == "resumed"]
    assert resumed["step"] == 4 and resumed["checkpoint"] == "step_00000004"
    assert resumed["layout"] == resumed["saved_layout"] == {"world_size": 1, "pp": 1, "dp": 1, "tp": 1, "ep": 1}


def test_keep_through(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step"')
    keep_through(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
