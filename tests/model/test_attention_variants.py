"""Attention options for Hugging Face families: defaults unchanged, MLA / QK-norm / biases / head_dim / RoPE layout."""
import pytest
import torch

from moe_dist.config import ConfigError, Config, ModelConfig, MoEConfig, validate
from moe_dist.model import MoETransformerLM
from moe_dist.model.rope import apply_rope, rope_tables


def build(**kw):
    torch.manual_seed(0)
    return MoETransformerLM(ModelConfig(vocab_size=64, d_model=32, n_head=4, n_layer=2, d_ff=32, max_seq_len=16, **kw),
                            MoEConfig(n_experts=4, top_k=2))


def test_default_attention_parameters_unchanged():
    names = [k for k in build().state_dict() if k.startswith("layers.0.attn.")]
    assert names == [f"layers.0.attn.{p}_proj.weight" for p in "qkvo"]


def test_qwen_options_add_their_parameters():
    sd = build(head_dim=12, n_kv_head=2, qkv_bias=True, attn_out_bias=True, qk_norm=True).state_dict()
    assert sd["layers.0.attn.q_proj.weight"].shape == (48, 32) and sd["layers.0.attn.k_proj.weight"].shape == (24, 32)
    assert sd["layers.0.attn.o_proj.bias"].shape == (32,) and sd["layers.0.attn.q_norm.weight"].shape == (12,)
    assert torch.count_nonzero(sd["layers.0.attn.q_proj.bias"]) == 0  # biases start at zero


@pytest.mark.parametrize("q_lora_rank", [None, 8])
def test_mla_shapes_and_causality(q_lora_rank):
    model = build(attention="mla", q_lora_rank=q_lora_rank, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
    attn = model.layers[0].attn
    assert attn.kv_a_proj_with_mqa.weight.shape == (12 + 4, 32) and attn.kv_b_proj.weight.shape == (4 * (6 + 5), 12)
    assert hasattr(attn, "q_proj") == (q_lora_rank is None)
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        full, prefix = model.eval()(ids), model(ids[:, :6])
    torch.testing.assert_close(full[:, :6], prefix, atol=1e-5, rtol=1e-5)  # no peeking at later tokens


def test_interleaved_rope_is_the_pairwise_complex_rotation():
    """q.k after the interleaved layout equals q.k of DeepSeek's (x0 + i x1) * e^{i m theta_j} rotation."""
    d, S = 8, 5
    cos, sin = rope_tables(d, S, 10000.0)
    q, k = torch.randn(1, 1, S, d), torch.randn(1, 1, S, d)
    freqs = torch.outer(torch.arange(S).float(), 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d)))
    rot = torch.polar(torch.ones_like(freqs), freqs)
    ref = lambda x: torch.view_as_real(torch.view_as_complex(x.reshape(1, 1, S, d // 2, 2)) * rot).flatten(3)  # noqa: E731
    ours = apply_rope(q, cos, sin, interleave=True) @ apply_rope(k, cos, sin, interleave=True).transpose(-1, -2)
    torch.testing.assert_close(ours, ref(q) @ ref(k).transpose(-1, -2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw,match", [
    (dict(attention="flash"), "model.attention"),
    (dict(head_dim=7), "model.head_dim"),
    (dict(d_model=30, n_head=4), "set model.head_dim"),
    (dict(attention="mla", qk_rope_head_dim=3), "qk_rope_head_dim"),
    (dict(attention="mla", qk_norm=True), "model.qk_norm"),
    (dict(attention="mla", n_kv_head=2), "model.n_kv_head"),
    (dict(attention="mla", q_lora_rank=0), "model.q_lora_rank"),
    (dict(kv_lora_rank=16), "model.kv_lora_rank: only used by multi-head latent attention"),
])
def test_validation_names_the_field(kw, match):
    base = dict(vocab_size=256, d_model=32, n_head=4)
    with pytest.raises(ConfigError, match=match):
        validate(Config(model=ModelConfig(**{**base, **kw})))


def test_head_dim_lifts_divisibility():
    validate(Config(model=ModelConfig(vocab_size=256, d_model=30, n_head=4, head_dim=8)))
