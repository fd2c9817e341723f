"""`moe-dist` command line: train, eval, generate, tokenize.

    moe-dist train --config configs/tiny.yaml train.steps=100 model.d_model=128
    moe-dist eval --run-dir runs/tiny
    moe-dist generate --run-dir runs/tiny --prompt "The for statement" --max-new-tokens 200
    moe-dist tokenize --config configs/small.yaml --vocab-size 8192 --out tokenizers/pydoc-8k.json

Known problems (bad config, bad data, missing checkpoint) print one `moe-dist: error: ...` message
and exit with status 2; tracebacks are for bugs.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional

from moe_dist.config import ConfigError, load_config


def _world_size() -> int:
    """World size from torchrun, mpirun/srun (exporting RANK/WORLD_SIZE for the latter two), or 1."""
    from moe_dist.parallel.env import discover

    return discover().world_size


def cmd_train(args) -> int:
    from moe_dist.train import train

    cfg = load_config(args.config, args.overrides, world_size=_world_size())
    train(cfg)
    return 0


def cmd_eval(args) -> int:
    import torch

    from moe_dist.config import Config, from_dict, parse_overrides, validate, _merge
    from moe_dist.train.checkpoint import find_checkpoint, load_config_dict, load_model_state
    from moe_dist.train.trainer import Runtime, Trainer, build_model, resolve_device

    ckpt = find_checkpoint(args.run_dir)
    tree = _merge(load_config_dict(ckpt), parse_overrides(args.overrides))
    tree.setdefault("checkpoint", {})["resume"] = False  # we load the weights ourselves, below
    cfg = from_dict(Config, tree)
    validate(cfg)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg)
    model.load_state_dict(load_model_state(ckpt))
    trainer = Trainer(cfg, Runtime(model=model.to(device), device=device))
    loss = trainer.evaluate(args.batches)
    print(f"{ckpt}: validation loss {loss:.4f} nats/token (perplexity {math.exp(min(loss, 50)):.2f}) "
          f"over {args.batches or cfg.train.eval_batches} batches")
    return 0


def cmd_generate(args) -> int:
    from moe_dist.train.generate import generate_text, load_trained, tokenizer_of

    if args.max_new_tokens < 0 or (args.top_k is not None and args.top_k < 1):
        raise ConfigError("--max-new-tokens must be >= 0 and --top-k >= 1")
    model, cfg, _ = load_trained(args.run_dir)
    text = generate_text(model, tokenizer_of(cfg), args.prompt, args.max_new_tokens, args.temperature,
                         args.top_k, args.seed)
    print(args.prompt + text)
    return 0


def cmd_tokenize(args) -> int:
    from moe_dist.data import iter_documents, train_tokenizer

    cfg = load_config(args.config, args.overrides)
    vocab = args.vocab_size or (cfg.model.vocab_size if cfg.model.vocab_size > 256 else 4096)
    tok = train_tokenizer(iter_documents(cfg.data.dataset, cfg.data.jsonl_field), vocab, args.out)
    print(f"wrote {args.out}: byte-level BPE with {tok.vocab_size} tokens trained on {cfg.data.dataset}; "
          f"use it with data.tokenizer={args.out} model.vocab_size={tok.vocab_size}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-dist", description="Train and use Mixture-of-Experts Transformer LMs.")
    sub = p.add_subparsers(dest="command", required=True)
    overrides = dict(nargs="*", default=[], metavar="key.sub=value", help="config overrides, e.g. train.steps=100")

    t = sub.add_parser("train", help="train a model (resumes from the run dir's latest checkpoint)")
    t.add_argument("--config", help="YAML config, e.g. configs/tiny.yaml (defaults are used without one)")
    t.add_argument("overrides", **overrides)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="validation loss of a checkpoint")
    e.add_argument("--run-dir", required=True, help="a run dir (uses its latest checkpoint) or a step_* dir")
    e.add_argument("--batches", type=int, default=None, help="validation batches (default train.eval_batches)")
    e.add_argument("overrides", **overrides)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("--run-dir", required=True, help="a run dir (uses its latest checkpoint) or a step_* dir")
    g.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    k = sub.add_parser("tokenize", help="train a byte-level BPE tokenizer.json on the configured corpus")
    k.add_argument("--config", help="YAML config whose data.dataset is the corpus")
    k.add_argument("--vocab-size", type=int, default=None, help="default: model.vocab_size if > 256, else 4096")
    k.add_argument("--out", default="tokenizer.json", help="where to write tokenizer.json")
    k.add_argument("overrides", **overrides)
    k.set_defaults(func=cmd_tokenize)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from moe_dist.data import DataError
    from moe_dist.train import CheckpointError, TrainingError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"moe-dist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-dist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
