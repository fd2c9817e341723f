"""Sparse upcycling (Komatsuzaki et al. 2022): an MoE model from a dense checkpoint.

Every expert of an upcycled layer starts as a copy of the dense layer's SwiGLU FFN (plus optional
Gaussian noise to break the symmetry); attention, norms and embeddings are copied unchanged; routers are
freshly initialised. With noise_std=0 and top-k gates renormalised to sum to 1 (norm_topk_prob), each
MoE layer computes sum_i g_i FFN(x) = FFN(x), so the upcycled model reproduces the dense model's logits
whatever the router says (dropless routing; dropped tokens would lose their FFN output).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
from torch import Tensor

from ..config import ConfigError, MoEConfig, ModelConfig


def upcycle(dense: Union[torch.nn.Module, dict[str, Tensor]], n_experts: int, *, config: Optional[ModelConfig] = None,
            top_k: int = 2, noise_std: float = 0.0, moe: Optional[MoEConfig] = None,
            layers: Optional[list[int]] = None, seed: int = 0):
    """Build an MoETransformerLM whose experts are copies of `dense`'s FFNs.

    dense: a MoETransformerLM without MoE layers, or its state dict (then pass its ModelConfig as `config`;
        a Hugging Face dense checkpoint can be brought in as such a state dict by the caller).
    n_experts, top_k: experts per upcycled layer and experts per token (ignored when `moe` is given).
    noise_std: std of N(0, noise_std^2) noise added to each expert's copy (0 = exact copies).
    moe: the full MoEConfig to use (its d_expert must be None or the dense d_ff); default:
        MoEConfig(n_experts, top_k, norm_topk_prob=True), dropless.
    layers: which layers become MoE (default: all).
    """
    from ..model import MoETransformerLM
    from ..model.moe import MoELayer

    if isinstance(dense, dict):
        if config is None:
            raise ConfigError("upcycle: a dense state dict needs its ModelConfig as config=")
        state = dense
    else:
        config = config or dense.config
        if any(isinstance(m, MoELayer) for m in dense.modules()):
            raise ConfigError("upcycle: the source model already has MoE layers; give a dense model (model.moe_every=0)")
        state = dense.state_dict()
    layers = list(range(config.n_layer)) if layers is None else sorted(layers)
    moe = moe or MoEConfig(n_experts=n_experts, top_k=top_k, norm_topk_prob=True)
    if moe.d_expert not in (None, config.d_ff):
        raise ConfigError(f"moe.d_expert: {moe.d_expert} but upcycled experts copy the dense FFN of width model.d_ff={config.d_ff}; "
                          "leave it null")
    cfg = dataclasses.replace(config, moe_layer_indices=layers)
    model = MoETransformerLM(cfg, dataclasses.replace(moe, d_expert=None))
    gen = torch.Generator().manual_seed(seed)
    new = dict(model.state_dict())  # router weights keep their fresh init
    for key, t in state.items():
        parts = key.split(".")
        if parts[0] == "layers" and int(parts[1]) in layers and parts[2] == "ffn":
            continue
        if key not in new:
            raise ConfigError(f"upcycle: the dense checkpoint has {key}, which the model does not; is config= its ModelConfig?")
        new[key] = t
    for i in layers:
        pre = f"layers.{i}.ffn."
        try:
            gate, up, down = (state[pre + n + ".weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        except KeyError as missing:
            raise ConfigError(f"upcycle: layer {i} has no dense FFN weight {missing} in the dense checkpoint") from None
        E = model.moe_config.n_experts
        gate_up = torch.cat([gate, up], dim=0).unsqueeze(0).repeat(E, 1, 1)  # [E, 2F, H]
        down = down.unsqueeze(0).repeat(E, 1, 1)  # [E, H, F]
        if noise_std > 0:
            gate_up = gate_up + noise_std * torch.randn(gate_up.shape, generator=gen).to(gate_up)
            down = down + noise_std * torch.randn(down.shape, generator=gen).to(down)
        new[pre + "experts.gate_up_proj"] = gate_up
        new[pre + "experts.down_proj"] = down
    model.load_state_dict(new, strict=True)
    return model
