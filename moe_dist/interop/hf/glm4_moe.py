"""GLM-4.5 (glm4_moe), Sarvam-30B (sarvam_moe: the same model, other defaults) and Solar Open (solar_open):
DeepSeek-V3's router and ungated shared experts under grouped-query attention. GLM-4-MoE adds partial
rotary (half the head by default), optional per-head q/k norms and q/k/v biases, dense layers first."""
from __future__ import annotations

from .common import (first_k_dense, no_partial_rotary, read_v3_router, rope_parameters, routed_and_shared,
                     write_routed_and_shared, write_v3_router)
from .registry import Family, register
from .tensors import Fused, TensorMap

PARTIAL_DEFAULT = {"glm4_moe": 0.5, "sarvam_moe": 1.0}  # when config.json names no partial_rotary_factor
QK_NORM_DEFAULT = {"glm4_moe": False, "sarvam_moe": True}


def _glm(family: str):
    def read(hf: dict, m: dict, e: dict) -> None:
        named = "partial_rotary_factor" in (hf.get("rope_parameters") or {}) or "partial_rotary_factor" in hf
        if not named and PARTIAL_DEFAULT[family] != 1.0:
            m["rotary_dim"] = int((m.get("head_dim") or m["d_model"] // m["n_head"]) * PARTIAL_DEFAULT[family])
        qk_norm = bool(hf.get("use_qk_norm", QK_NORM_DEFAULT[family]))
        m.update(qkv_bias=bool(hf.get("attention_bias", hf.get("use_qkv_bias", False))), qk_norm=qk_norm,
                 first_k_dense=hf.get("first_k_dense_replace", 1), moe_every=1)
        routed_and_shared(hf, e)
        read_v3_router(hf, e)

    def write(cfg, moe) -> dict:
        # the factor is written even when 1: glm4_moe's default is 0.5
        rope = rope_parameters(cfg) | {"partial_rotary_factor": cfg.rope_dim() / cfg.head_size()}
        return write_routed_and_shared(cfg, moe) | write_v3_router(moe) | dict(
            intermediate_size=cfg.d_ff, first_k_dense_replace=first_k_dense(cfg), use_qk_norm=cfg.qk_norm,
            attention_bias=cfg.qkv_bias, num_nextn_predict_layers=0, rope_parameters=rope)

    return read, write


def read_solar_open(hf: dict, m: dict, e: dict) -> None:
    no_partial_rotary("solar_open", m)
    m["qkv_bias"] = bool(hf.get("attention_bias", False))  # Llama attention without an o_proj bias; every layer MoE
    routed_and_shared(hf, e)
    read_v3_router(hf, e)


def write_solar_open(cfg, moe) -> dict:
    return write_routed_and_shared(cfg, moe) | write_v3_router(moe) | dict(attention_bias=cfg.qkv_bias, intermediate_size=cfg.d_ff)


# Sarvam's released checkpoints: their own names, and q, k, v fused into one projection
SARVAM = TensorMap(
    original=(("model.embed_tokens.", "model.word_embeddings."), ("self_attn.o_proj.", "attention.dense."),
              ("self_attn.q_norm.", "attention.query_layernorm."), ("self_attn.k_norm.", "attention.key_layernorm."),
              ("mlp.gate.e_score_correction_bias", "mlp.gate.expert_bias")),
    fused=tuple(Fused(f"attention.query_key_value.{p}", tuple(f"attn.{x}_proj.{p}" for x in "qkv"), original_only=True)
                for p in ("weight", "bias")))

register(
    Family("glm4_moe", "Glm4MoeForCausalLM", *_glm("glm4_moe"), TensorMap()),
    Family("sarvam_moe", "Glm4MoeForCausalLM", *_glm("sarvam_moe"), SARVAM, default_theta=8e6),
    Family("solar_open", "SolarOpenForCausalLM", read_solar_open, write_solar_open, TensorMap(), default_theta=1e6),
)
