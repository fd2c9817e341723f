"""Mixtral, and MiniMax-M2 (Mixtral's block with sigmoid routing, an expert bias, q/k norms over the whole
projections and partial rotary). Every layer is MoE; released checkpoints name the MoE block
block_sparse_moe and store experts one by one (w1 gate, w3 up, w2 down)."""
from __future__ import annotations

from ...config import resolved_d_expert
from .common import no_partial_rotary, window_everywhere
from .registry import Family, register
from .tensors import LLAMA, TensorMap, table

ORIGINAL = ((".mlp.", ".block_sparse_moe."),)


def _experts(hf: dict, m: dict, e: dict) -> None:
    m["d_ff"] = hf["intermediate_size"]  # every layer is MoE: the expert width
    e.update(n_experts=hf["num_local_experts"], router_jitter=hf.get("router_jitter_noise", 0.0) or 0.0,
             aux_loss_weight=hf.get("router_aux_loss_coef", 0.001), norm_topk_prob=True)


def read_mixtral(hf: dict, m: dict, e: dict) -> None:
    no_partial_rotary("mixtral", m)
    _experts(hf, m, e)
    if hf.get("sliding_window") is not None:
        m["sliding_window"] = hf["sliding_window"]  # every layer


def write_mixtral(cfg, moe) -> dict:
    return dict(intermediate_size=resolved_d_expert(cfg, moe), num_local_experts=moe.n_experts,
                sliding_window=window_everywhere(cfg), router_jitter_noise=moe.router_jitter,
                router_aux_loss_coef=moe.aux_loss_weight)


def read_minimax_m2(hf: dict, m: dict, e: dict) -> None:
    _experts(hf, m, e)
    e.update(score_func="sigmoid", expert_bias=True)
    m.update(qk_norm=True, qk_norm_scope="projection")
    if m.get("rotary_dim") is None and hf.get("rotary_dim") not in (None, m.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])):
        m["rotary_dim"] = hf["rotary_dim"]  # the released checkpoints' spelling of partial rotary


def write_minimax_m2(cfg, moe) -> dict:
    return dict(intermediate_size=resolved_d_expert(cfg, moe), num_local_experts=moe.n_experts,
                router_jitter_noise=moe.router_jitter, router_aux_loss_coef=moe.aux_loss_weight)


register(
    Family("mixtral", "MixtralForCausalLM", read_mixtral, write_mixtral,
           TensorMap(original=ORIGINAL, per_expert=("w1", "w3", "w2")), default_theta=1e6),
    Family("minimax_m2", "MiniMaxM2ForCausalLM", read_minimax_m2, write_minimax_m2,
           TensorMap(table(LLAMA, {"ffn.router.expert_bias": "mlp.e_score_correction_bias"}), original=ORIGINAL,
                     per_expert=("w1", "w3", "w2")), default_theta=5e6),
)
