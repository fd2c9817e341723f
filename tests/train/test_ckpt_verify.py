"""A truncated, corrupt or unfinished latest checkpoint is reported with a warning and the one
before it is used; the consolidated model reads back from the sharded format in one process."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from moe_dist.train import Checkpointer, Trainer
from moe_dist.checkpoint.manager import load_model_state, verify


def _damage(ckpt: Path, how: str) -> None:
    shard = ckpt / "__0_0.distcp"
    if how == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "corrupt":  # same size, flipped bytes
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:  # the save never finished
        (ckpt / "manifest.json").unlink()


def test_damaged_latest_falls_back_to_previous(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.steps=4", "checkpoint.every=2")
    Trainer(cfg).fit()
    assert verify(Path(cfg.logging.run_dir) / "checkpoints" / "step_00000004") is None
    for how in ("truncate", "corrupt", "unfinished"):
        run = tmp_path / how
        shutil.copytree(cfg.logging.run_dir, run)
        ckdir = run / "checkpoints"
        _damage(ckdir / "step_00000004", how)
        assert verify(ckdir / "step_00000004") is not None
        with pytest.warns(UserWarning, match="step_00000004.*falling back"):
            resumed = Trainer(tiny_cfg("train.steps=4", "checkpoint.every=2", f"logging.run_dir={run}"))
        assert resumed.resumed_from.name == "step_00000002" and resumed.step == 2, how


def test_consolidated_state_matches_model(tiny_cfg):
    trainer = Trainer(tiny_cfg("train.steps=2"))
    trainer.fit()
    state = load_model_state(Checkpointer(trainer.cfg.logging.run_dir).latest())
    for k, v in trainer.model.state_dict().items():
        torch.testing.assert_close(state[k], v, atol=0, rtol=0)
    manifest = json.loads((Checkpointer(trainer.cfg.logging.run_dir).latest() / "manifest.json").read_text())
    assert {".metadata", "__0_0.distcp", "rank_00000.pt", "config.yaml", "meta.json"} <= set(manifest["files"])
