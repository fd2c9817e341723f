"""Multi-head latent attention families: DeepSeek-V2 (softmax routing) and DeepSeek-V3 (sigmoid routing with
an expert bias), and DeepSeek-V3's kin: Sarvam-MLA (its config format), GLM-4.7-Flash (glm4_moe_lite: MoE
layers listed in mlp_layer_types) and A.X-K1 (mlp_layer_types, and an RMSNorm on each MoE output).

Dense layers come first (first_k_dense_replace) or where mlp_layer_types says "dense"; the shared experts are
ungated, of the routed width. num_key_value_heads is ignored: MLA decodes keys for every head, as transformers does.
"""
from __future__ import annotations

from .common import first_k_dense, no_partial_rotary, read_v3_router, routed_and_shared, unsupported, write_routed_and_shared, write_v3_router
from .registry import Family, register
from .tensors import LLAMA, TensorMap, table


def _mla(family: str, hf: dict, m: dict, e: dict) -> None:
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name):
            raise unsupported(family, name, True, "DeepSeek projections are bias-free in moe_dist")
    no_partial_rotary(family, m)
    m.pop("head_dim", None)  # transformers saves head_dim = qk_rope_head_dim; the MLA sizes below say it all
    m.update(attention="mla", n_kv_head=None, q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
             qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"])
    types = hf.get("mlp_layer_types")
    if types is not None:  # glm4_moe_lite, axk1
        odd = sorted(set(types) - {"dense", "sparse"})
        if odd:
            raise unsupported(family, "mlp_layer_types", odd, "layers are dense or sparse")
        m["moe_layer_indices"] = [i for i, t in enumerate(types) if t == "sparse"]
    else:
        if hf.get("moe_layer_freq", 1) != 1:
            raise unsupported(family, "moe_layer_freq", hf["moe_layer_freq"],
                              "transformers and moe_dist make every layer from first_k_dense_replace on MoE")
        m.update(first_k_dense=hf.get("first_k_dense_replace") or 0, moe_every=1)
    routed_and_shared(hf, e)
    e["routed_scaling_factor"] = float(hf.get("routed_scaling_factor", 1.0))


def _write_mla(cfg, moe, layer_list: bool) -> dict:
    d, layers = cfg.mla_dims(), cfg.moe_layers()
    out = write_routed_and_shared(cfg, moe) | dict(
               intermediate_size=cfg.d_ff, routed_scaling_factor=moe.routed_scaling_factor, q_lora_rank=d["q_lora_rank"], kv_lora_rank=d["kv_lora_rank"], qk_nope_head_dim=d["qk_nope"], head_dim=d["qk_rope"],
               qk_rope_head_dim=d["qk_rope"], v_head_dim=d["v"], attention_bias=False, norm_topk_prob=moe.norm_topk_prob)
    if layer_list:
        out["mlp_layer_types"] = ["sparse" if i in layers else "dense" for i in range(cfg.n_layer)]
    else:
        out["first_k_dense_replace"] = first_k_dense(cfg)
    return out


def read_deepseek_v2(hf: dict, m: dict, e: dict) -> None:
    _mla("deepseek_v2", hf, m, e)
    scoring = hf.get("scoring_func", "softmax")
    if scoring != "softmax":
        raise unsupported("deepseek_v2", "scoring_func", scoring, "DeepSeek-V2 routes on softmax scores")
    if hf.get("norm_topk_prob"):
        raise unsupported("deepseek_v2", "norm_topk_prob", True, "transformers' DeepSeek-V2 ignores it while DeepSeek's code "
                          "normalises; the intended maths is ambiguous")
    method = hf.get("topk_method", "greedy")
    if method == "group_limited_greedy":
        e.update(n_groups=hf.get("n_group"), topk_groups=hf.get("topk_group"), group_score="max")
    elif method != "greedy":
        raise unsupported("deepseek_v2", "topk_method", method, "DeepSeek-V2 routing is greedy or group_limited_greedy")
    e["aux_loss_weight"] = hf.get("aux_loss_alpha", 0.001)
    m["rope_interleave"] = True  # transformers' DeepSeek-V2 rotates (x0, x1), (x2, x3), ... pairs


def write_deepseek_v2(cfg, moe) -> dict:
    grouped = moe.n_groups > 0
    return _write_mla(cfg, moe, False) | dict(
        topk_method="group_limited_greedy" if grouped else "greedy", n_group=moe.n_groups if grouped else None,
        topk_group=moe.topk_groups if grouped else None, mlp_bias=False, aux_loss_alpha=moe.aux_loss_weight)


def _v3(family: str):
    """DeepSeek-V3's router (sigmoid scores, e_score_correction_bias for selection, top-2-sum groups) on MLA."""

    def read(hf: dict, m: dict, e: dict) -> None:
        _mla(family, hf, m, e)
        if family == "deepseek_v3":
            method = hf.get("topk_method", "noaux_tc")
            if method != "noaux_tc":
                raise unsupported(family, "topk_method", method, "DeepSeek-V3 routing is noaux_tc (sigmoid + e_score_correction_bias)")
        scoring = hf.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise unsupported(family, "scoring_func", scoring, f"{family} routes on sigmoid scores")
        read_v3_router(hf, e)
        m["rope_interleave"] = bool(hf.get("rope_interleave", True))
        if family == "axk1":
            if m["q_lora_rank"] is None:
                raise unsupported(family, "q_lora_rank", None, "A.X-K1's attention always compresses the query")
            m["post_norm"] = "moe"  # post_mlp_layernorm

    def write(cfg, moe) -> dict:
        out = _write_mla(cfg, moe, family in ("glm4_moe_lite", "axk1"))
        return out | write_v3_router(moe) | dict(rope_interleave=cfg.rope_interleave,
                                                 **({} if family in ("glm4_moe_lite", "axk1") else {"num_nextn_predict_layers": 0}))

    return read, write


AXK1 = TensorMap(table(LLAMA, {"ffn_out_norm.weight": "mlp.post_mlp_layernorm.weight"}),
                 original=(("mlp.post_mlp_layernorm.", "post_mlp_layernorm."),),  # stored at the layer level
                 may_lack=("ffn.router.expert_bias",),  # released checkpoints route without a correction bias
                 ignore=("ffn_out_norm.weight",))  # ... and carry the norm on dense layers too, where it is unused

register(
    Family("deepseek_v2", "DeepseekV2ForCausalLM", read_deepseek_v2, write_deepseek_v2, TensorMap()),
    Family("deepseek_v3", "DeepseekV3ForCausalLM", *_v3("deepseek_v3"), TensorMap()),
    Family("sarvam_mla", "DeepseekV3ForCausalLM", *_v3("sarvam_mla"), TensorMap()),
    Family("glm4_moe_lite", "Glm4MoeLiteForCausalLM", *_v3("glm4_moe_lite"), TensorMap()),
    Family("axk1", "AXK1ForCausalLM", *_v3("axk1"), AXK1),
)
