"""Checkpoints hold the one-device state: written at ep=2, read back at ep=4 (model and AdamW state)."""
import torch

from dist_helper import run_workers
from moe_dist.config import ModelConfig, MoEConfig, ParallelConfig
from moe_dist.model import MoETransformerLM
from moe_dist.parallel import GradReducer, ProcessGroupManager, parallelize
from moe_dist.parallel.checkpoint import (full_model_state, full_optimizer_state, load_full_model_state,
                                          load_full_optimizer_state)

MODEL = ModelConfig(vocab_size=32, d_model=16, n_layer=2, n_head=2, d_ff=32, max_seq_len=8)
MOE = MoEConfig(n_experts=8, top_k=2)


def build(ep):
    pgm = ProcessGroupManager(ParallelConfig(ep=ep), n_experts=8)
    torch.manual_seed(0)
    model = parallelize(MoETransformerLM(MODEL, MOE), MOE, pgm)
    return pgm, model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _worker(rank):
    pgm, model, opt = build(2)
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(rank))
    model(tokens).square().mean().backward()
    GradReducer(model, pgm).reduce()
    opt.step()
    state, opt_state = full_model_state(model, pgm), full_optimizer_state(opt, model, pgm)
    pgm4, model4, opt4 = build(4)
    load_full_model_state(model4, state, pgm4)
    load_full_optimizer_state(opt4, model4, opt_state, pgm4)
    return dict(state=state, opt=opt_state, back=full_model_state(model4, pgm4),
                opt_back=full_optimizer_state(opt4, model4, pgm4), local=model4.state_dict())


def test_state_gathered_at_ep2_loads_at_ep4():
    got = run_workers(_worker, 4)
    torch.manual_seed(0)
    one = MoETransformerLM(MODEL, MOE).state_dict()
    for rank, r in enumerate(got):
        assert r["state"].keys() == one.keys()
        for k, v in one.items():
            assert r["state"][k].shape == v.shape  # the one-device format
            torch.testing.assert_close(r["back"][k], r["state"][k], atol=0, rtol=0)
        w = r["state"]["layers.0.ffn.experts.gate_up_proj"]
        torch.testing.assert_close(r["local"]["layers.0.ffn.experts.gate_up_proj"], w[2 * rank:2 * rank + 2])
        assert r["opt"]["state"].keys() == r["opt_back"]["state"].keys()
        for i, s in r["opt"]["state"].items():
            for name, v in s.items():
                torch.testing.assert_close(r["opt_back"]["state"][i][name], v, atol=0, rtol=0)
        torch.testing.assert_close(r["state"]["layers.1.ffn.experts.down_proj"], got[0]["state"]["layers.1.ffn.experts.down_proj"])
