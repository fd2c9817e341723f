"""`python -m moe_dist.train ARGS` with one fault injected from outside the package, for torchrun to
run in the fault tests. MOE_DIST_TEST_FAULT="WHAT:RANK:STEP:MARKER" (once: the marker file remembers):

  kill_before_step   SIGKILL rank RANK before optimizer step STEP + 1, after step STEP's log and once this
                     rank's part of the checkpoint in flight is written (so that checkpoint survives)
  kill_in_save       SIGKILL rank RANK in the background write of checkpoint STEP, once its shards are
                     written and before the checkpoint is complete
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's moe_dist, not an installed one


def _kill(marker: str, what: str) -> None:
    Path(marker).write_text(what)
    os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    spec = os.environ.get("MOE_DIST_TEST_FAULT")
    if not spec:
        return
    what, rank, step, marker = spec.split(":", 3)
    if int(os.environ.get("RANK", "0")) != int(rank) or os.path.exists(marker):
        return
    step = int(step)
    if what == "kill_before_step":
        from moe_dist.train.trainer import Trainer

        train_step = Trainer.train_step

        def killing_train_step(self, *args, **kwargs):
            if self.step == step:
                self.checkpointer.drain()
                _kill(marker, what)
            return train_step(self, *args, **kwargs)

        Trainer.train_step = killing_train_step
    elif what == "kill_in_save":
        from torch.distributed.checkpoint import FileSystemWriter

        write_data = FileSystemWriter.write_data

        def killing_write_data(self, plan, planner):
            written = write_data(self, plan, planner)
            if Path(self.path).name == f".tmp-step_{step:08d}":
                _kill(marker, what)
            return written

        FileSystemWriter.write_data = killing_write_data
    else:
        raise ValueError(f"MOE_DIST_TEST_FAULT: unknown fault {what!r}")


if __name__ == "__main__":
    install()
    from moe_dist.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
