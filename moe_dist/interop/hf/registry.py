"""The Hugging Face families moe_dist converts, by model_type; and, for the types it does not, what is missing.

A family (one module per lineage in this package) is a `Family`: how its config.json maps to a
ModelConfig/MoEConfig and back, and its `TensorMap` (tensors.py). What a family can express is
checked by the round trip: a model exports as family X only if X's config.json of it imports back to
the same computation (convert.check_exportable), so no family keeps a hand-written list of refusals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ...config import MoEConfig, ModelConfig
    from .tensors import TensorMap


class HFInteropError(ValueError):
    """A checkpoint (or model) that cannot be converted exactly; the message names the field and why."""


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the transformers class written into config.json
    # config.json -> (ModelConfig, MoEConfig) keyword arguments; raise HFInteropError(unsupported(...)) for what
    # moe_dist does not compute. common.model_fields() has already read the fields every family shares.
    read: Callable[[dict, dict, dict], None]  # read(hf, model_kwargs, moe_kwargs): fills the two dicts in place
    # (ModelConfig, MoEConfig) -> the family's own config.json entries (common.hf_fields() writes the shared ones)
    write: Callable[["ModelConfig", "MoEConfig"], dict]
    tensors: "TensorMap"
    default_theta: float = 10000.0  # transformers' rope_theta when config.json names none
    moe: bool = True  # False: a dense family, imported as an upcycle() source, never exported


_FAMILIES: dict[str, Family] = {}


def register(*families: Family) -> None:
    for f in families:
        _FAMILIES[f.model_type] = f


def families(moe: bool = True) -> tuple[str, ...]:
    """model_types in registration order (the export inference tries them in this order)."""
    return tuple(t for t, f in _FAMILIES.items() if f.moe == moe)


# Mixture-of-experts causal LMs of transformers 5.24 that moe_dist does not import, with what it lacks.
MISSING = {
    **dict.fromkeys(("deepseek_v32", "glm_moe_dsa", "axk2", "dots3_note", "dots3_note_text", "minimax_m3_vl_text"),
                    "sparse attention with a learned indexer (DeepSeek sparse attention)"),
    **dict.fromkeys(("deepseek_v4", "hy_v4"), "hyper-connections and indexer-selected sparse attention"),
    **dict.fromkeys(("qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text", "qwen4_exp", "qwen4_exp_text", "bailing_hybrid",
                     "kimi_linear", "lara_mini"), "linear-attention layers (gated delta rule)"),
    **dict.fromkeys(("jamba", "bamba", "granitemoehybrid", "nemotron_h"), "Mamba (state-space) layers"),
    "minimax": "lightning (linear) attention layers",
    "lfm2_moe": "short-convolution layers",
    **dict.fromkeys(("inkling_text", "inkling2_text", "inkling2_loop_text"), "short convolutions and relative-position logits"),
    **dict.fromkeys(("llama4", "llama4_text"), "chunked attention, layers without RoPE and L2-normalised q/k"),
    "jetmoe": "mixture-of-attention-heads (MoA) layers",
    "dbrx": "LayerNorm blocks and a fused, clipped qkv projection",
    "phimoe": "sparsemixer routing and LayerNorm blocks",
    "longcat_flash": "zero-computation experts and two attention sub-blocks per layer",
    "doge": "dynamic-mask attention and cross-domain MoE",
}


def get(model_type) -> Family:
    """The family of a config.json's model_type, or HFInteropError naming what moe_dist lacks for it."""
    if model_type in _FAMILIES:
        return _FAMILIES[model_type]
    supported = f"moe_dist imports {', '.join(families())} (and dense {', '.join(families(moe=False))})"
    if model_type in MISSING:
        raise HFInteropError(f"config.json: model_type={model_type!r} needs {MISSING[model_type]}, which moe_dist "
                             f"does not implement; {supported}")
    raise HFInteropError(f"config.json: model_type={model_type!r} is not supported: no mapping of its config and "
                         f"tensors is written (moe_dist/interop/hf/registry.py); {supported}")
