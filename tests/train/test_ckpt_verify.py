"""A truncated or unfinished latest checkpoint is found by sizes and DCP's metadata, reported with a
warning, and the one before it used; corruption of the same size only by sha256 on request
(`moe-dist ckpt verify`); nothing read from a run dir runs code; the consolidated model reads back
from the sharded format in one process."""
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from moe_dist.checkpoint.manager import _load_rank_file, check, load_model_state, verify
from moe_dist.cli import main
from moe_dist.train import Checkpointer, CheckpointError, Trainer


def _resize_in_manifest(ckpt: Path, rel: str) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][rel]["size"] = (ckpt / rel).stat().st_size
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _damage(ckpt: Path, how: str) -> None:
    shard = ckpt / "__0_0.distcp"
    if how == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "corrupt":  # same size, flipped bytes
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif how == "metadata":  # the metadata no longer parses
        (ckpt / ".metadata").write_bytes((ckpt / ".metadata").read_bytes()[:50])
        _resize_in_manifest(ckpt, ".metadata")
    else:  # the save never finished
        (ckpt / "COMPLETE").unlink()


@pytest.fixture(scope="module")
def run4(tmp_path_factory, data_cache):
    """A 4-step run with checkpoints at 2 and 4, SHA256SUMS recorded after each save."""
    from conftest import TINY
    from moe_dist.config import load_config

    run = tmp_path_factory.mktemp("run4") / "run"
    Trainer(load_config(None, TINY + [f"data.cache_dir={data_cache}", f"logging.run_dir={run}", "train.steps=4",
                                      "checkpoint.every=2", "checkpoint.checksums=true"])).fit()
    return run


def test_damaged_latest_falls_back_to_previous(tiny_cfg, tmp_path, run4):
    ckpt = run4 / "checkpoints" / "step_00000004"
    assert verify(ckpt) is None and verify(ckpt, checksums=True) is None
    assert (ckpt / "SHA256SUMS").read_text().count("\n") == len(json.loads((ckpt / "manifest.json").read_text())["files"])
    for how in ("truncate", "metadata", "unfinished"):
        run = tmp_path / how
        shutil.copytree(run4, run)
        ckdir = run / "checkpoints"
        _damage(ckdir / "step_00000004", how)
        assert check(ckdir / "step_00000004") is not None, how
        with pytest.warns(UserWarning, match="step_00000004.*falling back to step_00000002"):
            resumed = Trainer(tiny_cfg("train.steps=4", "checkpoint.every=2", f"logging.run_dir={run}"))
        assert resumed.resumed_from.name == "step_00000002" and resumed.step == 2, how


def test_corruption_of_the_same_size_is_found_by_ckpt_verify_only(capsys, tmp_path, run4):
    run = tmp_path / "corrupt"
    shutil.copytree(run4, run)
    _damage(run / "checkpoints" / "step_00000004", "corrupt")
    assert check(run / "checkpoints" / "step_00000004") is None  # loading reads no more than sizes and metadata
    assert main(["ckpt", "verify", str(run4)]) == 0
    out = capsys.readouterr().out
    assert out.count("match SHA256SUMS") == 2, out
    assert main(["ckpt", "verify", str(run)]) == 2
    out, err = capsys.readouterr()
    assert "step_00000004: __0_0.distcp does not match its recorded sha256" in out and "step_00000002: ok" in out
    assert err.startswith("moe-dist: error:") and err.count("\n") == 1 and "write step_00000002 into" in err


def test_reading_a_run_dir_runs_no_code_from_it(tmp_path, run4):
    """A pickle placed as .metadata or as a rank file would call os.mkdir when unpickled in full."""
    run = tmp_path / "planted"
    shutil.copytree(run4, run)
    ckpt = run / "checkpoints" / "step_00000004"
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload()))
    _resize_in_manifest(ckpt, ".metadata")  # as a planted file would come with its manifest
    assert ".metadata unreadable" in check(ckpt) and "mkdir is not part of" in check(ckpt)
    with pytest.raises(pickle.UnpicklingError, match="mkdir is not part of a checkpoint.s metadata"):
        load_model_state(ckpt)
    ckpt = run / "checkpoints" / "step_00000002"
    torch.save({"step": 2, "payload": Payload()}, ckpt / "rank_00000.pt")
    with pytest.raises(CheckpointError, match="rank_00000.pt: holds posix.mkdir, which is neither a tensor nor a plain"):
        _load_rank_file(ckpt / "rank_00000.pt")
    assert not marker.exists()


def test_consolidated_state_matches_model(tiny_cfg):
    trainer = Trainer(tiny_cfg("train.steps=2"))
    trainer.fit()
    state = load_model_state(Checkpointer(trainer.cfg.logging.run_dir).latest())
    for k, v in trainer.model.state_dict().items():
        torch.testing.assert_close(state[k], v, atol=0, rtol=0)
    manifest = json.loads((Checkpointer(trainer.cfg.logging.run_dir).latest() / "manifest.json").read_text())
    assert {".metadata", "__0_0.distcp", "rank_00000.pt", "config.yaml", "meta.json"} <= set(manifest["files"])
