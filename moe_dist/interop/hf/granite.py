"""IBM Granite MoE (granitemoe) and Granite MoE with a shared expert (granitemoeshared): Mixtral-like layers with
a softmax over the top-k logits and Granite's four multipliers (embeddings, residual branches, the attention
scale itself, logits divided). The shared expert's gate and up projections are one fused input_linear."""
from __future__ import annotations

from ...config import resolved_d_expert
from .common import no_partial_rotary
from .registry import Family, register
from .tensors import LLAMA, Fused, TensorMap, table


def _granite(family: str):
    def read(hf: dict, m: dict, e: dict) -> None:
        no_partial_rotary(family, m)
        bias = bool(hf.get("attention_bias", False))
        m.update(qkv_bias=bias, attn_out_bias=bias, d_ff=hf["intermediate_size"],
                 embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
                 residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
                 attention_multiplier=float(hf.get("attention_multiplier", 1.0)), logits_scaling=float(hf.get("logits_scaling", 1.0)))
        e.update(n_experts=hf["num_local_experts"], topk_then_softmax=True, aux_loss_weight=hf.get("router_aux_loss_coef", 0.001))
        if family == "granitemoeshared" and hf.get("shared_intermediate_size"):
            e.update(n_shared_experts=1, d_shared_expert=hf["shared_intermediate_size"])

    def write(cfg, moe) -> dict:
        out = dict(intermediate_size=resolved_d_expert(cfg, moe), num_local_experts=moe.n_experts, attention_bias=cfg.qkv_bias,
                   embedding_multiplier=cfg.embedding_multiplier, residual_multiplier=cfg.residual_multiplier,
                   attention_multiplier=cfg.attention_multiplier or cfg.head_size() ** -0.5, logits_scaling=cfg.logits_scaling,
                   router_aux_loss_coef=moe.aux_loss_weight)
        if family == "granitemoeshared":
            out["shared_intermediate_size"] = moe.n_shared_experts * (moe.d_shared_expert or resolved_d_expert(cfg, moe))
        return out

    return read, write


GRANITE = TensorMap(
    table(LLAMA, {"ffn.router.weight": "block_sparse_moe.router.weight", "ffn.experts.": "block_sparse_moe.experts.",
                  "ffn.shared_experts.down_proj.weight": "shared_mlp.output_linear.weight", "ffn.shared_experts.": None}),
    original=(("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.input_linear.weight"),
              ("block_sparse_moe.experts.down_proj", "block_sparse_moe.output_linear.weight"),
              ("block_sparse_moe.router.weight", "block_sparse_moe.router.layer.weight")),
    per_expert=None,
    fused=(Fused("shared_mlp.input_linear.weight", ("ffn.shared_experts.gate_proj.weight", "ffn.shared_experts.up_proj.weight")),))

register(
    Family("granitemoe", "GraniteMoeForCausalLM", *_granite("granitemoe"), GRANITE),
    Family("granitemoeshared", "GraniteMoeSharedForCausalLM", *_granite("granitemoeshared"), GRANITE),
)
