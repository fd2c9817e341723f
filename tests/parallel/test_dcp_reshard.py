"""Distributed checkpoints (DCP) through the real Trainer: an ep=2 run stopped and resumed gives the
same losses as an uninterrupted one (AdamW, the FSDP2 ZeRO-1 fallback, DeepSpeed ZeRO-2); a checkpoint written
at world 4, ep=4 loads at ep=2, at world 2 with ep=1 and in one process with the same weights, AdamW
moments and validation loss; one written at tp=2 loads at ep=2 and in one process, and resumes at tp=1 and tp=2 x ep=2 with
the uninterrupted losses (with and without expert_tp); a DeepSpeed ZeRO-2
run resumes at another layout, or in one process on AdamW, and continues as if uninterrupted."""

import pytest
import torch

from dist_helper import full_model_state, full_optimizer_state, run_workers
from moe_dist.config import load_config
from moe_dist.checkpoint.state import dcp_optimizer_supported, zero_optimizer
from moe_dist.parallel.zero import deepspeed_available
from moe_dist.train import Trainer
from moe_dist.checkpoint.manager import CheckpointError, load_model_state
from moe_dist.model import build_model

# global micro-batch 8 at every dp (micro_batch_size = 8 / dp) in routing groups of 2 sequences, so every
# layout sees the same batches and the same capacity groups
TINY = ["model.vocab_size=256", "model.d_model=32", "model.n_layer=2", "model.n_head=2", "model.d_ff=64",
        "model.max_seq_len=16", "moe.n_experts=4", "moe.top_k=2", "train.lr=1e-2", "train.warmup_steps=2",
        "train.device=cpu", "train.eval_every=0", "train.eval_batches=2", "train.log_every=1",
        "logging.progress_bar=false", "logging.tensorboard=false"]


def config(run_dir, cache, world, *overrides):
    return load_config(None, TINY + [f"data.cache_dir={cache}", f"logging.run_dir={run_dir}",
                                     f"train.micro_batch_size={8 // world}", f"moe.routing_groups={4 // world}",
                                     *overrides], world_size=world)


def _fit(rank, run_dir, cache, world, overrides, until=None):
    if "train.zero_stage=1" in overrides:  # the FSDP2 fallback (parameters kept gathered), even with DeepSpeed installed
        import moe_dist.parallel.zero as zero

        zero.deepspeed_available = lambda: False
    trainer = Trainer(config(run_dir, cache, world, *overrides))
    out = trainer.fit(until_step=until)
    pgm = trainer.rt.pgm
    return dict(losses=out["losses"], val_loss=out["val_loss"], step=trainer.step,
                resumed=trainer.resumed_from.name if trainer.resumed_from else None,
                state=full_model_state(trainer.model, pgm) if pgm else trainer.model.state_dict(),
                opt=None if not dcp_optimizer_supported(trainer.optimizer) or zero_optimizer(trainer.optimizer) else
                (full_optimizer_state(trainer.optimizer, trainer.model, pgm) if pgm else trainer.optimizer.state_dict())["state"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("dcp_cache")
    Trainer(config(path / "warm", path, 1, "train.steps=1"))  # tokenize the corpus once, before forking
    return str(path)


def _resume_worker(rank, root, cache, extra):
    """Uninterrupted, then stopped at step 3 and resumed by a new Trainer (new engine, state from disk only);
    one launch, so DeepSpeed's start-up is paid once."""
    full = _fit(rank, f"{root}/full", cache, 2, extra)
    part = _fit(rank, f"{root}/split", cache, 2, extra, 3)
    rest = _fit(rank, f"{root}/split", cache, 2, extra)
    return full, part, rest


# AdamW, and ZeRO (the FSDP2 fallback, DeepSpeed ZeRO-2) regathered per parameter, through DCP; ZeRO-2 per rank
@pytest.mark.parametrize("zero", ["0", "1", "2", "2-per_rank"])
def test_ep2_resume_equals_uninterrupted(tmp_path, cache, zero):
    if zero.startswith("2") and not deepspeed_available():
        pytest.skip("DeepSpeed not installed")
    zero, _, per_rank = zero.partition("-")
    extra = ("parallel.ep=2", "train.steps=6", "checkpoint.every=3", "moe.router_jitter=0.1", f"train.zero_stage={zero}",
             *(["checkpoint.zero_state=per_rank"] if per_rank else []))
    full, part, rest = run_workers(_resume_worker, 2, str(tmp_path), cache, extra, timeout=300)[0]
    assert rest["resumed"] == "step_00000003" and rest["step"] == 6
    assert part["losses"] + rest["losses"] == full["losses"]  # bit-identical
    assert rest["val_loss"] == full["val_loss"]


def test_world4_ep4_checkpoint_loads_at_other_layouts(tmp_path, cache):
    run = str(tmp_path / "run")
    saved = run_workers(_fit, 4, run, cache, 4, ("parallel.ep=4", "train.steps=2"))[0]
    one_device = load_model_state(tmp_path / "run" / "checkpoints" / "step_00000002")  # consolidated, no process group
    for k, v in saved["state"].items():
        torch.testing.assert_close(one_device[k], v, atol=0, rtol=0)
    for world, ep in ((4, 2), (2, 1)):
        got = run_workers(_fit, world, run, cache, world, (f"parallel.ep={ep}", "train.steps=2"))[0]
        assert got["resumed"] == "step_00000002" and got["losses"] == []
        for k, v in saved["state"].items():
            torch.testing.assert_close(got["state"][k], v, atol=0, rtol=0)
        assert got["opt"].keys() == saved["opt"].keys() and saved["opt"]  # AdamW moments, experts regathered
        for i, s in saved["opt"].items():
            for name, v in s.items():
                torch.testing.assert_close(got["opt"][i][name], v, atol=0, rtol=0)
        assert got["val_loss"] == pytest.approx(saved["val_loss"], rel=1e-5)
    with pytest.warns(UserWarning, match="RNG"):
        single = _fit(0, run, cache, 1, ("train.steps=2",))
    assert single["resumed"] == "step_00000002"
    assert single["val_loss"] == pytest.approx(saved["val_loss"], rel=1e-5)


def _val(rank, run, cache, world, overrides):
    trainer = Trainer(config(run, cache, world, *overrides))
    return trainer.resumed_from.name if trainer.resumed_from else None, trainer.evaluate()


def test_tp2_checkpoint_loads_at_ep2_and_in_one_process(tmp_path, cache):
    run = str(tmp_path / "run")
    saved = run_workers(_fit, 2, run, cache, 2, ("parallel.tp=2", "train.steps=2", "model.n_head=4",
                                                 "train.micro_batch_size=8", "moe.routing_groups=4"))[0]
    # tp=2 means dp=1: the global micro-batch is 8 on each rank
    one = load_model_state(tmp_path / "run" / "checkpoints" / "step_00000002")
    ref = build_model(config(run, cache, 1, "model.n_head=4")).state_dict()
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in ref.items()}  # one-device shapes
    got = run_workers(_val, 2, run, cache, 2, ("parallel.ep=2", "model.n_head=4", "train.steps=2"))[0]
    assert got[0] == "step_00000002" and got[1] == pytest.approx(saved["val_loss"], rel=1e-5)
    with pytest.warns(UserWarning, match="RNG"):
        name, val = _val(0, run, cache, 1, ("model.n_head=4", "train.steps=2"))
    assert val == pytest.approx(saved["val_loss"], rel=1e-5)


def _tp_resume_worker(rank, root, cache, extra):
    """At tp=2 (dp 1, so the whole global micro-batch on each rank): uninterrupted, and stopped at step 3."""
    tp = ("parallel.tp=2", "train.micro_batch_size=8", "moe.routing_groups=4", *extra)
    return _fit(rank, f"{root}/full", cache, 2, tp), _fit(rank, f"{root}/split", cache, 2, tp, 3)


@pytest.mark.parametrize("expert_tp", [False, True])
def test_tp2_checkpoint_resumes_at_tp1_and_at_tp2_ep2(tmp_path, cache, expert_tp):
    """A checkpoint written at tp=2 (heads, vocabulary and, with expert_tp, every expert's hidden dimension
    split) continues in one process and at tp=2 x ep=2 (expert_tp off: ep takes the tp ranks) with the losses of
    the uninterrupted tp=2 run."""
    extra = ("model.n_head=4", "train.steps=6", "checkpoint.every=3", *(["parallel.expert_tp=true"] if expert_tp else []))
    full, part = run_workers(_tp_resume_worker, 2, str(tmp_path), cache, extra, timeout=300)[0]
    assert part["step"] == 3 and part["losses"] == full["losses"][:3]
    split = tmp_path / "split" / "checkpoints" / "step_00000003"
    one = load_model_state(split)  # consolidated: the one-device shapes, gate_up flattened back
    ref = build_model(config(tmp_path, cache, 1, "model.n_head=4")).state_dict()
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in ref.items()}
    with pytest.warns(UserWarning, match="RNG"):
        single = _fit(0, _copy_checkpoint(split, tmp_path / "tp1"), cache, 1, extra[:3])
    assert single["resumed"] == "step_00000003"
    torch.testing.assert_close(torch.tensor(single["losses"]), torch.tensor(full["losses"][3:]), rtol=1e-5, atol=1e-5)
    tp_ep = run_workers(_fit, 2, _copy_checkpoint(split, tmp_path / "tp2ep2"), cache, 2,
                        ("parallel.tp=2", "parallel.ep=2", "train.micro_batch_size=8", "moe.routing_groups=4", *extra[:3]))[0]
    assert tp_ep["resumed"] == "step_00000003"
    torch.testing.assert_close(torch.tensor(tp_ep["losses"]), torch.tensor(full["losses"][3:]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(single["val_loss"]), torch.tensor(full["val_loss"]), rtol=1e-5, atol=1e-5)


def _zero_layout_worker(rank, root, cache, stage):
    """ZeRO at ep=2: uninterrupted; stopped at step 3; resumed at ep=1 (another layout)."""
    zero = (f"train.zero_stage={stage}", "train.steps=6", "checkpoint.every=3")
    full = _fit(rank, f"{root}/full", cache, 2, ("parallel.ep=2", *zero))
    part = _fit(rank, f"{root}/split", cache, 2, ("parallel.ep=2", *zero), 3)
    rest = _fit(rank, f"{root}/split", cache, 2, ("parallel.ep=1", *zero))
    return full, part, rest


def _copy_checkpoint(src, run):
    """A run directory whose only (and latest) checkpoint is `src`."""
    import shutil

    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src, run / "checkpoints" / src.name)
    (run / "checkpoints" / "latest").write_text(src.name)
    return str(run)


@pytest.mark.parametrize("stage", ["1", "2"])  # the FSDP2 fallback, DeepSpeed ZeRO-2
def test_zero_checkpoint_resumes_at_another_layout_and_in_adamw(tmp_path, cache, stage):
    """ZeRO's moments are regathered per parameter: a run stopped at ep=2 and resumed at ep=1, or in
    one process on plain AdamW, continues as the uninterrupted run did; with the moments dropped
    (checkpoint.load_optimizer=false) it does not."""
    if stage == "2" and not deepspeed_available():
        pytest.skip("DeepSpeed not installed")
    full, part, rest = run_workers(_zero_layout_worker, 2, str(tmp_path), cache, stage, timeout=300)[0]
    assert part["losses"] == full["losses"][:3]
    assert rest["resumed"] == "step_00000003" and len(rest["losses"]) == 3
    assert rest["losses"] == pytest.approx(full["losses"][3:], rel=1e-5)
    step3 = tmp_path / "split" / "checkpoints" / "step_00000003"
    with pytest.warns(UserWarning, match="RNG"):
        adamw = _fit(0, _copy_checkpoint(step3, tmp_path / "adamw"), cache, 1, ("train.steps=6",))
    assert adamw["losses"] == pytest.approx(full["losses"][3:], rel=1e-4)  # ZeRO clips and sums in its own order
    with pytest.warns(UserWarning, match="RNG"), pytest.warns(UserWarning, match="optimizer state not loaded"):
        fresh = _fit(0, _copy_checkpoint(step3, tmp_path / "fresh"), cache, 1,
                     ("train.steps=6", "checkpoint.load_optimizer=false"))
    assert fresh["losses"] != pytest.approx(full["losses"][3:], rel=1e-3)


def _fresh_optimizer_worker(rank, run, cache, world, overrides):
    trainer = Trainer(config(run, cache, world, *overrides))
    loaded = {k: v.clone() for k, v in full_model_state(trainer.model, trainer.rt.pgm).items()}  # before it trains on
    val = trainer.evaluate()
    trainer.fit()
    return trainer.resumed_from.name, val, loaded, full_model_state(trainer.model, trainer.rt.pgm)


def test_zero_checkpoint_moves_layout_with_a_fresh_optimizer(tmp_path, cache):
    """ZeRO state saved per rank is refused at another layout by name; checkpoint.load_optimizer=false
    resumes there: weights exact, and DeepSpeed's fp32 master copy follows them."""
    if not deepspeed_available():
        pytest.skip("DeepSpeed not installed")
    per_rank = str(tmp_path / "per_rank")
    run_workers(_fit, 2, per_rank, cache, 2, ("train.zero_stage=2", "train.steps=1", "checkpoint.zero_state=per_rank"))
    with pytest.raises(CheckpointError, match="checkpoint.load_optimizer=false"):
        Trainer(config(per_rank, cache, 1, "train.steps=2", "checkpoint.allow_config_change=true"))
    run = str(tmp_path / "run")
    saved = run_workers(_fit, 2, run, cache, 2, ("parallel.ep=2", "train.zero_stage=2", "train.steps=6"))[0]
    name, val, loaded, after = run_workers(_fresh_optimizer_worker, 2, run, cache, 2, (
        "parallel.ep=1", "train.zero_stage=2", "train.steps=7", "checkpoint.load_optimizer=false",
        "checkpoint.allow_config_change=true"))[0]
    assert name == "step_00000006" and val == pytest.approx(saved["val_loss"], rel=1e-5)
    for k, v in saved["state"].items():
        torch.testing.assert_close(loaded[k], v, atol=0, rtol=0)
    # one fresh Adam step moves each weight by at most lr (1e-2); a stale master copy would throw the
    # weights back toward their initial values, six steps away
    assert max((after[k] - loaded[k]).abs().max().item() for k in loaded) <= 1.01e-2


def _resumed_from(rank, run, cache):
    trainer = Trainer(config(run, cache, 2, "parallel.ep=2", "train.steps=4"))
    return trainer.resumed_from.name


def test_both_ranks_shards_are_checked_and_summed(tmp_path, cache):
    """At world 2 (saved in the background, on a gloo group of its own): SHA256SUMS holds every file's
    true sha256, both ranks' shards among them; a truncated shard of either rank is found by sizes and
    DCP's metadata alone, and both ranks resume from the checkpoint before."""
    import hashlib
    import shutil

    from moe_dist.checkpoint.manager import check, recorded_sums

    run = tmp_path / "run"
    run_workers(_fit, 2, str(run), cache, 2, ("parallel.ep=2", "train.steps=4", "checkpoint.every=2",
                                              "checkpoint.checksums=true"))
    step4 = run / "checkpoints" / "step_00000004"
    sums = recorded_sums(step4)
    shards = sorted(rel for rel in sums if rel.endswith(".distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"] and {"rank_00000.pt", "rank_00001.pt", ".metadata"} <= set(sums)
    for rel, digest in sums.items():
        assert digest == hashlib.sha256((step4 / rel).read_bytes()).hexdigest(), rel
    for shard in shards:
        damaged = tmp_path / shard
        shutil.copytree(run, damaged)
        path = damaged / "checkpoints" / "step_00000004" / shard
        path.write_bytes(path.read_bytes()[:-64])
        assert "truncated" in check(path.parent)
        assert run_workers(_resumed_from, 2, str(damaged), cache) == ["step_00000002"] * 2, shard


GROUPED = ("moe.n_groups=ep", "moe.topk_groups=1", "moe.device_loss_weight=0.1", "moe.comm_loss_weight=0.1",
           "train.steps=6", "checkpoint.every=3")


def _grouped_worker(rank, root, cache):
    full = _fit(rank, f"{root}/full", cache, 2, ("parallel.ep=2", *GROUPED))
    part = _fit(rank, f"{root}/split", cache, 2, ("parallel.ep=2", *GROUPED), 3)
    return full, part


def test_device_limited_routing_resumes_at_ep1_with_the_groups_it_was_resolved_with(tmp_path, cache):
    """moe.n_groups=ep is fixed at 2 by the ep=2 run; resumed in one process it stays 2 (and n_devices with
    it), so the resumed losses are the uninterrupted ones (at ep=1 a fresh resolution would give 1 group)."""
    full, part = run_workers(_grouped_worker, 2, str(tmp_path), cache)[0]
    rest = _fit(0, f"{tmp_path}/split", cache, 1, ("parallel.ep=1", *GROUPED))
    assert part["step"] == 3 and rest["resumed"] == "step_00000003"
    torch.testing.assert_close(torch.tensor(part["losses"] + rest["losses"]), torch.tensor(full["losses"]),
                               atol=1e-5, rtol=1e-5)


ZERO3 = ("train.steps=6", "checkpoint.every=3", "model.tie_embeddings=true")


def _zero3_worker(rank, root, cache):
    full = _fit(rank, f"{root}/full", cache, 2, ("parallel.ep=2", "train.zero_stage=3", *ZERO3))
    part = _fit(rank, f"{root}/split", cache, 2, ("parallel.ep=2", "train.zero_stage=3", *ZERO3), 3)
    return full, part


def _zero3_resume_worker(rank, root, cache):
    return _fit(rank, f"{root}/back", cache, 2, ("parallel.ep=2", "train.zero_stage=3", *ZERO3))


def test_zero3_checkpoint_resumes_in_one_process_and_back(tmp_path, cache):
    """FSDP2 shards (dense over dp, experts over ep) saved through DCP's state-dict API: resumed at zero_stage 0
    in one process, and a one-process checkpoint resumed at zero_stage 3 on two ranks, both with the
    uninterrupted losses."""
    full, part = run_workers(_zero3_worker, 2, str(tmp_path), cache)[0]
    rest = _fit(0, f"{tmp_path}/split", cache, 1, ("train.zero_stage=0", *ZERO3))
    assert rest["resumed"] == "step_00000003"
    torch.testing.assert_close(torch.tensor(part["losses"] + rest["losses"]), torch.tensor(full["losses"]),
                               atol=1e-5, rtol=1e-5)
    first = _fit(0, f"{tmp_path}/back", cache, 1, ("train.zero_stage=0", *ZERO3), 3)
    back = run_workers(_zero3_resume_worker, 2, str(tmp_path), cache)[0]
    assert back["resumed"] == "step_00000003"
    torch.testing.assert_close(torch.tensor(first["losses"] + back["losses"]), torch.tensor(full["losses"]),
                               atol=1e-5, rtol=1e-5)
