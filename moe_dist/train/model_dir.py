"""Models wherever they were written, and Hugging Face directories in and out.

`load_model` takes a training run or checkpoint, a model directory (`moe-dist import-hf` or `moe-dist
export`: config.yaml + model.safetensors) or a Hugging Face directory (config.json + safetensors), so
`eval`, `generate` and `export-hf` run on any of them. `import_start_point` writes what `moe-dist
import-hf` hands to training; `export_extras` what a Hugging Face export carries beside the weights.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from moe_dist.config import Config, ConfigError, from_dict, merge, parse_overrides, resolve, validate
from moe_dist.interop.hf import CheckpointReader, hf_to_configs, read_config, save_weights
from moe_dist.interop.hf.io import TOKENIZER_FILES, write_json

# A fine-tuning start: a pretrained model wants a small learning rate and little warmup, not from-scratch settings.
FINE_TUNE = dict(lr=2e-5, min_lr=2e-6, warmup_steps=10)
SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kind_of(path: Path) -> str:
    """hf (config.json), model (config.yaml + model.safetensors) or checkpoint (anything else: a run or step dir)."""
    if (path / "config.json").is_file():
        return "hf"
    if (path / "config.yaml").is_file() and (path / "model.safetensors").is_file():
        return "model"
    return "checkpoint"


def load_model(path, overrides: Sequence[str] = (), need_tokenizer: bool = True):
    """(model in eval mode, Config, source dir) from any directory kind_of() knows.

    overrides: `key.sub=value` applied to the model's config (e.g. data.dataset=... for eval).
    need_tokenizer: refuse a Hugging Face directory without tokenizer.json unless data.tokenizer is given.
    """
    from moe_dist.checkpoint import find_checkpoint, load_config_dict, load_model_state
    from moe_dist.interop.hf import load_weights
    from moe_dist.model import build_model

    p, ckpt = Path(path), None
    kind = kind_of(p)
    extra = parse_overrides(list(overrides))
    if kind == "hf":
        _, mcfg, moe = hf_to_configs(read_config(p))
        tree = Config(model=mcfg, moe=moe).to_dict()
        tree["checkpoint"]["init_from"] = str(p)
        if (p / "tokenizer.json").is_file():
            tree["data"]["tokenizer"] = str((p / "tokenizer.json").resolve())
        elif need_tokenizer and "tokenizer" not in extra.get("data", {}):
            raise ConfigError(f"{p}: no tokenizer.json; its {mcfg.vocab_size} token ids need their tokenizer: pass "
                              f"data.tokenizer=path/to/tokenizer.json{_or_byte(mcfg.vocab_size, 'data.tokenizer=byte')}")
    elif kind == "model":
        tree = yaml.safe_load((p / "config.yaml").read_text())
        tree.setdefault("checkpoint", {})["init_from"] = str(p / "model.safetensors")
    else:
        ckpt = find_checkpoint(p)
        tree = load_config_dict(ckpt)
    tree["parallel"] = {}  # the model is the one-device model, used in this process
    tree = merge(tree, extra)
    tree.setdefault("checkpoint", {})["resume"] = False  # the weights are loaded here
    cfg = resolve(from_dict(Config, tree), 1)
    model = build_model(cfg, device="meta")  # its weights are loaded below, not initialised
    model.to_empty(device="cpu").tie_weights()
    model.reset_buffers()
    if ckpt is None:
        load_weights(model, cfg.checkpoint.init_from)
    else:  # the checkpoint's weights, not those it started from (cfg keeps init_from: export-hf reads its dtype)
        model.load_state_dict(load_model_state(ckpt))
    return model.eval(), cfg, ckpt or p


def _or_byte(vocab: int, spelling: str) -> str:
    """The byte tokenizer as an alternative, where its 256 ids fit the vocabulary."""
    return f" (or {spelling} if the ids are UTF-8 bytes)" if vocab >= 256 else ""


def weights_dtype(path: Optional[str]) -> torch.dtype:
    """The floating-point dtype of a weights file or directory; float32 when there is none."""
    if not path or not Path(path).exists():
        return torch.float32
    with CheckpointReader(path) as weights:
        return weights.dtype()


def source_dtype(cfg: Config, source: Path) -> torch.dtype:
    """What an export writes by default: the dtype of the weights the model came from (a training
    checkpoint holds fp32 master weights; it defaults to the dtype of its checkpoint.init_from)."""
    return weights_dtype(str(source) if kind_of(source) != "checkpoint" else cfg.checkpoint.init_from)


# ---------------------------------------------------------------------------------------------
# import-hf


def import_start_point(hf_dir, out, tokenizer: Optional[str] = None, dtype: Optional[str] = None,
                       max_seq_len: Optional[int] = None) -> tuple[Path, int]:
    """Write OUT/model.safetensors, OUT/config.yaml (a fine-tuning run of it) and the checkpoint's tokenizer and
    generation files; returns (config.yaml, parameters). Paths in config.yaml are absolute.

    tokenizer: a tokenizer.json, or byte; default: the checkpoint's tokenizer.json (there must be one).
    dtype: of model.safetensors (float32, bfloat16, float16); default: the checkpoint's.
    """
    from moe_dist.interop.hf import import_hf

    hf_dir, out = Path(hf_dir), Path(out).resolve()
    hf = read_config(hf_dir)
    vocab = hf.get("vocab_size")
    if tokenizer is None:
        if not (hf_dir / "tokenizer.json").is_file():
            raise ConfigError(f"{hf_dir}: no tokenizer.json; its {vocab} token ids need their tokenizer: pass --tokenizer "
                              f"path/to/tokenizer.json{_or_byte(vocab or 0, '--tokenizer byte')}")
        tokenizer = str(hf_dir / "tokenizer.json")
    elif tokenizer == "byte" and vocab is not None and vocab < 256:
        raise ConfigError(f"--tokenizer byte: the byte tokenizer has 256 ids, {hf_dir}/config.json a vocab_size of {vocab}; "
                          "give the checkpoint's tokenizer.json")
    elif tokenizer != "byte" and not Path(tokenizer).is_file():
        raise ConfigError(f"--tokenizer {tokenizer}: no such file; give a tokenizer.json, or byte")
    model, mcfg, moe = import_hf(hf_dir, max_seq_len=max_seq_len)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "model.safetensors", DTYPES[dtype] if dtype else weights_dtype(str(hf_dir)))
    for name in TOKENIZER_FILES:
        if name != "tokenizer.json" and (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out / name)
    if tokenizer != "byte":
        shutil.copyfile(tokenizer, out / "tokenizer.json")
        tokenizer = str(out / "tokenizer.json")
    if not (out / "generation_config.json").is_file():  # the special ids live in config.json then
        write_json(out / "generation_config.json", {k: hf.get(k) for k in SPECIAL})
    cfg = Config(model=mcfg, moe=moe)
    cfg.data = dataclasses.replace(cfg.data, tokenizer=tokenizer)
    cfg.train = dataclasses.replace(cfg.train, **FINE_TUNE)
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, init_from=str(out / "model.safetensors"))
    cfg.logging = dataclasses.replace(cfg.logging, run_dir=str(out / "run"))
    validate(cfg)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out / "config.yaml", sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# export-hf


def export_extras(cfg: Config, source: Path, out: Path) -> dict:
    """Copy the tokenizer to an export directory and return its special token ids (bos/eos/pad_token_id).

    The ids come from the first generation_config.json (or config.json) beside the model's source, its
    tokenizer or its checkpoint.init_from; else the tokenizer's end-of-text id is the eos id.
    """
    from moe_dist.data import load_tokenizer

    tok_file = Path(cfg.data.tokenizer) if cfg.data.tokenizer != "byte" else None
    if tok_file is not None and not tok_file.is_file():
        raise ConfigError(f"data.tokenizer: {tok_file} (in {source}'s config) does not exist here; the export copies it: "
                          "run export-hf from the directory the model was trained in")
    init = Path(cfg.checkpoint.init_from) if cfg.checkpoint.init_from else None
    dirs = [d for d in (source if source.is_dir() else None, tok_file.parent if tok_file else None,
                        (init if init.is_dir() else init.parent) if init else None) if d is not None]
    tokens = None
    for d in dirs:
        for name in ("generation_config.json", "config.json"):
            if (d / name).is_file():
                found = json.loads((d / name).read_text())
                if any(found.get(k) is not None for k in SPECIAL):
                    tokens = {k: found.get(k) for k in SPECIAL}
                    break
        if tokens:
            break
    if tokens is None:
        tokens = {"bos_token_id": None, "eos_token_id": load_tokenizer(cfg.data.tokenizer).eos_id, "pad_token_id": None}
    if tok_file is not None:
        if tok_file.resolve() != (out / "tokenizer.json").resolve():
            shutil.copyfile(tok_file, out / "tokenizer.json")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (tok_file.parent / name).is_file() and tok_file.parent.resolve() != out.resolve():
                shutil.copyfile(tok_file.parent / name, out / name)
        if not (out / "tokenizer_config.json").is_file():  # what transformers' AutoTokenizer needs beside tokenizer.json
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_file))
            names = {k.replace("_token_id", "_token"): tok.id_to_token(v) for k, v in tokens.items() if v is not None}
            write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                       "model_max_length": cfg.model.max_seq_len, **names})
    return tokens

