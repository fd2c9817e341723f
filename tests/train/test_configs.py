from pathlib import Path

import torch

from moe_dist.config import load_config
from moe_dist.model import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def n_params(cfg) -> int:
    with torch.device("meta"):  # no memory: Mixtral has 46.7B parameters
        return sum(p.numel() for p in build_model(cfg).parameters())


def test_tiny_has_the_size_the_readme_says():
    README = (CONFIGS.parent / "README.md").read_text()
    assert "tiny MoE model (3.5M parameters, 8 experts, top-2)" in README
    cfg = load_config(str(CONFIGS / "tiny.yaml"))
    assert (cfg.moe.n_experts, cfg.moe.top_k) == (8, 2)
    assert round(n_params(cfg) / 1e6, 1) == 3.5


def test_mixtral_has_the_published_size():
    cfg = load_config(str(CONFIGS / "mixtral_8x7b.yaml"), world_size=8)
    m, e = cfg.model, cfg.moe
    assert (m.d_model, m.n_layer, m.n_head, m.n_kv_head, m.vocab_size, m.theta) == (4096, 32, 32, 8, 32000, 1e6)
    assert (e.n_experts, e.top_k, e.d_expert) == (8, 2, 14336)
    assert abs(n_params(cfg) / 1e9 - 46.7) < 0.05


def test_deepseek_v2_lite_layout():
    cfg = load_config(str(CONFIGS / "deepseek_v2_lite.yaml"), world_size=8)
    m, e = cfg.model, cfg.moe
    assert (m.d_model, m.n_layer, m.n_head, m.d_ff, m.vocab_size) == (2048, 27, 16, 10944, 102400)
    assert m.moe_layers() == list(range(1, 27))
    assert (e.n_experts, e.top_k, e.d_expert, e.n_shared_experts) == (64, 6, 1408, 2)
    assert m.attention == "mla" and m.kv_lora_rank == 512
    assert abs(n_params(cfg) / 1e9 - 15.7) < 0.02  # the published 15.7B
