"""20 AdamW steps at world 4 (ep=4, and ep=2 x edp=2) reproduce the losses of one process running
the same global batches with moe.routing_groups=4 (capacity dropping, a shared expert, global
gradient clipping and the aux-loss-free expert bias included)."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_helper import run_workers
from moe_dist.config import ModelConfig, MoEConfig, ParallelConfig
from moe_dist.model import MoETransformerLM
from moe_dist.model.moe import MoEStats
from moe_dist.parallel import GradReducer, ProcessGroupManager, clip_grad_norm_, parallelize, update_expert_bias

WORLD, B, S, STEPS, E = 4, 2, 8, 20, 8
MODEL = ModelConfig(vocab_size=32, d_model=16, n_layer=2, n_head=2, d_ff=32, max_seq_len=S)
MOE = dict(n_experts=E, top_k=2, capacity_factor=1.25, n_shared_experts=1, expert_bias=True, bias_update_rate=1e-2)


def batches():
    """STEPS global batches [WORLD * B, S + 1] of a learnable pattern (counting mod vocab) plus noise."""
    g = torch.Generator().manual_seed(7)
    start = torch.randint(0, MODEL.vocab_size, (STEPS, WORLD * B, 1), generator=g)
    seq = (start + torch.arange(S + 1)) % MODEL.vocab_size
    noise = torch.rand(seq.shape, generator=g) < 0.1
    return torch.where(noise, torch.randint_like(seq, MODEL.vocab_size), seq)


def train(model, data, reducer=None, pgm=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for tokens in data:
        moe = MoEStats()
        logits = model(tokens[:, :-1], moe=moe)
        ce = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        (ce + moe.pop_aux_loss()).backward()
        if reducer is not None:
            reducer.reduce()
            clip_grad_norm_(model, pgm, 0.5)
            update_expert_bias(model, moe.layers(), pgm)
            ce = ce.detach().clone()
            dist.all_reduce(ce)
            ce /= WORLD
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            model.update_expert_bias([s["load"] for s in moe.layers()])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(ce.item())
    return losses


def _worker(rank, ep):
    pgm = ProcessGroupManager(ParallelConfig(ep=ep), n_experts=E)
    cfg = MoEConfig(**MOE)
    torch.manual_seed(0)
    model = parallelize(MoETransformerLM(MODEL, cfg), cfg, pgm)
    data = batches()[:, rank * B:(rank + 1) * B]
    return train(model, data, GradReducer(model, pgm), pgm)


@pytest.fixture(scope="module")
def reference_losses():
    torch.manual_seed(0)
    model = MoETransformerLM(MODEL, MoEConfig(**MOE, routing_groups=WORLD))
    return train(model, batches())


@pytest.mark.parametrize("ep", [4, 2])
def test_training_matches_one_process(reference_losses, ep):
    got = run_workers(_worker, WORLD, ep)
    for losses in got:
        assert losses == got[0]  # every rank agrees on the global loss
    assert reference_losses[-1] < reference_losses[0] - 0.3  # it learns
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(reference_losses), atol=2e-5, rtol=1e-5)
