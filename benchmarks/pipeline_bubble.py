"""Pipeline bubble: the measured idle fraction of each pipeline rank against the schedule's formula.

The real Trainer trains an MoE at world = pp (dp 1) under each schedule and micro-batch count. On every
rank the forward and backward of each stage chunk (PipelineStage.forward_one_chunk / backward_one_chunk,
which start after their receives are complete) are timed, and so is the whole schedule step. A rank's
bubble fraction is 1 - busy / step: the time it waits for the other stages (and for point-to-point
transfers) over the step. Beside it the ideal with equal stages and free transfers (Narayanan et al.
2021): 1F1B (pp - 1) / (m + pp - 1), interleaved 1F1B with v stages per rank (pp - 1) / (v m + pp - 1).
Each figure is the median over the steps after the first two, averaged over the ranks.

    python benchmarks/pipeline_bubble.py            # 8 layers, pp 2, m = 2, 4, 8 (a few minutes)
    python benchmarks/pipeline_bubble.py --small    # a toy model, m = 2, 4 (what tests run)

On a CPU the ranks share the machine's cores: give each rank a core (pp <= cores), or the ranks' compute
slows down each other and the idle time shrinks.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODEL = ["model.d_model=256", "model.n_layer=8", "model.n_head=8", "model.d_ff=512", "model.max_seq_len=128",
         "moe.n_experts=8", "moe.top_k=2", "moe.d_expert=256", "train.micro_batch_size=2"]
SMALL = ["model.d_model=64", "model.n_layer=4", "model.n_head=4", "model.d_ff=128", "model.max_seq_len=32",
         "moe.n_experts=4", "moe.top_k=2", "moe.d_expert=64", "train.micro_batch_size=2"]
RUN = ["train.device=cpu", "train.eval_every=0", "train.eval_batches=1", "train.log_every=1000",
       "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.resume=false", "checkpoint.every=0"]
WARMUP = 2  # steps left out: the first builds the schedule's buffers


def ideal(pp: int, m: int, v: int) -> float:
    """The bubble fraction of (interleaved, v > 1) 1F1B with equal stages and free transfers."""
    return (pp - 1) / (v * m + pp - 1)


def worker(overrides: list[str], out_dir: str) -> None:
    """One rank (under torchrun): time its chunks' forwards and backwards and its schedule steps."""
    import torch

    from moe_dist.config import load_config
    from moe_dist.train import Trainer

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    cfg = load_config(None, overrides, world_size=world)
    trainer = Trainer(cfg)
    pipe = trainer.run.pipeline
    busy = [0.0]

    def timed(fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                busy[0] += time.perf_counter() - t0
        return run

    for stage in pipe.stages:
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            setattr(stage, name, timed(getattr(stage, name)))
    step, fractions, step_s = pipe.schedule.step, [], []

    def timed_step(*args, **kwargs):
        busy[0] = 0.0
        t0 = time.perf_counter()
        out = step(*args, **kwargs)
        seconds = time.perf_counter() - t0
        fractions.append(1 - busy[0] / seconds)
        step_s.append(seconds)
        return out

    pipe.schedule.step = timed_step
    for _ in range(cfg.train.steps):
        trainer.train_step(log=False)
    rank = trainer.rt.pgm.rank
    Path(out_dir, f"{rank}.json").write_text(json.dumps({"bubble": fractions[WARMUP:], "step_s": step_s[WARMUP:]}))
    trainer.rt.close()


def run(model: list[str], pp: int, m: int, v: int, steps: int, cache: str) -> dict:
    from memory import torchrun

    schedule = "1f1b" if v == 1 else "interleaved_1f1b"
    overrides = model + RUN + [f"parallel.pp={pp}", f"parallel.pp_schedule={schedule}", f"parallel.pp_virtual_stages={v}",
                               f"train.grad_accum_steps={m}", f"train.steps={steps}", f"data.cache_dir={cache}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as out:
        torchrun(__file__, pp, out, overrides, env, f"pp {pp} m {m} v {v}")
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(pp)]
    per_rank = [statistics.median(r["bubble"]) for r in ranks]
    return {"pp": pp, "m": m, "v": v, "schedule": schedule, "measured": sum(per_rank) / pp, "per_rank": per_rank,
            "ideal": ideal(pp, m, v), "step_s": statistics.median(s for r in ranks for s in r["step_s"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a toy model (a quick check)")
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--micro-batches", type=int, nargs="+", default=None, help="m values (default 2 4 8; --small 2 4)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        return worker([a for a in rest if a != "--"], args.worker)
    model = SMALL if args.small else MODEL
    ms = args.micro_batches or ([2, 4] if args.small else [2, 4, 8])
    steps = max(args.steps, WARMUP + 1)
    cache = tempfile.mkdtemp(prefix="moe_dist_pp_")
    rows = [run(model, args.pp, m, v, steps, cache) for v in (1, 2) for m in ms]
    print(f"world {args.pp} = pp {args.pp} (dp 1), {model[1].split('=')[1]} layers, fp32 on CPU, gloo, one thread "
          f"per rank; median of {steps - WARMUP} steps, mean over ranks\n")
    print("| schedule | stages per rank | micro-batches m | measured bubble | ideal | measured / ideal | step, s | "
          "per rank |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['schedule']} | {r['v']} | {r['m']} | {r['measured']:.3f} | {r['ideal']:.3f} | "
              f"{r['measured'] / r['ideal']:.2f} | {r['step_s']:.3f} | {', '.join(f'{b:.3f}' for b in r['per_rank'])} |")
    print("json " + json.dumps(rows))


if __name__ == "__main__":
    main()
