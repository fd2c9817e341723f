"""The `moe-dist` command line: known problems are one clean message and exit status 2."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_dist.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.d_model=32", "model.n_layer=2", "model.n_head=2", "model.d_ff=64", "model.max_seq_len=32",
        "moe.n_experts=4", "moe.top_k=2", "train.micro_batch_size=8", "train.lr=1e-2", "train.warmup_steps=2",
        "train.device=cpu", "train.eval_batches=2", "logging.progress_bar=false", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return f"data.cache_dir={tmp_path_factory.mktemp('cache')}"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("override, field", [
    ("moe.top_k=9", "moe.top_k"),
    ("parallel.ep=3", "moe.n_experts=8 is not divisible by ep=3"),
    ("model.d_model=130", "model.d_model"),
    ("moe.capacity_factor=-1", "moe.capacity_factor"),
    ("model.dmodel=64", "model.dmodel"),
    ("data.dataset=/no/such/corpus.txt", "data.dataset"),
    ("model.vocab_size=100", "model.vocab_size"),
    ("train.lr=fast", "train.lr"),
    ("model.rope_scaling.type=yarn", "model.rope_scaling.original_max_seq_len"),
    ("model.rope_scaling.factor=4", "model.rope_scaling.factor"),
    ("model.rope_scaling.kind=yarn", "model.rope_scaling.kind"),
    # issue 20: non-finite or negative values
    ("moe.capacity_factor=nan", "moe.capacity_factor: nan is not a finite number"),
    ("moe.capacity_factor=inf", "moe.capacity_factor: inf is not a finite number"),
    ("moe.eval_capacity_factor=nan", "moe.eval_capacity_factor: nan is not a finite number"),
    ("model.init_std=-1", "model.init_std: must be positive, got -1.0"),
    ("model.norm_eps=-1", "model.norm_eps: must be positive, got -1.0"),
    ("train.lr=inf", "train.lr: inf is not a finite number; give a finite number (default 0.003)"),
])
def test_bad_config_is_a_clean_error(capsys, tmp_path, override, field):
    """One message naming the field, exit 2, before anything is written."""
    code, out, err = run_cli(capsys, "train", "--config", str(ROOT / "configs/tiny.yaml"),
                             f"logging.run_dir={tmp_path}/run", override)
    assert code == 2 and err.startswith("moe-dist: error:") and field in err
    assert "Traceback" not in err and not (tmp_path / "run").exists() and out == ""


def test_unknown_key_suggests_the_right_one(capsys):
    code, _, err = run_cli(capsys, "train", "model.dmodel=64")
    assert code == 2 and "did you mean 'd_model'" in err


def test_missing_config_file(capsys):
    code, _, err = run_cli(capsys, "train", "--config", "configs/nope.yaml")
    assert code == 2 and "configs/nope.yaml" in err


@pytest.mark.parametrize("name, content, expect", [
    ("empty.txt", b"", "empty file"),
    ("blob.bin", b"abc\x00\x01\x02" * 10, "binary data"),
    ("docs.jsonl", b'{"text": "fine"}\n{"text": broken\n', "docs.jsonl:2"),
])
def test_bad_data_is_a_one_line_error(capsys, tmp_path, cache, name, content, expect):
    path = tmp_path / name
    path.write_bytes(content)
    code, _, err = run_cli(capsys, "train", *TINY, cache, f"data.dataset={path}", f"logging.run_dir={tmp_path / 'run'}")
    assert code == 2
    assert expect in err and str(path) in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moe_dist.train", "--config", "configs/tiny.yaml", "moe.top_k=9",
                           f"logging.run_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert "moe.top_k" in proc.stderr and "Traceback" not in proc.stderr


def test_train_eval_generate(capsys, tmp_path, cache):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", *TINY, cache, "train.steps=30", f"logging.run_dir={run_dir}")
    assert code == 0, err
    assert "unigram entropy" in out and "final validation loss" in out
    assert (run_dir / "checkpoints" / "latest").is_file() and (run_dir / "metrics.jsonl").is_file()

    code, out, err = run_cli(capsys, "eval", "--run-dir", str(run_dir))
    assert code == 0, err
    loss = float(out.split("validation loss ")[1].split()[0])
    assert 0 < loss < 4.0

    code, out, err = run_cli(capsys, "generate", "--run-dir", str(run_dir), "--prompt", "The ", "--max-new-tokens", "40",
                             "--temperature", "0.8", "--top-k", "20")
    assert code == 0, err
    assert out.startswith("The ") and len(out.rstrip("\n")) > len("The ") + 10

    code, out2, _ = run_cli(capsys, "generate", "--run-dir", str(run_dir), "--prompt", "The ", "--max-new-tokens", "40",
                            "--temperature", "0.8", "--top-k", "20")
    assert out2 == out  # seeded


def test_generate_without_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--run-dir", str(tmp_path), "--prompt", "x")
    assert code == 2 and "no checkpoint found" in err


def test_tokenize_then_train_with_it(capsys, tmp_path, cache):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def moe(x):\n    return route(x) + shared(x)\n" * 400)
    tok = tmp_path / "tok.json"
    code, out, err = run_cli(capsys, "tokenize", "--vocab-size", "300", "--out", str(tok), f"data.dataset={corpus}")
    assert code == 0, err
    assert tok.is_file()
    code, out, err = run_cli(capsys, "train", *TINY, cache, f"data.dataset={corpus}", f"data.tokenizer={tok}",
                             "model.vocab_size=300", "train.steps=3", f"logging.run_dir={tmp_path / 'run'}")
    assert code == 0, err


def test_expert_tp_with_ep_is_refused_before_launch():
    from moe_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="parallel.expert_tp"):
        load_config(None, ["parallel.tp=2", "parallel.ep=2", "parallel.expert_tp=true"], world_size=4)
    load_config(None, ["parallel.tp=2", "parallel.ep=1", "parallel.expert_tp=true"], world_size=4)  # fine


@pytest.mark.parametrize("field", ["moe.grouped_mm", "model.cpu_gemm"])
def test_onednn_on_cuda_or_bf16_is_refused(field):
    from moe_dist.config import ConfigError, load_config

    for bad in (["train.device=cuda"], ["train.dtype=bf16"]):
        with pytest.raises(ConfigError, match=f"{field}: onednn runs fp32 on a CPU"):
            load_config(None, [f"{field}=onednn", *bad])
    with pytest.raises(ConfigError, match=field):
        load_config(None, [f"{field}=fast"])


@pytest.mark.parametrize("overrides, field", [
    (["model.n_kv_head=1"], "model.n_kv_head=1 is not divisible by tp=2"),
    (["model.vocab_size=257"], "model.vocab_size=257 is not divisible by tp=2"),
    (["model.moe_every=0", "model.d_ff=1025"], r"model.d_ff=1025 \(the dense FFNs' width\) is not divisible by tp=2"),
    (["moe.n_shared_experts=1", "moe.d_shared_expert=33"], r"shared experts' width 33 \(moe.n_shared_experts x "
                                                            "moe.d_shared_expert\) is not divisible by tp=2"),
    (["parallel.expert_tp=true", "moe.d_expert=33"], r"parallel.expert_tp: the experts' width 33 \(moe.d_expert\) is not "
                                                      "divisible by tp=2"),
    (["model.attention=mla", "model.n_head=3", "model.head_dim=32"], "model.n_head=3 is not divisible by tp=2"),
    (["data.seq_len=33", "model.max_seq_len=64"], r"the sequence length 33 \(data.seq_len\) is not divisible by tp=2"),
])
def test_tensor_parallel_splits_are_checked_at_config_time(overrides, field):
    """What the tensor-parallel modules would refuse while building is refused before any process starts."""
    from moe_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=field):
        load_config(None, ["parallel.tp=2", *overrides], world_size=2)
    load_config(None, ["parallel.tp=2"], world_size=2)  # the defaults split evenly
    load_config(None, ["parallel.tp=2", "model.attention=mla"], world_size=2)  # MLA splits by heads
    load_config(None, ["parallel.tp=2", "train.zero_stage=3"], world_size=4)  # FSDP2 over dp on a 2-D mesh


# -- issue 20: every bad input is one message naming the field or file, exit 2 ----------------------


def test_a_run_dir_that_is_a_file_or_read_only(capsys, tmp_path, monkeypatch):
    afile = tmp_path / "taken"
    afile.write_text("not a directory")
    code, _, err = run_cli(capsys, "train", *TINY, f"logging.run_dir={afile}")
    assert code == 2 and f"logging.run_dir: '{afile}' is a file, not a directory" in err
    code, _, err = run_cli(capsys, "train", *TINY, f"logging.run_dir={afile}/run")
    assert code == 2 and f"cannot be created: {afile} is a file" in err
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access
    # a read-only filesystem answers access(W_OK) with EROFS, even to root (who ignores chmod, as in CI)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == readonly else real_access(p, mode, **kw))
    code, _, err = run_cli(capsys, "train", *TINY, f"logging.run_dir={readonly}/run")
    assert code == 2 and f"logging.run_dir: '{readonly}/run' is not writable" in err and "read-only filesystem" in err
    assert "Traceback" not in err and err.count("\n") == 2  # the heading line and the one problem


def test_a_full_disk_names_the_run_dir_and_the_free_space_and_keeps_the_last_checkpoint(capsys, tmp_path, cache,
                                                                                       monkeypatch):
    """The write of step 4's shards fails as on a full disk (ENOSPC in DCP's writing thread)."""
    import errno

    from torch.distributed.checkpoint import FileSystemWriter

    from moe_dist.checkpoint.manager import check

    write_data = FileSystemWriter.write_data

    def full_disk(self, plan, planner):
        if Path(self.path).name == ".tmp-step_00000004":
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(self.path) / "__0_0.distcp"))
        return write_data(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, cache, "train.steps=6", "checkpoint.every=2", "train.eval_every=0",
                           f"logging.run_dir={run_dir}")
    assert code == 2, err
    assert f"moe-dist: error: {run_dir}/checkpoints: could not write checkpoint step_00000004" in err
    assert "No space left on device" in err and "GiB free there" in err
    assert "the previous checkpoint step_00000002 is intact" in err and "Traceback" not in err
    ckdir = run_dir / "checkpoints"
    assert (ckdir / "latest").read_text().strip() == "step_00000002" and check(ckdir / "step_00000002") is None
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_00000002"]


def test_eval_and_generate_refuse_bad_numbers(capsys, tmp_path):
    for batches in ("-1", "0"):
        code, _, err = run_cli(capsys, "eval", "--run-dir", str(tmp_path), "--batches", batches)
        assert code == 2 and f"--batches: {batches} must be >= 1" in err
    for temperature in ("nan", "inf", "-1"):
        code, _, err = run_cli(capsys, "generate", "--run-dir", str(tmp_path), "--temperature", temperature)
        assert code == 2 and "--temperature:" in err and "must be a finite number >= 0" in err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small Mixtral checkpoint directory, written by moe_dist's own export."""
    from moe_dist.config import load_config, resolve
    from moe_dist.interop.hf import export_hf
    from moe_dist.model import build_model

    out = tmp_path_factory.mktemp("hf") / "mixtral"
    export_hf(build_model(resolve(load_config(None, TINY[:6] + ["model.vocab_size=256", "moe.norm_topk_prob=true"]), 1)),
              out, "mixtral")
    return out


@pytest.mark.parametrize("damage, expect", [
    ("config_malformed", "config.json: not valid JSON"),
    ("config_incomplete", "config.json: no 'num_hidden_layers' (the file is incomplete)"),
    ("weights_truncated", "model.safetensors: not a readable safetensors file"),
])
def test_import_hf_on_a_damaged_directory_names_the_file(capsys, tmp_path, hf_dir, damage, expect):
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    config = broken / "config.json"
    if damage == "config_malformed":
        config.write_text(config.read_text()[:-20])
    elif damage == "config_incomplete":
        cfg = json.loads(config.read_text())
        del cfg["num_hidden_layers"]
        config.write_text(json.dumps(cfg))
    else:
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "ok"), "--tokenizer", "byte"]) == 0  # undamaged: fine
    capsys.readouterr()
    code, _, err = run_cli(capsys, "import-hf", str(broken), "--out", str(tmp_path / "out"), "--tokenizer", "byte")
    assert code == 2 and err.startswith("moe-dist: error:") and expect in err and str(broken) in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_ckpt_verify_without_checkpoints(capsys, tmp_path):
    code, _, err = run_cli(capsys, "ckpt", "verify", str(tmp_path))
    assert code == 2 and "no checkpoints" in err


@pytest.mark.parametrize("overrides, field", [
    (["parallel.tp=2", "model.n_kv_head=1"], "model.n_kv_head=1 is not divisible by tp=2"),
    (["parallel.tp=2", "model.vocab_size=257"], "model.vocab_size=257 is not divisible by tp=2"),
    (["parallel.tp=2", "parallel.expert_tp=true", "moe.d_expert=33"], "parallel.expert_tp: the experts' width 33"),
    (["moe.routing_groups=5"], "moe.routing_groups: 5 does not divide the 96 tokens of a micro-batch"),
    (["moe.capacity_factor=.nan"], "moe.capacity_factor: nan is not a finite number"),
])
def test_layout_errors_stop_a_job_before_it_starts(capsys, monkeypatch, tmp_path, overrides, field):
    """As rank 0 of a torchrun job of 2: one message naming the field, exit 2, before any process group."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = run_cli(capsys, "train", *TINY, "train.micro_batch_size=3", f"logging.run_dir={tmp_path}", *overrides)
    assert code == 2 and field in err and "Traceback" not in err
    assert err.count("moe-dist: error:") == 1 and not (tmp_path / "checkpoints").exists()
    monkeypatch.setenv("RANK", "1")  # the other ranks find the same problem and leave quietly
    code, _, err = run_cli(capsys, "train", *TINY, "train.micro_batch_size=3", f"logging.run_dir={tmp_path}", *overrides)
    assert code == 2 and err == ""


@pytest.mark.parametrize("overrides,layout,held", [
    ([], "resolved: world 64 = dp 64 x tp 1; ep 8 (edp 8)", "7.243B"),
    # rank 0 holds the first 8 of 32 layers and the embedding, whole (ZeRO-1 partitions the optimizer state only)
    (["parallel.pp=4", "train.grad_accum_steps=16"], "resolved: world 64 = pp 4 x dp 16 x tp 1; ep 8 (edp 2)", "1.876B"),
])
def test_dry_run_of_a_64_gpu_mixtral_allocates_nothing(tmp_path, overrides, layout, held):
    """Resolved and built on the meta device as 64 ranks would (a fake process group of 64, rank 0's view):
    exit 0, the layout and per-rank figures printed, the 46.7B model never allocated (peak under 3 GiB)."""
    argv = ["train", "--config", "configs/mixtral_8x7b.yaml", "--dry-run", "--world-size", "64", f"logging.run_dir={tmp_path}",
            *overrides]
    script = ("import resource, sys; from moe_dist.cli import main; code = main(sys.argv[1:]); "
              "print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert layout in proc.stdout
    assert f"46.70B in all, 12.88B active per token, {held} held by rank 0 (built on the meta device" in proc.stdout
    assert "fits 80 GB" in proc.stdout
    assert ("pipeline: 1f1b, 1 stage(s) per rank, layers per stage [8, 8, 8, 8], 16 micro-batches, bubble 15.8%"
            in proc.stdout) == bool(overrides)  # (pp - 1) / (m + pp - 1) = 3 / 19
    peak_kib = int(proc.stdout.split("peak_kib")[1])
    assert peak_kib < 3 * 2 ** 20
    assert not (tmp_path / "checkpoints").exists()


def test_a_full_disk_elsewhere_is_one_message_too(capsys, tmp_path, cache, monkeypatch):
    """ENOSPC from any write (here metrics.jsonl's) is one message with the file and the free space."""
    import errno

    from moe_dist.train import metrics

    log = tmp_path / "run" / "metrics.jsonl"

    def full(self, step, kind, values):
        raise OSError(errno.ENOSPC, "No space left on device", str(log))

    monkeypatch.setattr(metrics.Metrics, "log", full)
    code, _, err = run_cli(capsys, "train", *TINY, cache, "train.steps=2", f"logging.run_dir={tmp_path / 'run'}")
    assert code == 2 and f"moe-dist: error: {log}: No space left on device (" in err and "GiB free there" in err
    assert "Traceback" not in err
