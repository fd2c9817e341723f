"""Hugging Face interop: tiny random models built with transformers, imported and exported by moe_dist,
must give the same logits (fp32, eval, dropless) in both directions, and the same greedy generations."""
import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from moe_dist.config import MoEConfig, ModelConfig  # noqa: E402
from moe_dist.interop import HFInteropError, export_hf, import_hf  # noqa: E402
from moe_dist.interop.hf import hf_to_configs, infer_family  # noqa: E402
from moe_dist.model import MoETransformerLM  # noqa: E402
from moe_dist.train.generate import sample  # noqa: E402

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64,
            rms_norm_eps=1e-5)
MIXTRAL = dict(BASE, intermediate_size=24, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
QWEN = dict(BASE, intermediate_size=40, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, num_key_value_heads=2)
DEEPSEEK = dict(BASE, intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                num_key_value_heads=4, kv_lora_rank=12, q_lora_rank=10, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=6, first_k_dense_replace=1, n_shared_experts=1)
# GLM-4-MoE and its kin: DeepSeek-V3's router under grouped-query attention
GLM = dict(BASE, intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
           num_key_value_heads=2, head_dim=8)
SMALL = dict(BASE, intermediate_size=16, num_key_value_heads=2)  # Mixtral-like: intermediate_size is the expert width
# gpt-oss: a window shorter than the test sequences, and a SwiGLU limit the activations reach
GPT_OSS = dict(SMALL, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=4, swiglu_limit=0.5)

# (name, model_type, config overrides, save in transformers-5 stacked layout instead of the per-expert one)
CASES = [
    ("mixtral-top2-gqa", "mixtral", dict(MIXTRAL), False),
    ("mixtral-top1-stacked-tied", "mixtral", dict(MIXTRAL, num_experts_per_tok=1, num_key_value_heads=4, tie_word_embeddings=True), True),
    ("mixtral-head_dim", "mixtral", dict(MIXTRAL, head_dim=16, rope_parameters={"rope_theta": 500.0, "rope_type": "default"}), False),
    ("qwen2_moe-dense0-nonorm", "qwen2_moe", dict(QWEN, shared_expert_intermediate_size=24, mlp_only_layers=[0]), False),
    ("qwen2_moe-step2-norm-top1", "qwen2_moe", dict(QWEN, shared_expert_intermediate_size=20, decoder_sparse_step=2,
                                                    norm_topk_prob=True, num_experts_per_tok=1, qkv_bias=False), True),
    ("qwen3_moe-head_dim-norm", "qwen3_moe", dict(QWEN, head_dim=16, norm_topk_prob=True, mlp_only_layers=[1]), False),
    ("qwen3_moe-bias-top1", "qwen3_moe", dict(QWEN, attention_bias=True, num_experts_per_tok=1, num_key_value_heads=4), True),
    ("deepseek_v3-qlora-groups", "deepseek_v3", dict(DEEPSEEK, n_group=4, topk_group=2, norm_topk_prob=True,
                                                     routed_scaling_factor=2.5), False),
    ("deepseek_v3-noq-nogroup-halfrope", "deepseek_v3", dict(DEEPSEEK, q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                                                             rope_interleave=False, n_shared_experts=2, first_k_dense_replace=2), True),
    ("deepseek_v2-greedy-noq", "deepseek_v2", dict(DEEPSEEK, q_lora_rank=None, topk_method="greedy", n_shared_experts=2,
                                                   routed_scaling_factor=1.5), False),
    ("deepseek_v2-group-limited", "deepseek_v2", dict(DEEPSEEK, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                                      first_k_dense_replace=0, num_experts_per_tok=3), True),
    # YaRN: DeepSeek's (mscale, mscale_all_dim: the softmax scale grows), plain (attention factor from factor),
    # explicit attention_factor with a fractional ramp (no truncation). Each case has interpolated frequencies.
    ("deepseek_v3-yarn", "deepseek_v3", dict(DEEPSEEK, n_group=4, topk_group=2, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8, beta_fast=32, beta_slow=1,
        mscale=1.0, mscale_all_dim=1.0)), False),
    ("deepseek_v2-yarn", "deepseek_v2", dict(DEEPSEEK, topk_method="greedy", rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=8, beta_fast=32, beta_slow=1,
        mscale=0.707, mscale_all_dim=0.707)), True),
    ("qwen3_moe-yarn", "qwen3_moe", dict(QWEN, rope_parameters=dict(rope_type="yarn", rope_theta=1000.0, factor=4.0,
                                                                     original_max_position_embeddings=8)), False),
    ("mixtral-yarn-attention_factor", "mixtral", dict(MIXTRAL, head_dim=8, rope_parameters=dict(
        rope_type="yarn", rope_theta=500.0, factor=3.0, original_max_position_embeddings=1024, beta_fast=16, beta_slow=2,
        attention_factor=1.3, truncate=False)), True),
    # sliding windows (4-5 tokens; the test sequences are longer): on every layer, or on the layers layer_types names
    ("mixtral-sliding", "mixtral", dict(MIXTRAL, sliding_window=4, hidden_act="swish"), True),
    ("qwen2_moe-sliding-even-layers", "qwen2_moe", dict(QWEN, shared_expert_intermediate_size=24, use_sliding_window=True,
                                                        sliding_window=5, max_window_layers=3), False),
    ("qwen3_moe-sliding", "qwen3_moe", dict(QWEN, use_sliding_window=True, sliding_window=4), True),
    # families that need only a config and tensor-name mapping
    ("sarvam_mla-kv_heads", "sarvam_mla", dict(DEEPSEEK, n_group=4, topk_group=2, num_key_value_heads=128), False),
    ("glm4_moe_lite-layer_types", "glm4_moe_lite", dict(DEEPSEEK, mlp_layer_types=["sparse", "dense", "sparse"]), True),
    ("dots1-sliding-groups", "dots1", dict(GLM, first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True,
                                             routed_scaling_factor=2.0, sliding_window=4,
                                             layer_types=["full_attention", "sliding_attention", "full_attention"]), False),
    ("solar_open-bias", "solar_open", dict(GLM, attention_bias=True), True),
    ("aria_text", "aria_text", dict(SMALL, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=2, attention_bias=True), False),
    ("aria_text-stacked", "aria_text", dict(SMALL, moe_num_experts=4, moe_topk=1, moe_num_shared_experts=1), True),
    ("ernie4_5_moe", "ernie4_5_moe", dict(BASE, intermediate_size=40, moe_intermediate_size=16, moe_num_experts=8, moe_k=2,
                                          moe_num_shared_experts=1, num_key_value_heads=2), False),
    ("ernie4_5_moe-untied-stacked", "ernie4_5_moe", dict(BASE, intermediate_size=40, moe_intermediate_size=16, moe_num_experts=8,
                                                          moe_k=3, moe_num_shared_experts=0, tie_word_embeddings=False,
                                                          moe_layer_start_index=0), True),
    # families that the new model features unlock
    ("glm4_moe-half-rotary-qknorm", "glm4_moe", dict(GLM, use_qk_norm=True, attention_bias=True, n_group=4, topk_group=2), False),
    ("glm4_moe-stacked", "glm4_moe", dict(GLM, first_k_dense_replace=0, routed_scaling_factor=2.5), True),
    ("sarvam_moe-fused-qkv", "sarvam_moe", dict(GLM, attention_bias=True), False),
    ("sarvam_moe-partial-stacked", "sarvam_moe", dict(GLM, rope_parameters={"rope_theta": 1e4, "rope_type": "default",
                                                                             "partial_rotary_factor": 0.5}), True),
    ("minimax_m2-partial", "minimax_m2", dict(SMALL, num_local_experts=4, num_experts_per_tok=2, head_dim=8, rope_parameters={
        "rope_theta": 1e4, "rope_type": "default", "partial_rotary_factor": 0.5}), False),
    ("olmoe", "olmoe", dict(SMALL, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                            pad_token_id=None, eos_token_id=None), False),
    ("olmoe-gqa-bias-stacked", "olmoe", dict(SMALL, num_experts=4, num_experts_per_tok=2, attention_bias=True,
                                             pad_token_id=None, eos_token_id=None), True),
    ("flex_olmo", "flex_olmo", dict(SMALL, num_experts=4, num_experts_per_tok=2, pad_token_id=None, eos_token_id=None), False),
    ("granitemoe-multipliers", "granitemoe", dict(SMALL, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=1.5,
                                                  residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.5), False),
    ("granitemoeshared", "granitemoeshared", dict(SMALL, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=24,
                                                  embedding_multiplier=2.0, logits_scaling=0.5), True),
    ("hunyuan_v1_moe", "hunyuan_v1_moe", dict(SMALL, num_experts=4, moe_topk=2, head_dim=8), False),
    ("axk1", "axk1", dict(DEEPSEEK, mlp_layer_types=["dense", "sparse", "sparse"], n_group=4, topk_group=2), False),
    ("gpt_oss", "gpt_oss", dict(GPT_OSS), False),
    ("gpt_oss-all-full-stacked", "gpt_oss", dict(GPT_OSS, num_experts_per_tok=1, layer_types=["full_attention"] * 3), True),
]
# families whose maths an earlier-registered family writes exactly (export infers that one)
INFERRED = {"sarvam_mla": "deepseek_v3", "sarvam_moe": "glm4_moe", "solar_open": "glm4_moe"}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights are allocated uninitialised by some paths: give every tensor explicit random values,
    router weights large enough that top-k choices are far from ties, and a non-zero DeepSeek-V3 expert bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(("gate.weight", "router.weight", "gate.wg.weight")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))


def build_hf(model_type: str, kwargs: dict):
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config)
    randomize(model)
    return model.eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def our_logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name,model_type,kwargs,stacked", CASES, ids=[c[0] for c in CASES])
def test_import_then_export_matches_transformers(tmp_path, name, model_type, kwargs, stacked):
    hf = build_hf(model_type, kwargs)
    hf.save_pretrained(tmp_path / "hf", save_original_format=not stacked)
    model, cfg, moe = import_hf(tmp_path / "hf")
    expected = hf_logits(hf, IDS)
    torch.testing.assert_close(our_logits(model, IDS), expected, atol=1e-4, rtol=1e-4)
    # greedy generation token for token, through moe_dist's KV cache (sliding layers keep their last tokens) and theirs
    prompt = IDS[0, :7]
    hf.generation_config.eos_token_id = None  # never stop early (min_new_tokens would mask the eos logit instead)
    with torch.no_grad():
        theirs = hf.generate(prompt[None], max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 7:]
    assert sample(model, prompt.tolist(), 12, temperature=0) == theirs.tolist()

    # export (in the other tensor spelling than the one read) and reload with transformers
    layout = "original" if stacked else "transformers"
    assert export_hf(model, tmp_path / "out", family=model_type, layout=layout) == model_type
    assert infer_family(cfg, moe) == INFERRED.get(model_type, model_type)
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    torch.testing.assert_close(hf_logits(back.eval(), IDS), expected, atol=1e-4, rtol=1e-4)
    # and the exported checkpoint re-imports to the same configs
    _, cfg2, moe2 = import_hf(tmp_path / "out")
    assert (cfg2, moe2) == (cfg, moe)


def test_features_are_wired(tmp_path):
    """The imported configs name the family features (so a silent fallback cannot pass the logit test by luck)."""
    cases = {c[0]: c for c in CASES}
    _, m, e = hf_to_configs(AutoConfig.for_model("qwen2_moe", **cases["qwen2_moe-dense0-nonorm"][2]).to_dict())
    assert m.moe_layer_indices == [1, 2] and m.qkv_bias and e.shared_expert_gate and e.n_shared_experts == 1
    _, m, e = hf_to_configs(AutoConfig.for_model("qwen2_moe", **cases["qwen2_moe-step2-norm-top1"][2]).to_dict())
    assert m.moe_layer_indices == [1] and not m.qkv_bias and e.norm_topk_prob and e.top_k == 1
    _, m, e = hf_to_configs(AutoConfig.for_model("qwen3_moe", **cases["qwen3_moe-head_dim-norm"][2]).to_dict())
    assert m.qk_norm and m.head_dim == 16 and m.moe_layer_indices == [0, 2]
    _, m, e = hf_to_configs(AutoConfig.for_model("deepseek_v3", **cases["deepseek_v3-qlora-groups"][2]).to_dict())
    assert m.attention == "mla" and m.q_lora_rank == 10 and m.rope_interleave and m.moe_layers() == [1, 2]
    assert (e.score_func, e.expert_bias, e.n_groups, e.topk_groups, e.group_score) == ("sigmoid", True, 4, 2, "top2_sum")
    assert e.routed_scaling_factor == 2.5 and e.norm_topk_prob and e.n_shared_experts == 1
    _, m, e = hf_to_configs(AutoConfig.for_model("deepseek_v2", **cases["deepseek_v2-group-limited"][2]).to_dict())
    assert (e.score_func, e.n_groups, e.group_score, e.norm_topk_prob) == ("softmax", 4, "max", False) and m.moe_layers() == [0, 1, 2]

    def configs(name):
        return hf_to_configs(AutoConfig.for_model(cases[name][1], **cases[name][2]).to_dict())[1:]

    m, e = configs("gpt_oss")
    assert (m.attn_sinks, m.sliding_window, m.sliding_window_layers, m.qkv_bias, m.attn_out_bias) == (True, 4, [0, 2], True, True)
    assert (e.router_bias, e.expert_linear_bias, e.expert_act, e.swiglu_limit, e.topk_then_softmax) == (True, True, "clamped_swiglu", 0.5, True)
    m, e = configs("qwen2_moe-sliding-even-layers")
    assert (m.sliding_window, m.sliding_window_layers) == (5, [0, 2])
    m, e = configs("glm4_moe-half-rotary-qknorm")
    assert (m.rotary_dim, m.qk_norm, m.qkv_bias, m.attn_out_bias, m.first_k_dense) == (4, True, True, False, 1)
    assert (e.score_func, e.expert_bias, e.n_groups, e.n_shared_experts) == ("sigmoid", True, 4, 1)
    m, _ = configs("flex_olmo")
    assert (m.pre_norm, m.post_norm, m.qk_norm_scope) == (False, "all", "projection")
    m, _ = configs("granitemoe-multipliers")
    assert (m.embedding_multiplier, m.residual_multiplier, m.attention_multiplier, m.logits_scaling) == (1.5, 0.5, 0.3, 2.5)
    m, e = configs("hunyuan_v1_moe")
    assert m.qk_norm and m.qk_norm_after_rope and e.n_shared_experts == 1 and e.norm_topk_prob
    m, e = configs("axk1")
    assert m.post_norm == "moe" and m.moe_layer_indices == [1, 2] and e.expert_bias
    m, e = configs("ernie4_5_moe")
    assert m.rope_interleave and m.tie_embeddings and m.moe_layer_indices == [1, 2] and e.expert_bias and e.score_func == "softmax"
    m, e = configs("glm4_moe_lite-layer_types")
    assert m.attention == "mla" and m.moe_layer_indices == [0, 2]


def test_expert_bias_changes_deepseek_v3_routing(tmp_path):
    """The e_score_correction_bias is loaded and used: zeroing it changes the logits."""
    hf = build_hf("deepseek_v3", CASES[7][2])
    hf.save_pretrained(tmp_path)
    model, _, _ = import_hf(tmp_path)
    before = our_logits(model, IDS)
    for layer in model.moe_layers():
        assert layer.router.expert_bias.abs().sum() > 0
        layer.router.expert_bias.zero_()
    assert not torch.allclose(our_logits(model, IDS), before, atol=1e-3)


def test_yarn_in_the_transformers_4_config_format(tmp_path):
    """Real DeepSeek/Qwen checkpoints name YaRN under rope_scaling (4.x) with a top-level rope_theta."""
    kwargs = next(c[2] for c in CASES if c[0] == "deepseek_v3-yarn")
    hf = build_hf("deepseek_v3", kwargs)
    hf.save_pretrained(tmp_path)
    p = tmp_path
    cfg = json.loads((p / "config.json").read_text())
    cfg["rope_scaling"] = cfg.pop("rope_parameters")
    cfg["rope_theta"] = cfg["rope_scaling"].pop("rope_theta")
    (p / "config.json").write_text(json.dumps(cfg))
    model, m, _ = import_hf(p)
    assert (m.rope_scaling.type, m.rope_scaling.factor, m.rope_scaling.mscale_all_dim) == ("yarn", 4.0, 1.0)
    torch.testing.assert_close(our_logits(model, IDS), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)
    # and the export spells it both ways, for transformers 5 and for 4.x-era loaders
    export_hf(model, tmp_path / "out")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["rope_parameters"]["rope_type"] == out["rope_scaling"]["type"] == "yarn"
    assert out["rope_scaling"]["factor"] == 4.0 and out["rope_scaling"]["mscale_all_dim"] == 1.0


def test_sharded_checkpoint(tmp_path):
    hf = build_hf("mixtral", MIXTRAL)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _, _ = import_hf(tmp_path)
    torch.testing.assert_close(our_logits(model, IDS), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)
    export_hf(model, tmp_path / "out", max_shard_bytes=30_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(hf_logits(back, IDS), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)


def _saved(tmp_path, model_type, kwargs, edit):
    build_hf(model_type, kwargs).save_pretrained(tmp_path)
    p = tmp_path / "config.json"
    cfg = json.loads(p.read_text())
    edit(cfg)
    p.write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("model_type,kwargs,edit,match", [
    ("mixtral", MIXTRAL, lambda c: c.update(rope_parameters={"rope_type": "llama3", "factor": 4.0, "rope_theta": 1e4}), "rope_type"),
    ("mixtral", MIXTRAL, lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "original_max_position_embeddings"),
    ("mixtral", MIXTRAL, lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                             "original_max_position_embeddings": 8, "mscale_all_dim": 1.0}),
     "mscale_all_dim"),
    ("mixtral", MIXTRAL, lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    ("gpt_oss", GPT_OSS, lambda c: c.update(layer_types=["chunked_attention"] * 3), "layer_types"),
    ("mixtral", MIXTRAL, lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    ("mixtral", MIXTRAL, lambda c: c.update(model_type="jamba"), "model_type=.jamba. needs Mamba"),
    ("mixtral", MIXTRAL, lambda c: c.update(quantization_config={"quant_method": "fp8"}), "quantization_config"),
    ("qwen2_moe", dict(QWEN, shared_expert_intermediate_size=24), lambda c: c.update(layer_types=["sliding_attention"] * 3), "sliding_window"),
    ("deepseek_v3", DEEPSEEK, lambda c: c.update(attention_bias=True), "attention_bias"),
    ("deepseek_v2", DEEPSEEK, lambda c: c.update(norm_topk_prob=True), "norm_topk_prob"),
    ("deepseek_v2", DEEPSEEK, lambda c: c.update(topk_method="noaux_tc"), "topk_method"),
])
def test_unsupported_features_are_named(tmp_path, model_type, kwargs, edit, match):
    path = _saved(tmp_path, model_type, kwargs, edit)
    with pytest.raises(HFInteropError, match=match):
        import_hf(path)


def test_unknown_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    build_hf("mixtral", MIXTRAL).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.self_attn.sinks"] = torch.zeros(4)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFInteropError, match="self_attn.sinks"):
        import_hf(tmp_path)


def test_export_refuses_what_the_family_cannot_express(tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_head=4, n_layer=2, d_ff=16)
    model = MoETransformerLM(cfg, MoEConfig(n_experts=4, top_k=2, norm_topk_prob=False))
    with pytest.raises(HFInteropError, match="norm_topk_prob"):
        export_hf(model, tmp_path, family="mixtral")
    model = MoETransformerLM(cfg, MoEConfig(n_experts=4, top_k=2, topk_then_softmax=True))
    with pytest.raises(HFInteropError, match="topk_then_softmax"):
        export_hf(model, tmp_path, family="qwen3_moe")
    model = MoETransformerLM(cfg, MoEConfig(n_experts=4, top_k=2, score_func="sigmoid"))
    with pytest.raises(HFInteropError, match="score_func"):
        export_hf(model, tmp_path, family="qwen3_moe")
    # options of other families are refused by name too (the config round trip sees every one)
    olmo = dict(qk_norm=True, qk_norm_scope="projection")
    for family, kw, moe, match in [("olmoe", dict(olmo, pre_norm=False, post_norm="all"), {}, "model.post_norm"),
                                   ("flex_olmo", olmo, {}, "model.pre_norm"),
                                   ("mixtral", dict(sliding_window=4, sliding_window_layers=[1]), dict(norm_topk_prob=True),
                                    "model.sliding_window"),
                                   ("granitemoe", dict(attn_sinks=True), dict(topk_then_softmax=True), "model.attn_sinks"),
                                   ("gpt_oss", dict(qkv_bias=True, attn_out_bias=True, attn_sinks=True),
                                    dict(topk_then_softmax=True, router_bias=True, expert_linear_bias=True), "moe.expert_act")]:
        model = MoETransformerLM(dataclasses.replace(cfg, **kw), MoEConfig(n_experts=4, top_k=2, **moe))
        with pytest.raises(HFInteropError, match=match):
            export_hf(model, tmp_path, family=family)
    with pytest.raises(HFInteropError, match="no Hugging Face family expresses"):
        export_hf(MoETransformerLM(dataclasses.replace(cfg, attn_sinks=True, qk_norm=True), MoEConfig(n_experts=4)), tmp_path)


def test_native_mla_model_exports_to_deepseek_v3(tmp_path):
    """A model configured in moe_dist (not imported) exports and runs identically in transformers."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_head=4, n_layer=3, d_ff=40, attention="mla", q_lora_rank=16,
                      rope_interleave=True, first_k_dense=1, max_seq_len=64)
    moe = MoEConfig(n_experts=8, top_k=2, d_expert=16, score_func="sigmoid", expert_bias=True, norm_topk_prob=True,
                    n_groups=4, topk_groups=2, group_score="top2_sum", n_shared_experts=1, routed_scaling_factor=2.0)
    model = MoETransformerLM(cfg, moe)
    randomize(model)
    for layer in model.moe_layers():
        layer.router.weight.data.normal_(0, 0.5)
        layer.router.expert_bias.normal_(0, 0.2)
    assert export_hf(model, tmp_path) == "deepseek_v3"
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(hf_logits(back, IDS), our_logits(model, IDS), atol=1e-4, rtol=1e-4)


DENSE = dict(BASE, intermediate_size=40, num_key_value_heads=2)


@pytest.mark.parametrize("model_type,kwargs", [
    ("llama", dict(DENSE, attention_bias=True)),
    ("mistral", dict(DENSE, sliding_window=None)),
    ("qwen2", dict(DENSE)),
    ("qwen3", dict(DENSE, head_dim=12)),
], ids=["llama-bias", "mistral", "qwen2", "qwen3"])
def test_dense_checkpoint_imports_and_upcycles(tmp_path, model_type, kwargs):
    """A dense Hugging Face model imports exactly, and its upcycled MoE (noise 0) keeps its logits."""
    from moe_dist.interop import upcycle

    hf = build_hf(model_type, kwargs)
    hf.save_pretrained(tmp_path)
    dense, cfg, _ = import_hf(tmp_path)
    assert cfg.moe_layers() == []
    expected = hf_logits(hf, IDS)
    torch.testing.assert_close(our_logits(dense, IDS), expected, atol=1e-4, rtol=1e-4)
    moe = upcycle(dense, n_experts=4, top_k=2)
    torch.testing.assert_close(our_logits(moe, IDS), expected, atol=1e-4, rtol=1e-4)


def test_export_refuses_dense_model(tmp_path):
    model = MoETransformerLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_head=4, n_layer=2, d_ff=16, moe_every=0))
    with pytest.raises(HFInteropError, match="no MoE layers"):
        export_hf(model, tmp_path)
