"""Forward+backward time of moe_dist's MoELayer against its peers, all in one run.

Contenders, each loaded with the same weights and fed the same input and output gradient:
  moe_dist      MoELayer (router -> LocalDispatcher -> GroupedExperts -> combine), dropless top-k
  transformers  MixtralSparseMoeBlock built standalone from a MixtralConfig (5.x stacked experts)
  naive loop    MoELayer with tests/model/naive.py's naive_experts (autograd through per-expert slices)
  dense floor   the expert matmuls for T*k rows as one dense SwiGLU: x[T*k,H] @ [H,2F], silu*mul,
                @ [F,H] -- the same FLOPs with no routing, gather or scatter
  matmuls alone the same two matmuls forward+backward with nothing between them: the physical floor
  expert GEMMs  (CUDA) our experts' two torch._grouped_mm calls forward+backward alone, on the round's
                expert row counts from our router: the GEMMs to hold against `matmuls alone`

Before timing, MoELayer's output (and input gradient) must match the transformers block to 1e-4.
Timings are medians over repeats with the contenders interleaved (one call of each per round,
order rotated), so load from other processes hits all of them alike. Each round draws fresh
tokens, so expert row counts change between rounds as they do between training steps.

    python benchmarks/moe_layer.py                           # CPU, fp32, 2 threads, both shapes
    python benchmarks/moe_layer.py --device cuda --dtype bf16  # Mixtral size on a GPU; skips without one
    ... --json FILE                                            # also the medians as JSON (benchmarks/gpu_check.sh)
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "model")]  # the naive reference lives with the tests
from moe_dist.config import MoEConfig  # noqa: E402
from moe_dist.model.gemm import OneDNNGemm, onednn_available  # noqa: E402
from moe_dist.model.moe.experts import expert_gemm, grouped_mm, use_torch_grouped_mm  # noqa: E402
from moe_dist.model.moe.layer import MoELayer  # noqa: E402
from moe_dist.train.host_memory import cache_large_allocations  # noqa: E402
from naive import naive_experts  # noqa: E402


@dataclass
class Shape:
    name: str
    n_experts: int
    d_expert: int
    top_k: int


CPU_SHAPES = [Shape("Mixtral (8 experts, width 512, top-2)", 8, 512, 2),
              Shape("DeepSeek fine-grained (64 experts, width 128, top-8)", 64, 128, 8)]
GPU_SHAPES = [Shape("Mixtral 8x7B layer (8 experts, width 14336, top-2)", 8, 14336, 2)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OURS, HF, FLOOR = "moe_dist MoELayer", "transformers MixtralSparseMoeBlock (standalone: eager)", "dense floor (equal FLOPs)"
MATMULS = "matmuls alone (equal FLOPs, no activation)"
OURS_BLAS = "moe_dist MoELayer, moe.grouped_mm=loop (torch.mm: MKL)"
MATMULS_ONEDNN = "matmuls alone, oneDNN GEMMs (as our experts use)"
HF_GROUPED = "transformers block, experts_implementation=grouped_mm"
GROUPED_GEMMS = "moe_dist expert GEMMs alone (torch._grouped_mm, the router's row counts)"


def build_ours(H: int, s: Shape, device, dtype, seed: int = 0, impl: str = "auto") -> MoELayer:
    torch.manual_seed(seed)
    # Mixtral routing: softmax over all experts, top-k, renormalise the k probabilities; dropless.
    cfg = MoEConfig(n_experts=s.n_experts, top_k=s.top_k, norm_topk_prob=True, capacity_factor=None,
                    aux_loss_weight=0.0, grouped_mm=impl)
    with torch.device(device):  # initialise on the device: Mixtral-size weights are slow to fill on a CPU
        return MoELayer(H, cfg, d_expert=s.d_expert).to(dtype=dtype).train()


def build_hf(ours: MoELayer, H: int, s: Shape, device, dtype, experts_impl: str = "eager"):
    """MixtralSparseMoeBlock with our weights: router [E,H] = gate.weight, stacked experts as is.

    experts_impl "eager" is what a block built standalone runs (the loop over experts that got
    tokens); "grouped_mm" is what from_pretrained/from_config picks by default in transformers 5.x.
    """
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=H, intermediate_size=s.d_expert, num_local_experts=s.n_experts,
                        num_experts_per_tok=s.top_k, router_jitter_noise=0.0, hidden_act="silu")
    cfg._experts_implementation = experts_impl
    with torch.device(device):
        block = MixtralSparseMoeBlock(cfg).to(dtype=dtype).train()  # parameters are uninitialised
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        block.experts.down_proj.copy_(ours.experts.down_proj)
    return block


def check_match(ours: MoELayer, hf, x: torch.Tensor, atol: float) -> float:
    """Outputs and input gradients of MoELayer and the transformers block agree to atol (relative
    to the largest output for low precision); returns max |diff|."""
    g = torch.randn_like(x)
    diffs = []
    for m in (ours, hf):
        xi = x.detach().clone().requires_grad_(True)
        y = m(xi.unsqueeze(0)).squeeze(0)
        y.backward(g)
        diffs.append((y.detach().float(), xi.grad.float()))
    out_diff = (diffs[0][0] - diffs[1][0]).abs().max().item()
    grad_diff = (diffs[0][1] - diffs[1][1]).abs().max().item()
    scale = diffs[1][0].abs().max().item()
    if x.dtype != torch.float32:
        atol = atol * max(scale, 1.0)
    if not (out_diff <= atol and grad_diff <= atol):
        raise SystemExit(f"MoELayer and MixtralSparseMoeBlock disagree: max |dy| {out_diff:.3g}, "
                         f"max |dx| {grad_diff:.3g} (output scale {scale:.3g}, atol {atol})")
    for m in (ours, hf):
        m.zero_grad(set_to_none=True)
    return max(out_diff, grad_diff)


def make_contenders(H: int, T: int, s: Shape, device, dtype, check: bool):
    """-> (contender runs, a function that draws the next round's batch, notes)"""
    ours = build_ours(H, s, device, dtype)
    x = torch.randn(T, H, device=device, dtype=dtype)
    g = torch.randn(T, H, device=device, dtype=dtype)
    notes = []
    hf = hf_grouped = None
    try:
        hf = build_hf(ours, H, s, device, dtype)
    except ImportError as e:
        notes.append(f"transformers not installed ({e}); skipped")
    if hf is not None and check:
        atol = 1e-4 if dtype == torch.float32 else 2e-2
        diff = check_match(ours, hf, x[:1024], atol)
        notes.append(f"output and input grad match transformers: max |diff| {diff:.1e} (tol {atol:g})")
    if hf is not None:
        try:  # transformers' own grouped path, when torch._grouped_mm runs forward+backward here
            hf_grouped = build_hf(ours, H, s, device, dtype, "grouped_mm")
            check_match(ours, hf_grouped, x[:1024], 1e-4 if dtype == torch.float32 else 2e-2)
        except (RuntimeError, SystemExit, KeyError, ValueError) as e:
            hf_grouped = None
            notes.append(f"transformers experts_implementation=grouped_mm not timed: {str(e).splitlines()[0][:120]}")

    # dense floor: the expert FLOPs (T*k rows through one SwiGLU of width F) as plain dense matmuls
    F_ = s.d_expert
    torch.manual_seed(1)
    w1 = (torch.randn(2 * F_, H, device=device, dtype=dtype) * 0.02).requires_grad_(True)
    w2 = (torch.randn(H, F_, device=device, dtype=dtype) * 0.02).requires_grad_(True)
    xd = torch.randn(T * s.top_k, H, device=device, dtype=dtype)
    gd = torch.randn(T * s.top_k, H, device=device, dtype=dtype)

    def run_module(m):
        def run():
            m.zero_grad(set_to_none=True)
            xi = batch["x"].detach().requires_grad_(True)
            m(xi.unsqueeze(0)).squeeze(0).backward(batch["g"])
        return run

    def run_dense():
        w1.grad = w2.grad = None
        xi = xd.detach().requires_grad_(True)
        gate, up = F.linear(xi, w1).chunk(2, dim=-1)
        F.linear(F.silu(gate) * up, w2).backward(gd)

    runs = {OURS: run_module(ours)}
    if device.type == "cpu" and expert_gemm(x, "auto") is OneDNNGemm:  # the same layer on torch.mm (MKL)
        blas = build_ours(H, s, device, dtype, impl="loop")
        blas.load_state_dict(ours.state_dict())
        runs[OURS_BLAS] = run_module(blas)
    if hf is not None:
        runs[HF] = run_module(hf)
    if hf_grouped is not None:
        runs[HF_GROUPED] = run_module(hf_grouped)
    if device.type == "cpu":  # on a GPU the per-expert loop is the transformers block's own path
        naive = build_ours(H, s, device, dtype)
        naive.load_state_dict(ours.state_dict())
        naive.experts.forward = functools.partial(naive_experts, naive.experts)  # the per-expert loop, same router/dispatch
        runs["naive per-expert loop"] = run_module(naive)
    runs[FLOOR] = run_dense

    # stricter floor: the same matmuls alone (no activation, no chunk), forward + backward
    a = torch.randn(T * s.top_k, F_, device=device, dtype=dtype)
    gh = torch.randn(T * s.top_k, 2 * F_, device=device, dtype=dtype)

    def run_matmuls():
        w1.grad = w2.grad = None
        xi, ai = xd.detach().requires_grad_(True), a.detach().requires_grad_(True)
        torch.autograd.backward([F.linear(xi, w1), F.linear(ai, w2)], [gh, gd])

    runs[MATMULS] = run_matmuls
    if device.type == "cpu" and onednn_available():
        runs[MATMULS_ONEDNN] = onednn_matmuls(xd, a, w1.detach(), w2.detach(), gh, gd)
    if use_torch_grouped_mm(x, ours.experts.impl):
        # the same FLOPs through our experts' grouped GEMMs, split into experts as our router splits the round's tokens
        gate_up, down = ours.experts.gate_up_proj.detach(), ours.experts.down_proj.detach()

        def run_grouped():
            xi, ai = xd.detach().requires_grad_(True), a.detach().requires_grad_(True)
            wg, wd = gate_up.requires_grad_(True), down.requires_grad_(True)
            c = batch["counts"]
            torch.autograd.backward([grouped_mm(xi, wg, c), grouped_mm(ai, wd, c)], [gh, gd])
            wg.grad = wd.grad = None

        runs[GROUPED_GEMMS] = run_grouped

    def new_batch():  # fresh tokens every round: expert row counts change as in training
        batch["x"], batch["g"] = torch.randn_like(x), torch.randn_like(g)
        if GROUPED_GEMMS in runs:
            with torch.no_grad():
                batch["counts"] = torch.bincount(ours.router(batch["x"], None).kept()[1], minlength=s.n_experts)

    batch = {"x": x, "g": g}
    new_batch()
    return runs, new_batch, "; ".join(notes)


def onednn_matmuls(x, a, w1, w2, gh, gd) -> Callable[[], None]:
    """The `matmuls alone` floor on oneDNN's GEMM: y1 = x @ w1.T, y2 = a @ w2.T and their
    backward (input and weight gradients), each one dense call."""
    g1, g2 = torch.empty_like(w1), torch.empty_like(w2)

    n = x.shape[0]

    def run():
        OneDNNGemm.mm_t(x, w1, n), OneDNNGemm.mm_t(a, w2, n)
        OneDNNGemm.mm_t(gh, w1.t(), n), OneDNNGemm.mm_t(gd, w2.t(), n)
        OneDNNGemm.mm_tn(gh, x, n, out=g1), OneDNNGemm.mm_tn(gd, a, n, out=g2)
    return run


def time_interleaved(runs: dict[str, Callable[[], None]], new_batch: Callable[[], None], repeats: int, warmup: int,
                     device) -> dict[str, list[float]]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(runs)
    for _ in range(warmup):
        new_batch()
        for n in names:
            runs[n]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        new_batch()
        for i in range(len(names)):
            n = names[(r + i) % len(names)]  # rotate the order every round
            sync()
            t0 = time.perf_counter()
            runs[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
    return times


def expert_flops(T: int, H: int, s: Shape) -> float:
    """Forward+backward FLOPs of the expert matmuls: 3 x (2*T*k*H*2F + 2*T*k*F*H)."""
    return 3 * 6.0 * T * s.top_k * H * s.d_expert


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument("--tokens", type=int, default=None, help="default: 4096 on cpu, 16384 on cuda")
    p.add_argument("--hidden", type=int, default=None, help="default: 256 on cpu, 4096 on cuda")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--shape", choices=["all", "mixtral", "deepseek"], default="all")
    p.add_argument("--no-check", action="store_true", help="skip the match against transformers")
    p.add_argument("--no-malloc-cache", action="store_true",
                   help="leave glibc's defaults (by default the process keeps freed large blocks, as the "
                        "trainer does on CPU; it applies to every contender alike)")
    p.add_argument("--json", default=None, help="also write every contender's timings and the derived ratios here")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP: --device cuda requested but no CUDA device is available")
        if args.json:
            Path(args.json).write_text(json.dumps({"status": "skip", "reason": "no CUDA device"}, indent=1))
        return
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    T = args.tokens or (16384 if gpu else 4096)
    H = args.hidden or (4096 if gpu else 256)
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    if args.shape != "all":
        shapes = [s for s in shapes if s.name.lower().startswith(args.shape)] or shapes
    if not gpu:
        torch.set_num_threads(args.threads)
        if not args.no_malloc_cache:
            cache_large_allocations()

    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    try:
        import transformers
        tf = f", transformers {transformers.__version__}"
    except ImportError:
        tf = ""
    print(f"# MoE layer forward+backward: {where}, torch {torch.__version__}{tf}, {str(dtype).split('.')[-1]}, "
          f"{T} tokens, hidden {H}, dropless softmax top-k with norm_topk_prob; "
          f"{'glibc defaults' if gpu or args.no_malloc_cache else 'freed large blocks kept (train.cpu_malloc_cache)'}; "
          f"median of {args.repeats} interleaved repeats")
    record = {"status": "ok", "device": where, "torch": torch.__version__, "dtype": str(dtype).split(".")[-1],
              "tokens": T, "hidden": H, "repeats": args.repeats, "shapes": []}
    for s in shapes:
        runs, new_batch, note = make_contenders(H, T, s, device, dtype, check=not args.no_check)
        times = time_interleaved(runs, new_batch, args.repeats, args.warmup, device)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        ours, floor = med[OURS], med[FLOOR]
        flops = expert_flops(T, H, s)
        print(f"\n## {s.name}" + (f"  [{note}]" if note else ""))
        cols = "| contender | median ms | min ms | vs moe_dist | vs dense floor |"
        if gpu:
            cols += " expert TFLOP/s |"
        print(cols)
        print("|" + "---|" * (cols.count("|") - 1))
        for n, t in times.items():
            row = f"| {n} | {med[n]:.1f} | {min(t) * 1e3:.1f} | {med[n] / ours:.2f}x | {med[n] / floor:.2f}x |"
            if gpu:
                row += f" {flops / (med[n] * 1e-3) / 1e12:.0f} |"
            print(row)
        hf = med.get(HF)
        summary = f"moe_dist: {ours / floor:.2f}x the dense SwiGLU floor, {ours / med[MATMULS]:.2f}x the matmuls alone"
        if MATMULS_ONEDNN in med:
            summary += f", {ours / med[MATMULS_ONEDNN]:.2f}x the oneDNN matmuls alone"
        if OURS_BLAS in med:
            summary += f" (on torch.mm: {med[OURS_BLAS] / med[MATMULS]:.2f}x the matmuls alone)"
        if hf is not None:
            summary += f", {hf / ours:.2f}x faster than transformers"
        if HF_GROUPED in med:
            summary += f", {med[HF_GROUPED] / ours:.2f}x faster than its grouped_mm experts"
        if GROUPED_GEMMS in med:
            summary += (f"; expert GEMMs alone at {med[MATMULS] / med[GROUPED_GEMMS]:.2f}x the dense matmuls' TFLOP/s "
                        f"({flops / (med[GROUPED_GEMMS] * 1e-3) / 1e12:.0f} vs {flops / (med[MATMULS] * 1e-3) / 1e12:.0f})")
        print(summary)
        record["shapes"].append({
            "name": s.name, "n_experts": s.n_experts, "d_expert": s.d_expert, "top_k": s.top_k, "expert_flops": flops,
            "notes": note, "median_ms": med, "min_ms": {n: min(t) * 1e3 for n, t in times.items()},
            "keys": {"ours": OURS, "hf_eager": HF, "hf_grouped_mm": HF_GROUPED, "dense_swiglu": FLOOR,
                     "dense_matmuls": MATMULS, "grouped_gemms": GROUPED_GEMMS}})
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
