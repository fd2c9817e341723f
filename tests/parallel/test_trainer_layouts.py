"""The real Trainer at several parallel layouts reproduces the one-process run on the same global batch."""
import json

import pytest
import torch

from dist_helper import run_workers
from moe_dist.config import load_config
from moe_dist.parallel import zero
from moe_dist.train.trainer import Trainer

BASE = ["model.d_model=32", "model.n_layer=2", "model.n_head=4", "model.d_ff=64", "model.max_seq_len=32",
        "moe.n_experts=4", "moe.top_k=2", "moe.n_shared_experts=1", "train.lr=1e-2", "train.warmup_steps=2",
        "train.steps=6", "train.device=cpu", "train.eval_every=0", "train.eval_batches=2", "train.log_every=1",
        "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.resume=false"]
GLOBAL_BATCH = 8


def _train(rank, world, overrides, run_dir, cache):
    cfg = load_config(None, BASE + overrides + [f"logging.run_dir={run_dir}", f"data.cache_dir={cache}"],
                      world_size=world)
    return Trainer(cfg).fit()["losses"]



@pytest.mark.parametrize("layout", [
    ["parallel.tp=2"],  # dp 1: vocab-parallel loss, split heads, token-split experts
    ["parallel.ep=2"],  # dp 2, all-to-all
    ["parallel.ep=2", "train.zero_stage=2"],  # DeepSpeed ZeRO-2 on our dp/edp groups
    ["parallel.ep=2", "train.zero_stage=1", "moe.capacity_factor=1.0"],
    ["train.zero_stage=3"],  # FSDP2: dense and experts sharded over dp (ep = 1, edp = dp)
    ["parallel.ep=2", "train.zero_stage=3"],  # FSDP2 with experts over ep (edp = 1)
])
def test_trainer_layout_matches_one_process(tmp_path, layout):
    if "train.zero_stage=2" in layout and not zero.deepspeed_available():
        pytest.skip("DeepSpeed not installed")
    dp = 1 if "parallel.tp=2" in layout else 2
    capacity = [o for o in layout if o.startswith("moe.capacity")]
    ref = _train(0, 1, [f"train.micro_batch_size={GLOBAL_BATCH}", f"moe.routing_groups={dp}", "moe.n_devices=2",
                         *capacity], tmp_path / "ref", tmp_path / "cache")
    results = run_workers(_train, 2, 2, [f"train.micro_batch_size={GLOBAL_BATCH // dp}", "moe.n_devices=2", *layout],
                          tmp_path / "run", tmp_path / "cache", timeout=300)
    assert results[0] == results[1]  # every rank logs the dp-mean loss
    torch.testing.assert_close(torch.tensor(results[0]), torch.tensor(ref), rtol=1e-5, atol=1e-5)
    # what is logged is of the whole dp batch, not rank 0's share: aux loss, dropped fraction, expert loads
    logged = {run: [r for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                    if r["kind"] == "train"] for run in ("ref", "run")}
    for key in ("aux_loss", "expert_loss", "router_entropy", "drop_frac", "max_load_ratio",
                "expert_load", "layer_drop_frac", "layer_expert_loss"):  # and per MoE layer
        got, want = ([r[key] for r in logged[run]] for run in ("run", "ref"))
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-6, msg=key)
    if layout == ["parallel.ep=2"]:  # dropless: the ranks' experts receive every assignment of the dp batch once
        tokens = GLOBAL_BATCH * 32  # model.max_seq_len=32 is the sequence length
        for r in logged["run"]:
            assert [sum(ranks) for ranks in r["a2a_rows_received"]] == [tokens * 2] * 2  # top-2, two MoE layers
            assert r["a2a_mb"] > 0


@pytest.mark.parametrize("stage", [3, 1])
def test_zero_stages_at_world_1_run_fsdp2_and_deepspeed(tmp_path, stage):
    """torchrun --nproc-per-node 1 with train.zero_stage > 0 runs FSDP2 (3) or DeepSpeed's ZeRO (1), not the
    plain one-process path, with the plain run's losses."""
    if stage == 1 and not zero.deepspeed_available():
        pytest.skip("DeepSpeed not installed")
    ref = _train(0, 1, [f"train.micro_batch_size={GLOBAL_BATCH}"], tmp_path / "ref", tmp_path / "cache")
    ran = run_workers(_train_world_1, 1, [f"train.micro_batch_size={GLOBAL_BATCH}", f"train.zero_stage={stage}"],
                      tmp_path / "run", tmp_path / "cache", timeout=300)[0]
    assert ran["ran"] == ("FSDP2" if stage == 3 else "DeepSpeed")
    torch.testing.assert_close(torch.tensor(ran["losses"]), torch.tensor(ref), rtol=1e-5, atol=1e-5)


def _train_world_1(rank, overrides, run_dir, cache):
    from torch.distributed.fsdp import FSDPModule

    cfg = load_config(None, BASE + overrides + [f"logging.run_dir={run_dir}", f"data.cache_dir={cache}"], world_size=1)
    trainer = Trainer(cfg)
    ran = "DeepSpeed" if trainer.engine is not None else "FSDP2" if isinstance(trainer.model, FSDPModule) else "plain"
    try:
        return {"ran": ran, "losses": trainer.fit()["losses"]}
    finally:
        trainer.rt.close()
