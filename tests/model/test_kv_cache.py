"""Generation with a KV cache computes what the full forward computes: same logits token by token."""
import pytest
import torch

from moe_dist.config import ModelConfig, MoEConfig, RopeScaling
from moe_dist.model import MoETransformerLM
from moe_dist.model.transformer import KVCache
from moe_dist.train.generate import sample

DROPLESS = MoEConfig(n_experts=4, top_k=2, capacity_factor=None, eval_capacity_factor=None, n_shared_experts=1)


def build(max_seq_len=32, **kw):
    torch.manual_seed(0)
    # init_std 0.3: outputs that depend strongly on positions and context, so argmax choices do too
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=3, n_head=4, d_ff=48, max_seq_len=max_seq_len,
                      first_k_dense=1, init_std=0.3, **kw)
    return MoETransformerLM(cfg, DROPLESS).eval()


@pytest.mark.parametrize("kw", [dict(n_kv_head=2), dict(attention="mla", q_lora_rank=8, kv_lora_rank=12),
                                dict(n_kv_head=2, rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_seq_len=8))])
def test_cached_steps_equal_the_full_forward(kw):
    model = build(**kw)
    ids = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(len(model.layers))
        # a prompt, a chunk of three (queries see the cache plus the causal part of the chunk), then one at a time
        parts = [model(ids[:, :6], cache), model(ids[:, 6:9], cache)] + [model(ids[:, t:t + 1], cache) for t in range(9, 14)]
    assert cache.length == 14
    # fp32 sums in another order (cached keys vs one causal pass): 1e-5 is exceeded on AVX2-only CPUs
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)
    cached = [t.shape for t in cache.layers[0].tensors]
    if kw.get("attention") == "mla":  # DeepSeek's cache: the latent (12) and the shared rope key (4), one "head"
        assert cached == [torch.Size([2, 1, 14, 12 + 4])]
    else:  # keys and values of the 2 kv heads of size 8
        assert cached == [torch.Size([2, 2, 14, 8])] * 2


def test_cache_beyond_max_seq_len_is_refused():
    model = build(max_seq_len=8)
    cache = KVCache(len(model.layers))
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(torch.zeros(1, 3, dtype=torch.long), cache)


def test_greedy_sampling_equals_recomputing_every_token():
    """Through the end of the context and past it (a sliding window of max_seq_len tokens)."""
    model = build(max_seq_len=12)
    prompt = [3, 1, 4, 1, 5]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(15):
            ids.append(int(model(torch.tensor([ids[-12:]]))[0, -1].argmax()))
    assert sample(model, prompt, 15, temperature=0) == ids[len(prompt):]
