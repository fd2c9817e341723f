"""Training: the composition root (setup), the loop (trainer), runtimes, AdamW groups, lr schedule, metrics."""
from moe_dist.checkpoint import Checkpointer, CheckpointError, find_checkpoint
from moe_dist.train.runtime import DistributedRuntime, Runtime
from moe_dist.train.schedule import lr_at
from moe_dist.train.setup import Run, build_run
from moe_dist.train.trainer import Trainer, TrainingError, train

__all__ = ["Trainer", "Run", "build_run", "Runtime", "DistributedRuntime", "train", "TrainingError", "Checkpointer",
           "CheckpointError", "find_checkpoint", "lr_at"]
