"""Single-process checkpoints, written atomically, with a `latest` pointer and keep-last-N.

    run_dir/checkpoints/step_00000100/   model.pt  train_state.pt  config.yaml
    run_dir/checkpoints/latest           "step_00000100"

A checkpoint is written into a temporary directory and renamed into place (os.replace), then
`latest` is replaced; a crash at any moment leaves the previous checkpoint usable and no partial
step_* directory. Older checkpoints beyond keep_last are deleted last.
"""
from __future__ import annotations

import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read; the message names the path and the fix."""


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": np.array(n["key"], dtype=np.uint32), "pos": n["pos"]}})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    # -- writing ------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module | dict, optimizer: Optional[torch.optim.Optimizer | dict],
             sampler_state: Optional[dict], config: dict, extra: Optional[dict] = None) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            # a module or its state dict (an expert-parallel job passes the gathered one-device state)
            torch.save(model if isinstance(model, dict) else model.state_dict(), tmp / "model.pt")
            opt_state = optimizer if isinstance(optimizer, dict) or optimizer is None else optimizer.state_dict()
            torch.save({"step": step, "optimizer": opt_state,
                        "sampler": sampler_state, "rng": rng_state(), "extra": extra or {}},
                       tmp / "train_state.pt")
            (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step (e.g. the end step equals a periodic one)
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._write_latest(final.name)
        self._prune()
        return final

    def _write_latest(self, name: str) -> None:
        tmp = self.dir / f".{LATEST}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(name + "\n")
        os.replace(tmp, self.dir / LATEST)

    def _prune(self) -> None:
        steps = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        for old in steps[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".tmp-*"):  # left by a crash of an earlier run
            shutil.rmtree(stale, ignore_errors=True)

    # -- reading ------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        pointer = self.dir / LATEST
        if not pointer.is_file():
            return None
        path = self.dir / pointer.read_text().strip()
        if not (path / "model.pt").is_file():
            raise CheckpointError(f"{pointer} points at {path.name}, which is missing or incomplete; "
                                  f"fix the pointer to an existing step_* directory or delete {self.dir}")
        return path


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a run dir (its latest), a checkpoints dir, or a step_* dir."""
    p = Path(path)
    if (p / "model.pt").is_file():
        return p
    for candidate in (p, p / "checkpoints"):
        if (candidate / LATEST).is_file():
            return Checkpointer(candidate.parent if candidate.name == "checkpoints" else candidate).latest()
    raise CheckpointError(f"{path}: no checkpoint found (expected {p}/checkpoints/{LATEST}); "
                          f"train first with `moe-dist train`, or pass the run's logging.run_dir")


def load_config_dict(ckpt: Path) -> dict:
    return yaml.safe_load((ckpt / "config.yaml").read_text())


def load_model_state(ckpt: Path, map_location: Any = "cpu") -> dict:
    return torch.load(ckpt / "model.pt", map_location=map_location, weights_only=True)


def load_train_state(ckpt: Path, map_location: Any = "cpu") -> dict:
    return torch.load(ckpt / "train_state.pt", map_location=map_location, weights_only=True)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
