import json
import math

import pytest
import torch

from moe_dist.config import ConfigError, resolve
from moe_dist.train import Trainer, TrainingError
from moe_dist.model import MoEStats, build_model
from moe_dist.model.transformer import lm_loss


def test_short_run_learns_below_unigram_entropy(tiny_cfg):
    cfg = tiny_cfg("train.steps=40", "train.eval_every=20")
    trainer = Trainer(cfg)
    start = trainer.evaluate()
    assert start > math.log(256) - 0.5  # an untrained model is near uniform over bytes
    result = trainer.fit()
    assert result["step"] == 40 and result["skipped_steps"] == 0
    assert result["val_loss"] < start - 1.5
    assert result["val_loss"] < result["unigram_entropy"]  # learned more than byte frequencies
    records = [json.loads(line) for line in open(cfg.logging.run_dir + "/metrics.jsonl")]
    vals = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [0, 20, 40]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(0.0 <= r["drop_frac"] <= 1.0 and r["tokens_per_s"] > 0 and r["aux_loss"] > 0 for r in train)
    assert all(1.0 <= r["max_load_ratio"] <= 4.0 for r in train)  # at most all tokens on one of 4 experts
    for r in train:  # per MoE layer (both blocks are MoE): expert shares, drops, the figures above per layer
        assert r["moe_layers"] == [0, 1] and len(r["expert_load"]) == 2
        assert all(len(row) == 4 and sum(row) == pytest.approx(1.0, abs=1e-5) for row in r["expert_load"])
        assert sum(r["layer_expert_loss"]) == pytest.approx(r["expert_loss"], rel=1e-4)
        assert sum(r["layer_max_load_ratio"]) / 2 == pytest.approx(r["max_load_ratio"], rel=1e-4)
        assert r["layer_drop_frac"] == [0.0, 0.0]  # dropless


def test_grad_accumulation_with_capacity_equals_one_big_batch(tiny_cfg):
    """3 accumulated micro-batches of 8 give the gradient of one batch of 24 whose 3 routing groups
    are those micro-batches (capacity drops are per group, so they are the same drops)."""
    trainer = Trainer(tiny_cfg("train.steps=6", "train.grad_accum_steps=3", "moe.capacity_factor=0.5",
                               "train.grad_clip=0"))
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batches, grads = [], {}
    draw = trainer.data.train.next_batch
    trainer.data.train.next_batch = lambda: batches.append(draw()) or batches[-1]
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a: grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()}) or step(*a)
    result = trainer.train_step()
    assert len(batches) == 3 and result.drop_frac > 0.05  # a capacity factor of 0.5 drops for real

    cfg = tiny_cfg("moe.capacity_factor=0.5", "moe.routing_groups=3", "train.micro_batch_size=24")
    one = build_model(resolve(cfg, 1))
    one.load_state_dict(start)
    inputs, targets = (torch.cat(t) for t in zip(*batches))
    moe = MoEStats()
    logits = one(inputs, moe=moe)
    (lm_loss(logits, targets) + moe.pop_aux_loss()).backward()
    stats = moe.layers()
    assert result.drop_frac == pytest.approx(sum(float(s["dropped"]) for s in stats) /
                                             sum(float(s["assignments"]) for s in stats))
    record = result.router.record()  # the step's per-layer figures: the three micro-batches together
    for layer, s in enumerate(stats):
        assert record["expert_load"][layer] == pytest.approx((s["load"] / s["load"].sum()).tolist(), abs=1e-6)
        assert record["layer_drop_frac"][layer] == pytest.approx(float(s["dropped"]) / float(s["assignments"]))
    assert grads.keys() == {n for n, _ in one.named_parameters()}
    for name, p in one.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_expert_bias_updates_after_each_step(tiny_cfg):
    trainer = Trainer(tiny_cfg("train.steps=3", "moe.expert_bias=true", "moe.aux_loss_weight=0",
                               "moe.bias_update_rate=0.01"))
    trainer.fit()
    biases = [layer.router.expert_bias for layer in trainer.model.moe_layers()]
    for b in biases:
        assert b.abs().sum() > 0  # sign(mean - load) moved it
        assert torch.allclose((b / 0.01).round(), b / 0.01, atol=1e-4)  # 3 steps of +-rate (or 0)


def test_nonfinite_loss_skips_then_aborts(tiny_cfg):
    trainer = Trainer(tiny_cfg("train.steps=20", "train.max_nonfinite_steps=3"))
    with torch.no_grad():
        trainer.model.lm_head.weight.fill_(float("nan"))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(TrainingError, match="max_nonfinite_steps"):
        trainer.fit()
    # every step skipped on the device; the run of 3 is read, and the run stopped, at the next log step
    assert trainer.step == 5 and trainer.skipped_steps == 5
    after = list(trainer.model.parameters())
    assert all(torch.equal(a, b) or torch.isnan(a).all() for a, b in zip(before, after))  # no update applied


def test_one_nonfinite_step_is_skipped_and_training_goes_on(tiny_cfg):
    trainer = Trainer(tiny_cfg("train.steps=4"))
    real_step = trainer.train_step

    def flaky(log):
        if trainer.step == 1:
            with torch.no_grad():
                saved = trainer.model.lm_head.weight.clone()
                trainer.model.lm_head.weight.fill_(float("inf"))
            r = real_step(log)
            with torch.no_grad():
                trainer.model.lm_head.weight.copy_(saved)
            return r
        return real_step(log)

    trainer.train_step = flaky
    result = trainer.fit()
    assert result["step"] == 4 and result["skipped_steps"] == 1
    assert math.isfinite(result["val_loss"])


def test_tokenizer_larger_than_vocab_is_a_config_error(tiny_cfg, tmp_path):
    from moe_dist.data import train_tokenizer

    tok = train_tokenizer(["hello world, hello moe " * 50], 300, tmp_path / "tok.json")
    with pytest.raises(ConfigError, match="model.vocab_size"):
        Trainer(tiny_cfg(f"data.tokenizer={tmp_path / 'tok.json'}", f"model.vocab_size={tok.vocab_size - 1}"))

