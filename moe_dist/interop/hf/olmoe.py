"""OLMoE and FlexOlmo: RMSNorm of q and k over the whole projections (before RoPE), softmax top-k routing,
every layer MoE. FlexOlmo's blocks norm the branch outputs instead of their inputs (OLMo 2)."""
from __future__ import annotations

from ...config import resolved_d_expert
from .common import no_partial_rotary, unsupported
from .registry import Family, register
from .tensors import LLAMA, TensorMap, table


def _olmo(family: str):
    def read(hf: dict, m: dict, e: dict) -> None:
        no_partial_rotary(family, m)
        if hf.get("clip_qkv") is not None:
            raise unsupported(family, "clip_qkv", hf["clip_qkv"], "q/k/v are not clipped in moe_dist")
        if family == "olmoe" and "head_dim" in m:
            raise unsupported(family, "head_dim", m["head_dim"], "OLMoE's q norm spans hidden_size: head_dim is hidden_size / heads")
        bias = bool(hf.get("attention_bias", False))
        m.update(qk_norm=True, qk_norm_scope="projection", qkv_bias=bias, attn_out_bias=bias, d_ff=hf["intermediate_size"])
        if family == "flex_olmo":
            m.update(pre_norm=False, post_norm="all")
        e.update(n_experts=hf["num_experts"], norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                 aux_loss_weight=hf.get("router_aux_loss_coef", 0.01))

    def write(cfg, moe) -> dict:
        return dict(intermediate_size=resolved_d_expert(cfg, moe), num_experts=moe.n_experts, norm_topk_prob=moe.norm_topk_prob,
                    attention_bias=cfg.qkv_bias, router_aux_loss_coef=moe.aux_loss_weight,
                    **({"clip_qkv": None} if family == "olmoe" else {}))

    return read, write


FLEX = table(LLAMA, {"attn_norm.weight": None, "ffn_norm.weight": None, "attn_out_norm.weight": "post_attention_layernorm.weight",
                     "ffn_out_norm.weight": "post_feedforward_layernorm.weight"})
register(
    Family("olmoe", "OlmoeForCausalLM", *_olmo("olmoe"), TensorMap()),
    Family("flex_olmo", "FlexOlmoForCausalLM", *_olmo("flex_olmo"), TensorMap(FLEX), default_theta=500000.0),
)
