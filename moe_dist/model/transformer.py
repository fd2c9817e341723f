"""Decoder-only MoE Transformer: RoPE, RMSNorm pre-norm, causal SDPA attention, SwiGLU FFNs.

Plain PyTorch on one device; parallelism is applied from outside (moe_dist.parallel).
Parameter names follow Hugging Face Llama/Mixtral where they can, to ease checkpoint import.
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, noop_context_fn

from ..config import ConfigError, MoEConfig, ModelConfig, resolved_d_expert, validate_model, validate_moe
from .gemm import Linear
from .init import init_weights
from .mlp import SwiGLU
from .moe import MoELayer, MoEStats
from .rope import apply_rope, rope_tables, softmax_scale_factor


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross entropy (nats); logits [B, S, V], targets [B, S]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LayerKV:
    """One layer's cached tensors of the tokens seen so far ([B, heads, L, d]), for generation:
    keys and values (attention), or the latent and the shared rope key (MLA)."""

    def __init__(self):
        self.tensors: tuple[Tensor, ...] = ()

    def append(self, *new: Tensor, keep: Optional[int] = None) -> tuple[Tensor, ...]:
        """Add the new tokens' tensors; returns those of all tokens kept so far plus the new ones.

        keep: then store only the last `keep` tokens (a sliding-window layer needs window - 1 of them
        for the next token), so the cache of such a layer stays bounded however long generation runs.
        """
        full = new if not self.tensors else tuple(torch.cat(pair, dim=2) for pair in zip(self.tensors, new))
        self.tensors = full if keep is None else tuple(t[:, :, t.shape[2] - min(keep, t.shape[2]):] for t in full)
        return full


class KVCache:
    """Keys and values of every layer, so generation computes each new token once:
    `logits = model(prompt, cache)`, then `model(next_token, cache)` per step."""

    def __init__(self, n_layer: int):
        self.layers = [LayerKV() for _ in range(n_layer)]
        self.length = 0  # tokens seen; the next token's position


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, enable_gqa: bool = False,
                     window: Optional[int] = None, sinks: Optional[Tensor] = None) -> Tensor:
    """SDPA where the S queries are the last S of the L keys' positions (L > S with a KV cache).

    window: each query sees only the last `window` positions, itself included (sliding-window attention).
    sinks [h]: a per-head logit in every softmax's denominator (gpt-oss), as one extra key whose value is
    zero and whose score the float mask sets to the sink.
    """
    S, L = q.shape[-2], k.shape[-2]
    if S == L and window is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    mask = torch.ones(S, L, dtype=torch.bool, device=q.device).tril(L - S)  # query i sees keys 0 .. L-S+i
    if window is not None:
        mask &= ~torch.ones_like(mask).tril(L - S - window)  # ... and none before L-S+i-window+1
    if sinks is not None:
        bias = torch.zeros(S, L, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        mask = torch.cat([bias.expand(sinks.shape[0], S, L), sinks.to(q.dtype).view(-1, 1, 1).expand(-1, S, 1)], dim=-1)
        k, v = (torch.cat([t, t.new_zeros(*t.shape[:2], 1, t.shape[3])], dim=2) for t in (k, v))  # [B, kv, L + 1, d]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


class Attention(nn.Module):
    """Multi-head / grouped-query attention, with the options of Qwen2-MoE (q/k/v bias), Qwen3 (explicit
    head_dim, o_proj bias, per-head RMSNorm of q and k before RoPE) and further families: q/k norms over
    the whole projections (OLMoE) or after RoPE (HunYuan), partial rotary (GLM-4-MoE), Granite's softmax
    scale, a sliding window (`window`, this layer's) and attention sinks (gpt-oss)."""

    def __init__(self, cfg: ModelConfig, window: Optional[int] = None):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.head_size()
        self.rope_interleave = cfg.rope_interleave
        self.q_proj = Linear(cfg.d_model, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.d_model, self.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.d_model, self.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.attn_out_bias)
        # qk_norm: None | "head" (per head, before RoPE) | "rotated" (per head, after RoPE) | "projection"
        self.qk_norm = None if not cfg.qk_norm else ("rotated" if cfg.qk_norm_after_rope else cfg.qk_norm_scope)
        whole = self.qk_norm == "projection"
        self.q_norm = RMSNorm(self.head_dim * (self.n_head if whole else 1), cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim * (self.n_kv_head if whole else 1), cfg.norm_eps) if cfg.qk_norm else None
        scale = cfg.attention_multiplier if cfg.attention_multiplier is not None else self.head_dim ** -0.5
        self.scale = scale * softmax_scale_factor(cfg.rope_scaling)
        self.window = window
        self.sinks = nn.Parameter(torch.zeros(self.n_head)) if cfg.attn_sinks else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past: Optional[LayerKV] = None) -> Tensor:
        B, S, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        # head counts from the weights, so a tensor-parallel shard runs the same code
        q, k = q.view(B, S, -1, self.head_dim), k.view(B, S, -1, self.head_dim)  # [B, S, h, hd], [B, S, kv, hd]
        v = v.view(B, S, -1, self.head_dim).transpose(1, 2)  # [B, kv, S, hd]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = apply_rope(q, cos, sin, self.rope_interleave), apply_rope(k, cos, sin, self.rope_interleave)
        if self.qk_norm == "rotated":
            q, k = self.q_norm(q), self.k_norm(k)
        if past is not None:
            k, v = past.append(k, v, keep=self.window - 1 if self.window is not None else None)
        y = causal_attention(q, k, v, self.scale, q.shape[1] != k.shape[1], self.window, self.sinks)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


# DeepSeek's latent RMSNorms use the RMSNorm default eps, not rms_norm_eps (as in its reference code and HF).
MLA_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3); names follow the Hugging Face checkpoints.

    Keys and values of all heads are decoded from one low-rank latent c_kv = norm(x W_dkv) [S, kv_lora_rank];
    the query is optionally low-rank too. Position enters only through qk_rope extra dimensions per head,
    whose key part is a single head shared by all heads (decoupled RoPE). Score scale: (nope + rope)^-0.5
    (times DeepSeek's YaRN mscale^2 under rope_scaling). Generating, it caches what DeepSeek does: the
    normalised latent and the rope key, kv_lora_rank + qk_rope numbers per token instead of every
    head's key and value, and attends in the latent space (the key and value up-projections absorbed
    into the query and the output).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.mla_dims()
        H, h = cfg.d_model, cfg.n_head
        self.nope, self.rope, self.v_dim, self.kv_rank = d["qk_nope"], d["qk_rope"], d["v"], d["kv_lora_rank"]
        self.rope_interleave = cfg.rope_interleave
        qk = self.nope + self.rope
        self.scale = qk ** -0.5 * softmax_scale_factor(cfg.rope_scaling)
        self.q_lora_rank = d["q_lora_rank"]
        if self.q_lora_rank is None:
            self.q_proj = Linear(H, h * qk, bias=False)
        else:
            self.q_a_proj = Linear(H, d["q_lora_rank"], bias=False)
            self.q_a_layernorm = RMSNorm(d["q_lora_rank"], MLA_NORM_EPS)
            self.q_b_proj = Linear(d["q_lora_rank"], h * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(H, self.kv_rank + self.rope, bias=False)  # latent + shared rope key
        self.kv_a_layernorm = RMSNorm(self.kv_rank, MLA_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_rank, h * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(h * self.v_dim, H, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past: Optional[LayerKV] = None) -> Tensor:
        B, S, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, S, -1, self.nope + self.rope).transpose(1, 2)  # [B, h, S, nope+rope]
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rope = k_rope.view(B, 1, S, self.rope)  # one rope key for all heads
        q_rope = apply_rope(q_rope, cos, sin, self.rope_interleave)
        k_rope = apply_rope(k_rope, cos, sin, self.rope_interleave)
        if past is not None:
            y = self._attend_latent(q_nope, q_rope, latent.unsqueeze(1), k_rope, past)
        else:
            kv = self.kv_b_proj(latent).view(B, S, -1, self.nope + self.v_dim).transpose(1, 2)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [B, h, S, nope], [B, h, S, v]
            q = torch.cat([q_nope, q_rope], dim=-1)
            k = torch.cat([k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
            y = causal_attention(q, k, v, self.scale)  # [B, h, S, v]
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))

    def _attend_latent(self, q_nope: Tensor, q_rope: Tensor, latent: Tensor, k_rope: Tensor, past: LayerKV) -> Tensor:
        """The same attention with the cache in latent space: q_nope . (W_uk c) = (W_uk^T q_nope) . c, and
        sum_j a_j (W_uv c_j) = W_uv (sum_j a_j c_j); one latent "head" serves every query head."""
        w = self.kv_b_proj.weight.view(-1, self.nope + self.v_dim, self.kv_rank)  # [h, nope + v, r]
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]
        (keys,) = past.append(torch.cat([latent, k_rope], dim=-1))  # [B, 1, L, r + rope]
        q = torch.cat([torch.einsum("bhsn,hnr->bhsr", q_nope, w_uk), q_rope], dim=-1)
        y_latent = causal_attention(q, keys, keys[..., :self.kv_rank], self.scale, enable_gqa=True)  # [B, h, S, r]
        return torch.einsum("bhsr,hvr->bhsv", y_latent, w_uv)


class Block(nn.Module):
    """x + attn(norm(x)), then the same with the FFN. Other families: no input norms (pre_norm=false), norms
    on the branch outputs (post_norm: all, or on MoE FFNs only) and Granite's residual_multiplier."""

    def __init__(self, cfg: ModelConfig, moe: Optional[MoEConfig], d_expert: int, window: Optional[int] = None):
        super().__init__()

        def norm(on: bool) -> nn.Module:  # Identity: no parameters, the same forward
            return RMSNorm(cfg.d_model, cfg.norm_eps) if on else nn.Identity()

        self.attn_norm = norm(cfg.pre_norm)
        self.attn = MLAttention(cfg) if cfg.attention == "mla" else Attention(cfg, window)
        self.attn_out_norm = norm(cfg.post_norm == "all")
        self.ffn_norm = norm(cfg.pre_norm)
        self.ffn = MoELayer(cfg.d_model, moe, d_expert) if moe is not None else SwiGLU(cfg.d_model, cfg.d_ff)
        self.ffn_out_norm = norm(cfg.post_norm == "all" or (cfg.post_norm == "moe" and moe is not None))
        self.residual_multiplier = cfg.residual_multiplier

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past: Optional[LayerKV] = None,
                moe: Optional[MoEStats] = None) -> Tensor:
        x = x + self._scaled(self.attn_out_norm(self.attn(self.attn_norm(x), cos, sin, past)))
        h = self.ffn_norm(x)
        h = self.ffn(h, moe) if isinstance(self.ffn, MoELayer) else self.ffn(h)
        return x + self._scaled(self.ffn_out_norm(h))

    def _scaled(self, h: Tensor) -> Tensor:
        return h * self.residual_multiplier if self.residual_multiplier != 1.0 else h


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

    def __init__(self, config: Optional[ModelConfig] = None, moe: Optional[MoEConfig] = None,
                 seed: Optional[int] = None, **kwargs):
        super().__init__()
        cfg, moe = _configs_from_kwargs(config, moe, kwargs)
        errors: list[str] = []
        validate_model(cfg, errors)
        if cfg.moe_layers():
            validate_moe(moe, cfg, errors, ep=moe.n_devices or 1)
            if moe.n_groups == "ep":
                errors.append("moe.n_groups: 'ep' (one group per expert-parallel rank) becomes a number when the run "
                              "is resolved (moe_dist.config.resolve); build the model from the resolved config")
        if errors:
            raise ConfigError("invalid model config:\n  " + "\n  ".join(errors))
        self.config, self.moe_config = cfg, moe
        moe_layers = set(cfg.moe_layers())
        d_expert = resolved_d_expert(cfg, moe)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, moe if i in moe_layers else None, d_expert, cfg.layer_window(i))
                                    for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.tie_weights()
        for m in self.modules():
            if isinstance(m, Linear):
                m.gemm = cfg.cpu_gemm
        if self.lm_head.weight.device.type != "meta":  # a meta model is initialised once materialised
            if seed is None:  # from torch's generator: torch.manual_seed(s) before building decides it
                seed = int(torch.randint(0, 2 ** 62, (), device="cpu"))
            init_weights(self, seed)

    def tie_weights(self) -> None:
        """With model.tie_embeddings the head is the embedding table (again after to_empty, which makes each
        module its own new parameter)."""
        if (self.config.tie_embeddings and self.lm_head is not None and self.embed_tokens is not None
                and self.lm_head.weight is not self.embed_tokens.weight):
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The buffers' values (RoPE tables, zero expert biases), on the model's device."""
        device = next(self.parameters()).device
        cfg = self.config
        cos, sin = rope_tables(cfg.rope_dim(), cfg.max_seq_len, cfg.theta, cfg.rope_scaling)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        for layer in self.moe_layers():
            layer.router.expert_bias.zero_()

    def forward(self, token_ids: Tensor, cache: Optional[KVCache] = None, moe: Optional[MoEStats] = None) -> Tensor:
        """token_ids [B, S] -> logits [B, S, V]. With `cache` (generation) the tokens continue those the
        cache has seen: positions start at cache.length, and their keys/values are added to it. With `moe`
        each MoE layer records its aux loss and statistics there (training: add moe.pop_aux_loss())."""
        S = token_ids.shape[1]
        start = cache.length if cache is not None else 0
        if start + S > self.config.max_seq_len:
            raise ValueError(f"sequence length {start + S} exceeds model.max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[start:start + S], self.rope_sin[start:start + S]
        x = self.run_blocks(self.embed(token_ids), self.blocks(), cos, sin, cache, moe)
        if cache is not None:
            cache.length += S
        return self.head(x)

    # The forward's three parts, which a pipeline stage (moe_dist.parallel.pipeline) runs a share of.
    def embed(self, token_ids: Tensor) -> Tensor:
        """token_ids [B, S] -> the residual stream [B, S, H]."""
        x = self.embed_tokens(token_ids)
        return x * self.config.embedding_multiplier if self.config.embedding_multiplier != 1.0 else x

    def run_blocks(self, x: Tensor, blocks: list[tuple[int, "Block"]], cos: Tensor, sin: Tensor,
                   cache: Optional[KVCache] = None, moe: Optional[MoEStats] = None) -> Tensor:
        """The residual stream through `blocks` ([(layer index, block)], in order)."""
        for i, layer in blocks:
            if self.config.activation_checkpointing and self.training:
                recompute = (lambda: (nullcontext(), moe.recomputing())) if moe is not None else noop_context_fn
                x = checkpoint(layer, x, cos, sin, None, moe, use_reentrant=False, context_fn=recompute)
            else:
                x = layer(x, cos, sin, cache.layers[i] if cache is not None else None, moe)
        return x

    def head(self, x: Tensor) -> Tensor:
        """The residual stream -> logits [B, S, V]."""
        logits = self.lm_head(self.norm(x))
        return logits / self.config.logits_scaling if self.config.logits_scaling != 1.0 else logits

    def blocks(self) -> list[tuple[int, "Block"]]:
        """(layer index, block) of the blocks this model holds: all of them, or under pipeline parallelism
        this rank's stages' (a ModuleDict keyed by layer index, so parameter names stay those of the whole model)."""
        if isinstance(self.layers, nn.ModuleDict):
            return [(int(i), block) for i, block in self.layers.items()]
        return list(enumerate(self.layers))

    def moe_layers(self) -> Iterator[MoELayer]:
        return (layer.ffn for _, layer in self.blocks() if isinstance(layer.ffn, MoELayer))

    @torch.no_grad()
    def update_expert_bias(self, loads: list[Tensor], apply: Optional[Tensor] = None) -> None:
        """Aux-loss-free balancing step; loads[j]: [E] tokens per expert of MoE layer j over the dp batch.
        apply: a device bool, False for a step that is skipped (no host sync to decide)."""
        for layer, load in zip(self.moe_layers(), loads):
            layer.router.update_bias(load, apply)


class HybridMoETransformerLM(MoETransformerLM):
    """MoE only at `moe_layer_indices`; dense SwiGLU elsewhere."""

    def __init__(self, config: Optional[ModelConfig] = None, moe: Optional[MoEConfig] = None, *,
                 moe_layer_indices: Optional[list[int]] = None, **kwargs):
        if moe_layer_indices is None and (config is None or config.moe_layer_indices is None):
            raise ConfigError("moe_layer_indices: HybridMoETransformerLM needs the list of MoE layers, e.g. [2, 5, 8, 11]")
        if moe_layer_indices is not None:
            kwargs["moe_layer_indices"] = list(moe_layer_indices)
        super().__init__(config, moe, **kwargs)
