"""Faults in a 2-process job: a stop signal on one rank makes every rank save and leave at the same
step; a collective that hangs past parallel.timeout_s fails with an error naming the step and group."""
import os
import signal
import time

import pytest

from dist_helper import run_workers
from moe_dist.config import load_config
from moe_dist.train import Trainer, TrainingError

TINY = ["model.vocab_size=256", "model.d_model=32", "model.n_layer=2", "model.n_head=2", "model.d_ff=64",
        "model.max_seq_len=16", "moe.n_experts=4", "moe.top_k=2", "train.micro_batch_size=4", "train.device=cpu",
        "train.eval_every=0", "train.eval_batches=1", "train.log_every=1", "logging.progress_bar=false",
        "logging.tensorboard=false", "parallel.ep=2"]


def make(run_dir, cache, *overrides):
    return Trainer(load_config(None, TINY + [f"data.cache_dir={cache}", f"logging.run_dir={run_dir}", *overrides],
                               world_size=2))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults_cache")
    Trainer(load_config(None, TINY[:-1] + [f"data.cache_dir={path}", f"logging.run_dir={path / 'warm'}"]))
    return str(path)


def _signal_worker(rank, run_dir, cache):
    trainer = make(run_dir, cache, "train.steps=50")
    step = trainer.train_step

    def train_step(**kw):
        if rank == 1 and trainer.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives mid-step on rank 1 only
        return step(**kw)

    trainer.train_step = train_step
    out = trainer.fit()
    again = make(run_dir, cache, "train.steps=50")
    return out.get("stopped"), out["step"], again.step, again.resumed_from.name


def test_stop_signal_on_one_rank_stops_all_at_the_same_step(tmp_path, cache):
    got = run_workers(_signal_worker, 2, str(tmp_path / "run"), cache)
    assert got[1][0] == "SIGUSR1" and got[0][0] == "a peer's stop request"
    assert got[0][1:] == got[1][1:] == (3, 3, "step_00000003")  # stopped after step 3, saved, resumable


def _hang_worker(rank, run_dir, cache):
    trainer = make(run_dir, cache, "train.steps=4", "parallel.timeout_s=2")
    step = trainer.train_step

    def train_step(**kw):
        if rank == 1 and trainer.step == 1:
            time.sleep(6)  # rank 0 waits in its first collective of step 2 past the timeout
        return step(**kw)

    trainer.train_step = train_step
    try:
        trainer.fit()
    except TrainingError as e:
        return str(e)
    except RuntimeError as e:  # rank 1 may find its peer gone instead
        return f"RuntimeError: {e}"
    return "finished"


def test_hung_collective_fails_with_step_and_group(tmp_path, cache):
    got = run_workers(_hang_worker, 2, str(tmp_path / "run"), cache, timeout=60)
    assert got[0].startswith("step 2: all_to_all_single on the ep/dp group (ranks [0, 1])") and "timeout_s=2" in got[0], got[0]
