"""resolve: every derived value filled once; layout-derived model values kept on resume; what a
resume may change."""
import dataclasses

import pytest

from moe_dist.config import (Config, ConfigError, config_changes, describe, load_config, read_yaml, resolve,
                             validate_layout)

GROUPED = ["moe.n_experts=8", "moe.n_groups=ep", "moe.topk_groups=1", "moe.device_loss_weight=0.1",
           "moe.comm_loss_weight=0.1", "parallel.ep=2"]


def test_every_derived_value_is_filled():
    cfg = resolve(load_config(None, [*GROUPED, "model.d_ff=96", "train.device=auto"]), 4, cuda_available=False)
    assert (cfg.parallel.dp, cfg.parallel.backend, cfg.train.device, cfg.train.dtype) == (4, "gloo", "cpu", "fp32")
    assert (cfg.moe.d_expert, cfg.moe.n_devices, cfg.moe.n_groups, cfg.moe.comm_max_devices) == (96, 2, 2, 1)
    assert cfg.data.seq_len == cfg.model.max_seq_len
    assert resolve(cfg, 4, cuda_available=False) == cfg  # resolving a resolved config changes nothing
    assert describe(cfg, 4).startswith("resolved: world 4 = dp 4 x tp 1; ep 2 (edp 2); d_expert 96, n_groups 2")
    gpu = resolve(load_config(None, ["train.device=auto"]), 1, cuda_available=True)
    assert (gpu.train.device, gpu.train.dtype, gpu.parallel.backend) == ("cuda", "bf16", "nccl")


def test_groups_asked_for_as_ep_are_fixed_once_and_kept_at_another_ep():
    first = resolve(load_config(None, GROUPED), 2)
    assert (first.moe.n_groups, first.moe.n_devices) == (2, 2)
    raw_at_ep1 = load_config(None, [*GROUPED, "parallel.ep=1", "train.micro_batch_size=16", "moe.routing_groups=2"])
    assert resolve(raw_at_ep1, 1).moe.n_groups == 1  # a fresh run at ep=1 is its own model
    again = resolve(raw_at_ep1, 1, saved=first)  # a resume keeps the saved model
    assert (again.moe.n_groups, again.moe.n_devices, again.moe.comm_max_devices) == (2, 2, 1)
    assert config_changes(first, 2, again, 1) == ([], [])


def test_groups_without_a_count_are_refused():
    with pytest.raises(ConfigError, match="moe.topk_groups: 2 groups kept, but moe.n_groups is 0"):
        load_config(None, ["moe.topk_groups=2"])
    with pytest.raises(ConfigError, match="moe.n_groups: 'four' is neither a number nor ep"):
        load_config(None, ["moe.n_groups=four", "moe.topk_groups=1"])
    with pytest.raises(ConfigError, match="moe.topk_groups: 3 must be between 1 and moe.n_groups=2"):
        validate_layout(load_config(None, ["moe.n_groups=ep", "moe.topk_groups=3", "parallel.ep=2"]), 2)


@pytest.mark.parametrize("override", ["model.n_head=8", "moe.top_k=1", "moe.score_func=sigmoid", "train.seed=7",
                                      "data.val_fraction=0.1", "moe.capacity_factor=1.0"])
def test_a_change_of_the_model_or_data_is_refused(override):
    base = resolve(load_config(None, ["model.n_head=4"]), 1)
    new = resolve(load_config(None, ["model.n_head=4", override]), 1)
    refused, schedule = config_changes(base, 1, new, 1)
    assert [k for k, *_ in refused] == [override.split("=")[0]] and schedule == []


@pytest.mark.parametrize("override, field", [("train.steps=400", "train.steps"), ("train.lr=1e-3", "train.lr"),
                                             ("train.grad_accum_steps=2", "global batch (sequences per step)")])
def test_a_schedule_change_is_told_apart(override, field):
    refused, schedule = config_changes(resolve(load_config(None, []), 1), 1, resolve(load_config(None, [override]), 1), 1)
    assert refused == [] and [k for k, *_ in schedule] == [field]


def test_a_layout_change_that_keeps_the_batches_changes_nothing():
    """dp 2 x micro-batch 4 (one routing group each) is the same training as one process with micro-batch 8
    in two routing groups."""
    two = resolve(load_config(None, ["parallel.ep=2", "train.micro_batch_size=4", "train.zero_stage=1"]), 2)
    one = resolve(load_config(None, ["train.micro_batch_size=8", "moe.routing_groups=2", "moe.n_devices=2"]), 1)
    assert config_changes(two, 2, one, 1) == ([], [])


def test_duplicate_keys_and_empty_files_are_refused(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  d_model: 64\ntrain:\n  steps: 5\nmodel:\n  n_layer: 2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml:5: 'model' is given twice in the same section \(first on line 1\)"):
        load_config(str(twice))
    inner = tmp_path / "inner.yaml"
    inner.write_text("train:\n  steps: 5\n  lr: 0.1\n  steps: 6\n")
    with pytest.raises(ConfigError, match="inner.yaml:4: 'steps' is given twice"):
        read_yaml(str(inner))
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="empty.yaml: the file is empty"):
        load_config(str(empty))


def test_non_finite_and_negative_values_are_refused():
    for override, field in [("moe.capacity_factor=.nan", "moe.capacity_factor"), ("moe.capacity_factor=.inf", "moe.capacity_factor"),
                            ("moe.eval_capacity_factor=.nan", "moe.eval_capacity_factor"), ("model.init_std=-1", "model.init_std"),
                            ("model.norm_eps=-1", "model.norm_eps"), ("train.lr=.inf", "train.lr")]:
        with pytest.raises(ConfigError, match=field):
            load_config(None, [override])


def test_the_model_refuses_an_unresolved_group_count():
    from moe_dist.model import build_model

    with pytest.raises(ConfigError, match="moe.n_groups: 'ep'"):
        build_model(load_config(None, GROUPED))
    assert dataclasses.is_dataclass(build_model(resolve(load_config(None, GROUPED), 2)).moe_config)
