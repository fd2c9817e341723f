"""config.json fields every family shares, read and written once; the helpers family modules use."""
from __future__ import annotations

from typing import Optional

import torch

from ...config import MoEConfig, ModelConfig, resolved_d_expert
from .registry import Family, HFInteropError

# transformers computes these as SiLU (ACT2FN); anything else is refused by name
SILU = ("silu", "swish")
_YARN_KEYS = {"factor": "factor", "original_max_position_embeddings": "original_max_seq_len", "beta_fast": "beta_fast",
              "beta_slow": "beta_slow", "mscale": "mscale", "mscale_all_dim": "mscale_all_dim",
              "attention_factor": "attention_factor", "truncate": "truncate"}


def unsupported(family: str, field: str, value, why: str) -> HFInteropError:
    return HFInteropError(f"{family} config.json: {field}={value!r} is not supported by moe_dist ({why}); "
                          "importing it would compute different numbers")


def _rope(hf: dict, family: Family) -> tuple[float, dict, float]:
    """(theta, model.rope_scaling fields, partial_rotary_factor) from rope_parameters (transformers 5) or rope_scaling (4.x)."""
    name = family.model_type
    old, new = hf.get("rope_scaling") or {}, hf.get("rope_parameters") or {}
    kind = lambda d: d.get("rope_type", d.get("type")) or "default"  # noqa: E731
    if old and new and kind(old) != kind(new):
        raise unsupported(name, "rope_scaling", old, f"it disagrees with rope_parameters (rope_type {kind(new)!r}); keep one")
    rp = {**old, **new}
    partial = float(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0)
    theta = rp.get("rope_theta", hf.get("rope_theta"))
    theta = float(theta if theta is not None else family.default_theta)
    rope_type = kind(rp)
    if rope_type == "default":
        return theta, {}, partial
    if rope_type != "yarn":
        raise unsupported(name, "rope_type", rope_type, "plain RoPE and YaRN are implemented, not linear/dynamic/llama3/longrope scaling")
    out = {ours: rp[key] for key, ours in _YARN_KEYS.items() if rp.get(key) is not None}
    if "original_max_seq_len" not in out:
        raise unsupported(name, "rope_parameters.original_max_position_embeddings", None, "YaRN needs it")
    if "factor" not in out:  # transformers' rule: the ratio of the context lengths
        out["factor"] = hf["max_position_embeddings"] / out["original_max_seq_len"]
    return theta, {"type": "yarn", **out}, partial


def model_fields(hf: dict, family: Family, max_seq_len: Optional[int]) -> tuple[dict, dict]:
    """ModelConfig and MoEConfig keyword arguments from the fields all families share."""
    name = family.model_type
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise unsupported(name, "quantization_config.quant_method", method, "weights must be plain floating point; dequantize first")
    act = hf.get("hidden_act", "silu")
    if act not in SILU:
        raise unsupported(name, "hidden_act", act, "experts and FFNs are SwiGLU with SiLU")
    theta, rope_scaling, partial = _rope(hf, family)
    n_head = hf["num_attention_heads"]
    m = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads"), d_ff=hf.get("intermediate_size") or 1,
        max_seq_len=max_seq_len or hf.get("max_position_embeddings", 4096), theta=theta,
        rope_scaling=rope_scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02),
    )
    if m["n_kv_head"] == n_head:
        m["n_kv_head"] = None
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != hf["hidden_size"] // n_head:
        m["head_dim"] = head_dim
    if partial != 1.0:
        m["rotary_dim"] = int((head_dim or hf["hidden_size"] // n_head) * partial)  # as transformers rounds it
    e = dict(top_k=hf.get("num_experts_per_tok") or 1, capacity_factor=None, eval_capacity_factor=None)
    return m, e


def no_partial_rotary(family: str, m: dict) -> None:
    if m.get("rotary_dim") is not None:
        raise unsupported(family, "partial_rotary_factor", m["rotary_dim"], f"{family} rotates whole heads in transformers")


def read_layer_types(family: str, hf: dict, m: dict, window: Optional[int]) -> None:
    """model.sliding_window(_layers) from config.json's layer_types (full_attention / sliding_attention per layer)."""
    types = hf.get("layer_types") or ["sliding_attention" if window else "full_attention"] * m["n_layer"]
    odd = sorted(set(types) - {"full_attention", "sliding_attention"})
    if odd:
        raise unsupported(family, "layer_types", odd, "layers are full_attention or sliding_attention")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if sliding and not window:
        raise unsupported(family, "sliding_window", window, "sliding_attention layers need a window of at least 1 token")
    if sliding:
        m["sliding_window"] = window
        m["sliding_window_layers"] = None if len(sliding) == len(types) else sliding


def layer_types(cfg: ModelConfig) -> list[str]:
    return ["sliding_attention" if cfg.layer_window(i) else "full_attention" for i in range(cfg.n_layer)]


def window_everywhere(cfg: ModelConfig) -> Optional[int]:
    """The window when every layer has it (families with one window for all layers), else None."""
    return cfg.sliding_window if cfg.sliding_window_layers is None else None


def hf_fields(family: Family, cfg: ModelConfig, moe: MoEConfig, dtype: torch.dtype) -> dict:
    """The config.json fields all families share."""
    hf = {
        "architectures": [family.architecture], "model_type": family.model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head, "hidden_act": "silu", "head_dim": cfg.head_size(),
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.theta,
        "rope_parameters": rope_parameters(cfg), "attention_dropout": 0.0,
        "num_experts_per_tok": moe.top_k, "use_cache": True, "dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.rope_scaling.type != "none":  # the transformers 4.x / vLLM spelling of the same, for their loaders
        hf["rope_scaling"] = {k: v for k, v in hf["rope_parameters"].items() if k != "rope_theta"} | {"type": cfg.rope_scaling.type}
    return hf


def rope_parameters(cfg: ModelConfig) -> dict:
    r = cfg.rope_scaling
    out = {"rope_theta": cfg.theta, "rope_type": "default" if r.type == "none" else "yarn"}
    if r.type != "none":
        out.update({key: getattr(r, ours) for key, ours in _YARN_KEYS.items() if getattr(r, ours) is not None})
    if cfg.attention != "mla" and cfg.rope_dim() != cfg.head_size():
        out["partial_rotary_factor"] = cfg.rope_dim() / cfg.head_size()
    return out


def first_k_dense(cfg: ModelConfig) -> int:
    """Layers before the first MoE layer (first_k_dense_replace)."""
    layers = cfg.moe_layers()
    return layers[0] if layers else cfg.n_layer


def read_v3_router(hf: dict, e: dict, norm_default: bool = True) -> None:
    """DeepSeek-V3's router, which GLM-4-MoE, dots.llm1 and Solar Open reuse: sigmoid scores, an
    e_score_correction_bias for selection only, top-2-sum expert groups, routed_scaling_factor."""
    e.update(score_func="sigmoid", expert_bias=True, norm_topk_prob=bool(hf.get("norm_topk_prob", norm_default)),
             routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), aux_loss_weight=0.0)
    if (hf.get("n_group") or 1) > 1:
        e.update(n_groups=hf["n_group"], topk_groups=hf.get("topk_group"), group_score="top2_sum")


def write_v3_router(moe: MoEConfig) -> dict:
    return dict(n_group=moe.n_groups or 1, topk_group=moe.topk_groups or 1, norm_topk_prob=moe.norm_topk_prob,
                routed_scaling_factor=moe.routed_scaling_factor)


def routed_and_shared(hf: dict, e: dict) -> None:
    """Routed experts of moe_intermediate_size and n_shared_experts ungated shared experts of the same width."""
    e.update(n_experts=hf["n_routed_experts"], d_expert=hf["moe_intermediate_size"], n_shared_experts=hf.get("n_shared_experts") or 0)


def write_routed_and_shared(cfg: ModelConfig, moe: MoEConfig) -> dict:
    d_e = resolved_d_expert(cfg, moe)
    return dict(n_routed_experts=moe.n_experts, moe_intermediate_size=d_e,
                n_shared_experts=moe.n_shared_experts * (moe.d_shared_expert or d_e) // d_e)
