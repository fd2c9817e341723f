"""Pipeline parallelism (parallel.pp): the real Trainer at pipeline layouts reproduces one process on the same
global batch (losses, the first step's gradients of every parameter, the logged MoE figures), and checkpoints
move between pp=2 and pp=1."""
import json

import pytest
import torch

from dist_helper import full_model_state, run_workers
from moe_dist.config import ConfigError, load_config, stage_layers
from moe_dist.model.build import build_model
from moe_dist.parallel.pipeline import _AuxLossOnActivation, keep_stages, layer_ranges, stages_of
from moe_dist.train.setup import zero_engine
from moe_dist.train.trainer import Trainer

# four layers, the first dense: under pp=2 stage 0 holds the dense layer and one MoE layer; shared experts
# and a router z-loss besides the balance loss, so every stage's aux losses have gradients
BASE = ["model.d_model=32", "model.n_layer=4", "model.first_k_dense=1", "model.n_head=4", "model.d_ff=64",
        "model.max_seq_len=32", "moe.n_experts=4", "moe.top_k=2", "moe.n_shared_experts=1", "moe.z_loss_weight=0.01",
        "moe.aux_loss_weight=0.05", "moe.n_devices=2", "train.lr=1e-2", "train.warmup_steps=2", "train.steps=4",
        "train.device=cpu", "train.eval_every=0", "train.eval_batches=2", "train.log_every=1",
        "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.resume=false"]
GLOBAL_BATCH, ACCUM = 8, 2  # sequences per step; micro-batches per step (the pipeline's)


def _cfg(world, overrides, run_dir, cache):
    return load_config(None, BASE + overrides + [f"logging.run_dir={run_dir}", f"data.cache_dir={cache}"],
                       world_size=world)


def _train(rank, world, overrides, run_dir, cache, until=None):
    """Train; returns the losses and the first step's gradients (after clipping) of the whole model,
    gathered over each rank's stage (the test joins the stages)."""
    trainer = Trainer(_cfg(world, overrides, run_dir, cache))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    grads, step = {}, trainer.optimizer.step

    def recording_step(*args, **kwargs):
        if not grads:
            for group in trainer.optimizer.param_groups:
                for p in (p for p in group["params"] if id(p) in names):  # DeepSpeed's hold flat partitions
                    g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    grads[names[id(p)]] = g.detach().clone()
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    out = trainer.fit(until_step=until)
    return {"losses": out["losses"], "grads": grads, "val_loss": out["val_loss"]}


def _joined(results):
    grads = {}
    for r in results:
        for name, g in r["grads"].items():
            if name in grads:  # a dp/tp replica of the same stage: the same gradient
                torch.testing.assert_close(g, grads[name], rtol=0, atol=0)
            grads[name] = g
    return grads


def _records(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _reference(tmp_path, dp, accum, model_options):
    return _train(0, 1, [f"train.micro_batch_size={GLOBAL_BATCH // accum}", f"train.grad_accum_steps={accum}",
                         f"moe.routing_groups={dp}", *model_options], tmp_path / "ref", tmp_path / "cache")


def _value(layout, key, default):
    return next((int(o.split("=")[1]) for o in layout if o.startswith(key + "=")), default)


LAYOUTS = {
    "pp2": ["parallel.pp=2"],  # dp 2 within each stage
    "pp2_ep2": ["parallel.pp=2", "parallel.ep=2"],  # all-to-alls within each stage
    "pp2_interleaved_v2": ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"],
    "pp2_tp2": ["parallel.pp=2", "parallel.tp=2"],  # dp 1, sequence parallel, vocab-parallel loss on the last stage
    "pp2_ep2_zero3": ["parallel.pp=2", "parallel.ep=2", "train.zero_stage=3"],  # FSDP2 rooted at the stages
    "pp2_uneven_zero1": ["parallel.pp=2", "parallel.pp_layers=[1,3]", "train.zero_stage=1"],  # a dense-only stage
    # the expert-bias update from each stage's loads, balance over the dp batch, recomputed blocks
    "pp2_ep2_bias_balance_recompute": ["parallel.pp=2", "parallel.ep=2", "moe.expert_bias=true",
                                       "moe.global_batch_balance=true", "model.activation_checkpointing=true"],
    "pp4": ["parallel.pp=4", "train.grad_accum_steps=4"],  # a layer per stage, 1F1B over 4 ranks
    # MLA with a capacity factor (static all-to-all slots), interleaved over ep groups
    "pp2_ep2_interleaved_mla_capacity": ["parallel.pp=2", "parallel.ep=2", "parallel.pp_schedule=interleaved_1f1b",
                                         "parallel.pp_virtual_stages=2", "model.attention=mla",
                                         "model.kv_lora_rank=16", "moe.capacity_factor=1.25"],
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_pipeline_layout_matches_one_process(tmp_path, name):
    layout = LAYOUTS[name]
    dp = 4 // (_value(layout, "parallel.pp", 1) * _value(layout, "parallel.tp", 1))
    accum = _value(layout, "train.grad_accum_steps", ACCUM)
    ref = _reference(tmp_path, dp, accum, [o for o in layout if o.startswith(("model.", "moe."))])
    results = run_workers(_train, 4, 4, [f"train.micro_batch_size={GLOBAL_BATCH // (accum * dp)}",
                                         f"train.grad_accum_steps={accum}", *layout],
                          tmp_path / "run", tmp_path / "cache", timeout=300)
    for r in results:  # every rank reports the losses of the whole batch (the last stage's, summed over stages)
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
        assert r["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)  # forward only through the stages
    grads = _joined(results)
    assert grads.keys() == ref["grads"].keys()  # the stages hold every parameter once
    for key, want in ref["grads"].items():
        scale = want.abs().max().item()
        torch.testing.assert_close(grads[key], want, rtol=1e-5, atol=1e-5 * scale + 1e-9, msg=key)
    # the logged figures are the whole model's: aux loss of every stage, loads of every MoE layer, clipping norm
    got, want = _records(tmp_path / "run"), _records(tmp_path / "ref")
    for key in ("loss", "aux_loss", "expert_loss", "z_loss", "grad_norm", "router_entropy", "expert_load",
                "layer_expert_loss", "layer_drop_frac"):
        torch.testing.assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in want]),
                                   rtol=1e-4, atol=1e-6, msg=key)
    if "parallel.ep=2" in layout:  # each stage's ep ranks report only their layers' rows: 3 MoE layers, 2 ranks
        assert all(len(r["a2a_rows_received"]) == 3 and all(len(x) == 2 for x in r["a2a_rows_received"]) for r in got)


def test_pipeline_validation_matches_one_process(tmp_path):
    """Validation runs forward only through the stages: the same loss as one process on the same batches."""
    over = [f"train.micro_batch_size={GLOBAL_BATCH // ACCUM}", f"train.grad_accum_steps={ACCUM}", "train.steps=2"]
    ref = _train(0, 1, over, tmp_path / "ref", tmp_path / "cache")
    got = run_workers(_train, 2, 2, over + ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                                            "parallel.pp_virtual_stages=2"], tmp_path / "run", tmp_path / "cache")
    for r in got:
        assert r["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6)


@pytest.mark.parametrize("saved,resumed", [("pp2", "pp1"), ("pp1", "pp2_interleaved"), ("pp2_ep2_zero3", "ep2"),
                                           ("pp2_ep2_zero1", "pp2_ep2_zero1"), ("pp2_ep2_zero1", "ep2_zero1")])
def test_checkpoint_moves_between_pp_2_and_pp_1(tmp_path, saved, resumed):
    """Stop a run at step 2, resume it at another pipeline layout (and ep, FSDP2): steps 3-4 give the
    uninterrupted losses."""
    mb = f"train.micro_batch_size={GLOBAL_BATCH // ACCUM}"
    half = f"train.micro_batch_size={GLOBAL_BATCH // ACCUM // 2}"  # dp 2
    layouts = {"pp1": (1, [mb]), "pp2": (2, [mb, "parallel.pp=2"]),
               "pp2_interleaved": (2, [mb, "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                                       "parallel.pp_virtual_stages=2"]),
               "pp2_ep2_zero3": (4, [half, "parallel.pp=2", "parallel.ep=2", "train.zero_stage=3"]),
               "ep2": (2, [half, "parallel.ep=2"]),
               # DeepSpeed ZeRO-1 under pp and without: its state regathered per parameter by name
               "pp2_ep2_zero1": (4, [half, "parallel.pp=2", "parallel.ep=2", "train.zero_stage=1"]),
               "ep2_zero1": (2, [half, "parallel.ep=2", "train.zero_stage=1"])}

    def run(layout, run_dir, until=None, resume=False):
        world, over = layouts[layout]
        over = [f"train.grad_accum_steps={ACCUM}"] + over + (["checkpoint.resume=true"] if resume else [])
        if world == 1:
            return [_train(0, 1, over, run_dir, tmp_path / "cache", until)]
        return run_workers(_train, world, world, over, run_dir, tmp_path / "cache", until, timeout=300)

    whole = run(saved, tmp_path / "whole")[0]["losses"]
    run(saved, tmp_path / "stopped", until=2)
    after = run(resumed, tmp_path / "stopped", resume=True)
    for r in after:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(whole[2:]), rtol=1e-5, atol=1e-5)


def test_stages_cut_the_model_by_layers():
    cfg = _cfg(4, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
                   "parallel.pp_layers=[1,1,1,1]", "train.grad_accum_steps=2"], "/tmp/unused", "/tmp/unused")
    assert [list(r) for r in layer_ranges(cfg)] == [[0], [1], [2], [3]]
    assert stages_of(0, 2, 2) == [0, 2] and stages_of(1, 2, 2) == [1, 3]  # stage s on pp rank s % pp
    assert stage_layers(7, 3) == [3, 2, 2]
    first, second = (keep_stages(build_model(cfg, device="meta"), cfg, r) for r in (0, 1))
    names = [{n for n, _ in m.named_parameters()} for m in (first, second)]
    whole = {n for n, _ in build_model(cfg, device="meta").named_parameters()}
    assert names[0] | names[1] == whole and not names[0] & names[1]  # whole-model names, each once
    assert [i for i, _ in first.blocks()] == [0, 2] and [i for i, _ in second.blocks()] == [1, 3]
    assert first.embed_tokens is not None and first.lm_head is None and second.embed_tokens is None


def test_aux_loss_rides_on_the_activation():
    h = torch.randn(2, 3, requires_grad=True)
    w = torch.tensor(2.0, requires_grad=True)
    out = _AuxLossOnActivation.apply(h, w * 3.0)
    assert torch.equal(out, h)
    out.sum().backward()
    assert torch.equal(h.grad, torch.ones(2, 3)) and w.grad.item() == 3.0  # d(aux)/dw, with d(loss)/d(aux) = 1


@pytest.mark.parametrize("overrides,field", [
    (["parallel.pp=3"], "parallel.pp"),  # does not divide the world of 4
    (["parallel.pp=2", "train.grad_accum_steps=1"], "train.grad_accum_steps"),
    (["parallel.pp=2", "parallel.pp_virtual_stages=2", "train.grad_accum_steps=2"], "parallel.pp_virtual_stages"),
    (["parallel.pp=2", "parallel.pp_layers=[1,2]", "train.grad_accum_steps=2"], "parallel.pp_layers"),
    (["parallel.pp=2", "model.tie_embeddings=true", "train.grad_accum_steps=2"], "model.tie_embeddings"),
    (["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "train.grad_accum_steps=2"], "parallel.pp_schedule"),
    (["parallel.pp=4", "parallel.pp_virtual_stages=2", "parallel.pp_schedule=interleaved_1f1b",
      "train.grad_accum_steps=4"], "parallel.pp"),  # 8 stages, 4 layers
])
def test_bad_pipeline_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _cfg(4, overrides, "/tmp/unused", "/tmp/unused")


def _started_before_reduce(rank, tmp):
    from moe_dist.parallel.data_parallel import GradReducer

    seen, reduce = [], GradReducer.reduce

    def recording_reduce(self):
        seen.append([b.started for b in self.buckets])
        return reduce(self)

    GradReducer.reduce = recording_reduce
    trainer = Trainer(_cfg(4, ["parallel.pp=2", "train.micro_batch_size=2", f"train.grad_accum_steps={ACCUM}",
                               "train.steps=2"], tmp / "run", tmp / "cache"))
    trainer.fit()
    return seen


def test_gradient_reduction_starts_in_each_stage_last_backward(tmp_path):
    """zero_stage 0 under pp=2 x dp=2: every bucket's all-reduce was launched during its stage's last
    micro-batch backward (inside the schedule), none left for after it."""
    for seen in run_workers(_started_before_reduce, 4, tmp_path):
        assert len(seen) == 2 and all(all(step) and step for step in seen)


def _train_zero1(rank, world, overrides, run_dir, cache):
    trainer = Trainer(_cfg(world, overrides, run_dir, cache))
    out = trainer.fit()
    return {"losses": out["losses"], "deepspeed": trainer.engine is not None
            and type(trainer.optimizer).__module__.startswith("deepspeed")}


@pytest.mark.parametrize("layout", [["parallel.pp=2"], ["parallel.pp=2", "parallel.ep=2"],
                                    ["parallel.pp=2", "parallel.ep=2", "moe.expert_bias=true"],
                                    ["parallel.pp=2", "parallel.ep=2", "parallel.pp_schedule=interleaved_1f1b",
                                     "parallel.pp_virtual_stages=2"]],
                         ids=["pp2", "pp2_ep2", "pp2_ep2_expert_bias", "pp2_ep2_interleaved_v2"])
def test_pipeline_zero1_runs_on_deepspeed_and_matches_one_process(tmp_path, layout):
    """train.zero_stage=1 under pp=2 (dp 2) runs DeepSpeed's ZeRO-1 optimizer after the torch schedule's backward:
    the losses and the logged grad norm (over both stages' parameters) are one process's, with clipping active."""
    pytest.importorskip("deepspeed")
    clip = ["train.grad_clip=0.05"]
    ref = _train(0, 1, [f"train.micro_batch_size={GLOBAL_BATCH // ACCUM}", f"train.grad_accum_steps={ACCUM}",
                        "moe.routing_groups=2", *clip, *(o for o in layout if o.startswith("moe."))],
                 tmp_path / "ref", tmp_path / "cache")
    results = run_workers(_train_zero1, 4, 4, [f"train.micro_batch_size={GLOBAL_BATCH // (ACCUM * 2)}",
                                               f"train.grad_accum_steps={ACCUM}", "train.zero_stage=1", *clip, *layout],
                          tmp_path / "run", tmp_path / "cache", timeout=300)
    for r in results:
        assert r["deepspeed"]
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
    got, want = ([r["grad_norm"] for r in _records(d)] for d in (tmp_path / "run", tmp_path / "ref"))
    assert min(want) > 0.05  # every step clipped, so a norm missing a stage would change the losses too
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=0)


@pytest.mark.parametrize("overrides,deepspeed", [
    (["train.zero_stage=1"], True),
    (["train.zero_stage=2"], False),  # ZeRO-2 partitions gradients in every micro-batch's backward
    (["train.zero_stage=1", "parallel.pp_layers=[1,3]"], False),  # stage 0 without MoE layers: other groups
    (["train.zero_stage=1", "parallel.tp=2"], False),
])
def test_zero_engine_under_pp(overrides, deepspeed):
    pytest.importorskip("deepspeed")
    cfg = _cfg(4, ["parallel.pp=2", "train.grad_accum_steps=2", *overrides], "/tmp/unused", "/tmp/unused")
    assert zero_engine(cfg) == (deepspeed, not deepspeed)


def _build_with_unlike_stages(rank, world, run_dir, cache):
    import moe_dist.train.setup as setup
    from moe_dist.config import ConfigError

    setup._stages_alike = lambda cfg: True  # past zero_engine's check, to reach initialize_deepspeed's
    try:
        Trainer(_cfg(world, ["parallel.pp=2", "parallel.pp_layers=[1,3]", "train.zero_stage=1",
                             "train.micro_batch_size=2", "train.grad_accum_steps=2"], run_dir, cache))
    except ConfigError as e:
        return str(e)
    return None


def test_deepspeed_refuses_stages_with_other_parameter_groups(tmp_path):
    """DeepSpeed sums the norm over the stages group by group: unlike groups are refused, not mis-summed."""
    pytest.importorskip("deepspeed")
    for message in run_workers(_build_with_unlike_stages, 4, 4, tmp_path / "run", tmp_path / "cache"):
        assert message is not None and "parallel.pp_layers" in message
