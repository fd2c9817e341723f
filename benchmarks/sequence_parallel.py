"""Sequence parallelism at tp=2: per-rank peak memory and all-to-all bytes, with it and without.

The real Trainer trains a few steps of the same MoE at world 2 = tp 2 with ep 2 (each tp rank also an
ep rank, its experts half of each layer's), once with parallel.sequence_parallel=true (the default:
between blocks each tp rank holds half of the sequence, and dispatches only its own tokens' assignments)
and once with false (plain tensor parallelism: the residual stream replicated, every tp rank dispatching
every assignment). Each rank reports VmHWM (the peak of its resident set, glibc returning freed blocks:
train.cpu_malloc_cache=false). From metrics.jsonl: the all-to-all payload per rank and step (the rows the
experts received, a2a_rows_received, x d_model x 4 bytes, x 2 for dispatch and combine, x 2 for forward and
backward; a rank's rows for its own experts included), and the bytes that left for other ranks (a2a_mb;
which share of a rank's assignments is remote depends on the routing, so it halves only about). Beside
each figure, its ratio to the run without sequence parallelism.

    python benchmarks/sequence_parallel.py            # ~150M parameters, 4 x 1024 tokens per step (minutes)
    python benchmarks/sequence_parallel.py --small    # a toy model (seconds; what tests run)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MiB = 2 ** 20
MODEL = ["model.d_model=1024", "model.n_layer=4", "model.n_head=8", "model.d_ff=2048", "model.vocab_size=16384",
         "model.max_seq_len=1024", "moe.n_experts=8", "moe.top_k=2", "moe.d_expert=1024",
         "train.micro_batch_size=4"]
SMALL = ["model.d_model=64", "model.n_layer=2", "model.n_head=4", "model.d_ff=128", "model.vocab_size=512",
         "model.max_seq_len=64", "moe.n_experts=4", "moe.top_k=2", "moe.d_expert=64", "train.micro_batch_size=2"]
RUN = ["parallel.tp=2", "parallel.ep=2", "train.steps=3", "train.device=cpu", "train.eval_every=0",
       "train.eval_batches=1", "train.log_every=1", "logging.progress_bar=false", "logging.tensorboard=false",
       "checkpoint.resume=false", "train.cpu_malloc_cache=false"]
WORLD = 2


def worker(overrides: list[str], out_dir: str) -> None:
    """One rank (under torchrun): the run, then its VmHWM."""
    import torch

    from memory import vmhwm_bytes
    from moe_dist.config import load_config
    from moe_dist.train import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(load_config(None, overrides, world_size=WORLD))
    trainer.fit()
    Path(out_dir, f"{trainer.rt.pgm.rank}.json").write_text(json.dumps({"vmhwm": vmhwm_bytes()}))
    trainer.rt.close()


def run(model: list[str], sequence_parallel: bool, cache: str) -> dict:
    from memory import torchrun

    overrides = model + RUN + [f"parallel.sequence_parallel={str(sequence_parallel).lower()}", f"data.cache_dir={cache}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as out:
        torchrun(__file__, WORLD, out, overrides, env, f"sequence_parallel={sequence_parallel}")
        peak = max(json.loads(Path(out, f"{r}.json").read_text())["vmhwm"] for r in range(WORLD))
        steps = [r for r in map(json.loads, Path(out, "run", "metrics.jsonl").read_text().splitlines())
                 if r["kind"] == "train"]
    from moe_dist.config import load_config

    d_model = load_config(None, model).model.d_model
    # per rank: the mean over the ranks of what every rank's experts received / sent
    payload = [sum(map(sum, r["a2a_rows_received"])) / WORLD * d_model * 4 * 2 * 2 for r in steps]
    remote = [r["a2a_mb"] * 1e6 / WORLD for r in steps]
    return {"peak": peak, "a2a_bytes": payload, "remote_bytes": remote, "loss": [r["loss"] for r in steps]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a toy model (a quick check)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        return worker([a for a in rest if a != "--"], args.worker)
    from moe_dist import plan
    from moe_dist.config import load_config

    model = SMALL if args.small else MODEL
    cfg = load_config(None, model)
    n = plan.param_counts(cfg.model, cfg.moe).total
    cache = tempfile.mkdtemp(prefix="moe_dist_sp_")
    off, on = run(model, False, cache), run(model, True, cache)
    print(f"{n / 1e6:.0f}M parameters; world 2 = tp 2 x ep 2; {cfg.train.micro_batch_size} x {cfg.model.max_seq_len} "
          f"tokens per step; fp32 on CPU, gloo\n")
    print("| sequence parallelism | peak VmHWM per rank, MiB | / without | all-to-all payload per rank per step, MB | "
          "/ without | to other ranks, MB | / without |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("off (plain tp)", off), ("on (default)", on)):
        print(f"| {name} | {r['peak'] / MiB:.0f} | {r['peak'] / off['peak']:.3f} | {r['a2a_bytes'][-1] / 1e6:.3f} | "
              f"{r['a2a_bytes'][-1] / off['a2a_bytes'][-1]:.3f} | {r['remote_bytes'][-1] / 1e6:.3f} | "
              f"{r['remote_bytes'][-1] / off['remote_bytes'][-1]:.3f} |")
    worst = max(abs(a - b) / abs(b) for a, b in zip(on["loss"], off["loss"]))
    print(f"\nlosses with and without: largest relative difference {worst:.1e} (the same model, other sums)")
    print("json " + json.dumps({"off": off, "on": on}))


if __name__ == "__main__":
    main()
