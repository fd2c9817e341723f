"""The MoE hot path makes no data-dependent device-to-host transfer (REFERENCE.md: Host syncs), counted by a
TorchDispatchMode over a forward + backward on the grouped-GEMM path (F.grouped_mm, the path CUDA runs):
none on one device, dropless or with a capacity factor; under ep=2 exactly one per MoE layer dropless
(the all-to-all split sizes) and none with a capacity factor; and a training step that is not a log step
adds none. On a CPU nothing stalls, so the count is the proxy for what would stall a GPU's launch queue."""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dist_helper import run_workers
from moe_dist.config import MoEConfig, ModelConfig, ParallelConfig, load_config
from moe_dist.model import MoEStats, MoETransformerLM
from moe_dist.parallel import ProcessGroupManager, parallelize

aten = torch.ops.aten


class HostSyncs(TorchDispatchMode):
    """Counts, by name, the ops whose result the host must wait for: a scalar read (item, bool, float),
    data-sized outputs (nonzero, bincount, unique, masked_select, a bool-mask index, repeat_interleave
    without output_size), and Tensor.tolist (which reads memory without dispatching an op)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "bincount", "unique", "_unique", "_unique2", "unique_dim",
               "unique_consecutive", "masked_select"}

    def __init__(self):
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.SYNCING:
            self.seen[name] += 1
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.seen["repeat_interleave"] += 1
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.seen["bool_index"] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        seen = self.seen

        def tolist(t):
            seen["tolist"] += 1
            return self._tolist(t)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


MODEL = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, d_ff=64, max_seq_len=16)
B, S = 2, 16


def moe_cfg(capacity_factor, **kw) -> MoEConfig:
    # grouped_mm: F.grouped_mm with the offsets on the device, in fp32 on a CPU too
    return MoEConfig(n_experts=4, top_k=2, capacity_factor=capacity_factor, n_shared_experts=1,
                     grouped_mm="grouped_mm", z_loss_weight=1e-3, seq_aux_loss_weight=1e-3, **kw)


def count_forward_backward(model) -> Counter:
    ids = torch.randint(0, MODEL.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(1))
    with HostSyncs() as syncs:
        moe = MoEStats()
        logits = model(ids[:, :-1], moe=moe)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + moe.pop_aux_loss()
        loss.backward()
        assert len(moe.layers()) == 2
    return syncs.seen


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_one_device_forward_backward_makes_no_host_sync(capacity_factor):
    torch.manual_seed(0)
    model = MoETransformerLM(MODEL, moe_cfg(capacity_factor, drop_policy="probs"))
    assert count_forward_backward(model) == Counter()


def test_the_counter_sees_what_it_counts():
    """The mutation check of the counter itself: each kind of sync it claims to see, it sees."""
    x = torch.tensor([0, 2, 1, 2])
    with HostSyncs() as syncs:
        x.sum().item(), bool(x[0]), x.nonzero(), torch.bincount(x), x.unique(), x.tolist(), x[x > 0]
        torch.repeat_interleave(x)
    assert set(syncs.seen) == {"_local_scalar_dense", "nonzero", "bincount", "_unique2", "tolist", "bool_index",
                               "repeat_interleave"}


def _ep(rank, capacity_factor):
    pgm = ProcessGroupManager(ParallelConfig(ep=2), n_experts=4)
    cfg = moe_cfg(capacity_factor)
    torch.manual_seed(0)
    model = parallelize(MoETransformerLM(MODEL, cfg), cfg, pgm)
    return count_forward_backward(model)


def test_expert_parallel_dropless_syncs_once_per_layer_capacity_never():
    for rank_counts in run_workers(_ep, 2, None):
        assert rank_counts == Counter(tolist=2)  # two MoE layers: their split sizes, read once each
    for rank_counts in run_workers(_ep, 2, 1.0):
        assert rank_counts == Counter()


def test_training_step_outside_log_steps_makes_no_host_sync(tmp_path):
    from moe_dist.train.trainer import Trainer

    cfg = load_config(None, ["model.vocab_size=256", "model.d_model=32", "model.n_layer=2", "model.n_head=2",
                             "model.d_ff=64", "model.max_seq_len=32", "moe.n_experts=4", "moe.top_k=2",
                             "moe.grouped_mm=grouped_mm", "moe.capacity_factor=1.0", "moe.expert_bias=true",
                             "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.device=cpu",
                             "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.resume=false",
                             f"logging.run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"])
    trainer = Trainer(cfg)
    trainer.train_step(log=False)  # warm-up: the optimizer's state is created here
    with HostSyncs() as syncs:
        r = trainer.train_step(log=False)
    assert syncs.seen == Counter()
    logged = trainer.train_step(log=True)
    assert r.loss != r.loss and 0 < logged.loss < 10  # NaN until a log step reads it; then the real one


def _pipeline_step(rank, run_dir, cache):
    from moe_dist.train.trainer import Trainer

    cfg = load_config(None, ["model.vocab_size=256", "model.d_model=32", "model.n_layer=4", "model.n_head=2",
                             "model.d_ff=64", "model.max_seq_len=32", "moe.n_experts=4", "moe.top_k=2",
                             "moe.grouped_mm=grouped_mm", "moe.capacity_factor=1.0", "moe.expert_bias=true",
                             "parallel.pp=2", "train.micro_batch_size=2", "train.grad_accum_steps=4", "train.device=cpu",
                             "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.resume=false",
                             f"logging.run_dir={run_dir}", f"data.cache_dir={cache}"], world_size=2)
    trainer = Trainer(cfg)
    trainer.train_step(log=False)  # warm-up: the schedule's buffers and the optimizer's state
    with HostSyncs() as syncs:
        trainer.train_step(log=False)
    return syncs.seen


def test_pipeline_training_step_makes_no_host_sync(tmp_path):
    """Under pp=2 (1F1B over 4 micro-batches) a step outside log steps reads nothing on the host either: the
    schedule's sends and receives have static shapes, and the loss stays on the last stage's device."""
    for seen in run_workers(_pipeline_step, 2, tmp_path / "run", tmp_path / "cache"):
        assert seen == Counter()
