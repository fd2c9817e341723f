"""Hugging Face checkpoint directories on disk: config.json, safetensors shards, the files beside them.

A checkpoint is read tensor by tensor (`CheckpointReader`: name -> tensor, or a slice of it, from the
shard that holds it), so a loader can take only what it needs; written as one model.safetensors or
as shards listed in model.safetensors.index.json.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterator, Union

import torch
from torch import Tensor

from .registry import HFInteropError

INDEX = "model.safetensors.index.json"
# Files a Hugging Face directory carries for its tokenizer and generation (copied, never converted).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def read_config(path: Union[str, Path]) -> dict:
    p = Path(path) / "config.json"
    if not p.is_file():
        raise HFInteropError(f"{path}: no config.json; give a Hugging Face checkpoint directory (config.json + *.safetensors)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise HFInteropError(f"{p}: not valid JSON ({e})") from None


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def shard_files(path: Union[str, Path]) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json lists (or, lacking both, every *.safetensors);
    a .safetensors file is its own one shard."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / INDEX).is_file():
        return [path / name for name in sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {', '.join(bins[:3])}: PyTorch pickles are not read; convert them to safetensors)" if bins else ""
        raise HFInteropError(f"{path}: no model.safetensors or {INDEX}{hint}")
    return found


class CheckpointReader:
    """The tensors of a checkpoint directory by name, each read from its shard when asked for.

        with CheckpointReader(path) as ckpt:
            for name in ckpt.names(): t = ckpt.get(name)      # or ckpt.get_slice(name)[rows]
    """

    def __init__(self, path: Union[str, Path]):
        from safetensors import safe_open

        self.path = Path(path)
        self._files = {f: safe_open(str(f), framework="pt") for f in shard_files(path)}
        self._where: dict[str, Path] = {}
        for f, handle in self._files.items():
            for name in handle.keys():
                self._where[name] = f

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> Tensor:
        return self._files[self._where[name]].get_tensor(name)

    def get_slice(self, name: str):
        """safetensors' lazy slice: index it (`[a:b]`) to read only those rows."""
        return self._files[self._where[name]].get_slice(name)

    def dtype(self) -> torch.dtype:
        """The checkpoint's floating-point dtype: that of most of its floating-point values."""
        sizes: Counter = Counter()
        for name in self._where:
            s = self.get_slice(name)
            dtype = _DTYPES.get(s.get_dtype())
            if dtype is not None and dtype.is_floating_point:
                sizes[dtype] += _numel(s.get_shape())
        return sizes.most_common(1)[0][0] if sizes else torch.float32

    def items(self) -> Iterator[tuple[str, Tensor]]:
        for name in self._where:
            yield name, self.get(name)

    def close(self) -> None:
        self._files.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def load_safetensors(path: Union[str, Path]) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory in one dict (small checkpoints, tests)."""
    with CheckpointReader(path) as ckpt:
        return dict(ckpt.items())


def save_safetensors(state: dict[str, Tensor], out_dir: Union[str, Path], max_shard_bytes: int = 5 * 2**30) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards + model.safetensors.index.json."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.contiguous()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata=meta)
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(out_dir / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
