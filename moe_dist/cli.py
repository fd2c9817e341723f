"""`moe-dist` command line: train, eval, generate, export, tokenize, import-hf, export-hf, plan, report, info.

    moe-dist train --config configs/tiny.yaml train.steps=100 model.d_model=128
    moe-dist eval --run-dir runs/tiny
    moe-dist generate --run-dir runs/tiny --prompt "The for statement" --max-new-tokens 200
    moe-dist export runs/tiny exported/tiny      # one-device model.safetensors + config.yaml
    moe-dist tokenize --config configs/small.yaml --vocab-size 8192 --out tokenizers/pydoc-8k.json
    moe-dist import-hf path/to/Mixtral-dir --out runs/mixtral-start   # then: moe-dist train --config runs/mixtral-start/config.yaml
    moe-dist export-hf runs/tiny exported/tiny-hf
    moe-dist plan --config configs/mixtral_8x7b.yaml --gpus 64 --gpu-memory-gb 80   # layouts that fit, the fastest
    moe-dist report runs/tiny [--out DIR]    # PNG plots (loss, expert load per layer, balance, ...) + summary
    moe-dist info runs/tiny                  # checkpoints, layout, resolved config, last validation loss

Known problems (bad config, bad data, missing checkpoint) print one `moe-dist: error: ...` message
and exit with status 2; tracebacks are for bugs.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional

from moe_dist.config import ConfigError, load_config


def cmd_train(args) -> int:
    from moe_dist.config import preflight, resolve
    from moe_dist.parallel.env import discover
    from moe_dist.train import train

    if args.dry_run:
        from moe_dist.train.setup import dry_run

        world = args.world_size or discover().world_size
        print(dry_run(load_config(args.config, args.overrides, world_size=world), world, gpu=args.gpu))
        return 0
    launch = discover()  # torchrun, mpirun/srun (through moe_dist.parallel.env) or one process
    cfg = load_config(args.config, args.overrides, world_size=launch.world_size)
    preflight(resolve(cfg, launch.world_size))  # every config and environment error before any work
    train(cfg, launch)
    return 0


def cmd_eval(args) -> int:
    from moe_dist.train.model_dir import load_model
    from moe_dist.train.setup import local_run
    from moe_dist.train.trainer import evaluate

    model, cfg, source = load_model(args.run_dir, args.overrides)
    run = local_run(cfg, model)
    n = args.batches or run.cfg.train.eval_batches
    loss = evaluate(run.model, run.data.eval_batches(n), run.runtime)
    print(f"{source}: validation loss {loss:.4f} nats/token (perplexity {math.exp(min(loss, 50)):.2f}) over {n} batches")
    return 0


def cmd_generate(args) -> int:
    from moe_dist.train.generate import generate_text, tokenizer_of
    from moe_dist.train.model_dir import load_model

    if args.max_new_tokens < 0 or (args.top_k is not None and args.top_k < 1):
        raise ConfigError("--max-new-tokens must be >= 0 and --top-k >= 1")
    model, cfg, _ = load_model(args.run_dir, args.overrides)
    tokenizer = tokenizer_of(cfg)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer: {cfg.data.tokenizer} has {tokenizer.vocab_size} ids, the model "
                          f"{cfg.model.vocab_size}; give the model's tokenizer")
    text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                         args.top_k, args.seed)
    print(args.prompt + text)
    return 0


def cmd_export(args) -> int:
    """Consolidate a (sharded) checkpoint into one-device safetensors + config.yaml, in this process."""
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    from moe_dist.checkpoint.manager import find_checkpoint, load_model_state

    ckpt = find_checkpoint(args.run_dir)
    state, seen = {}, set()
    for k, v in load_model_state(ckpt).items():  # tied weights share storage; safetensors wants them apart
        v = v.contiguous()
        state[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": str(ckpt)})
    shutil.copyfile(ckpt / "config.yaml", out / "config.yaml")
    n = sum(v.numel() for v in state.values())
    print(f"wrote {out}/model.safetensors ({len(state)} tensors, {n / 1e6:.2f}M values, one-device layout) "
          f"and config.yaml from {ckpt}")
    return 0


def cmd_tokenize(args) -> int:
    from moe_dist.data import iter_documents, train_tokenizer

    cfg = load_config(args.config, args.overrides)
    vocab = args.vocab_size or (cfg.model.vocab_size if cfg.model.vocab_size > 256 else 4096)
    tok = train_tokenizer(iter_documents(cfg.data.dataset, cfg.data.jsonl_field), vocab, args.out)
    print(f"wrote {args.out}: byte-level BPE with {tok.vocab_size} tokens trained on {cfg.data.dataset}; "
          f"use it with data.tokenizer={args.out} model.vocab_size={tok.vocab_size}")
    return 0


def cmd_import_hf(args) -> int:
    """HF checkpoint dir -> OUT/model.safetensors + OUT/config.yaml that `moe-dist train` starts from."""
    from moe_dist.train.model_dir import import_start_point

    config, n = import_start_point(args.hf_dir, args.out, args.tokenizer, args.dtype, args.max_seq_len)
    print(f"imported {args.hf_dir}: {n / 1e6:.2f}M parameters -> {config.parent}; fine-tune it with\n"
          f"  moe-dist train --config {config} [parallel.ep=...]")
    return 0


def cmd_export_hf(args) -> int:
    from pathlib import Path

    from moe_dist.interop.hf import export_hf
    from moe_dist.train.model_dir import DTYPES, export_extras, load_model, source_dtype

    model, cfg, source = load_model(args.run_dir, need_tokenizer=False)
    dtype = DTYPES[args.dtype] if args.dtype else source_dtype(cfg, source)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = export_extras(cfg, source, out)
    family = export_hf(model, out, args.family, dtype=dtype, tokens=tokens)
    print(f"exported {source} to {out} as {family} ({str(dtype).removeprefix('torch.')}, Hugging Face format)")
    return 0


def cmd_plan(args) -> int:
    import dataclasses

    from moe_dist import plan

    gpu = dataclasses.replace(plan.GPUS[args.gpu], **{k: v for k, v in (("peak_tflops", args.peak_tflops),
                              ("nvlink_gb_s", args.nvlink_gb_s), ("network_gb_s", args.network_gb_s)) if v is not None})
    result = plan.plan(load_config(args.config, args.overrides), args.gpus, args.gpu_memory_gb, gpu, args.gpus_per_node,
                       args.max_load_ratio, args.global_batch_size)
    print(plan.to_json(result) if args.json else plan.format_table(result))
    return 0


def cmd_report(args) -> int:
    from moe_dist.report import report

    rep = report(args.run_dir, args.out)
    print(rep.summary)
    return 0


def cmd_info(args) -> int:
    from moe_dist.report import info

    print(info(args.run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-dist", description="Train and use Mixture-of-Experts Transformer LMs.")
    sub = p.add_subparsers(dest="command", required=True)
    overrides = dict(nargs="*", default=[], metavar="key.sub=value", help="config overrides, e.g. train.steps=100")

    t = sub.add_parser("train", help="train a model (resumes from the run dir's latest checkpoint)")
    t.add_argument("--config", help="YAML config, e.g. configs/tiny.yaml (defaults are used without one)")
    t.add_argument("--dry-run", action="store_true", help="resolve, validate and build on the meta device as the job "
                   "would, print the layout, parameter counts and per-GPU memory, allocate nothing, exit")
    t.add_argument("--world-size", type=int, default=None, help="--dry-run: the job's ranks (default: this launch's)")
    t.add_argument("--gpu", default="h100", choices=["h100", "h200", "a100", "b200"], help="--dry-run: the plan's GPU")
    t.add_argument("overrides", **overrides)
    t.set_defaults(func=cmd_train)

    model_dir = ("a run dir (its latest checkpoint), a step_* dir, a model dir (import-hf / export: config.yaml + "
                 "model.safetensors) or a Hugging Face dir")
    e = sub.add_parser("eval", help="validation loss of a checkpoint or model")
    e.add_argument("--run-dir", required=True, help=model_dir)
    e.add_argument("--batches", type=int, default=None, help="validation batches (default train.eval_batches)")
    e.add_argument("overrides", **overrides)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="sample text from a checkpoint or model")
    g.add_argument("--run-dir", required=True, help=model_dir)
    g.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("overrides", **overrides)
    g.set_defaults(func=cmd_generate)

    x = sub.add_parser("export", help="write a checkpoint as one-device model.safetensors + config.yaml")
    x.add_argument("run_dir", help="a run dir (uses its latest checkpoint) or a step_* dir")
    x.add_argument("out_dir", help="where to write model.safetensors and config.yaml")
    x.set_defaults(func=cmd_export)

    k = sub.add_parser("tokenize", help="train a byte-level BPE tokenizer.json on the configured corpus")
    k.add_argument("--config", help="YAML config whose data.dataset is the corpus")
    k.add_argument("--vocab-size", type=int, default=None, help="default: model.vocab_size if > 256, else 4096")
    k.add_argument("--out", default="tokenizer.json", help="where to write tokenizer.json")
    k.add_argument("overrides", **overrides)
    k.set_defaults(func=cmd_tokenize)
    from moe_dist.interop.hf import FAMILIES

    dtypes = ["float32", "bfloat16", "float16"]
    i = sub.add_parser("import-hf", help="import a local Hugging Face MoE checkpoint dir as a moe_dist fine-tuning start")
    i.add_argument("hf_dir", help=f"dir with config.json and *.safetensors ({', '.join(FAMILIES)})")
    i.add_argument("--out", required=True, help="where to write model.safetensors, config.yaml and the tokenizer files")
    i.add_argument("--max-seq-len", type=int, default=None, help="default: the checkpoint's max_position_embeddings")
    i.add_argument("--tokenizer", default=None, help="a tokenizer.json, or byte; default: the checkpoint's tokenizer.json")
    i.add_argument("--dtype", choices=dtypes, default=None, help="of model.safetensors; default: the checkpoint's")
    i.set_defaults(func=cmd_import_hf)

    x = sub.add_parser("export-hf", help="write a checkpoint or model in Hugging Face format (config.json + safetensors)")
    x.add_argument("run_dir", help=model_dir)
    x.add_argument("out_dir")
    x.add_argument("--family", default=None, choices=FAMILIES, help="default: the first that expresses the model exactly")
    x.add_argument("--dtype", choices=dtypes, default=None,
                   help="default: the source's (a training checkpoint: its checkpoint.init_from's, else float32)")
    x.set_defaults(func=cmd_export_hf)

    from moe_dist.plan import DEFAULT_MAX_LOAD_RATIO, GPUS

    n = sub.add_parser("plan", help="predict memory, communication and step time of every layout on N GPUs; recommend one")
    n.add_argument("--config", required=True, help="YAML config of the model and batch, e.g. configs/mixtral_8x7b.yaml")
    n.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    n.add_argument("--gpu-memory-gb", type=float, required=True, help="memory per GPU in GiB, e.g. 80")
    n.add_argument("--gpus-per-node", type=int, default=8, help="GPUs sharing NVLink (default 8)")
    n.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="peak FLOP/s and link presets (default h100)")
    n.add_argument("--peak-tflops", type=float, default=None, help="override the preset's dense bf16 TFLOP/s")
    n.add_argument("--nvlink-gb-s", type=float, default=None, help="override the preset's NVLink GB/s per GPU, one way")
    n.add_argument("--network-gb-s", type=float, default=None, help="override the preset's network GB/s per GPU, one way")
    n.add_argument("--max-load-ratio", type=float, default=DEFAULT_MAX_LOAD_RATIO,
                   help=f"busiest expert's rows over the mean under dropless expert parallelism (default "
                        f"{DEFAULT_MAX_LOAD_RATIO:g}; `train` logs the measured max_load_ratio)")
    n.add_argument("--global-batch-size", type=int, default=None,
                   help="sequences per optimizer step (default: the config's micro_batch_size x grad_accum_steps x dp)")
    n.add_argument("--json", action="store_true", help="print every layout as JSON")
    n.add_argument("overrides", **overrides)
    n.set_defaults(func=cmd_plan)

    r = sub.add_parser("report", help="plot a run's metrics.jsonl (loss, expert load per layer, balance, "
                                      "all-to-all, tokens/s) and summarise it")
    r.add_argument("run_dir", help="the run's logging.run_dir")
    r.add_argument("--out", default=None, help="where to write the PNGs and summary.txt (default RUN_DIR/report)")
    r.set_defaults(func=cmd_report)

    f = sub.add_parser("info", help="a run's checkpoints (steps, sizes), layout, resolved config, last validation loss")
    f.add_argument("run_dir", help="the run's logging.run_dir")
    f.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from moe_dist.data import DataError
    from moe_dist.interop.hf import HFInteropError
    from moe_dist.report import ReportError
    from moe_dist.train import CheckpointError, TrainingError

    from moe_dist.parallel.env import launcher_rank

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, TrainingError, HFInteropError, ReportError) as e:
        if launcher_rank() == 0:  # every rank of a job finds the same problem; one says it
            print(f"moe-dist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-dist: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moe-dist info RUN | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0


if __name__ == "__main__":
    sys.exit(main())
