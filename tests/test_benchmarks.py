"""The benchmark scripts keep running: each at a toy size (timings are not looked at; the MoE layer
benchmark stops by itself if MoELayer and the transformers block disagree)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_dist.parallel import zero

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_moe_layer_benchmark_runs_and_matches_transformers():
    out = run("benchmarks/moe_layer.py", "--tokens", "256", "--hidden", "64", "--repeats", "1", "--warmup", "0")
    assert out.count("output and input grad match transformers") == 2  # both shapes
    assert out.count("faster than transformers") == 2


def test_ep_dispatch_benchmark_runs():
    out = run("benchmarks/ep_dispatch.py", "--world", "2", "--eps", "1", "2", "--tokens", "64", "--d-model", "32",
              "--d-expert", "64", "--iters", "1", "--warmup", "0")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith(("| dropless", "| capacity"))]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("dropless", "1"), ("dropless", "2"),
                                                          ("capacity 1.25", "1"), ("capacity 1.25", "2")]
    assert all(float(r[-2]) == 0 for r in rows if r[1].strip() == "1")  # ep=1 moves no tokens
    assert all(float(r[-2]) > 0 for r in rows if r[1].strip() == "2")
    assert "all-to-all bytes equal moe_dist.plan's on every rank and step" in out


def test_cpu_gemm_benchmark_runs():
    out = run("benchmarks/cpu_gemm.py", "--tokens", "256", "--hidden", "64", "--step-tokens", "256", "--seq", "32",
              "--rounds", "1", "--warmup", "0")
    assert out.startswith("SKIP") or out.count("| oneDNN |") == 3


def test_checkpoint_benchmark_runs():
    out = run("benchmarks/checkpoint.py", "--d-model", "32", "--layers", "1", "--experts", "4", "--d-expert", "32",
              "--vocab", "256")
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "operation" not in line]
    assert rows == ["dcp.save", "save, async (blocking)", "save, async (total)", "save, sync", "save + SHA256SUMS",
                    "dcp.load", "load (sizes + metadata)", "load after ckpt verify"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check is the GPU pass itself (minutes)")
def test_gpu_check_runs_on_cpu_and_writes_its_summary(tmp_path):
    """benchmarks/gpu_check.sh without CUDA: the CPU-capable steps run at a toy size, the rest skip with one
    message each; summary.json says so (the structure only: no timing is looked at)."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["cuda"] is False
    status = {name: st["status"] for name, st in s["steps"].items()}
    ds = "ok" if zero.deepspeed_available() else "fail"
    assert status == {"env": "ok", "train": "ok", "layer": "ok", "syncs": "skip", "zero-plain": "ok",
                      "zero-fsdp2": "ok", "zero-ds": ds, "tests": "skip"}, proc.stdout
    for name in ("env", "train", "layer", "syncs", "tests"):  # each CUDA part says once that it skipped, and why
        assert "SKIP (no CUDA): " in s["steps"][name]["line"], name
    assert proc.stdout.count("SKIP (no CUDA): ") == 5
    assert [t["met"] for t in s["targets"]] == [None, None, None]  # no GPU figures, no verdicts
    assert all(t["name"] and t["target"] for t in s["targets"])
    assert s["results"]["train"]["toy"] and len(s["results"]["train"]["losses"]) == 3
    assert s["results"]["layer"]["speedup_vs_hf_eager"] > 0  # the layer ran against transformers (and matched it)
    modes = ("fsdp2", "ds") if ds == "ok" else ("fsdp2",)
    for mode in modes:  # FSDP2 and DeepSpeed ZeRO-1 really ran at world 1, with the plain run's losses
        z = s["zero_vs_plain"][mode]
        assert z["ran"].startswith(("FSDP2", "DeepSpeed ZeRO-1")) and z["agree"], z
    md = (out / "summary.md").read_text()
    assert "| target | goal | measured | met |" in md and md.count("| not measured |") == 3


def test_sequence_parallel_benchmark_halves_the_all_to_all_payload():
    """At tp=2 x ep=2, each tp rank dispatching only its own half of the sequence: every step's all-to-all
    payload per rank is exactly half of plain tp's (dropless), for the same losses."""
    out = run("benchmarks/sequence_parallel.py", "--small")
    r = json.loads(out.split("json ", 1)[1])
    assert len(r["on"]["a2a_bytes"]) == 3 and all(b > 0 for b in r["off"]["a2a_bytes"])
    assert [2 * on for on in r["on"]["a2a_bytes"]] == r["off"]["a2a_bytes"]
    torch.testing.assert_close(torch.tensor(r["on"]["loss"]), torch.tensor(r["off"]["loss"]), rtol=1e-5, atol=1e-6)


def test_pipeline_bubble_benchmark_runs_against_the_formulas():
    """Each schedule at pp 2 reports its measured idle fraction beside (pp-1)/(m+pp-1) and (pp-1)/(vm+pp-1)."""
    out = run("benchmarks/pipeline_bubble.py", "--small", "--micro-batches", "2", "--steps", "3")
    rows = json.loads(out.split("json ", 1)[1])
    assert [(r["schedule"], r["v"], r["m"]) for r in rows] == [("1f1b", 1, 2), ("interleaved_1f1b", 2, 2)]
    assert [r["ideal"] for r in rows] == [1 / 3, 1 / 5]
    assert all(0 < r["measured"] < 1 and len(r["per_rank"]) == 2 for r in rows)
