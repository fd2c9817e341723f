import pytest
import torch
import torch.nn.functional as F

from moe_dist import ConfigError, HybridMoETransformerLM, MoETransformerLM
from moe_dist.config import MoEConfig, ModelConfig
from moe_dist.model.mlp import SwiGLU
from moe_dist.model.moe import MoELayer, MoEStats

SMALL = dict(d_model=32, n_head=4, vocab_size=97, max_seq_len=16, d_ff=64, n_layer=4, n_experts=4, top_k=2)


def test_quick_start_calls():
    model = MoETransformerLM(d_model=512, n_head=8, vocab_size=10000, max_seq_len=1024, d_ff=2048, theta=10000.0,
                             n_layer=12, n_experts=8, top_k=2, use_moe_aux_loss=True, moe_aux_loss_weight=0.01)
    ids = torch.randint(0, 10000, (2, 8))
    moe = MoEStats()
    logits = model(ids, moe=moe)
    assert logits.shape == (2, 8, 10000)
    aux = moe.pop_aux_loss()
    assert aux.dim() == 0 and aux.requires_grad
    # 12 MoE layers, each about weight * 1 near uniform routing
    assert 0.05 < aux.item() < 0.5
    hybrid = HybridMoETransformerLM(d_model=64, n_head=4, vocab_size=100, max_seq_len=32, d_ff=128, n_layer=12,
                                    moe_layer_indices=[2, 5, 8, 11], n_experts=8, top_k=2)
    kinds = [isinstance(b.ffn, MoELayer) for b in hybrid.layers]
    assert [i for i, k in enumerate(kinds) if k] == [2, 5, 8, 11]
    assert hybrid(torch.randint(0, 100, (1, 4))).shape == (1, 4, 100)


def test_aux_loss_can_be_turned_off():
    model = MoETransformerLM(**SMALL, use_moe_aux_loss=False)
    moe = MoEStats()
    model(torch.randint(0, 97, (1, 8)), moe=moe)
    assert moe.pop_aux_loss().item() == 0.0


def test_layer_placement_first_k_dense_and_moe_every():
    cfg = ModelConfig(n_layer=6, d_model=32, n_head=4, d_ff=64, vocab_size=50, first_k_dense=1, moe_every=2)
    model = MoETransformerLM(cfg, MoEConfig(n_experts=4, top_k=1))
    assert [isinstance(b.ffn, MoELayer) for b in model.layers] == [False, True, False, True, False, True]
    assert all(isinstance(b.ffn, SwiGLU) for b in model.layers if not isinstance(b.ffn, MoELayer))


def test_causal():
    """Dropless routing is per token, so a later token never changes earlier logits."""
    model = MoETransformerLM(**SMALL).eval()
    ids = torch.randint(0, 97, (1, 10))
    ids2 = ids.clone()
    ids2[0, 7:] = (ids2[0, 7:] + 1) % 97
    assert torch.allclose(model(ids)[0, :7], model(ids2)[0, :7], atol=1e-5)


def test_gqa_and_tied_embeddings():
    model = MoETransformerLM(**SMALL, n_kv_head=2, tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.layers[0].attn.k_proj.out_features == 2 * 8
    assert model(torch.randint(0, 97, (2, 5))).shape == (2, 5, 97)


def test_attention_matches_manual_softmax_attention():
    model = MoETransformerLM(**SMALL)
    attn = model.layers[0].attn
    x = torch.randn(1, 6, 32)
    cos, sin = model.rope_cos[:6], model.rope_sin[:6]
    q = attn.q_proj(x).view(1, 6, 4, 8).transpose(1, 2)
    k = attn.k_proj(x).view(1, 6, 4, 8).transpose(1, 2)
    v = attn.v_proj(x).view(1, 6, 4, 8).transpose(1, 2)

    def rope(t):  # rotate pairs (i, i + hd/2) by angle pos * theta^(-2i/hd)
        pos = torch.arange(6).float()[:, None]
        inv = 10000.0 ** (-torch.arange(4).float() * 2 / 8)
        ang = pos * inv
        a, b = t[..., :4], t[..., 4:]
        return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)

    q, k = rope(q), rope(k)
    att = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    att = att.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    expected = attn.o_proj((att @ v).transpose(1, 2).reshape(1, 6, 32))
    assert torch.allclose(attn(x, cos, sin), expected, atol=1e-5)


def test_activation_checkpointing_same_loss_and_grads():
    torch.manual_seed(0)
    a = MoETransformerLM(**SMALL)
    b = MoETransformerLM(**SMALL, activation_checkpointing=True)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 97, (2, 12))
    results = []
    for model in (a, b):
        model.train()
        moe = MoEStats()
        logits = model(ids, moe=moe)
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten()) + moe.pop_aux_loss()
        loss.backward()  # recomputes the blocks of b: their records must not count twice
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                        [s["load"] for s in moe.layers()]))
    assert torch.allclose(results[0][0], results[1][0])
    assert all(torch.equal(u, v) for u, v in zip(results[0][2], results[1][2])) and len(results[1][2]) == 4
    for name, g in results[0][1].items():
        assert torch.allclose(g, results[1][1][name], atol=1e-6), name


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="top_k"):
        MoETransformerLM(**{**SMALL, "top_k": 9})
    with pytest.raises(ConfigError, match="n_head"):
        MoETransformerLM(**{**SMALL, "d_model": 30})
    with pytest.raises(ConfigError, match="nonsense"):
        MoETransformerLM(**SMALL, nonsense=1)
    with pytest.raises(ConfigError, match="moe_layer_indices"):
        HybridMoETransformerLM(**SMALL)
    with pytest.raises(ValueError, match="max_seq_len"):
        MoETransformerLM(**SMALL)(torch.zeros(1, 17, dtype=torch.long))


def test_expert_bias_update_through_model():
    model = MoETransformerLM(**SMALL, expert_bias=True, bias_update_rate=0.5, aux_loss_weight=0.0)
    moe = MoEStats()
    model(torch.randint(0, 97, (2, 8)), moe=moe)
    loads = [s["load"] for s in moe.layers()]
    model.update_expert_bias(loads)
    first = next(model.moe_layers())
    expected = 0.5 * torch.sign(loads[0].float().mean() - loads[0].float())
    assert torch.equal(first.router.expert_bias, expected)
