import pytest

from moe_dist.config import load_config

# A model small enough that a 40-step run takes seconds on a laptop CPU.
TINY = ["model.vocab_size=256", "model.d_model=32", "model.n_layer=2", "model.n_head=2", "model.d_ff=64",
        "model.max_seq_len=32", "moe.n_experts=4", "moe.top_k=2", "train.micro_batch_size=8",
        "train.lr=1e-2", "train.min_lr=1e-3", "train.warmup_steps=5", "train.device=cpu", "train.eval_every=0",
        "train.eval_batches=4", "train.log_every=5", "logging.progress_bar=false", "logging.tensorboard=false"]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))  # builtin:pydoc is tokenized once per session


@pytest.fixture
def tiny_cfg(tmp_path, data_cache):
    def make(*overrides: str):
        return load_config(None, TINY + [f"data.cache_dir={data_cache}", f"logging.run_dir={tmp_path / 'run'}",
                                         *overrides])
    return make
