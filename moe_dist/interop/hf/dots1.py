"""dots.llm1 (dots1): Qwen3's attention (per-head q/k norms, optional sliding-window layers) with DeepSeek-V3's
MoE (sigmoid router with an expert bias, ungated shared experts, dense layers first)."""
from __future__ import annotations

from .common import (first_k_dense, layer_types, no_partial_rotary, read_layer_types, read_v3_router, routed_and_shared,
                     write_routed_and_shared, write_v3_router)
from .registry import Family, register
from .tensors import TensorMap


def read_dots1(hf: dict, m: dict, e: dict) -> None:
    no_partial_rotary("dots1", m)
    bias = bool(hf.get("attention_bias", False))
    m.update(qk_norm=True, qkv_bias=bias, attn_out_bias=bias, first_k_dense=hf.get("first_k_dense_replace") or 0, moe_every=1)
    m.setdefault("head_dim", hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    read_layer_types("dots1", hf, m, hf.get("sliding_window"))
    routed_and_shared(hf, e)
    read_v3_router(hf, e, norm_default=False)


def write_dots1(cfg, moe) -> dict:
    return write_routed_and_shared(cfg, moe) | write_v3_router(moe) | dict(
        intermediate_size=cfg.d_ff, first_k_dense_replace=first_k_dense(cfg), attention_bias=cfg.qkv_bias,
        sliding_window=cfg.sliding_window, layer_types=layer_types(cfg), max_window_layers=cfg.n_layer)


register(Family("dots1", "Dots1ForCausalLM", read_dots1, write_dots1, TensorMap()))
