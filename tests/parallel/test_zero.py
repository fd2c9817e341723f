"""DeepSpeed ZeRO 1/2 on our groups (CPU, gloo, world 4) reproduces plain data parallelism.

Per layout and stage, each rank trains the same model twice for 20 steps: once through
deepspeed.initialize (our ep/edp/dp groups registered in DeepSpeed), once with plain data
parallelism (GradReducer + tp/ep-aware clipping + torch AdamW). Losses must agree tightly, and
the optimizer state each rank holds must shrink by ~1/dp (dense) and ~1/edp (experts).
"""
import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from moe_dist.train.optimizer import build_optimizer, param_groups

from dist_helper import optimizer_state_bytes, run_workers
from moe_dist.config import Config, ModelConfig, MoEConfig, ParallelConfig, TrainConfig
from moe_dist.model import MoEStats, MoETransformerLM
from moe_dist.parallel import GradReducer, ProcessGroupManager, clip_grad_norm_, parallelize
from moe_dist.parallel import zero as Z
from moe_dist.model.transformer import lm_loss

pytest.importorskip("deepspeed")

WORLD, B, S, STEPS = 4, 2, 8, 20
MODEL = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, d_ff=64, max_seq_len=S, moe_layer_indices=[1])
MOE = MoEConfig(n_experts=4, top_k=2, capacity_factor=1.25, d_expert=96)
CLIP = 0.5


def config(tp, ep, stage, clip=CLIP):
    return Config(model=MODEL, moe=MOE, parallel=ParallelConfig(tp=tp, ep=ep),
                  train=TrainConfig(micro_batch_size=B, lr=3e-3, weight_decay=0.1, grad_clip=clip, zero_stage=stage))


def batch(step, dp_rank):
    g = torch.Generator().manual_seed(1000 * (step % 4) + dp_rank)  # 4 batches in turn: the loss falls
    return torch.randint(0, MODEL.vocab_size, (B, S + 1), generator=g)


def fresh_model(cfg, pgm):
    torch.manual_seed(0)
    return parallelize(MoETransformerLM(cfg.model, cfg.moe), cfg, pgm)  # materialised, then sharded


def loss_of(model, tokens, pgm):
    """The LM loss (on vocabulary-sharded logits under tp: run it and its backward under loss_parallel)."""
    moe = MoEStats()
    loss = lm_loss(model(tokens[:, :-1], moe=moe), tokens[:, 1:])
    return (loss.to_local() if isinstance(loss, DTensor) else loss) + moe.pop_aux_loss()


def _worker(rank, layouts, clip):
    return {layout: _train_both(*layout, clip) for layout in layouts}


def _train_both(tp, ep, stage, clip):
    cfg = config(tp, ep, stage, clip)
    pgm = ProcessGroupManager(cfg.parallel, n_experts=MOE.n_experts)
    # plain data parallelism
    model = fresh_model(cfg, pgm)
    opt = build_optimizer(model, cfg.train, pgm.device)  # the one-device AdamW and its weight-decay groups
    reducer, plain, norms = GradReducer(model, pgm), [], []
    for step in range(STEPS):
        with loss_parallel():  # a no-op on plain logits
            loss = loss_of(model, batch(step, pgm.dp_rank), pgm)
            opt.zero_grad()
            loss.backward()
        reducer.reduce()
        if clip:
            norms.append(clip_grad_norm_(model, pgm, clip).item())
        opt.step()
        plain.append(loss.item())
    full_state = optimizer_state_bytes(opt)["dense"]
    model = Z.local_parameters(fresh_model(cfg, pgm), pgm)  # DeepSpeed flattens plain tensors: experts' local slices
    dense, expert = Z.zero_param_split(model, pgm)
    numel = {"dense": sum(p.numel() for p in dense), "expert": sum(p.numel() for p in expert)}
    # DeepSpeed ZeRO
    engine, ds_opt = Z.initialize_deepspeed(model, cfg, pgm, param_groups(model, cfg.train.weight_decay))
    zero, ds_norms = [], []
    for step in range(STEPS):
        with loss_parallel():
            loss = loss_of(engine, batch(step, pgm.dp_rank), pgm)
            engine.backward(loss)
        engine.step()
        zero.append(loss.item())
        ds_norms.append(float(engine.get_global_grad_norm()))
    return dict(plain=plain, zero=zero, norms=norms, ds_norms=ds_norms, state=optimizer_state_bytes(ds_opt), full_state=full_state, numel=numel,
                dp=pgm.dp, edp=pgm.edp)


# (tp, ep, stage); with tp > 1 the weights are DTensors, which DeepSpeed cannot hold: zero_stage 1/2 runs FSDP2
LAYOUTS = [(1, 2, 1), (1, 2, 2), (1, 1, 2), (1, 4, 2)]


@pytest.fixture(scope="module")
def zero_results():
    # one set of workers for every layout: DeepSpeed's first initialize costs seconds per process
    return run_workers(_worker, WORLD, LAYOUTS, CLIP, timeout=600)


@pytest.mark.parametrize("tp,ep,stage", LAYOUTS)
def test_zero_matches_plain_data_parallel(zero_results, tp, ep, stage):
    for r in (res[tp, ep, stage] for res in zero_results):
        torch.testing.assert_close(torch.tensor(r["zero"]), torch.tensor(r["plain"]), atol=1e-5, rtol=1e-5)
        assert r["plain"][-1] < r["plain"][0]
        # clipping is active and DeepSpeed's global norm is ours (tp shards once, experts over ep)
        assert max(r["norms"]) > CLIP
        torch.testing.assert_close(torch.tensor(r["ds_norms"]), torch.tensor(r["norms"]), atol=1e-5, rtol=1e-4)
        # Adam moments (2 fp32 per element) of 1/dp of the dense and 1/edp of the expert elements,
        # up to DeepSpeed's alignment padding
        st, n, dp, edp = r["state"], r["numel"], r["dp"], r["edp"]
        assert st["dense"] == pytest.approx(8 * n["dense"] / dp, rel=0.02), (st, n)
        assert st["expert"] == pytest.approx(8 * n["expert"] / edp, rel=0.02), (st, n)
        assert st["dense"] + st["expert"] < r["full_state"] / min(dp, edp) * 1.02
