"""`moe-dist import-hf` -> training at a parallel layout -> `moe-dist export-hf` -> transformers reloads it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from moe_dist.cli import main  # noqa: E402
from moe_dist.config import load_config, resolve  # noqa: E402
from moe_dist.interop.hf import load_weights  # noqa: E402
from moe_dist.model import build_model  # noqa: E402

from test_hf import DEEPSEEK, IDS, MIXTRAL, build_hf, hf_logits, our_logits  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHORT = ["train.steps=2", "train.micro_batch_size=2", "model.max_seq_len=16", "train.eval_every=0",
         "train.eval_batches=1", "logging.progress_bar=false", "logging.tensorboard=false", "model.vocab_size=256"]


def start_model(cfg):
    """The model a training run starts from: the config's, with checkpoint.init_from's weights."""
    model = build_model(resolve(cfg, 1))
    load_weights(model, cfg.checkpoint.init_from)
    return model


@pytest.mark.parametrize("model_type,kwargs", [("mixtral", dict(MIXTRAL, vocab_size=256)),
                                               ("deepseek_v3", dict(DEEPSEEK, vocab_size=256, n_group=4, topk_group=2))])
def test_import_train_at_ep2_export(tmp_path, model_type, kwargs):
    hf = build_hf(model_type, kwargs)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "start"), "--max-seq-len", "16"]) == 0
    config = tmp_path / "start" / "config.yaml"
    # the start point carries the checkpoint's weights exactly
    cfg = load_config(str(config), [f"data.cache_dir={tmp_path}/cache"])
    torch.testing.assert_close(our_logits(start_model(cfg), IDS), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)
    # it trains with the experts split over two processes (the byte tokenizer fits its 256 vocab)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "moe_dist.train", "--config", str(config), "parallel.ep=2", *SHORT,
                          f"data.cache_dir={tmp_path}/cache", f"logging.run_dir={tmp_path}/run"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    trained = start_model(load_config(str(config), [f"checkpoint.init_from={tmp_path}/out", f"data.cache_dir={tmp_path}/c"]))
    torch.testing.assert_close(our_logits(trained, IDS), hf_logits(back, IDS), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(hf_logits(back, IDS), hf_logits(hf, IDS), atol=1e-4)  # training changed it
