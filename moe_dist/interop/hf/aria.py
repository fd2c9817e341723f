"""Aria's language model (aria_text): every layer MoE, a softmax over the top-k logits, ungated shared experts
of the routed width, attention biases on q/k/v/o. Experts are stored transposed ([E, H, 2F] / [E, F, H]),
in released checkpoints as experts.fc1 / experts.fc2."""
from __future__ import annotations

from ...config import resolved_d_expert
from .common import no_partial_rotary, unsupported
from .registry import Family, register
from .tensors import LLAMA, TensorMap, table


def read_aria_text(hf: dict, m: dict, e: dict) -> None:
    no_partial_rotary("aria_text", m)
    if hf.get("mlp_bias"):
        raise unsupported("aria_text", "mlp_bias", True, "shared experts are bias-free in moe_dist")
    bias = bool(hf.get("attention_bias", False))
    m.update(qkv_bias=bias, attn_out_bias=bias)
    e.update(n_experts=hf.get("moe_num_experts", 8), top_k=hf.get("moe_topk", 2), topk_then_softmax=True,
             d_expert=hf["intermediate_size"], n_shared_experts=hf.get("moe_num_shared_experts", 2))


def write_aria_text(cfg, moe) -> dict:
    d_e = resolved_d_expert(cfg, moe)
    return dict(intermediate_size=d_e, moe_num_experts=moe.n_experts, moe_topk=moe.top_k, attention_bias=cfg.qkv_bias,
                moe_num_shared_experts=moe.n_shared_experts * (moe.d_shared_expert or d_e) // d_e, mlp_bias=False)


register(Family("aria_text", "AriaTextForCausalLM", read_aria_text, write_aria_text, TensorMap(
    table(LLAMA, {"ffn.router.weight": "mlp.router.weight"}), per_expert=None, experts="transposed",
    original=(("mlp.experts.gate_up_proj", "mlp.experts.fc1.weight"), ("mlp.experts.down_proj", "mlp.experts.fc2.weight")))))
