"""Checkpoints: what is saved (state.py: each rank's shards as DTensors, optimizer state per parameter)
and how (manager.py: DCP, written atomically, verified, keep-last-N, resumable at any layout)."""
from .manager import (Checkpointer, CheckpointError, checkpoint_bytes, find_checkpoint, list_checkpoints,
                      load_config_dict, load_model_state)

__all__ = ["Checkpointer", "CheckpointError", "checkpoint_bytes", "find_checkpoint", "list_checkpoints",
           "load_config_dict", "load_model_state"]
