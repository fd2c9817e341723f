"""fp32 CPU GEMMs: oneDNN against torch.mm (MKL), for the MoE layer and for a whole training step.

`model.cpu_gemm` (dense linears) and `moe.grouped_mm` (experts) pick the GEMM of fp32 CPU runs;
their `auto` follows this benchmark's table (benchmarks/RESULTS.md): oneDNN where the CPU has
AVX-512, torch.mm elsewhere. Each round runs every contender once, in rotated order, on fresh
tokens, so load from other processes hits all alike; we report the median and the best round.

    python benchmarks/cpu_gemm.py                       # this CPU's kernels
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/cpu_gemm.py                   # as a CPU without AVX-512 runs
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_dist.config import ModelConfig, MoEConfig  # noqa: E402
from moe_dist.model import MoETransformerLM  # noqa: E402
from moe_dist.model.gemm import onednn_available  # noqa: E402
from moe_dist.model.moe import MoEStats  # noqa: E402
from moe_dist.model.moe.layer import MoELayer  # noqa: E402
from moe_dist.train.host_memory import cache_large_allocations  # noqa: E402

PATHS = {"oneDNN": ("onednn", "onednn"), "torch.mm": ("torch", "loop")}  # (model.cpu_gemm, moe.grouped_mm)
LAYERS = {"Mixtral layer (8 x 512, top-2)": (8, 512, 2), "DeepSeek layer (64 x 128, top-8)": (64, 128, 8)}


def interleaved(runs: dict, new_batch, rounds: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        new_batch()
        for run in runs.values():
            run()
    times = {n: [] for n in runs}
    names = list(runs)
    for r in range(rounds):
        new_batch()
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            t0 = time.perf_counter()
            runs[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def layer_runs(tokens: int, hidden: int, shape: tuple[int, int, int]):
    E, F_, k = shape
    layers = {}
    for name, (_, impl) in PATHS.items():
        torch.manual_seed(0)
        layers[name] = MoELayer(hidden, MoEConfig(n_experts=E, top_k=k, norm_topk_prob=True, aux_loss_weight=0.0,
                                                  grouped_mm=impl), d_expert=F_).train()
    batch = {}

    def new_batch():
        batch["x"], batch["g"] = torch.randn(tokens, hidden), torch.randn(tokens, hidden)

    def run(layer):
        def go():
            x = batch["x"].detach().requires_grad_(True)
            layer(x).backward(batch["g"])
        return go
    return {n: run(layer) for n, layer in layers.items()}, new_batch


def step_runs(tokens: int, d_model: int, seq: int):
    models, opts = {}, {}
    for name, (gemm, impl) in PATHS.items():
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=256, d_model=d_model, n_layer=4, n_head=4, d_ff=2 * d_model, max_seq_len=seq,
                          cpu_gemm=gemm)
        models[name] = MoETransformerLM(cfg, MoEConfig(n_experts=8, top_k=2, grouped_mm=impl)).train()
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    batch = {}

    def new_batch():
        batch["ids"] = torch.randint(0, 256, (tokens // seq, seq + 1))

    def run(name):
        def go():
            ids = batch["ids"]
            m = models[name]
            moe = MoEStats()
            logits = m(ids[:, :-1], moe=moe)
            (F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + moe.pop_aux_loss()).backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
        return go
    return {n: run(n) for n in models}, new_batch


def report(title: str, times: dict[str, list[float]], unit_scale: float, unit: str) -> None:
    med = {n: statistics.median(t) for n, t in times.items()}
    base = med["torch.mm"]
    print(f"\n{title}")
    print(f"| path | median {unit} | best {unit} | median vs torch.mm |\n|---|---|---|---|")
    for n, t in times.items():
        print(f"| {n} | {unit_scale(med[n]):.0f} | {unit_scale(min(t)):.0f} | {base / med[n]:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per MoE-layer call")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--step-tokens", type=int, default=2048, help="tokens per training step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not onednn_available():
        print("SKIP: this torch has no oneDNN")
        return
    torch.set_num_threads(args.threads)
    cache_large_allocations()  # as the trainer does on CPU
    forced = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
              if k in os.environ}
    print(f"CPU: ATen capability {torch.backends.cpu.get_cpu_capability()}, forced {forced or 'nothing'}; "
          f"torch {torch.__version__}, {args.threads} threads, fp32; {args.rounds} interleaved rounds")
    for title, shape in LAYERS.items():
        runs, new_batch = layer_runs(args.tokens, args.hidden, shape)
        report(f"{title}, {args.tokens} tokens, hidden {args.hidden}, forward+backward",
               interleaved(runs, new_batch, args.rounds, args.warmup), lambda s: 1e3 * s, "ms")
    runs, new_batch = step_runs(args.step_tokens, args.hidden, args.seq)
    report(f"training step: 4 layers, d_model {args.hidden}, 8 experts top-2, {args.step_tokens} tokens (AdamW)",
           interleaved(runs, new_batch, args.rounds, args.warmup), lambda s: args.step_tokens / s, "tokens/s")


if __name__ == "__main__":
    main()
