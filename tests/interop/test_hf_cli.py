"""`moe-dist import-hf` -> training at a parallel layout -> `moe-dist export-hf` -> transformers reloads it;
the commands on imported and exported model directories, and their refusals."""
import json
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
from moe_dist.interop.hf import checkpoint_dtype, load_weights  # noqa: E402
from moe_dist.model import build_model  # noqa: E402

from test_hf import DEEPSEEK, IDS, MIXTRAL, QWEN, VOCAB, build_hf, hf_logits, our_logits  # noqa: E402

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
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "start"), "--max-seq-len", "16", "--tokenizer", "byte"]) == 0
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
    # the checkpoint started from the imported model: its dtype and special ids carry through
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    source = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert [exported[k] for k in ("bos_token_id", "eos_token_id")] == [source[k] for k in ("bos_token_id", "eos_token_id")]
    assert exported["dtype"] == "float32" == source["dtype"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    trained = start_model(load_config(str(config), [f"checkpoint.init_from={tmp_path}/out", f"data.cache_dir={tmp_path}/c"]))
    torch.testing.assert_close(our_logits(trained, IDS), hf_logits(back, IDS), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(hf_logits(back, IDS), hf_logits(hf, IDS), atol=1e-4)  # training changed it


def small_tokenizer(path: Path, vocab: int) -> Path:
    """A word-level tokenizer.json with `vocab` ids (end-of-text first): the tokenizer of a checkpoint with vocab < 256."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>", "[UNK]"] + [f"w{i}" for i in range(vocab - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_import_without_tokenizer_is_refused_with_the_fix(capsys, tmp_path):
    build_hf("mixtral", MIXTRAL).save_pretrained(tmp_path / "hf")  # vocab 96, no tokenizer.json
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "start")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "--tokenizer" in err and "96" in err and "Traceback" not in err
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "start"), "--tokenizer", "byte"]) == 2
    assert "256" in capsys.readouterr().err
    assert not (tmp_path / "start").exists()  # refused before writing anything


def test_model_dirs_import_generate_eval_export_keep_dtype_and_tokens(capsys, tmp_path, monkeypatch):
    """A bf16 checkpoint with vocab < 256 and its tokenizer: import-hf, then eval / generate / export-hf on the
    imported directory and on the exported one, from another working directory."""
    hf = build_hf("qwen3_moe", dict(QWEN, bos_token_id=3, eos_token_id=0, pad_token_id=1)).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    small_tokenizer(tmp_path / "hf" / "tokenizer.json", VOCAB)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{i % 90}" for i in range(4000)))
    monkeypatch.chdir(tmp_path)
    assert main(["import-hf", "hf", "--out", "start", "--max-seq-len", "32"]) == 0
    start = tmp_path / "start"
    assert checkpoint_dtype(start / "model.safetensors") == torch.bfloat16  # the source's dtype by default
    cfg = load_config(str(start / "config.yaml"))
    assert all(Path(p).is_absolute() for p in (cfg.checkpoint.init_from, cfg.logging.run_dir, cfg.data.tokenizer))
    assert (cfg.train.lr, cfg.train.warmup_steps) == (2e-5, 10)  # fine-tuning, not from-scratch, settings
    monkeypatch.chdir(tmp_path / "hf")  # the paths work from anywhere
    data = [f"data.dataset={corpus}", f"data.cache_dir={tmp_path}/cache", "train.eval_batches=1", "train.micro_batch_size=2"]
    for model_dir in (start, tmp_path / "hf"):
        capsys.readouterr()
        assert main(["eval", "--run-dir", str(model_dir), "--batches", "1", *data]) == 0, capsys.readouterr().err
        assert "validation loss" in capsys.readouterr().out
        assert main(["generate", "--run-dir", str(model_dir), "--prompt", "w1 w2", "--max-new-tokens", "3", "--temperature", "0"]) == 0
        assert capsys.readouterr().out.startswith("w1 w2")
    assert main(["export-hf", str(start), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"], config["dtype"]) == (3, 0, 1, "bfloat16")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0
    assert checkpoint_dtype(out) == torch.bfloat16
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).encode("w5 w7") == [7, 9]
    back, source = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (out, tmp_path / "hf"))
    torch.testing.assert_close(hf_logits(back, IDS), hf_logits(source, IDS), atol=1e-4, rtol=1e-4)
    assert main(["export-hf", str(out), str(tmp_path / "again"), "--dtype", "float32"]) == 0  # an exported dir exports too
    assert checkpoint_dtype(tmp_path / "again") == torch.float32
