"""tests/gpu: tests that need a CUDA device. Without one every test here is skipped (one reason, below);
benchmarks/gpu_check.sh runs them first on a lent GPU.

The convention: a test that needs CUDA lives in this folder, and nowhere else; tests elsewhere run on CPU.
"""
import pytest
import torch

from moe_dist.config import load_config

NO_CUDA = "no CUDA device: tests/gpu runs on a GPU (bash benchmarks/gpu_check.sh OUT_DIR)"


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)


# A small MoE model on the GPU: 8 experts top-2, grouped-query attention, 4 of its layers MoE.
SMALL = ["model.vocab_size=512", "model.d_model=256", "model.n_layer=4", "model.n_head=8", "model.n_kv_head=2",
         "model.d_ff=512", "model.max_seq_len=128", "moe.n_experts=8", "moe.top_k=2", "moe.norm_topk_prob=true",
         "train.micro_batch_size=8", "train.lr=3e-3", "train.warmup_steps=2", "train.steps=6", "train.device=cuda",
         "train.eval_every=0", "train.eval_batches=1", "train.log_every=1", "logging.progress_bar=false",
         "logging.tensorboard=false", "checkpoint.resume=false"]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture
def small_cfg(tmp_path, data_cache):
    def make(*overrides: str, run: str = "run"):
        return load_config(None, SMALL + [f"data.cache_dir={data_cache}", f"logging.run_dir={tmp_path / run}",
                                          *overrides])
    return make
