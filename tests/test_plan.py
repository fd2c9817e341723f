"""moe_dist.plan against hand-computed values for a small model, against the real model (parameter
counts on the meta device, saved activations through autograd's hooks), and `moe-dist plan`'s JSON."""
import dataclasses
import json

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from moe_dist import plan as P
from moe_dist.cli import main
from moe_dist.config import (Config, ConfigError, DataConfig, ModelConfig, MoEConfig, ParallelConfig, TrainConfig,
                             load_config, validate_layout)
from moe_dist.model import MoETransformerLM

# The small model of the hand computations: vocab 256, d_model 64, 2 layers (layer 0 dense, layer 1 MoE),
# 4 heads of 16 with 2 kv heads, dense FFN 128, 4 experts of width 32, top-2, untied embeddings.
SMALL = ModelConfig(vocab_size=256, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128, max_seq_len=16,
                    moe_layer_indices=[1])
SMALL_MOE = MoEConfig(n_experts=4, top_k=2, d_expert=32)


def small_cfg(**train) -> Config:
    return Config(model=SMALL, moe=SMALL_MOE, data=DataConfig(seq_len=16), train=TrainConfig(**train))


def layout(tp=1, ep=1, dp=1, zero=0, mbs=2, ac=False, expert_tp=False) -> P.Layout:
    return P.Layout(tp=tp, ep=ep, dp=dp, expert_tp=expert_tp, zero_stage=zero, micro_batch_size=mbs,
                    activation_checkpointing=ac)


def test_parameter_counts_by_hand():
    c = P.param_counts(SMALL, SMALL_MOE)
    embedding = 256 * 64  # 16384
    attention = 64 * 64 + 2 * (64 * 32) + 64 * 64  # q, k, v (2 kv heads of 16), o = 12288
    dense_ffn = 3 * 64 * 128  # 24576
    router, experts = 4 * 64, 3 * 64 * 32 * 4  # 256, 24576
    norms = 2 * 64  # per block
    head = 256 * 64 + 64  # lm_head + final norm
    total = embedding + (attention + dense_ffn + norms) + (attention + router + experts + norms) + head
    assert total == 107072
    assert c.total == total and c.expert == experts and c.dense == total - experts
    assert c.active == total - experts + 2 * 3 * 64 * 32  # 2 of the 4 experts per token: 94784
    # tp=2, ep=2: tensor parallelism splits embedding, attention, dense FFN and lm_head; norms and router stay whole
    L = layout(tp=2, ep=2, dp=2)
    assert c.dense_local(L) == (embedding + 2 * attention + dense_ffn + 256 * 64) / 2 + (2 * norms + 64 + router)  # 41536
    assert c.expert_local(L) == experts / 2  # 12288


VARIANTS = {
    "qwen": (dict(qkv_bias=True, attn_out_bias=True, qk_norm=True, tie_embeddings=True, head_dim=24, first_k_dense=1),
             dict(n_shared_experts=2, d_shared_expert=40, shared_expert_gate=True, noisy_gating=True)),
    "mla": (dict(attention="mla", n_kv_head=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                 v_head_dim=12), dict(n_shared_experts=1)),
    "mla_q_lora": (dict(attention="mla", n_kv_head=None, q_lora_rank=24, kv_lora_rank=32, moe_every=2), {}),
    "dense": (dict(moe_every=0, moe_layer_indices=None), {}),
}


@pytest.mark.parametrize("path", ["configs/mixtral_8x7b.yaml", "configs/deepseek_v2_lite.yaml", "configs/tiny.yaml"])
def test_parameter_counts_equal_the_meta_model_of_the_configs(path):
    cfg = load_config(path)
    with torch.device("meta"):
        model = MoETransformerLM(cfg.model, cfg.moe)
    c = P.param_counts(cfg.model, cfg.moe)
    assert c.total == sum(p.numel() for p in model.parameters())
    if "mixtral" in path:  # 46.7B, 12.9B active (Mistral's figures)
        assert round(c.total / 1e9, 1) == 46.7 and round(c.active / 1e9, 1) == 12.9


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameter_counts_equal_the_meta_model_of_every_variant(name):
    m, e = VARIANTS[name]
    mc, moe = dataclasses.replace(SMALL, **m), dataclasses.replace(SMALL_MOE, **e)
    with torch.device("meta"):
        model = MoETransformerLM(mc, moe)
    assert P.param_counts(mc, moe).total == sum(p.numel() for p in model.parameters())


def test_state_bytes_by_hand():
    """REFERENCE.md "Memory per rank" with n = 53824 local and s = 41536/2 + 12288/2 = 26912 partitioned parameters."""
    c = P.param_counts(SMALL, SMALL_MOE)
    L = layout(tp=2, ep=2, dp=2)  # edp = dp*tp/ep = 2
    n, s = 41536 + 12288, 26912
    cpu = P.precision("cpu", "auto", 0)
    assert P.state_bytes(c, L, cpu, "cpu") == {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n}
    # DeepSpeed: fp32 gradient partition + reduce bucket (all n touched on a CPU), fp32 master + moments partitioned
    for stage in (1, 2):
        got = P.state_bytes(c, dataclasses.replace(L, zero_stage=stage), P.precision("cpu", "auto", stage), "cpu")
        assert got == {"params": 4 * n, "grads": 4 * s + 4 * n, "optimizer": 12 * s}
    # bf16 on a GPU: autocast's bf16 copies at zero 0; bf16 weights and a 5e8-element bucket under DeepSpeed
    assert P.state_bytes(c, L, P.precision("cuda", "auto", 0), "cuda")["params"] == 4 * n + 2 * n
    z1 = P.state_bytes(c, dataclasses.replace(L, zero_stage=1), P.precision("cuda", "auto", 1), "cuda")
    assert z1 == {"params": 2 * n, "grads": 4 * s + 4 * 500_000_000, "optimizer": 12 * s}
    # FSDP2: 16 s, plus two gathered units and one unit's gradients; the largest unit is the MoE block:
    # 12288/2 (attention) + 256 + 128 (router, norms) + 24576/2 (experts) = 18816
    z3 = P.state_bytes(c, dataclasses.replace(L, zero_stage=3), P.precision("cpu", "auto", 3), "cpu")
    unit = 18816
    assert z3 == {"params": 4 * s + 2 * unit * 4, "grads": 4 * s + unit * 4, "optimizer": 8 * s}


def test_activation_bytes_by_hand():
    """fp32 on a CPU, one micro-batch of 2 x 16 = 32 tokens; elements per token:
    attention: rms_norm input + x*rstd (2H = 128), the q/k/v input (H = 64), q, k, v (4+2+2 heads x 16 = 128),
      SDPA output (64) and logsumexp (4): 388
    dense FFN: 2H + H = 192, gate, silu, up, product (4 x 128 = 512): 704
    MoE FFN: 192, router scores (E = 4), expert rows k(H + 2F) = 2(64 + 64) = 256, combine k(H + 1) = 130: 582
    head: final norm 2H, LM head input H, logits, log-probs, their gradient, the logits' gradient 4V: 1216"""
    cfg = small_cfg(micro_batch_size=2)
    prec = P.precision("cpu", "auto", 0)
    per_token = (388 + 704) + (388 + 582) + 1216
    got = P.activation_bytes(cfg, layout(), prec, 16, 1.0)
    assert got["total"] == per_token * 4 * 32 == 419584 and got["a2a_buffers"] == 0
    # checkpointing: each block's input (H per layer) plus the larger block recomputed (whose input is one of them)
    ac = P.activation_bytes(cfg, layout(ac=True), prec, 16, 1.0)
    assert ac["total"] == (2 * 64 + (388 + 704) - 64 + 1216) * 4 * 32


def _saved_bytes(mc: ModelConfig, moe: MoEConfig, B: int, S: int) -> int:
    """Bytes of the tensors autograd saves in a forward + loss (parameters and buffers aside)."""
    torch.manual_seed(0)
    model = MoETransformerLM(mc, moe)
    ids = torch.randint(0, mc.vocab_size, (B, S))
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    return sum(seen.values())


@pytest.mark.parametrize("name", ["small", "qwen", "mla", "mla_q_lora", "dense"])
def test_saved_activations_equal_what_autograd_saves(name):
    """The per-block terms are what autograd keeps (fp32, CPU), to within the index tensors left out."""
    m, e = VARIANTS.get(name, ({}, {}))
    mc = dataclasses.replace(SMALL, max_seq_len=32, **m)
    moe = dataclasses.replace(SMALL_MOE, grouped_mm="loop", z_loss_weight=0.01, **e)  # loop: no oneDNN row padding
    cfg = Config(model=mc, moe=moe, data=DataConfig(seq_len=32), train=TrainConfig(micro_batch_size=2))
    prec = P.precision("cpu", "auto", 0)
    got = P.activation_bytes(cfg, layout(), prec, 32, 1.0)
    saved_logits = 2 * 32 * mc.vocab_size * 4 * 3  # the planned peak also holds the logits and two gradients
    assert got["total"] - saved_logits == pytest.approx(_saved_bytes(mc, moe, 2, 32), rel=0.01)


def test_expert_rows_and_all_to_all_bytes_by_hand():
    """ep=2, 32 tokens per rank, top-2 of 4 experts: 64 own assignments, half of them remote."""
    L = layout(ep=2, dp=2)
    r = P.expert_rows(SMALL_MOE, L, 32, 16, 1.5)
    assert (r.computed, r.own, r.sent, r.received) == (96, 64, 32, 48)  # the busiest rank runs 1.5 x 64
    # forward dispatch 32 rows out, combine 48 back; backward the reverse; H = 64 fp32
    assert P.a2a_bytes(32, 48, 64, 4, 4) == (32 + 48) * 2 * 64 * 4 == 40960
    assert P.a2a_bytes(32, 48, 64, 4, 4, forward_passes=2) == (32 + 48) * 3 * 64 * 4  # recomputed forward
    # capacity 1.0: C = ceil(1.0 * 32 * 2 / 4) = 16 slots per expert; E_l * G * C = 2 * 1 * 16 = 32 rows each way
    cap = dataclasses.replace(SMALL_MOE, capacity_factor=1.0)
    r = P.expert_rows(cap, L, 32, 16, 1.5)
    assert (r.computed, r.sent, r.received) == (4 * 16, 32, 32)  # E * G * C slots, whatever the load
    assert P.dropless_rows([[5, 1, 2, 0], [3, 3, 0, 4]], rank=0) == (2 + 0, 3 + 3)


def test_collective_bytes_and_node_spans_by_hand():
    assert P.ring_bytes("all_reduce", 100, 4) == 150 and P.ring_bytes("reduce_scatter", 100, 4) == 75
    assert P.ring_bytes("all_gather", 100, 1) == 0
    assert P.group_nodes(stride=1, size=8, gpus_per_node=8) == 1  # an ep group of 8 consecutive ranks
    assert P.group_nodes(stride=8, size=8, gpus_per_node=8) == 8  # its edp group: one rank per node


def test_model_flops_by_hand():
    """6 x (active - input embedding) + causal attention 3 x layers x heads x (d_qk + d_v) x S."""
    cfg = small_cfg()
    assert P.model_flops_per_token(cfg, P.param_counts(SMALL, SMALL_MOE), 16) == 6 * (94784 - 16384) + 3 * 2 * 4 * 32 * 16


def test_step_time_is_its_parts_and_mfu_its_definition():
    cfg = dataclasses.replace(small_cfg(micro_batch_size=2, grad_accum_steps=2), parallel=ParallelConfig(tp=2, ep=2))
    gpu = P.GPUS["h100"]
    e = P.evaluate(cfg, layout(tp=2, ep=2, dp=2, zero=1), gpu, gpus_per_node=2)
    t = e["time_s"]
    assert e["step_time_s"] == pytest.approx(t["compute"] + t["a2a"] + t["tp"] + t["dp_exposed"])
    assert e["micro_batches"] == 2 and e["tokens_per_step"] == 2 * 2 * 2 * 16  # mbs x accum x dp x seq
    assert e["mfu"] == pytest.approx(e["model_flops_per_step"] / (e["step_time_s"] * gpu.peak_tflops * 1e12 * 4))
    assert e["comm_bytes"]["dp"]["network"] > 0 and e["comm_bytes"]["a2a"]["network"] == 0  # dp groups span 2 nodes


def test_enumerated_layouts_are_exactly_those_config_validation_accepts():
    """(pp, tp, ep, expert_tp) as validate_layout accepts them, grad_accum_steps standing for the most
    micro-batches a layout can run (micro-batch size 1: 64 / dp)."""
    cfg = Config(model=dataclasses.replace(SMALL, n_kv_head=2), moe=dataclasses.replace(SMALL_MOE, n_experts=8))
    world = 8
    planned = {(L.pp, L.tp, L.ep, L.expert_tp) for L in P.enumerate_layouts(cfg, world, global_batch=64)}
    accepted = set()
    for pp in range(1, 9):
        for tp in range(1, 9):
            for ep in range(1, 9):
                for expert_tp in (False, True):
                    accum = 64 * pp * tp // world if world % (pp * tp) == 0 else 1
                    trial = dataclasses.replace(cfg, parallel=ParallelConfig(tp=tp, ep=ep, expert_tp=expert_tp, pp=pp),
                                                train=TrainConfig(grad_accum_steps=accum))
                    try:
                        validate_layout(trial, world)
                    except ConfigError:
                        continue
                    accepted.add((pp, tp, ep, expert_tp and tp > 1))
    assert planned == accepted
    assert (1, 4, 1, False) not in planned  # n_kv_head = 2
    assert {pp for pp, *_ in planned} == {1, 2}  # 2 layers: at most 2 stages


def test_every_enumerated_layout_passes_validate_layout_with_its_own_settings():
    """Each layout as the user would apply it: its pp/tp/ep, micro-batch size and micro-batches per step."""
    cfg = Config(model=dataclasses.replace(SMALL, n_layer=4, moe_layer_indices=[1, 3]), moe=SMALL_MOE)
    world, global_batch = 8, 16
    layouts = P.enumerate_layouts(cfg, world, global_batch)
    assert {L.pp for L in layouts} == {1, 2, 4}  # 8 would need 8 layers
    for L in {(L.pp, L.tp, L.ep, L.expert_tp, L.micro_batch_size, L.dp) for L in layouts}:
        pp, tp, ep, expert_tp, b, dp = L
        m = global_batch // (b * dp)
        assert m >= pp
        validate_layout(dataclasses.replace(cfg, parallel=ParallelConfig(tp=tp, ep=ep, expert_tp=expert_tp, pp=pp),
                                            train=TrainConfig(micro_batch_size=b, grad_accum_steps=m)), world)


def _plan_json(capsys, *flags):
    code = main(["plan", "--config", "configs/tiny.yaml", *flags, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_cli_json_has_the_issue_schema_and_recommends_the_fastest_fitting(capsys):
    got = _plan_json(capsys, "--gpus", "4", "--gpu-memory-gb", "80", "--gpus-per-node", "2")
    assert set(got) == {"layouts", "recommended"}
    keys = {"tp", "ep", "dp", "edp", "expert_tp", "zero_stage", "micro_batch_size", "activation_checkpointing",
            "fits", "memory_gb", "comm_gb_per_step", "step_time_s", "mfu",
            "pp", "pp_schedule", "pp_virtual_stages", "micro_batches", "bubble_fraction", "memory_pp_rank"}  # issue 22
    for row in got["layouts"]:
        assert set(row) == keys
        assert set(row["memory_gb"]) == {"params", "grads", "optimizer", "activations", "total"}
        assert row["pp"] * row["tp"] * row["dp"] == 4 and row["zero_stage"] in (0, 1, 2, 3)
        assert row["bubble_fraction"] == round((row["pp"] - 1) / (row["micro_batches"] + row["pp"] - 1), 4)
    assert {row["pp"] for row in got["layouts"]} == {1, 2, 4}  # tiny.yaml: 4 layers
    best = got["layouts"][got["recommended"]]
    assert best["fits"]
    assert best["step_time_s"] == min(r["step_time_s"] for r in got["layouts"] if r["fits"])
    assert not _plan_json(capsys, "--gpus", "4", "--gpu-memory-gb", "0.001")["recommended"]  # nothing fits: null


@pytest.mark.parametrize("flags, message", [
    (["--gpus", "0", "--gpu-memory-gb", "80"], "--gpus"),
    (["--gpus", "4", "--gpu-memory-gb", "-1"], "--gpu-memory-gb"),
    (["--gpus", "12", "--gpu-memory-gb", "80"], "--gpus-per-node: 8 does not divide --gpus 12"),
    (["--gpus", "4", "--gpu-memory-gb", "80", "--max-load-ratio", "0.5"], "--max-load-ratio"),
    (["--gpus", "4", "--gpu-memory-gb", "80", "--global-batch-size", "0"], "--global-batch-size"),
    (["--gpus", "4", "--gpu-memory-gb", "80", "--network-gb-s", "0"], "--network-gb-s"),
    (["--gpus", "4", "--gpu-memory-gb", "80", "moe.top_k=9"], "moe.top_k"),
])
def test_cli_bad_input_is_one_message_and_exit_2(capsys, flags, message):
    code = main(["plan", "--config", "configs/tiny.yaml", *flags])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and "Traceback" not in err


def test_mixtral_on_64_h100s_recommends_a_layout_that_fits():
    result = P.plan(load_config("configs/mixtral_8x7b.yaml"), 64, 80, P.GPUS["h100"])
    best = result["estimates"][result["recommended"]]
    assert best["fits"] and best["memory_bytes"]["total"] <= 0.9 * 80 * P.GiB
    assert 0 < best["mfu"] < 1


def test_estimate_is_the_configs_own_layout():
    """What the dry run prints: Mixtral at ep=8 on 64 GPUs holds 1.61B dense + 45.1B/8 expert parameters per GPU."""
    est = P.estimate(load_config("configs/mixtral_8x7b.yaml"), 64)
    assert est["layout"]["ep"] == 8 and est["layout"]["dp"] == 64 and est["layout"]["zero_stage"] == 1
    assert round(est["params"]["per_rank"] / 1e9, 2) == 7.24  # issue 14's figure
    assert est["fits"]
    with pytest.raises(ConfigError, match="parallel.ep"):
        P.estimate(load_config("configs/mixtral_8x7b.yaml"), 4)


def test_cpu_memory_estimate_is_fp32_state_activations_and_the_baseline():
    cfg = small_cfg(micro_batch_size=2)
    got = P.cpu_memory_estimate(cfg, 1, max_load_ratio=1.0)
    n = 107072
    assert (got["params"], got["grads"], got["optimizer"]) == (4 * n, 4 * n, 8 * n)
    assert got["activations"] == 419584 and got["baseline"] == P.PROCESS_BASELINE_BYTES
    assert got["total"] == sum(v for k, v in got.items() if k != "total")


# ---------------------------------------------------------------------------------------------
# Pipeline parallelism (issue 22), by hand: SMALL with 4 layers (0, 2 dense; 1, 3 MoE), fp32 on a CPU,
# micro-batches of 2 x 16 = 32 tokens, m = 4 per step. Per block: dense 12288 + 24576 + 128 = 36992,
# MoE 12288 + 256 + 24576 + 128 = 37248 parameters; the embedding 16384, the final norm + head 16448.
# Saved elements per token (test_activation_bytes_by_hand): dense block 388 + 704 = 1092, MoE block
# 388 + 582 = 970; the head 704 kept until backward (norm 2H, its input H, logits and log-probs 2V) and
# 512 at its start (two gradients 2V); a stage boundary is the residual stream, H = 64 per token.
PP_MODEL = dataclasses.replace(SMALL, n_layer=4, moe_layer_indices=[1, 3])


def pp_cfg(pp=2, schedule="1f1b", v=1) -> Config:
    return Config(model=PP_MODEL, moe=SMALL_MOE, data=DataConfig(seq_len=16),
                  parallel=ParallelConfig(pp=pp, pp_schedule=schedule, pp_virtual_stages=v),
                  train=TrainConfig(micro_batch_size=2, grad_accum_steps=4))


def pp_layout(pp=2, schedule="1f1b", v=1, **kw) -> P.Layout:
    return dataclasses.replace(layout(**kw), pp=pp, pp_schedule=schedule, pp_virtual_stages=v)


def test_pipeline_bubble_by_hand():
    assert P.bubble_fraction("1f1b", 2, 1, 4) == 1 / 5  # (pp - 1)/(m + pp - 1)
    assert P.bubble_fraction("interleaved_1f1b", 2, 2, 4) == 1 / 9  # (pp - 1)/(v m + pp - 1)
    assert P.bubble_fraction("1f1b", 4, 1, 16) == 3 / 19
    assert P.bubble_fraction("1f1b", 1, 1, 4) == 0.0


def test_pipeline_parameters_per_rank_by_hand():
    counts = P.param_counts(PP_MODEL, SMALL_MOE)
    cfg = pp_cfg()
    # 1F1B, stages of 2 layers: rank 0 the embedding, layers 0-1; rank 1 layers 2-3, the head
    L = pp_layout()
    assert [P.rank_param_counts(cfg, counts, L, r).total for r in (0, 1)] == [16384 + 36992 + 37248, 36992 + 37248 + 16448]
    # interleaved, 4 stages of 1 layer, stage s on rank s % 2: rank 0 layers 0, 2; rank 1 layers 1, 3
    Li = pp_layout(schedule="interleaved_1f1b", v=2)
    assert Li.rank_layers(4, 0) == [0, 2] and Li.rank_layers(4, 1) == [1, 3]
    assert [P.rank_param_counts(cfg, counts, Li, r).total for r in (0, 1)] == [16384 + 2 * 36992, 2 * 37248 + 16448]
    # the MoE layers' active experts go with them: 2 of 4 experts, 3 x 64 x 32 each
    assert P.rank_param_counts(cfg, counts, Li, 0).active_expert == 0
    assert P.rank_param_counts(cfg, counts, Li, 1).active_expert == 2 * 2 * 3 * 64 * 32
    # the given split, parallel.pp_layers
    Lg = dataclasses.replace(L, pp_layers=(3, 1))
    assert P.rank_param_counts(cfg, counts, Lg, 1).total == 37248 + 16448


def test_pipeline_micro_batches_in_flight_by_hand():
    """1F1B: rank r holds min(m, pp - r) at the end of its warmup. Interleaved (m = 4, pp = 2, v = 2: rounds of
    2): rank 0 warms up with (v - 1) x 2 + 2 = 4 forwards, two per local stage, then each step a forward of
    local stage 0 and a backward of local stage 1: (3, 1) ... peaks at (4, 1). Rank 1 warms up with 2 and
    peaks at (2, 1): its last stage's head outweighs a third micro-batch of its first."""
    L = pp_layout()
    assert P.in_flight(L, 4, 0, [1.0]) == (2,) and P.in_flight(L, 4, 1, [1.0]) == (1,)
    assert P.in_flight(pp_layout(pp=4), 8, 1, [1.0]) == (3,) and P.in_flight(pp_layout(pp=4), 2, 0, [1.0]) == (2,)
    Li = pp_layout(schedule="interleaved_1f1b", v=2)
    assert P.in_flight(Li, 4, 0, [1156.0, 1092.0]) == (4, 1)
    assert P.in_flight(Li, 4, 1, [970.0, 1610.0]) == (2, 1)
    assert P.in_flight(Li, 4, 1, [970.0, 0.0]) == (3, 0)  # without the head, a third micro-batch of stage 1
    got = P.pipeline_activation_bytes(pp_cfg(schedule="interleaved_1f1b", v=2), Li, P.precision("cpu", "auto", 0), 16,
                                      1.0, micro_batches=4)
    assert [a["in_flight"] for a in got] == [(4, 1), (2, 1)]


def _torch_order(pp, v, m, rank):
    from types import SimpleNamespace
    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B, _ComputationType
    fake = SimpleNamespace(n_local_stages=v, microbatches_per_round=m // max(1, m // pp), pp_group_size=pp, _n_microbatches=m)
    ops = ScheduleInterleaved1F1B._calculate_single_rank_operations(fake, rank)
    return [("F" if a.computation_type == _ComputationType.FORWARD else "B", a.stage_index // pp) for a in ops if a]


@pytest.mark.parametrize("pp, v, m", [(2, 2, 4), (2, 3, 6), (3, 2, 6), (4, 2, 4), (4, 3, 12), (2, 2, 3)])
def test_interleaved_order_is_torchs(pp, v, m):
    """schedule_actions reproduces ScheduleInterleaved1F1B's pipeline_order (idle slots aside)."""
    for rank in range(pp):
        assert P.schedule_actions("interleaved_1f1b", pp, v, m, rank) == _torch_order(pp, v, m, rank)


def test_1f1b_closed_form_is_the_schedules_peak():
    for pp, m in ((2, 4), (4, 4), (4, 9), (8, 3)):
        for rank in range(pp):
            counts, peak = 0, 0
            for kind, _ in P.schedule_actions("1f1b", pp, 1, m, rank):
                counts += 1 if kind == "F" else -1
                peak = max(peak, counts)
            assert P.in_flight(pp_layout(pp=pp), m, rank, [1.0]) == (peak,) == (min(m, pp - rank),)


def test_pipeline_activations_and_p2p_buffers_by_hand():
    """Elements per token x 4 bytes x 32 tokens. A stage keeps its output (64) until its backward, not its
    input (the receive buffer); torch allocates m = 4 receive buffers per stage for activations (not stage 0)
    and m for gradients (not the last stage)."""
    prec = P.precision("cpu", "auto", 0)
    # 1F1B: rank 0 (stage 0: layers 0-1) holds 2 micro-batches of 1092 + 970 + 64, and 4 gradient buffers
    got = P.pipeline_activation_bytes(pp_cfg(), pp_layout(), prec, 16, 1.0, micro_batches=4)
    assert got[0]["blocks"] == 2 * (1092 + 970 + 64) * 128 and got[0]["head"] == 0
    assert got[0]["p2p_buffers"] == 4 * 64 * 128 and got[0]["total"] == (4252 + 256) * 128
    # rank 1 (stage 1: layers 2-3, the head) holds 1 micro-batch of 1092 + 970 - 64 and the head, 4 activation buffers
    assert got[1]["blocks"] == (1092 + 970 - 64) * 128 and got[1]["head"] == (704 + 512) * 128
    assert got[1]["total"] == (1998 + 1216 + 256) * 128
    # interleaved: rank 0 holds (4, 1) of stage 0 (layer 0 + its output) and stage 2 (layer 2; output and input
    # cancel); buffers: stage 0 gradients, stage 2 both: 3 x 4
    Li = pp_layout(schedule="interleaved_1f1b", v=2)
    got = P.pipeline_activation_bytes(pp_cfg(schedule="interleaved_1f1b", v=2), Li, prec, 16, 1.0, micro_batches=4)
    assert got[0]["total"] == (4 * 1156 + 1092 + 3 * 4 * 64) * 128
    # rank 1: (2, 1) of stage 1 (layer 1) and stage 3 (layer 3 less its input, the head), 3 x 4 buffers
    assert got[1]["total"] == (2 * 970 + (970 - 64 + 704) + 512 + 3 * 4 * 64) * 128
    # pp = 1 is unchanged: one micro-batch, no buffers
    one = P.pipeline_activation_bytes(pp_cfg(pp=1), layout(), prec, 16, 1.0, micro_batches=4)
    assert len(one) == 1 and one[0]["in_flight"] == (1,) and one[0]["p2p_buffers"] == 0
    assert one[0]["total"] == (2 * 1092 + 2 * 970 + 1216) * 128


def test_pipeline_p2p_bytes_and_links_by_hand():
    """A boundary carries [b, S/tp, H] = 2 x 16 x 64 fp32 = 8192 bytes per micro-batch each way."""
    prec = P.precision("cpu", "auto", 0)
    gpu = P.GPUS["h100"]
    cfg, L = pp_cfg(), pp_layout()
    counts = P.param_counts(PP_MODEL, SMALL_MOE)
    assert P.stage_boundary_bytes(cfg, L, prec, 16) == 8192
    assert P.stage_boundary_bytes(cfg, dataclasses.replace(L, tp=2), P.precision("cuda", "auto", 1), 16) == 8192 / 2 / 2
    for r in (0, 1):  # 1F1B: rank 0 sends activations, rank 1 gradients, 4 micro-batches; one GPU per node: network
        rc = P.rank_param_counts(cfg, counts, L, r)
        t = P.communication(cfg, rc, L, prec, gpu, 1, 16, 4, 1.0, r)["pp"]
        assert (t.nvlink, t.network) == (0, 4 * 8192) and t.seconds == pytest.approx(4 * 8192 / 50e9)
        assert P.communication(cfg, rc, L, prec, gpu, 2, 16, 4, 1.0, r)["pp"].nvlink == 4 * 8192  # one node
    # interleaved: rank 0's stage 0 sends forward, its stage 2 forward and backward
    Li = pp_layout(schedule="interleaved_1f1b", v=2)
    ci = pp_cfg(schedule="interleaved_1f1b", v=2)
    t = P.communication(ci, P.rank_param_counts(ci, counts, Li, 0), Li, prec, gpu, 2, 16, 4, 1.0, 0)["pp"]
    assert t.nvlink == 3 * 4 * 8192
    # stage ranks are dp*tp apart: with dp 2 on 2-GPU nodes, pp rank 0 fills node 0 and pp rank 1 node 1
    assert P.crosses_nodes(0, 1, 2, 2) and not P.crosses_nodes(0, 1, 2, 4)


def test_pipeline_evaluate_and_estimate():
    """The config's own layout (the dry run's figures): memory of the fullest rank, the bubble stretching the
    slowest rank's micro-batches, P2P on top; MFU over all GPUs."""
    gpu = P.GPUS["h100"]
    for cfg, bubble in ((pp_cfg(), 1 / 5), (pp_cfg(schedule="interleaved_1f1b", v=2), 1 / 9)):
        est = P.estimate(cfg, 2, gpus_per_node=2)
        lay = est["layout"]
        assert (lay["pp"], lay["dp"], lay["pp_schedule"]) == (2, 1, cfg.parallel.pp_schedule)
        assert est["bubble_fraction"] == pytest.approx(bubble) and est["micro_batches"] == 4
        pipe = est["pipeline"]
        assert est["memory_bytes"]["total"] == max(pipe["memory_total_bytes"])
        assert pipe["memory_total_bytes"][pipe["memory_pp_rank"]] == est["memory_bytes"]["total"]
        t = est["time_s"]
        stage = t["compute"] + t["a2a"] + t["tp"]
        assert t["bubble"] == pytest.approx(stage * bubble / (1 - bubble)) and t["p2p"] > 0
        assert est["step_time_s"] == pytest.approx(stage + t["bubble"] + t["p2p"] + t["dp_exposed"])
        assert est["mfu"] == pytest.approx(est["model_flops_per_step"] / (est["step_time_s"] * gpu.peak_tflops * 1e12 * 2))
        assert pipe["p2p_bytes_per_micro_batch"] == 2 * 16 * 64 * 4  # zero 0: autocast keeps the stream fp32
    # 1F1B: rank 0 (2 micro-batches in flight and the embedding) is the fullest at zero 0 on a GPU
    est = P.estimate(pp_cfg(), 2)
    assert est["pipeline"]["in_flight"] == [[2], [1]] and est["pipeline"]["memory_pp_rank"] == 0
    assert est["params"]["per_rank"] == 16384 + 36992 + 37248
    with pytest.raises(ConfigError, match="parallel.pp"):
        P.estimate(pp_cfg(), 3)


def test_plan_recommends_a_pipeline_only_when_it_is_faster():
    """tiny.yaml on 4 GPUs: every layout is timed the same way, pp among them; the recommended one is the
    fastest fitting, whatever its pp."""
    result = P.plan(load_config("configs/tiny.yaml"), 4, 80, P.GPUS["h100"], gpus_per_node=4)
    fits = [e for e in result["estimates"] if e["fits"]]
    assert {e["layout"].pp for e in fits} == {1, 2, 4}
    best = result["estimates"][result["recommended"]]
    assert best["step_time_s"] == min(e["step_time_s"] for e in fits)
    assert " pp " in P.format_table(result).splitlines()[3]
