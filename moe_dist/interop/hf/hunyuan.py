"""Tencent Hunyuan-A13B (hunyuan_v1_moe): per-head q/k norms applied after RoPE, softmax routing with
renormalised gates, one ungated shared MLP of the expert width in every (MoE) layer."""
from __future__ import annotations

from ...config import resolved_d_expert
from .common import no_partial_rotary, unsupported
from .registry import Family, register
from .tensors import LLAMA, TensorMap, table


def read_hunyuan(hf: dict, m: dict, e: dict) -> None:
    no_partial_rotary("hunyuan_v1_moe", m)
    for name in ("num_experts", "moe_topk"):
        if not isinstance(hf.get(name, 1), int):
            raise unsupported("hunyuan_v1_moe", name, hf[name], "one value for all layers")
    bias = bool(hf.get("attention_bias", False))
    m.update(qk_norm=True, qk_norm_after_rope=True, qkv_bias=bias, attn_out_bias=bias, d_ff=hf["intermediate_size"],
             head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    e.update(n_experts=hf.get("num_experts", 1), top_k=hf.get("moe_topk", 1), norm_topk_prob=True, n_shared_experts=1)


def write_hunyuan(cfg, moe) -> dict:
    return dict(intermediate_size=resolved_d_expert(cfg, moe), num_experts=moe.n_experts, moe_topk=moe.top_k,
                attention_bias=cfg.qkv_bias)


register(Family("hunyuan_v1_moe", "HunYuanMoEV1ForCausalLM", read_hunyuan, write_hunyuan, TensorMap(table(LLAMA, {
    "ffn.router.weight": "mlp.gate.wg.weight", "ffn.shared_experts.": "mlp.shared_mlp.",
    "attn.q_norm.weight": "self_attn.query_layernorm.weight", "attn.k_norm.weight": "self_attn.key_layernorm.weight"}))))
