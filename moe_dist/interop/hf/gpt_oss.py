"""OpenAI gpt-oss: attention sinks, sliding-window layers (layer_types), q/k/v/o biases, a router bias and a
softmax over the top-k logits, experts with biases and the clamped SwiGLU. Experts are stored transposed with
gate and up columns interleaved."""
from __future__ import annotations

from ...config import resolved_d_expert
from .common import layer_types, no_partial_rotary, read_layer_types
from .registry import Family, register
from .tensors import LLAMA, TensorMap, table


def read_gpt_oss(hf: dict, m: dict, e: dict) -> None:
    no_partial_rotary("gpt_oss", m)
    bias = bool(hf.get("attention_bias", True))
    m.update(qkv_bias=bias, attn_out_bias=bias, attn_sinks=True, d_ff=hf["intermediate_size"])
    read_layer_types("gpt_oss", hf, m, hf.get("sliding_window"))
    e.update(n_experts=hf["num_local_experts"], topk_then_softmax=True, router_bias=True, expert_linear_bias=True,
             expert_act="clamped_swiglu", swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
             swiglu_limit=float(hf.get("swiglu_limit", 7.0)), aux_loss_weight=hf.get("router_aux_loss_coef", 0.001))


def write_gpt_oss(cfg, moe) -> dict:
    return dict(intermediate_size=resolved_d_expert(cfg, moe), num_local_experts=moe.n_experts, attention_bias=cfg.qkv_bias,
                sliding_window=cfg.sliding_window or 128, layer_types=layer_types(cfg),  # transformers wants one, used or not swiglu_alpha=moe.swiglu_alpha,
                swiglu_limit=moe.swiglu_limit, router_aux_loss_coef=moe.aux_loss_weight)


register(Family("gpt_oss", "GptOssForCausalLM", read_gpt_oss, write_gpt_oss, TensorMap(
    table(LLAMA, {"ffn.router.weight": "mlp.router.weight", "ffn.router.bias": "mlp.router.bias"}), per_expert=None,
    experts="gpt_oss"), default_theta=150000.0))
