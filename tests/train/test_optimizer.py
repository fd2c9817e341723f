import pytest
import torch

from moe_dist import MoETransformerLM
from moe_dist.config import TrainConfig
from moe_dist.train.optimizer import build_optimizer, param_groups


def test_groups_split_decay_and_experts():
    model = MoETransformerLM(d_model=32, n_head=2, n_layer=2, vocab_size=64, max_seq_len=16, d_ff=64,
                             n_experts=4, top_k=2, n_shared_experts=1)
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    assert set(groups) == {"dense_decay", "dense_no_decay", "expert_decay"}
    names = {k: set(g["param_names"]) for k, g in groups.items()}
    assert "embed_tokens.weight" in names["dense_no_decay"]
    assert "norm.weight" in names["dense_no_decay"] and "layers.0.attn_norm.weight" in names["dense_no_decay"]
    assert "layers.0.ffn.experts.gate_up_proj" in names["expert_decay"]
    assert "layers.0.ffn.shared_experts.down_proj.weight" in names["dense_decay"]
    assert "layers.0.ffn.router.weight" in names["dense_decay"]
    assert groups["dense_no_decay"]["weight_decay"] == 0.0 and groups["expert_decay"]["weight_decay"] == 0.1
    n_grouped = sum(len(g["params"]) for g in groups.values())
    assert n_grouped == len(list(model.parameters()))


def test_build_optimizer_cpu():
    model = MoETransformerLM(d_model=32, n_head=2, n_layer=1, vocab_size=64, max_seq_len=16, d_ff=64, n_experts=4, top_k=1)
    opt = build_optimizer(model, TrainConfig(lr=1e-3), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults.get("fused")  # no DTensor parameter: fused, so a non-finite step is skipped on the device


def test_apex_without_cuda_warns_and_uses_torch_adamw():
    model = MoETransformerLM(d_model=32, n_head=2, n_layer=1, vocab_size=64, max_seq_len=16, d_ff=64, n_experts=4, top_k=1)
    with pytest.warns(UserWarning, match="train.apex"):
        opt = build_optimizer(model, TrainConfig(lr=1e-3, apex=True), torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
