"""ERNIE 4.5 MoE (ernie4_5_moe): softmax routing with a selection-only expert bias (moe_statics), renormalised
gates, ungated shared experts, MoE on the layers moe_layer_start_index..end_index every interval, interleaved
RoPE, tied embeddings by default."""
from __future__ import annotations

from ...config import resolved_d_expert
from .common import no_partial_rotary, unsupported
from .registry import Family, register
from .tensors import LLAMA, TensorMap, table


def read_ernie(hf: dict, m: dict, e: dict) -> None:
    no_partial_rotary("ernie4_5_moe", m)
    if hf.get("use_bias"):
        raise unsupported("ernie4_5_moe", "use_bias", True, "FFN and LM-head biases are not implemented")
    n, E, k = m["n_layer"], hf.get("moe_num_experts", 64), hf.get("moe_k", 6)
    # transformers divides by max(sum of the top-k scores, moe_norm_min); the sum is at least k/E
    if (hf.get("moe_norm_min") or 0) > k / E:
        raise unsupported("ernie4_5_moe", "moe_norm_min", hf["moe_norm_min"], f"moe_dist renormalises by the sum alone (>= k/E = {k / E})")
    start, end, every = hf.get("moe_layer_start_index", 1), hf.get("moe_layer_end_index", -1), hf.get("moe_layer_interval", 1)
    end = n - 1 if end == -1 else end
    m.update(moe_layer_indices=[i for i in range(n) if (i + 1) % every == 0 and start <= i <= end], rope_interleave=True,
             tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    e.update(n_experts=E, top_k=k, d_expert=hf["moe_intermediate_size"], n_shared_experts=hf.get("moe_num_shared_experts", 2) or 0,
             norm_topk_prob=True, expert_bias=True, aux_loss_weight=hf.get("router_aux_loss_coef", 0.001))


def write_ernie(cfg, moe) -> dict:
    d_e, layers = resolved_d_expert(cfg, moe), cfg.moe_layers()
    return dict(intermediate_size=cfg.d_ff, moe_intermediate_size=d_e, moe_num_experts=moe.n_experts, moe_k=moe.top_k,
                moe_num_shared_experts=moe.n_shared_experts * (moe.d_shared_expert or d_e) // d_e,
                moe_layer_start_index=layers[0], moe_layer_end_index=layers[-1], moe_layer_interval=1,
                moe_norm_min=1e-12, use_bias=False, router_aux_loss_coef=moe.aux_loss_weight)


BIAS = "mlp.gate.moe_statics.e_score_correction_bias"
register(Family("ernie4_5_moe", "Ernie4_5_MoeForCausalLM", read_ernie, write_ernie, TensorMap(
    table(LLAMA, {"ffn.router.expert_bias": BIAS}), original=(("mlp.gate.moe_statics.", "mlp.moe_statics."),),
    unsqueezed=(BIAS,)), default_theta=500000.0))
