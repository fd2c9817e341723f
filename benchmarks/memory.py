"""Per-rank peak resident memory (VmHWM) of real training steps, beside the formulas.

A ~400M-parameter MoE with a real dense part (d_model 1024, 8 layers, 8 experts of width 1536, top-2,
vocab 32768 untied) trains 2 steps through the real Trainer (meta-device build, sharded materialisation)
at world 1, 2 and 4 with ep = world, for zero_stage 0 (plain data parallelism), 1 and 2 (DeepSpeed ZeRO
when installed, else FSDP2 keeping parameters gathered) and 3 (FSDP2). Each rank reports VmHWM, the
peak of its resident set; beside it the REFERENCE.md formula for the model state (16 bytes per local
parameter at zero_stage 0, ...) and moe_dist.plan's whole-step estimate.

    python benchmarks/memory.py                          # every world and stage (~10 minutes on 2 cores)
    python benchmarks/memory.py --worlds 2 --stages 3    # one cell
    python benchmarks/memory.py --small                  # a 2M model (seconds; what tests run)
    python benchmarks/memory.py --worlds 2 4 --pp 2      # pipeline: pp 1 and 2 at each world (ep = world / pp),
                                                         # 2 micro-batches per step in both
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 2 ** 30
MODEL = ["model.d_model=1024", "model.n_layer=8", "model.n_head=8", "model.d_ff=1536", "model.vocab_size=32768",
         "model.max_seq_len=256", "moe.n_experts=8", "moe.top_k=2", "moe.d_expert=1536"]
SMALL = ["model.d_model=128", "model.n_layer=2", "model.n_head=4", "model.d_ff=256", "model.vocab_size=4096",
         "model.max_seq_len=64", "moe.n_experts=4", "moe.top_k=2", "moe.d_expert=256"]
RUN = ["train.micro_batch_size=1", "train.steps=2", "train.device=cpu", "train.eval_batches=1", "train.eval_every=0",
       "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.resume=false",
       # every block of 1 MiB or more returned to the OS when freed (moe_dist.train.host_memory): what the
       # model needs, not what glibc's heap keeps (the default cache keeps the peak heap and its fragments)
       "train.cpu_malloc_cache=false"]


def vmhwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def worker(overrides: list[str], out_dir: str) -> None:
    """One rank: two training steps, then its VmHWM (run under torchrun)."""
    import torch

    from moe_dist.config import load_config
    from moe_dist.parallel.data_parallel import local
    from moe_dist.train import Trainer

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = Trainer(load_config(None, overrides, world_size=world))
    for _ in range(2):
        trainer.train_step()
    rank = trainer.rt.pgm.rank if trainer.rt.pgm else 0
    held = sum(local(p).numel() for p in trainer.model.parameters())
    Path(out_dir, f"{rank}.json").write_text(json.dumps({"vmhwm": vmhwm_bytes(), "local_params": held}))
    trainer.rt.close()


def formula_bytes(cfg, world: int) -> int:
    """REFERENCE.md, Memory per rank: the model state of one rank (fp32 AdamW)."""
    from moe_dist import plan

    counts = plan.param_counts(cfg.model, cfg.moe)
    layout = plan.config_layout(cfg, world)
    # under pipeline parallelism: the fullest pp rank's layers (and embedding or head)
    return max(_state_bytes(plan.rank_param_counts(cfg, counts, layout, r), cfg, world) for r in range(layout.pp))


def _state_bytes(counts, cfg, world: int) -> int:
    n_d, n_e = counts.dense, counts.expert
    tp, ep, pp, zero = cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.pp, cfg.train.zero_stage
    dp, edp = world // (pp * tp), world // (pp * ep)
    n = n_d / tp + n_e / ep
    shard = n_d / tp / dp + n_e / ep / edp
    if zero == 0:  # (zero_stage > 0 in one process is a process group of one: ZeRO's own copies too)
        return int(16 * n)
    if zero == 3:
        return int(16 * shard)
    grads = 4 * n if zero == 1 else 4 * shard
    return int(4 * n + grads + 12 * shard)  # weights, gradients, moments + fp32 master partitioned


def torchrun(script: str, world: int, out: str, overrides: list[str], env: dict, what: str) -> None:
    """`script --worker OUT -- OVERRIDES logging.run_dir=OUT/run` on `world` local ranks; stops with the
    workers' stderr if they fail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), script,
           "--worker", out, "--", *overrides, f"logging.run_dir={out}/run"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")


def run_cell(model: list[str], world: int, stage: int, cache: str, env: dict, pp: int = 1, accum: int = 1) -> dict:
    from moe_dist import plan
    from moe_dist.config import load_config, resolve

    overrides = model + RUN + [f"parallel.ep={world // pp}", f"parallel.pp={pp}", f"train.grad_accum_steps={accum}",
                               f"train.zero_stage={stage}", f"data.cache_dir={cache}"]
    with tempfile.TemporaryDirectory() as out:
        torchrun(__file__, world, out, overrides, env, f"world {world} zero_stage {stage}")
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]
    cfg = resolve(load_config(None, overrides), world)
    return {"world": world, "pp": pp, "zero_stage": stage, "peak": max(r["vmhwm"] for r in ranks),
            "local_params": max(r["local_params"] for r in ranks), "formula": formula_bytes(cfg, world),
            "plan": plan.cpu_memory_estimate(cfg, world)["total"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--small", action="store_true", help="a 2M-parameter model (a quick check)")
    p.add_argument("--pp", type=int, default=1, help="also run each cell at this pipeline size (and pp 1 beside it)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        return worker([a for a in rest if a != "--"], args.worker)
    model, cfg, n_total, env, cache = _setup(args)
    if args.pp > 1:
        return pipeline_cells(args, model, cfg, n_total, env, cache)
    print(f"{n_total / 1e6:.0f}M parameters (16N = {16 * n_total / GiB:.2f} GiB); 2 training steps of 1 x "
          f"{cfg.model.max_seq_len} tokens per rank; ep = world; fp32 on CPU\n")
    print("| world | zero_stage | peak VmHWM per rank, GiB | formula (model state), GiB | plan (whole step), GiB | "
          "measured / plan | local parameters |")
    print("|---|---|---|---|---|---|---|")
    cells = {}
    for world in args.worlds:
        for stage in args.stages:
            c = run_cell(model, world, stage, cache, env)
            cells[world, stage] = c
            print(f"| {world} | {stage} | {c['peak'] / GiB:.2f} | {c['formula'] / GiB:.2f} | {c['plan'] / GiB:.2f} | "
                  f"{c['peak'] / c['plan']:.2f} | {c['local_params'] / 1e6:.0f}M |", flush=True)
    if (2, 3) in cells and (4, 3) in cells:
        ratio = cells[4, 3]["peak"] / cells[2, 3]["peak"]
        bound = 1.3 * 16 * n_total / 4 + GiB
        print(f"\nzero_stage 3: world 4 / world 2 = {ratio:.2f} (target <= 0.65); world 4 peak "
              f"{cells[4, 3]['peak'] / GiB:.2f} GiB against 1.3 x 16N/4 + 1 GiB = {bound / GiB:.2f} GiB")


def _setup(args):
    """(model overrides, their config, total parameters, the workers' environment, a token cache directory)."""
    from moe_dist import plan
    from moe_dist.config import load_config

    model = SMALL if args.small else MODEL
    cfg = load_config(None, model)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return model, cfg, plan.param_counts(cfg.model, cfg.moe).total, env, tempfile.mkdtemp(prefix="moe_dist_memory_")


def pipeline_cells(args, model, cfg, n_total: int, env: dict, cache: str) -> None:
    """pp 1 and pp args.pp at each world (ep = world / pp), args.pp micro-batches per step in both."""
    print(f"{n_total / 1e6:.0f}M parameters; 2 training steps of {args.pp} micro-batches of 1 x {cfg.model.max_seq_len} "
          f"tokens per rank; ep = world / pp; fp32 on CPU, 1F1B\n")
    print("| world | pp | zero_stage | peak VmHWM per rank, GiB | / pp 1 | formula (model state, fullest rank), GiB | "
          "plan (whole step), GiB | measured / plan | local parameters (largest rank) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for world in args.worlds:
        for stage in args.stages:
            base = None
            for pp in (1, args.pp):
                c = run_cell(model, world, stage, cache, env, pp=pp, accum=args.pp)
                base = base or c
                print(f"| {world} | {pp} | {stage} | {c['peak'] / GiB:.2f} | {c['peak'] / base['peak']:.2f} | "
                      f"{c['formula'] / GiB:.2f} | {c['plan'] / GiB:.2f} | {c['peak'] / c['plan']:.2f} | "
                      f"{c['local_params'] / 1e6:.0f}M |", flush=True)


if __name__ == "__main__":
    main()
