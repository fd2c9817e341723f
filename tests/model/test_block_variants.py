"""Block and expert options of further Hugging Face families, against hand-written references: sliding
windows and attention sinks (also through the KV cache), partial rotary, gpt-oss's experts; and their refusals.
(Each family's combination is checked against transformers in tests/interop.)"""
import math

import pytest
import torch
from naive import naive_experts

from moe_dist.config import Config, ConfigError, ModelConfig, MoEConfig, ParallelConfig, validate, validate_layout
from moe_dist.model import MoETransformerLM
from moe_dist.model.moe.experts import GroupedExperts, clamped_swiglu
from moe_dist.model.rope import apply_rope, rope_tables
from moe_dist.model.transformer import KVCache, causal_attention
from naive import naive_experts


def reference_attention(q, k, v, scale, window=None, sinks=None):
    """softmax over keys j <= i (and j > i - window) of q.k * scale, with each head's sink logit in the denominator."""
    S, L = q.shape[-2], k.shape[-2]
    i = torch.arange(S).view(-1, 1) + (L - S)  # query positions
    j = torch.arange(L).view(1, -1)
    visible = (j <= i) & ((j > i - window) if window is not None else True)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, -math.inf)  # [B, h, S, L]
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)], dim=-1)
    return scores.softmax(-1)[..., :L] @ v


@pytest.mark.parametrize("S,L", [(9, 9), (3, 9), (1, 9)])  # a full forward, a chunk after a cache, one token
@pytest.mark.parametrize("window,sinks", [(3, False), (None, True), (4, True), (1, False)])
def test_sliding_window_and_sinks_equal_the_masked_softmax(S, L, window, sinks):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g) for n in (S, L, L))
    s = torch.randn(4, generator=g) if sinks else None
    torch.testing.assert_close(causal_attention(q, k, v, 0.3, window=window, sinks=s),
                               reference_attention(q, k, v, 0.3, window, s), atol=1e-5, rtol=1e-5)


def test_partial_rotary_rotates_the_first_dims_only():
    cos, sin = rope_tables(4, 6, 10000.0)
    x = torch.randn(1, 2, 6, 10)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y[..., :4], apply_rope(x[..., :4], cos, sin))
    assert torch.equal(y[..., 4:], x[..., 4:])


def build(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=3, n_head=4, n_kv_head=2, d_ff=48, max_seq_len=32, init_std=0.3, **kw)
    return MoETransformerLM(cfg, MoEConfig(n_experts=4, top_k=2, n_shared_experts=1)).eval()


@pytest.mark.parametrize("kw", [dict(sliding_window=3, sliding_window_layers=[0, 2], attn_sinks=True),
                                dict(sliding_window=1, rotary_dim=4, qk_norm=True, qk_norm_after_rope=True),
                                dict(qk_norm=True, qk_norm_scope="projection", pre_norm=False, post_norm="all",
                                     embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                                     logits_scaling=3.0)])
def test_cached_generation_equals_the_full_forward_and_sliding_caches_stay_bounded(kw):
    model = build(**kw)
    ids = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(len(model.layers))
        parts = [model(ids[:, :6], cache), model(ids[:, 6:9], cache)] + [model(ids[:, t:t + 1], cache) for t in range(9, 14)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)
    for i, layer in enumerate(cache.layers):
        window = model.config.layer_window(i)
        assert layer.tensors[0].shape[2] == (14 if window is None else window - 1)  # a sliding layer keeps W - 1 tokens


def test_variant_options_change_the_model():
    """Each option is wired: turning it on changes the logits (so a parity test cannot pass by ignoring it)."""
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = build()(ids)
        for kw in (dict(sliding_window=4), dict(attn_sinks=True), dict(rotary_dim=4), dict(residual_multiplier=0.5),
                   dict(embedding_multiplier=2.0), dict(attention_multiplier=0.5), dict(logits_scaling=2.0),
                   dict(post_norm="moe"), dict(pre_norm=False)):
            model = build(**kw)
            if kw.get("attn_sinks"):
                for layer in model.layers:
                    layer.attn.sinks.data.fill_(2.0)
            assert not torch.allclose(model(ids), base, atol=1e-3), kw


def gpt_oss_experts(impl: str) -> GroupedExperts:
    torch.manual_seed(0)
    ex = GroupedExperts(4, 16, 8, impl, bias=True, act="clamped_swiglu", alpha=1.702, limit=0.7)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.5)
    return ex


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_gpt_oss_experts_equal_the_per_expert_reference_with_gradients(impl):
    ex = gpt_oss_experts(impl)
    counts = torch.tensor([3, 0, 7, 6])
    x = torch.randn(16, 16, requires_grad=True)
    try:
        y = ex(x, counts)
    except RuntimeError as e:  # no torch._grouped_mm kernel on this build
        pytest.skip(f"torch._grouped_mm unavailable: {e}")
    params = [x, *ex.parameters()]
    g = torch.randn_like(y)
    y_ref = naive_experts(ex, x, counts)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, params, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_clamped_swiglu_is_gpt_oss_activation():
    gate, up = torch.tensor([-9.0, 0.5, 9.0]), torch.tensor([9.0, -0.5, -9.0])
    g = torch.tensor([-9.0, 0.5, 7.0])  # clamped above only
    expected = (torch.tensor([7.0, -0.5, -7.0]) + 1) * g * torch.sigmoid(1.702 * g)
    torch.testing.assert_close(clamped_swiglu(gate, up, 1.702, 7.0), expected)


@pytest.mark.parametrize("model,moe,parallel,match", [
    (dict(rotary_dim=7), {}, {}, "model.rotary_dim"),
    (dict(qk_norm_scope="projection"), {}, {}, "model.qk_norm_scope: has no effect without model.qk_norm"),
    (dict(qk_norm=True, qk_norm_scope="projection", qk_norm_after_rope=True), {}, {}, "model.qk_norm_after_rope"),
    (dict(post_norm="sandwich"), {}, {}, "model.post_norm"),
    (dict(sliding_window=0), {}, {}, "model.sliding_window: must be >= 1"),
    (dict(sliding_window_layers=[1]), {}, {}, "model.sliding_window_layers: set model.sliding_window"),
    (dict(attention="mla", attn_sinks=True), {}, {}, "model.attn_sinks: not implemented with model.attention=mla"),
    (dict(logits_scaling=0.0), {}, {}, "model.logits_scaling"),
    ({}, dict(expert_act="gelu"), {}, "moe.expert_act"),
    ({}, dict(expert_linear_bias=True, grouped_mm="onednn"), {}, "moe.grouped_mm: onednn runs the plain SwiGLU"),
    (dict(attn_sinks=True), {}, dict(tp=2), "model.attn_sinks: tensor parallelism"),
    (dict(qk_norm=True, qk_norm_scope="projection"), {}, dict(tp=2), "model.qk_norm_scope: projection"),
    ({}, dict(expert_linear_bias=True), dict(tp=2, expert_tp=True), "moe.expert_linear_bias: parallel.expert_tp"),
])
def test_bad_values_are_refused_with_the_field(model, moe, parallel, match):
    cfg = Config(model=ModelConfig(vocab_size=256, d_model=32, n_head=4, **model), moe=MoEConfig(**moe),
                 parallel=ParallelConfig(**parallel))
    with pytest.raises(ConfigError, match=match):
        validate(cfg)
        validate_layout(cfg, parallel.get("tp", 1))
