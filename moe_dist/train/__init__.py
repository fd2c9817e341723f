"""Training: the loop (trainer), AdamW groups (optimizer), lr schedule, checkpoints and metrics."""
from moe_dist.train.checkpoint import Checkpointer, CheckpointError, find_checkpoint
from moe_dist.train.schedule import lr_at
from moe_dist.train.trainer import Runtime, Trainer, TrainingError, setup, train

__all__ = ["Trainer", "Runtime", "setup", "train", "TrainingError", "Checkpointer", "CheckpointError",
           "find_checkpoint", "lr_at"]
