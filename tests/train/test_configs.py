from pathlib import Path

import pytest
import torch

from moe_dist.config import load_config
from moe_dist.train.trainer import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def n_params(cfg) -> int:
    with torch.device("meta"):  # no memory: Mixtral has 46.7B parameters
        return sum(p.numel() for p in build_model(cfg).parameters())


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_single_process_configs_load(name):
    cfg = load_config(str(CONFIGS / f"{name}.yaml"))
    assert cfg.data.dataset == "builtin:pydoc" and cfg.data.tokenizer == "byte"


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
    assert abs(n_params(cfg) / 1e9 - 15.79) < 0.05  # MHA in place of MLA
