"""tp=2 equals tp=1: outputs and gradients of attention, SwiGLU, vocab-parallel embedding + loss, whole model.

Each rank builds the one-device reference itself (same seed), so no gathering is needed:
the reference gradients are sliced by applying the same tensor-parallel step to a copy of the
reference model whose weights are replaced by their gradients.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_dist.config import MoEConfig, ModelConfig
from moe_dist.model.mlp import SwiGLU
from moe_dist.model.transformer import Attention, MoETransformerLM, rope_tables
from moe_dist.parallel import tensor as T

from dist_helper import run_workers

ATOL = 1e-5


def run_distributed(fn, world, *args):
    return run_workers(_init_then, world, fn, world, *args)


def _init_then(rank, fn, world, *args):
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return fn(rank, world, *args)


def _grads_as_weights(ref: torch.nn.Module) -> torch.nn.Module:
    for layer in getattr(ref, "moe_layers", lambda: [])():
        layer.aux_loss, layer.stats = torch.zeros(()), {}  # non-leaf tensors of the last forward
    g = copy.deepcopy(ref)
    for p, q in zip(ref.parameters(), g.parameters()):
        q.data = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    return g


def _compare_grads(tp_mod, grad_mod, group, what: str) -> int:
    """tp_mod's grads vs grad_mod's (already sharded) weights; partial expert grads summed over tp."""
    ref = dict(grad_mod.named_parameters())
    n = 0
    for name, p in tp_mod.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if getattr(p, "tp_partial_grad", False):
            g = g.clone()
            dist.all_reduce(g, group=group)  # what the edp reduction does
        torch.testing.assert_close(g, ref[name].data, atol=ATOL, rtol=1e-4, msg=lambda m: f"{what} {name}: {m}")
        n += 1
    return n


def _check_blocks(rank, world):
    group = dist.new_group(list(range(world)))
    # attention, plain and GQA
    for n_kv in (4, 2):
        cfg = ModelConfig(d_model=32, n_head=4, n_kv_head=n_kv, max_seq_len=8)
        torch.manual_seed(0)
        attn = Attention(cfg)
        cos, sin = rope_tables(8, 8, cfg.theta)
        x = torch.randn(2, 8, 32)
        xr = x.clone().requires_grad_()
        y_ref = attn(xr, cos, sin)
        (y_ref * torch.arange(32.0)).sum().backward()
        tp_attn = copy.deepcopy(attn)
        T.parallelize_attention(tp_attn, group)
        assert tp_attn.q_proj.weight.shape == (16, 32) and tp_attn.k_proj.weight.shape == (8 * n_kv // 2, 32)
        xt = x.clone().requires_grad_()
        y = tp_attn(xt, cos, sin)
        (y * torch.arange(32.0)).sum().backward()
        torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(xt.grad, xr.grad, atol=ATOL, rtol=1e-5)
        g = _grads_as_weights(attn)
        T.parallelize_attention(g, group)
        _compare_grads(tp_attn, g, group, f"attn kv={n_kv}")
    # GQA with fewer kv heads than tp ranks is refused
    with pytest.raises(ValueError, match="n_kv_head"):
        T.parallelize_attention(Attention(ModelConfig(d_model=32, n_head=4, n_kv_head=1)), group)
    # SwiGLU
    torch.manual_seed(1)
    mlp = SwiGLU(16, 48)
    x = torch.randn(5, 16)
    xr = x.clone().requires_grad_()
    y_ref = mlp(xr)
    y_ref.pow(2).sum().backward()
    tp_mlp = copy.deepcopy(mlp)
    T.parallelize_swiglu(tp_mlp, group)
    xt = x.clone().requires_grad_()
    y = tp_mlp(xt)
    y.pow(2).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(xt.grad, xr.grad, atol=ATOL, rtol=1e-5)
    g = _grads_as_weights(mlp)
    T.parallelize_swiglu(g, group)
    _compare_grads(tp_mlp, g, group, "swiglu")
    return True


def _check_vocab(rank, world):
    group = dist.new_group(list(range(world)))
    torch.manual_seed(2)
    V, H = 12, 8
    emb, head = torch.nn.Embedding(V, H), torch.nn.Linear(H, V, bias=False)
    ids = torch.randint(0, V, (3, 5))
    target = torch.randint(0, V, (3, 5))
    target[0, :2] = -100  # ignored positions
    with torch.no_grad():
        head.weight.mul_(30)  # large logits: the max subtraction matters

    def ref_loss(e, h):
        return F.cross_entropy(h(e(ids)).flatten(0, 1), target.flatten(), ignore_index=-100)

    loss_ref = ref_loss(emb, head)
    loss_ref.backward()
    pe = T.VocabParallelEmbedding(copy.deepcopy(emb), group)
    ph = T.ColumnParallelLinear.from_linear(copy.deepcopy(head), group)
    logits = ph(pe(ids))
    assert logits.shape == (3, 5, V // world)
    loss = T.cross_entropy(logits, target, group)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, atol=ATOL, rtol=1e-6)
    s = slice(rank * V // world, (rank + 1) * V // world)
    torch.testing.assert_close(pe.weight.grad, emb.weight.grad[s], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ph.weight.grad, head.weight.grad[s], atol=ATOL, rtol=1e-5)
    # per-token losses and a huge logit stay finite and exact
    big = torch.full((2, V // world), -1e4)
    big[:, 0] = 1e4 if rank == 0 else -1e4
    per_tok = T.vocab_parallel_cross_entropy(big, torch.tensor([0, 1]), group, reduction="none")
    assert torch.isfinite(per_tok).all()
    # rank 0 holds the only large logit
    full = torch.full((2, V), -1e4)
    full[:, 0] = 1e4
    torch.testing.assert_close(per_tok, F.cross_entropy(full, torch.tensor([0, 1]), reduction="none"))
    return True


MODEL = dict(d_model=32, n_head=4, n_kv_head=2, vocab_size=64, max_seq_len=16, d_ff=48, n_layer=3,
             moe_layer_indices=[1, 2])


def _check_model(rank, world, expert_tp, moe_kw, model_kw=MODEL):
    group = dist.new_group(list(range(world)))
    torch.manual_seed(3)
    ref = MoETransformerLM(ModelConfig(**model_kw), MoEConfig(**moe_kw))
    ids = torch.randint(0, 64, (2, 16))
    target = torch.roll(ids, -1, 1)
    model = T.apply_tensor_parallel(copy.deepcopy(ref), group, expert_tp=expert_tp)
    loss_ref = F.cross_entropy(ref(ids).flatten(0, 1), target.flatten()) + ref.get_aux_loss()
    loss_ref.backward()
    logits = model(ids)
    assert logits.shape[-1] == 64 // world
    loss = T.cross_entropy(logits, target, group) + model.get_aux_loss()
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, atol=ATOL, rtol=1e-6)
    for s_ref, s in zip(ref.moe_stats(), model.moe_stats()):
        assert torch.equal(s_ref["load"], s["load"]) and torch.equal(s_ref["dropped"], s["dropped"])
    g = T.apply_tensor_parallel(_grads_as_weights(ref), group, expert_tp=expert_tp)
    n = _compare_grads(model, g, group, f"model expert_tp={expert_tp}")
    assert n == len(list(ref.parameters()))  # tied weights count once in both
    return loss.item()


def test_attention_gqa_and_swiglu_tp2_equal_tp1():
    assert run_distributed(_check_blocks, 2) == [True, True]


def test_vocab_parallel_embedding_and_cross_entropy_tp2_equal_tp1():
    assert run_distributed(_check_vocab, 2) == [True, True]


@pytest.mark.parametrize("expert_tp", [False, True])
def test_whole_model_tp2_equals_tp1(expert_tp):
    # shared experts, capacity dropping (the same assignments must be dropped on every layout)
    moe = dict(n_experts=4, top_k=2, n_shared_experts=1, shared_expert_gate=True, capacity_factor=1.0,
               z_loss_weight=1e-3)
    losses = run_distributed(_check_model, 2, expert_tp, moe)
    assert losses[0] == losses[1]


def test_whole_model_tp2_tied_embeddings_dropless_sigmoid():
    moe = dict(n_experts=4, top_k=2, score_func="sigmoid", norm_topk_prob=True)
    run_distributed(_check_model, 2, False, moe, dict(MODEL, tie_embeddings=True))
