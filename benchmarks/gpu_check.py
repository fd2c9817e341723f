"""The steps of benchmarks/gpu_check.sh, one per call, each writing OUT/<step>.json (and printing one line).

    python benchmarks/gpu_check.py env    --out OUT   # device, versions, the 8192^3 bf16 matmul's TFLOP/s
    python benchmarks/gpu_check.py tests  --out OUT   # pytest tests/gpu (the CUDA tests)
    python benchmarks/gpu_check.py train  --out OUT   # bf16 training at Mixtral-8x7B layer shapes, as many layers as fit
    python benchmarks/gpu_check.py layer  --out OUT   # benchmarks/moe_layer.py --device cuda --dtype bf16
    python benchmarks/gpu_check.py zero --mode plain|fsdp2|ds --out OUT   # under torchrun --nproc-per-node 1 for fsdp2/ds
    python benchmarks/gpu_check.py syncs  --out OUT   # host syncs per training step (torch.cuda.set_sync_debug_mode)
    python benchmarks/gpu_check.py summary --out OUT  # summary.json + summary.md (the RESULTS.md table), targets met or not

Without CUDA every step that can run on a CPU runs at a toy size (fp32; its figures say nothing about speed) and
the rest print `SKIP (no CUDA): ...` and exit 75. Exit status: 0 ok, 75 skipped, anything else failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

torch = None  # imported by main() for every step but the summary, which reads JSON only
CUDA = False
SKIPPED = 75
# Targets of issue 21 (benchmarks/RESULTS.md "GPU check")
TARGET_GEMM_FRACTION = 0.70  # expert grouped GEMMs' TFLOP/s over the dense bf16 matmuls' of equal FLOPs
TARGET_VS_HF_GROUPED = 1.3  # MoE layer speed-up over transformers' grouped_mm Mixtral block
TARGET_TRAIN_TFLOPS = 400.0  # model TFLOP/s training at Mixtral-8x7B layer shapes on one GPU
# Dense bf16 tensor-core peak (TFLOP/s, vendor datasheets; leads, the measured matmul is the real ceiling)
NOMINAL_PEAK = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                ("GH200", 989.0), ("A100", 312.0), ("B200", 2250.0)]
# The Mixtral-8x7B layer (configs/mixtral_8x7b.yaml) on one GPU: the layer count comes from memory
MIXTRAL = ["parallel.ep=1", "train.zero_stage=0", "train.micro_batch_size=2", "train.grad_accum_steps=1",
           "model.activation_checkpointing=false", "train.lr=1e-4", "train.warmup_steps=2", "train.eval_every=0",
           "train.eval_batches=1", "checkpoint.resume=false", "logging.tensorboard=false", "logging.progress_bar=false"]
# A model for the ZeRO and host-sync runs: small enough to build in seconds, large enough for the GPU's kernels
MEDIUM = ["model.vocab_size=32000", "model.d_model=1024", "model.n_layer=4", "model.n_head=16", "model.n_kv_head=4",
          "model.d_ff=2816", "model.max_seq_len=1024", "moe.n_experts=8", "moe.top_k=2", "moe.d_expert=1408",
          "moe.norm_topk_prob=true", "train.micro_batch_size=4"]
# The same code paths at a size a 2-core CPU runs in seconds
TOY = ["model.vocab_size=512", "model.d_model=64", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2",
       "model.d_ff=128", "model.max_seq_len=64", "moe.n_experts=8", "moe.top_k=2", "moe.d_expert=128",
       "moe.norm_topk_prob=true", "train.micro_batch_size=4"]
COMMON = ["train.lr=1e-3", "train.warmup_steps=2", "train.eval_every=0", "train.eval_batches=1", "train.log_every=1000",
          "checkpoint.resume=false", "logging.tensorboard=false", "logging.progress_bar=false"]


def device_overrides() -> list[str]:
    return ["train.device=cuda", "train.dtype=bf16"] if CUDA else ["train.device=cpu", "train.dtype=fp32"]


def write(out: Path, name: str, record: dict) -> dict:
    (out / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
    return record


def read(out: Path, name: str) -> dict | None:
    f = out / f"{name}.json"
    return json.loads(f.read_text()) if f.exists() else None


def skip(out: Path, name: str, reason: str) -> int:
    write(out, name, {"status": "skip", "reason": reason})
    print(f"SKIP (no CUDA): {reason}")
    return SKIPPED


def nominal_peak(name: str) -> float | None:
    return next((peak for key, peak in NOMINAL_PEAK if key.lower() in name.lower()), None)


def cuda_time_ms(fn, warmup: int = 3, repeats: int = 10) -> float:
    """Median ms of fn() between CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gib(n: float) -> float:
    return round(n / 2 ** 30, 2)


# -- env ------------------------------------------------------------------------------------------


def step_env(out: Path, args) -> int:
    rec = {"status": "ok", "cuda": CUDA, "python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "grouped_mm": hasattr(torch, "_grouped_mm")}
    from importlib import metadata

    for dist in ("transformers", "deepspeed", "apex"):  # installed versions, without the seconds of importing them
        try:
            rec[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            rec[dist] = None
    if not CUDA:
        write(out, "env", {**rec, "device": f"CPU ({platform.processor() or platform.machine()})"})
        print(f"CPU, torch {rec['torch']}, transformers {rec['transformers']}, deepspeed {rec['deepspeed']}")
        print("SKIP (no CUDA): 8192^3 bf16 matmul (the device's ceiling)")
        return 0
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    rec.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
               memory_gib=gib(total), free_gib=gib(free), nominal_peak_tflops=nominal_peak(props.name),
               nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
    n = 8192
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=gen)  # random, never zeros
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    ms = cuda_time_ms(lambda: a @ b, warmup=5, repeats=20)
    rec["matmul_8192_bf16_tflops"] = round(2 * n ** 3 / (ms * 1e-3) / 1e12, 1)
    write(out, "env", rec)
    print(f"{props.name}: {gib(total)} GiB, torch {rec['torch']} (CUDA {rec['torch_cuda']}), transformers "
          f"{rec['transformers']}, deepspeed {rec['deepspeed']}; 8192^3 bf16 matmul {rec['matmul_8192_bf16_tflops']} "
          f"TFLOP/s (nominal {rec['nominal_peak_tflops']})")
    return 0


# -- tests ----------------------------------------------------------------------------------------


def step_tests(out: Path, args) -> int:
    import xml.etree.ElementTree as ET

    xml = out / "tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           f"--junitxml={xml}", str(ROOT / "tests" / "gpu")], cwd=ROOT)
    counts, failed = Counter(), []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
            kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            counts[kind] += 1
            if kind in ("failure", "error"):
                failed.append(name)
    rec = {"status": "ok" if proc.returncode == 0 else "fail", "pytest_rc": proc.returncode,
           "passed": counts["passed"], "failed": counts["failure"] + counts["error"], "skipped": counts["skipped"],
           "failing": failed}
    line = f"tests/gpu: {rec['passed']} passed, {rec['failed']} failed, {rec['skipped']} skipped"
    if not CUDA and proc.returncode == 0 and rec["passed"] == 0:
        return skip(out, "tests", f"{line} (each needs CUDA)")
    write(out, "tests", rec)
    print(line + (f": {', '.join(failed)}" if failed else ""))
    return 0 if proc.returncode == 0 else 1


# -- train ----------------------------------------------------------------------------------------


def pick_layers(free_bytes: int, overrides: list[str], max_layers: int = 8) -> tuple[int, dict]:
    """The most Mixtral layers whose planned memory (moe_dist.plan, bf16 autocast over fp32 AdamW) fits
    USABLE_MEMORY of the free bytes; with the plan's figures for that count."""
    from moe_dist.config import load_config
    from moe_dist.plan import GPU, USABLE_MEMORY, estimate

    gpu = GPU("this", 989.0, free_bytes / 2 ** 30, 450.0, 50.0)
    best = (1, None)
    for L in range(1, max_layers + 1):
        est = estimate(load_config(str(ROOT / "configs" / "mixtral_8x7b.yaml"), [*overrides, f"model.n_layer={L}"]), 1, gpu)
        if est["memory_bytes"]["total"] > USABLE_MEMORY * free_bytes:
            break
        best = (L, est)
    return best


def train_config(run_dir: Path, cache: Path, layers: int | None):
    from moe_dist.config import load_config

    where = [f"logging.run_dir={run_dir}", f"data.cache_dir={cache}"]
    if CUDA:
        return load_config(str(ROOT / "configs" / "mixtral_8x7b.yaml"),
                           [*MIXTRAL, f"model.n_layer={layers}", *device_overrides(), *where])
    return load_config(None, [*TOY, *COMMON, *device_overrides(), *where])


def measure_training(cfg, warmup: int, steps: int) -> dict:
    """Build the real Trainer on cfg and time its optimizer steps (no evaluation, logging or checkpoint)."""
    from moe_dist.plan import model_flops_per_token, param_counts
    from moe_dist.train.trainer import Trainer

    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    sync()
    build_s = time.perf_counter() - t0
    try:
        losses, times = [], []
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            losses.append(trainer.train_step().loss)  # ends in a device-to-host copy of the logged figures
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        trainer.rt.close()
    rcfg = trainer.cfg
    seq = rcfg.data.seq_len
    counts = param_counts(rcfg.model, rcfg.moe)
    step_s = statistics.median(times[warmup:])
    tokens = trainer.tokens_per_step
    flops = model_flops_per_token(rcfg, counts, seq) * tokens
    return {"n_layer": rcfg.model.n_layer, "params": counts.total, "active_params": counts.active, "seq_len": seq,
            "micro_batch_size": rcfg.train.micro_batch_size, "tokens_per_step": tokens, "build_s": round(build_s, 1),
            "first_step_s": round(times[0], 3), "step_s": step_s, "step_times_s": times, "losses": losses,
            "tokens_per_s": tokens / step_s, "model_flops_per_step": flops, "model_tflops": flops / step_s / 1e12}


def step_train(out: Path, args) -> int:
    run_dir, cache = out / "runs" / "train", out / "cache"
    if not CUDA:
        rec = measure_training(train_config(run_dir, cache, None), warmup=1, steps=2)
        write(out, "train", {"status": "ok", "toy": True, "device": "cpu", **rec})
        print(f"toy model on CPU ({rec['params'] / 1e6:.2f}M parameters): {rec['tokens_per_s']:,.0f} tok/s, losses "
              + " ".join(f"{v:.3f}" for v in rec["losses"]))
        print("SKIP (no CUDA): Mixtral-8x7B layer shapes in bf16 (tokens/s, model TFLOP/s, MFU, peak memory)")
        return 0
    env = read(out, "env") or {}
    free, total = torch.cuda.mem_get_info()
    layers, est = pick_layers(free, [*MIXTRAL, *device_overrides()])
    rec = {"status": "ok", "toy": False, "device": torch.cuda.get_device_name(), "free_gib_before": gib(free),
           "planned_layers": layers, "planned_memory_gib": {k: gib(v) for k, v in est["memory_bytes"].items()} if est else None}
    print(f"{gib(free)} GiB free: {layers} Mixtral layers fit by moe_dist.plan "
          f"({rec['planned_memory_gib']['total'] if est else '?'} GiB planned)", flush=True)
    while True:
        torch.cuda.reset_peak_memory_stats()
        try:
            rec.update(measure_training(train_config(run_dir, cache, layers), warmup=2, steps=args.steps))
            break
        except torch.OutOfMemoryError as e:  # the plan was optimistic: one layer fewer, once
            if layers <= 1 or rec.get("oom_at_layers"):
                raise
            rec["oom_at_layers"] = layers
            print(f"out of memory at {layers} layers ({str(e).splitlines()[0][:120]}); retrying with {layers - 1}",
                  flush=True)
            layers -= 1
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    rec["peak_memory_gib"] = gib(torch.cuda.max_memory_allocated())
    rec["peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
    measured, nominal = env.get("matmul_8192_bf16_tflops"), env.get("nominal_peak_tflops") or nominal_peak(rec["device"])
    rec["mfu_vs_measured_matmul"] = rec["model_tflops"] / measured if measured else None
    rec["mfu_vs_nominal_peak"] = rec["model_tflops"] / nominal if nominal else None
    write(out, "train", rec)
    mfu = lambda v: f"{100 * v:.1f}%" if v is not None else "n/a"  # noqa: E731
    print(f"{rec['n_layer']} Mixtral layers ({rec['params'] / 1e9:.2f}B parameters, {rec['active_params'] / 1e9:.2f}B "
          f"active), {rec['tokens_per_step']} tokens/step: {rec['tokens_per_s']:,.0f} tok/s, {rec['model_tflops']:.0f} "
          f"model TFLOP/s, MFU {mfu(rec['mfu_vs_measured_matmul'])} of the measured matmul, "
          f"{mfu(rec['mfu_vs_nominal_peak'])} of nominal; peak {rec['peak_memory_gib']} GiB; build {rec['build_s']} s")
    return 0


# -- layer ----------------------------------------------------------------------------------------


def step_layer(out: Path, args) -> int:
    import moe_layer

    raw = out / "layer_raw.json"
    argv = (["--device", "cuda", "--dtype", "bf16", "--repeats", str(args.repeats), "--warmup", "3"] if CUDA else
            ["--tokens", "256", "--hidden", "64", "--repeats", "1", "--warmup", "0", "--shape", "mixtral"])
    moe_layer.main([*argv, "--json", str(raw)])
    bench = json.loads(raw.read_text())
    shape = bench["shapes"][0]
    med, keys, flops = shape["median_ms"], shape["keys"], shape["expert_flops"]
    tflops = {name: flops / (ms * 1e-3) / 1e12 for name, ms in med.items()}
    ours = med[keys["ours"]]
    rec = {"status": "ok", "toy": not CUDA, "device": bench["device"], "tokens": bench["tokens"],
           "hidden": bench["hidden"], "shape": shape["name"], "notes": shape["notes"], "median_ms": med,
           "expert_tflops": tflops,
           "layer_expert_tflops": tflops[keys["ours"]],
           "dense_matmul_tflops": tflops.get(keys["dense_matmuls"]),
           "grouped_gemm_tflops": tflops.get(keys["grouped_gemms"]),
           "grouped_gemm_vs_dense": (med[keys["dense_matmuls"]] / med[keys["grouped_gemms"]]
                                     if keys["grouped_gemms"] in med else None),
           "layer_vs_dense": med[keys["dense_matmuls"]] / ours,
           "speedup_vs_hf_grouped_mm": med[keys["hf_grouped_mm"]] / ours if keys["hf_grouped_mm"] in med else None,
           "speedup_vs_hf_eager": med[keys["hf_eager"]] / ours if keys["hf_eager"] in med else None}
    write(out, "layer", rec)
    if not CUDA:
        print("SKIP (no CUDA): the Mixtral-8x7B layer in bf16 against transformers' grouped_mm block and the dense "
              "bf16 matmuls (ran the CPU toy shape instead)")
    return 0


# -- zero -----------------------------------------------------------------------------------------


def step_zero(out: Path, args) -> int:
    """One of the three runs whose losses the summary compares: plain (one process), FSDP2 (zero_stage 3)
    or DeepSpeed ZeRO-1 (zero_stage 1), the latter two under torchrun --nproc-per-node 1."""
    from moe_dist.config import load_config
    from moe_dist.parallel import zero
    from moe_dist.train.trainer import Trainer

    name = f"zero_{args.mode}"
    stage = {"plain": 0, "fsdp2": 3, "ds": 1}[args.mode]
    if args.mode == "ds" and not zero.deepspeed_available():
        write(out, name, {"status": "fail", "reason": "DeepSpeed is not installed (carry it as wheels: "
                                                      "bash benchmarks/gpu_wheels.sh)"})
        print("FAIL: DeepSpeed is not installed here; carry it as wheels (bash benchmarks/gpu_wheels.sh)")
        return 1
    if args.mode != "plain" and "RANK" not in os.environ:
        print("note: not under torchrun; a world of one in this process")
    cfg = load_config(None, [*(MEDIUM if CUDA else TOY), *COMMON, *device_overrides(), f"train.zero_stage={stage}",
                             f"train.steps={args.steps}", f"logging.run_dir={out / 'runs' / name}",
                             f"data.cache_dir={out / 'cache'}"])
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    build_s = time.perf_counter() - t0
    engine, model = trainer.engine, trainer.model
    from torch.distributed.fsdp import FSDPModule

    what = (f"DeepSpeed ZeRO-{engine.zero_optimization_stage()} (bf16 {engine.bfloat16_enabled()})" if engine is not None
            else "FSDP2" if isinstance(model, FSDPModule) else "plain")
    try:
        losses, times = [], []
        for _ in range(cfg.train.steps):
            t0 = time.perf_counter()
            losses.append(trainer.train_step().loss)
            times.append(time.perf_counter() - t0)
    finally:
        trainer.rt.close()
    rec = {"status": "ok", "mode": args.mode, "zero_stage": stage, "ran": what, "world_size": trainer.rt.world_size,
           "dtype": trainer.cfg.train.dtype, "build_s": round(build_s, 1), "losses": losses,
           "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
           "peak_memory_gib": gib(torch.cuda.max_memory_allocated()) if CUDA else None}
    write(out, name, rec)
    print(f"{args.mode}: {what}, world {rec['world_size']}, {rec['dtype']}; losses " + " ".join(f"{v:.4f}" for v in losses))
    expected = {"plain": "plain", "fsdp2": "FSDP2", "ds": "DeepSpeed"}[args.mode]
    if not what.startswith(expected):
        print(f"FAIL: expected {expected}, the trainer ran {what}")
        return 1
    return 0


# -- syncs ----------------------------------------------------------------------------------------


def count_syncs(trainer, steps: int) -> tuple[list[int], Counter]:
    """Synchronizing CUDA calls per train_step (no log step: fit()'s logging never runs), and where."""
    per_step, where = [], Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for _ in range(steps):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer.train_step()
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            per_step.append(len(syncs))
            where.update(f"{Path(w.filename).relative_to(ROOT) if Path(w.filename).is_relative_to(ROOT) else w.filename}"
                         f":{w.lineno}" for w in syncs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return per_step, where


def step_syncs(out: Path, args) -> int:
    if not CUDA:
        return skip(out, "syncs", "host syncs per training step (torch.cuda.set_sync_debug_mode is CUDA's)")
    from moe_dist.config import load_config
    from moe_dist.train.trainer import Trainer

    runs = {}
    for layers in (2, 4):  # syncs per step = fixed + per MoE layer x layers
        cfg = load_config(None, [*MEDIUM, *COMMON, *device_overrides(), f"model.n_layer={layers}", "train.steps=100",
                                 f"logging.run_dir={out / 'runs' / f'syncs{layers}'}", f"data.cache_dir={out / 'cache'}"])
        trainer = Trainer(cfg)
        try:
            for _ in range(2):  # warm-up: first-step allocations and handles
                trainer.train_step()
            per_step, where = count_syncs(trainer, args.steps)
        finally:
            trainer.rt.close()
        runs[layers] = {"moe_layers": len(cfg.model.moe_layers()), "micro_batches": cfg.train.grad_accum_steps,
                        "per_step": per_step, "where": dict(where.most_common())}
    a, b = (statistics.median(runs[n]["per_step"]) for n in (2, 4))
    per_layer = (b - a) / (runs[4]["moe_layers"] - runs[2]["moe_layers"])
    rec = {"status": "ok", "runs": runs, "per_step": {n: statistics.median(r["per_step"]) for n, r in runs.items()},
           "per_moe_layer": per_layer, "fixed_per_step": a - per_layer * runs[2]["moe_layers"]}
    write(out, "syncs", rec)
    print(f"host syncs per step: {a:g} with 2 MoE layers, {b:g} with 4: {per_layer:g} per MoE layer + "
          f"{rec['fixed_per_step']:g} per step; where (4 layers): "
          + ", ".join(f"{k} x{v}" for k, v in list(runs[4]["where"].items())[:6]))
    return 0


# -- summary --------------------------------------------------------------------------------------


def target(name: str, goal: str, measured, ok, shown: str) -> dict:
    return {"name": name, "target": goal, "measured": measured, "shown": shown,
            "met": None if measured is None else bool(ok)}


def step_summary(out: Path, args) -> int:
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()] \
        if (out / "steps.jsonl").exists() else []
    for st in steps:  # the step's line: its last result line, and what it skipped
        log = out / st["log"] if st.get("log") else None
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()] if log and log.exists() else []
        skips = [ln for ln in lines if ln.startswith("SKIP (")]
        result = [ln for ln in lines if ln and not ln.startswith(("SKIP", "note", "[rank"))][-1:]
        st["line"] = "; ".join((result if st["status"] != "skip" else []) + skips)[:300].replace("|", "/")
    res = {n: read(out, n) for n in ("env", "tests", "train", "layer", "zero_plain", "zero_fsdp2", "zero_ds", "syncs")}
    env = res["env"] or {}
    gpu = bool(env.get("cuda"))
    layer, train = res["layer"] or {}, res["train"] or {}
    on_gpu = lambda r: r if gpu and r.get("status") == "ok" else {}  # noqa: E731 - CPU toy figures are no measurement
    lg, tr = on_gpu(layer), on_gpu(train)
    frac, speed, tflops = lg.get("grouped_gemm_vs_dense"), lg.get("speedup_vs_hf_grouped_mm"), tr.get("model_tflops")
    targets = [
        target("expert grouped GEMMs vs dense bf16 matmuls (Mixtral layer, TFLOP/s)", f">= {TARGET_GEMM_FRACTION:.0%}",
               frac, frac is not None and frac >= TARGET_GEMM_FRACTION,
               f"{frac:.0%} ({lg['grouped_gemm_tflops']:.0f} vs {lg['dense_matmul_tflops']:.0f} TFLOP/s)" if frac else "-"),
        target("MoE layer vs transformers' grouped_mm Mixtral block", f">= {TARGET_VS_HF_GROUPED}x faster",
               speed, speed is not None and speed >= TARGET_VS_HF_GROUPED, f"{speed:.2f}x" if speed else "-"),
        target("training at Mixtral-8x7B layer shapes, model TFLOP/s", f">= {TARGET_TRAIN_TFLOPS:.0f}",
               tflops, tflops is not None and tflops >= TARGET_TRAIN_TFLOPS, f"{tflops:.0f}" if tflops else "-"),
    ]
    zero = {}
    plain = (res["zero_plain"] or {}).get("losses")
    for mode in ("fsdp2", "ds"):
        r = res[f"zero_{mode}"] or {}
        if not r.get("losses"):
            status = r.get("status") or next((st["status"] for st in steps if st["step"] == f"zero-{mode}"), "not run")
            zero[mode] = {"ran": None, "status": status, "reason": r.get("reason")}
        elif not plain:
            zero[mode] = {"ran": r.get("ran"), "status": "no plain run to compare with"}
        else:
            diffs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], plain)]
            tol = 3e-2 if gpu else 1e-3  # bf16: three precisions of weights (fp32 + autocast, bf16 + fp32 master)
            zero[mode] = {"ran": r.get("ran"), "max_rel_diff_vs_plain": max(diffs), "tolerance": tol,
                          "agree": max(diffs) <= tol}
    summary = {"device": env.get("device"), "cuda": gpu, "torch": env.get("torch"), "transformers": env.get("transformers"),
               "deepspeed": env.get("deepspeed"), "matmul_8192_bf16_tflops": env.get("matmul_8192_bf16_tflops"),
               "nominal_peak_tflops": env.get("nominal_peak_tflops"),
               "wall_s": round(sum(s.get("seconds", 0) for s in steps), 1),
               "steps": {s["step"]: {k: v for k, v in s.items() if k != "step"} for s in steps},
               "targets": targets, "zero_vs_plain": zero, "results": res}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    md = markdown(summary)
    (out / "summary.md").write_text(md)
    print(md)
    return 0


def markdown(s: dict) -> str:
    """The RESULTS.md section's table of one run."""
    res, gpu = s["results"], s["cuda"]
    env = res["env"] or {}
    lines = [f"Run {time.strftime('%Y-%m-%d')}: {s['device'] or '?'}, torch {s['torch']}, transformers {s['transformers']}, "
             f"DeepSpeed {s['deepspeed']}; 8192^3 bf16 matmul {s['matmul_8192_bf16_tflops'] or 'n/a'} TFLOP/s "
             f"(nominal {s['nominal_peak_tflops'] or 'n/a'}); the whole check {s['wall_s']} s."
             + ("" if gpu else " **No CUDA: CPU toy sizes, figures say nothing about GPU speed.**"), "",
             "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in s["targets"]:
        met = "not measured" if t["met"] is None else "**met**" if t["met"] else "**not met**"
        lines.append(f"| {t['name']} | {t['target']} | {t['shown']} | {met} |")
    lines += ["", "| step | status | s | result |", "|---|---|---|---|"]
    for name, st in s["steps"].items():
        lines.append(f"| {name} | {st.get('status')} | {st.get('seconds', '')} | {st.get('line', '')} |")
    tr = res["train"] or {}
    if tr.get("status") == "ok" and not tr.get("toy"):
        pct = lambda v: f"{100 * v:.1f}%" if v is not None else "n/a"  # noqa: E731
        lines += ["", "| training (Mixtral-8x7B layers, bf16 autocast, fused AdamW) | |", "|---|---|",
                  f"| layers (as many as fit) | {tr['n_layer']} ({tr['params'] / 1e9:.2f}B parameters, "
                  f"{tr['active_params'] / 1e9:.2f}B active) |",
                  f"| tokens per step | {tr['micro_batch_size']} x {tr['seq_len']} |",
                  f"| step time (median) | {1e3 * tr['step_s']:.0f} ms |",
                  f"| tokens/s | {tr['tokens_per_s']:,.0f} |",
                  f"| model TFLOP/s | {tr['model_tflops']:.0f} |",
                  f"| MFU vs the measured matmul / nominal peak | {pct(tr['mfu_vs_measured_matmul'])} / "
                  f"{pct(tr['mfu_vs_nominal_peak'])} |",
                  f"| peak memory allocated (planned) | {tr['peak_memory_gib']} GiB "
                  f"({(tr.get('planned_memory_gib') or {}).get('total', '?')} GiB) |",
                  f"| build (meta init + materialize) | {tr['build_s']} s |"]
    lg = res["layer"] or {}
    if lg.get("status") == "ok" and not lg.get("toy"):
        lines += ["", f"| MoE layer fwd+bwd, {lg['tokens']} tokens, bf16 | median ms | expert TFLOP/s |", "|---|---|---|"]
        lines += [f"| {n} | {ms:.1f} | {lg['expert_tflops'][n]:.0f} |" for n, ms in lg["median_ms"].items()]
    if s["zero_vs_plain"]:
        lines += ["", "| world-1 run | ran | max relative loss difference vs plain | agree |", "|---|---|---|---|"]
        for mode, z in s["zero_vs_plain"].items():
            if "agree" not in z:
                lines.append(f"| {mode} | {z['ran'] or '-'} | {z['status']}{': ' + z['reason'] if z.get('reason') else ''} | - |")
                continue
            lines.append(f"| {mode} | {z['ran']} | {z['max_rel_diff_vs_plain']:.2e} (tol {z['tolerance']:g}) | "
                         f"{'yes' if z['agree'] else '**no**'} |")
    sy = res["syncs"] or {}
    if sy.get("status") == "ok":
        lines += ["", f"Host syncs per training step: {sy['per_moe_layer']:g} per MoE layer + {sy['fixed_per_step']:g} "
                      f"per step ({', '.join(f'{k} MoE layers: {v:g}' for k, v in sy['per_step'].items())})."]
    te = res["tests"] or {}
    if te.get("status") in ("ok", "fail"):
        lines += ["", f"tests/gpu: {te['passed']} passed, {te['failed']} failed, {te['skipped']} skipped"
                      + (f" ({', '.join(te['failing'])})" if te.get("failing") else "") + "."]
    if env.get("deepspeed") is None:
        lines += ["", "DeepSpeed is not installed here: carry it as wheels (bash benchmarks/gpu_wheels.sh)."]
    return "\n".join(lines) + "\n"


STEPS = {"env": step_env, "tests": step_tests, "train": step_train, "layer": step_layer, "zero": step_zero,
         "syncs": step_syncs, "summary": step_summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=list(STEPS))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--mode", choices=["plain", "fsdp2", "ds"], default="plain", help="zero: which run")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps measured (train 6, zero 8, syncs 3)")
    p.add_argument("--repeats", type=int, default=15, help="layer: timed rounds")
    args = p.parse_args(argv)
    global torch, CUDA
    if args.step != "summary":
        import torch as _torch

        torch, CUDA = _torch, _torch.cuda.is_available()
    args.steps = args.steps or {"train": 6, "zero": 8 if CUDA else 4, "syncs": 3}.get(args.step, 0)
    args.out.mkdir(parents=True, exist_ok=True)
    if "RANK" in os.environ and os.environ.get("RANK") != "0":
        args.out = args.out / f"rank{os.environ['RANK']}"  # only rank 0 writes the step's record
        args.out.mkdir(exist_ok=True)
    return STEPS[args.step](args.out, args)


if __name__ == "__main__":
    sys.exit(main())
