"""Qwen2-MoE (q/k/v biases, a sigmoid-gated shared expert) and Qwen3-MoE (per-head q/k norms, explicit head_dim):
softmax top-k routing, MoE on every decoder_sparse_step-th layer but those in mlp_only_layers."""
from __future__ import annotations

from ...config import resolved_d_expert
from .common import layer_types, no_partial_rotary, read_layer_types, unsupported, window_everywhere
from .registry import Family, HFInteropError, register
from .tensors import LLAMA, TensorMap, table


def _moe(family: str, hf: dict, m: dict, e: dict) -> None:
    no_partial_rotary(family, m)
    E = hf.get("num_experts", hf.get("num_local_experts"))  # Qwen3-MoE saves it as num_local_experts
    if E is None:
        raise HFInteropError(f"{family} config.json: no num_experts / num_local_experts")
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or [])
    m["moe_layer_indices"] = [i for i in range(m["n_layer"]) if i not in dense and E > 0 and (i + 1) % step == 0]
    e.update(n_experts=max(E, 1), d_expert=hf["moe_intermediate_size"], norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
             aux_loss_weight=hf.get("router_aux_loss_coef", 0.001))


def _write_moe(cfg, moe) -> dict:
    layers = cfg.moe_layers()
    return dict(intermediate_size=cfg.d_ff, moe_intermediate_size=resolved_d_expert(cfg, moe), num_experts=moe.n_experts,
                norm_topk_prob=moe.norm_topk_prob, decoder_sparse_step=1, router_aux_loss_coef=moe.aux_loss_weight,
                mlp_only_layers=[i for i in range(cfg.n_layer) if i not in layers])


def read_qwen2_moe(hf: dict, m: dict, e: dict) -> None:
    _moe("qwen2_moe", hf, m, e)
    m["qkv_bias"] = bool(hf.get("qkv_bias", True))
    shared = hf.get("shared_expert_intermediate_size", 0)
    if not shared:
        raise unsupported("qwen2_moe", "shared_expert_intermediate_size", shared, "Qwen2-MoE's gated shared expert must have a width")
    e.update(n_shared_experts=1, d_shared_expert=shared, shared_expert_gate=True)
    read_sliding_qwen2("qwen2_moe", hf, m)


def read_sliding_qwen2(family: str, hf: dict, m: dict) -> None:
    """Qwen2's sliding window: on the layers layer_types names (by default the even ones below max_window_layers)."""
    on = bool(hf.get("use_sliding_window"))
    if not hf.get("layer_types") and on:
        hf = {**hf, "layer_types": ["sliding_attention" if (i + 1) % 2 and i < hf.get("max_window_layers", 28) else "full_attention"
                                    for i in range(m["n_layer"])]}
    read_layer_types(family, hf, m, hf.get("sliding_window") if on else 0)


def write_qwen2_moe(cfg, moe) -> dict:
    d_e = resolved_d_expert(cfg, moe)
    return _write_moe(cfg, moe) | dict(
        qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=moe.n_shared_experts * (moe.d_shared_expert or d_e),
        use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window, max_window_layers=cfg.n_layer,
        layer_types=layer_types(cfg))


def read_qwen3_moe(hf: dict, m: dict, e: dict) -> None:
    _moe("qwen3_moe", hf, m, e)
    bias = bool(hf.get("attention_bias", False))
    m.update(qk_norm=True, qkv_bias=bias, attn_out_bias=bias)
    m.setdefault("head_dim", hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    if hf.get("use_sliding_window"):
        m["sliding_window"] = hf["sliding_window"]  # every layer


def write_qwen3_moe(cfg, moe) -> dict:
    window = window_everywhere(cfg)
    return _write_moe(cfg, moe) | dict(attention_bias=cfg.qkv_bias, use_sliding_window=window is not None, sliding_window=window)


register(
    Family("qwen2_moe", "Qwen2MoeForCausalLM", read_qwen2_moe, write_qwen2_moe,
           TensorMap(table(LLAMA, {"ffn.shared_experts.": "mlp.shared_expert."}))),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", read_qwen3_moe, write_qwen3_moe, TensorMap()),
)
