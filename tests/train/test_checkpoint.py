import errno
import os
import threading
from pathlib import Path

import pytest
import torch

from moe_dist.config import ConfigError
from moe_dist.checkpoint.manager import check, load_model_state
from moe_dist.train import Checkpointer, CheckpointError, Trainer, find_checkpoint


def test_resume_gives_identical_losses(tiny_cfg, tmp_path):
    extra = ("train.steps=12", "checkpoint.every=4", "moe.router_jitter=0.1", "train.grad_accum_steps=2")
    full = Trainer(tiny_cfg(*extra, f"logging.run_dir={tmp_path / 'full'}")).fit()

    first = Trainer(tiny_cfg(*extra, f"logging.run_dir={tmp_path / 'split'}"))
    part = first.fit(until_step=8)  # as if the job were killed after the step-8 checkpoint
    del first
    second = Trainer(tiny_cfg(*extra, f"logging.run_dir={tmp_path / 'split'}"))
    assert second.step == 8 and second.resumed_from.name == "step_00000008"
    rest = second.fit()
    assert part["losses"] + rest["losses"] == full["losses"]  # bit-identical, not approximately
    assert rest["val_loss"] == full["val_loss"]


def test_checkpoint_layout_latest_pointer_and_keep_last(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.steps=10", "checkpoint.every=2", "checkpoint.keep_last=2")
    Trainer(cfg).fit()
    ckdir = Path(cfg.logging.run_dir) / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_00000008", "step_00000010"]
    assert (ckdir / "latest").read_text().strip() == "step_00000010"
    assert {p.name for p in (ckdir / "step_00000010").iterdir()} == {".metadata", "__0_0.distcp", "rank_00000.pt",
                                                                     "meta.json", "config.yaml", "manifest.json",
                                                                     "COMPLETE"}
    assert find_checkpoint(cfg.logging.run_dir) == ckdir / "step_00000010"


def test_crash_while_saving_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(1, model, None, None, {"a": 1})
    ck.wait()

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint step_00000002 .*No space left.* free there; "
                                              r"the previous checkpoint step_00000001 is intact"):
        ck.save(2, model, None, None, {"a": 1})
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["latest", "step_00000001"]  # no partial step_00000002, no temp dir
    assert ck.latest().name == "step_00000001"


def test_async_save_returns_before_the_write_and_keeps_the_values_it_was_given(tmp_path, monkeypatch):
    """save() returns with the shards staged; training may change the weights at once; `latest` moves
    only when the checkpoint is complete (wait)."""
    from torch.distributed.checkpoint import FileSystemWriter

    model = torch.nn.Linear(4, 4)
    ck = Checkpointer(tmp_path)
    ck.save(1, model, None, None, {"a": 1})
    ck.wait()
    release, original = threading.Event(), FileSystemWriter.write_data

    def held_write(self, plan, planner):
        assert release.wait(60)
        return original(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", held_write)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    final = ck.save(2, model, None, None, {"a": 1})
    with torch.no_grad():
        model.weight.add_(1.0)  # the next optimizer step, while the shards are being written
    assert not final.exists() and (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    release.set()
    assert ck.wait() == final and check(final) is None
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    for k, v in load_model_state(final).items():
        torch.testing.assert_close(v, saved[k], atol=0, rtol=0)


def _complete_run(root: Path, steps: list[int]) -> Path:
    model = torch.nn.Linear(2, 2)
    ck = Checkpointer(root, keep_last=10)
    for step in steps:
        ck.save(step, model, None, None, {"a": 1})
    ck.wait()
    return root / "checkpoints"


def test_dangling_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    ckdir = _complete_run(tmp_path, [6, 7, 8])
    (ckdir / "latest").write_text("step_00000005\n")  # an older step that is gone
    with pytest.warns(UserWarning, match=r"names step_00000005, which cannot be used \(missing\).*falling back to "
                                         r"step_00000008, the newest complete"):
        assert Checkpointer(tmp_path).latest().name == "step_00000008"
    (ckdir / "step_00000008" / "COMPLETE").unlink()  # the newest one did not finish either
    (ckdir / "latest").unlink()  # and the pointer was lost with the node
    with pytest.warns(UserWarning, match=r"latest is missing.*step_00000008: no COMPLETE.*falling back to step_00000007"):
        assert Checkpointer(tmp_path).latest().name == "step_00000007"


def test_no_complete_checkpoint_is_a_clear_error_that_advises_no_deleting(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000005\n")
    with pytest.raises(CheckpointError, match="step_00000005") as e:
        Checkpointer(tmp_path).latest()
    assert "delete" not in str(e.value) and "checkpoint.resume=false" in str(e.value)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_checkpoint(tmp_path / "nowhere")


def test_resume_with_another_model_shape_is_a_clear_error(tiny_cfg):
    Trainer(tiny_cfg("train.steps=2")).fit()
    with pytest.raises(ConfigError, match="model.d_model: 32 in the checkpoint, 64 now"):
        Trainer(tiny_cfg("train.steps=4", "model.d_model=64"))


def test_resume_past_the_end_or_with_another_schedule_is_refused(tiny_cfg):
    Trainer(tiny_cfg("train.steps=4")).fit()
    with pytest.raises(ConfigError, match="train.steps: 3, but .*step_00000004 is at step 4"):
        Trainer(tiny_cfg("train.steps=3", "checkpoint.allow_config_change=true"))
    for override in ("train.steps=6", "train.lr=1e-3"):
        with pytest.raises(ConfigError, match=f"another schedule:\n  {override.split('=')[0]}"):
            Trainer(tiny_cfg(override))
    for override in ("moe.top_k=1", "moe.score_func=sigmoid", "model.n_head=1"):  # n_head: shapes unchanged
        with pytest.raises(ConfigError, match=f"another model or data.*\n  {override.split('=')[0]}"):
            Trainer(tiny_cfg("train.steps=6", override))
    resumed = Trainer(tiny_cfg("train.steps=6", "train.lr=1e-3", "checkpoint.allow_config_change=true"))
    assert resumed.step == 4 and [k for k, *_ in resumed.run.schedule_changes] == ["train.lr", "train.steps"]
    assert "train.lr: 0.01 in the checkpoint, now 0.001" in resumed.describe(3.0)
