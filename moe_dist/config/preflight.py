"""Environment preflight: what a resolved config needs from this machine (CUDA, kernels, DeepSpeed,
files), checked before any work starts, each failure one message naming the field and the fix."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from .schema import Config, ConfigError

INSTALL_DS = "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed"


@functools.cache
def onednn_available() -> bool:
    """oneDNN's fp32 GEMM (the private op torch.compile uses for CPU linears) is in this torch."""
    import torch

    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def preflight(cfg: Config, machine: bool = True) -> None:
    """Raise ConfigError listing every need of `cfg` (resolved or not) that this machine does not meet;
    machine=False checks the files only (a dry run of a job for other machines)."""
    import torch

    errors: list[str] = []
    tr, m, moe, d = cfg.train, cfg.model, cfg.moe, cfg.data
    if machine:
        gpu = tr.device == "cuda" or (tr.device == "auto" and torch.cuda.is_available())
        if tr.device == "cuda" and not torch.cuda.is_available():
            errors.append("train.device: cuda requested but no CUDA device is visible; use train.device=auto or cpu")
        if cfg.parallel.backend == "nccl" and not gpu:
            errors.append("parallel.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
        for name, value in (("model.cpu_gemm", m.cpu_gemm), ("moe.grouped_mm", moe.grouped_mm)):
            if value == "onednn" and not onednn_available():
                errors.append(f"{name}: onednn needs a torch built with oneDNN (mkldnn); use auto")
            elif value == "onednn" and gpu:
                errors.append(f"{name}: onednn runs fp32 on a CPU, and train.device={tr.device} runs on the GPU here; "
                              "use auto, or train.device=cpu")
        if moe.grouped_mm == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
            errors.append(f"moe.grouped_mm: torch {torch.__version__} has no torch._grouped_mm (it needs torch 2.8 "
                          "or newer); use auto or loop")
    if not d.dataset.startswith("builtin:") and not Path(d.dataset).exists():
        errors.append(f"data.dataset: '{d.dataset}' does not exist; give a text/JSONL file or a directory, or builtin:pydoc")
    if d.tokenizer != "byte" and not Path(d.tokenizer).is_file():
        errors.append(f"data.tokenizer: '{d.tokenizer}' is not a file; give a tokenizer.json (make one with "
                      "`moe-dist tokenize`) or byte")
    init = cfg.checkpoint.init_from
    if init is not None and not Path(init).exists():
        errors.append(f"checkpoint.init_from: '{init}' does not exist; give a model.safetensors written by "
                      "`moe-dist import-hf` or a Hugging Face checkpoint directory")
    if errors:
        raise ConfigError("this machine cannot run the config:\n  " + "\n  ".join(errors))
