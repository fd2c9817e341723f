"""Sparse upcycling: experts copied from the dense FFN reproduce the dense model (noise 0, renormalised top-k)."""
import pytest
import torch

from moe_dist.config import ConfigError, MoEConfig, ModelConfig
from moe_dist.interop import upcycle
from moe_dist.model import MoEStats, MoETransformerLM


def dense_model(**kw):
    torch.manual_seed(0)
    kw = {"n_kv_head": 2, **kw}
    cfg = ModelConfig(vocab_size=64, d_model=32, n_head=4, n_layer=3, d_ff=48, max_seq_len=32, moe_every=0, **kw)
    return MoETransformerLM(cfg).eval()


IDS = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS)


@pytest.mark.parametrize("top_k,kw", [(1, {}), (2, {}), (3, dict(attention="mla", n_kv_head=None, q_lora_rank=8, rope_interleave=True))])
def test_upcycled_reproduces_dense_logits(top_k, kw):
    dense = dense_model(**kw)
    moe = upcycle(dense, n_experts=4, top_k=top_k)
    assert len(list(moe.moe_layers())) == 3
    torch.testing.assert_close(logits(moe), logits(dense), atol=1e-5, rtol=1e-5)
    stats = MoEStats()
    with torch.no_grad():
        moe.eval()(IDS, moe=stats)
    for layer in stats.layers():  # routers are fresh, so tokens really go to different experts
        assert layer["load"].count_nonzero() > 1


def test_upcycle_from_state_dict_and_some_layers():
    dense = dense_model()
    moe = upcycle(dense.state_dict(), n_experts=8, top_k=2, config=dense.config, layers=[1])
    assert [i for i, layer in enumerate(moe.layers) if hasattr(layer.ffn, "router")] == [1]
    torch.testing.assert_close(logits(moe), logits(dense), atol=1e-5, rtol=1e-5)


def test_without_renormalisation_the_output_is_scaled():
    dense = dense_model()
    moe = upcycle(dense, n_experts=4, moe=MoEConfig(n_experts=4, top_k=2, norm_topk_prob=False))
    assert not torch.allclose(logits(moe), logits(dense), atol=1e-3)


def test_noise_breaks_expert_symmetry():
    dense = dense_model()
    moe = upcycle(dense, n_experts=4, noise_std=0.01, seed=3)
    w = next(moe.moe_layers()).experts.gate_up_proj
    assert not torch.equal(w[0], w[1])
    ffn = dense.layers[0].ffn
    ref = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight])
    assert 0.005 < (w[0] - ref).std() < 0.02
    assert (logits(moe) - logits(dense)).abs().max() < 0.5  # close to the dense model, not equal


def test_upcycle_rejects_moe_source_and_bad_width():
    dense = dense_model()
    with pytest.raises(ConfigError, match="already has MoE"):
        upcycle(upcycle(dense, n_experts=2), n_experts=4)
    with pytest.raises(ConfigError, match="d_expert"):
        upcycle(dense, n_experts=4, moe=MoEConfig(n_experts=4, d_expert=16))
    with pytest.raises(ConfigError, match="config="):
        upcycle(dense.state_dict(), n_experts=4)
