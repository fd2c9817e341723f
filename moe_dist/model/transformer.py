"""Decoder-only MoE Transformer: RoPE, RMSNorm pre-norm, causal SDPA attention, SwiGLU FFNs.

Plain PyTorch on one device; parallelism is applied from outside (moe_dist.parallel).
Parameter names follow Hugging Face Llama/Mixtral where they can, to ease checkpoint import.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, MoEConfig, ModelConfig, resolved_d_expert, validate_model, validate_moe
from .mlp import SwiGLU
from .moe import MoELayer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin: [max_seq_len, head_dim], the half-split (rotate_half) convention of HF Llama."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, heads, S, hd]; cos/sin: [S, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.q_proj = nn.Linear(cfg.d_model, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, S, _ = x.shape
        # head counts from the weights, so a tensor-parallel shard runs the same code
        q = self.q_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # [B, h, S, hd]
        k = self.k_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # [B, kv, S, hd]
        v = self.v_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: Optional[MoEConfig], d_expert: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoELayer(cfg.d_model, moe, d_expert) if moe is not None else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


# Keyword names of the original design that are not field names of the configs.
_ALIASES = {"moe_aux_loss_weight": ("moe", "aux_loss_weight")}


def _configs_from_kwargs(config: Optional[ModelConfig], moe: Optional[MoEConfig], kwargs: dict) -> tuple[ModelConfig, MoEConfig]:
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
    m_over, e_over = {}, {}
    use_aux = kwargs.pop("use_moe_aux_loss", True)
    for key, value in kwargs.items():
        if key in _ALIASES:
            e_over[_ALIASES[key][1]] = value
        elif key in model_fields:
            m_over[key] = value
        elif key in moe_fields:
            e_over[key] = value
        else:
            raise ConfigError(f"{key}: unknown model argument; use a ModelConfig or MoEConfig field name")
    cfg = dataclasses.replace(config or ModelConfig(), **m_over)
    moe = dataclasses.replace(moe or MoEConfig(), **e_over)
    if not use_aux:
        moe = dataclasses.replace(moe, aux_loss_weight=0.0)
    return cfg, moe


class MoETransformerLM(nn.Module):
    """Decoder-only language model; `model(token_ids)` -> logits [batch, seq, vocab].

    Build it from configs (`MoETransformerLM(ModelConfig(...), MoEConfig(...))`) or keyword
    arguments naming fields of either (`MoETransformerLM(d_model=512, n_experts=8, top_k=2)`).
    """

    def __init__(self, config: Optional[ModelConfig] = None, moe: Optional[MoEConfig] = None, **kwargs):
        super().__init__()
        cfg, moe = _configs_from_kwargs(config, moe, kwargs)
        errors: list[str] = []
        validate_model(cfg, errors)
        if cfg.moe_layers():
            validate_moe(moe, cfg, errors, ep=moe.n_devices or 1)
        if errors:
            raise ConfigError("invalid model config:\n  " + "\n  ".join(errors))
        self.config, self.moe_config = cfg, moe
        moe_layers = set(cfg.moe_layers())
        d_expert = resolved_d_expert(cfg, moe)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, moe if i in moe_layers else None, d_expert) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.d_model // cfg.n_head, cfg.max_seq_len, cfg.theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        # residual-branch outputs are scaled down so the residual stream's variance stays O(1) (GPT-2)
        out_std = std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("noise_weight"):
                nn.init.zeros_(p)  # noisy top-k starts noise-free (Shazeer et al. 2017)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    def forward(self, token_ids: Tensor) -> Tensor:
        S = token_ids.shape[1]
        if S > self.config.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        x = self.embed_tokens(token_ids)
        for layer in self.layers:
            if self.config.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    def moe_layers(self) -> Iterator[MoELayer]:
        return (layer.ffn for layer in self.layers if isinstance(layer.ffn, MoELayer))

    def get_aux_loss(self) -> Tensor:
        """Sum of the weighted MoE losses of the last forward (a scalar with grad)."""
        losses = [layer.aux_loss for layer in self.moe_layers()]
        return torch.stack(losses).sum() if losses else self.lm_head.weight.new_zeros(())

    def moe_stats(self) -> list[dict[str, Tensor]]:
        """Per MoE layer, the detached stats of the last forward."""
        return [layer.stats for layer in self.moe_layers()]

    @torch.no_grad()
    def update_expert_bias(self, loads: list[Tensor]) -> None:
        """Aux-loss-free balancing step; loads[j]: [E] tokens per expert of MoE layer j over the dp batch."""
        for layer, load in zip(self.moe_layers(), loads):
            layer.router.update_bias(load)


class HybridMoETransformerLM(MoETransformerLM):
    """MoE only at `moe_layer_indices`; dense SwiGLU elsewhere."""

    def __init__(self, config: Optional[ModelConfig] = None, moe: Optional[MoEConfig] = None, *,
                 moe_layer_indices: Optional[list[int]] = None, **kwargs):
        if moe_layer_indices is None and (config is None or config.moe_layer_indices is None):
            raise ConfigError("moe_layer_indices: HybridMoETransformerLM needs the list of MoE layers, e.g. [2, 5, 8, 11]")
        if moe_layer_indices is not None:
            kwargs["moe_layer_indices"] = list(moe_layer_indices)
        super().__init__(config, moe, **kwargs)
