"""Initial values as a function of (seed, parameter name) alone, for any slice of a parameter.

Every parameter is cut into blocks of whole rows of its global (one-device) shape; block b's values
come from a generator seeded with (seed, name, b), drawn on the CPU, so a rank that holds any slice
of a parameter generates only the blocks that slice touches, one at a time: its peak memory is its
shard plus one block, and the values are the same at every layout and on every device.
"""
from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import ModelConfig

BLOCK = 1 << 20  # values per generated block (4 MiB of fp32)

# (global shape, the global indices along each dim of the local slice, the local tensor to fill) of a
# parameter; the default is the whole tensor. moe_dist.parallel supplies the one for DTensor shards.
ShardOf = Callable[[Tensor], tuple[Sequence[int], Sequence[Tensor], Tensor]]


def _whole(p: Tensor):
    return p.shape, [torch.arange(n) for n in p.shape], p


def _block_seed(key: str, block: int) -> int:
    digest = hashlib.blake2b(f"{key}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@torch.no_grad()
def fill_normal_(local: Tensor, global_shape: Sequence[int], indices: Sequence[Tensor], std: float, key: str) -> None:
    """local <- its slice (the global `indices` along each dim) of a [global_shape] tensor of N(0, std^2)
    values drawn block by block from generators seeded by (key, block). local: contiguous."""
    shape = list(global_shape) or [1]
    idx = list(indices) or [torch.zeros(1, dtype=torch.long)]
    cols = shape[-1]
    rows_per_block = max(1, BLOCK // max(cols, 1))
    # global row (index over all but the last dim) of each local row, in local order
    grow = torch.zeros((), dtype=torch.long)
    for size, i in zip(shape[:-1], idx[:-1]):
        grow = grow.unsqueeze(-1) * size + i
    grow = grow.reshape(-1)
    flat = local.view(-1, local.shape[-1] if local.dim() else 1)
    blocks = grow // rows_per_block
    n_rows = math.prod(shape[:-1])
    spans = [(b, (blocks == b).nonzero().squeeze(1)) for b in torch.unique(blocks).tolist()]

    @torch.no_grad()  # grad mode is per thread: the pool's threads need it too
    def fill(b: int, mine: Tensor) -> None:
        first = b * rows_per_block
        g = torch.Generator().manual_seed(_block_seed(key, b))
        values = torch.empty(min(rows_per_block, n_rows - first), cols, device="cpu").normal_(0.0, std, generator=g)
        flat[mine] = values[grow[mine] - first][:, idx[-1]].to(flat.device)

    # a generator fills serially (70M values/s, a 1.4B-parameter Mixtral layer takes 20 s): the blocks, each
    # its own generator and rows, go to torch's intra-op threads, which run them without the GIL
    workers = min(len(spans), torch.get_num_threads())
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda span: fill(*span), spans))
    else:
        for span in spans:
            fill(*span)


def init_std(cfg: ModelConfig, name: str) -> Optional[float]:
    """The normal init's std of parameter `name`, or None for the ones set to a constant. Residual-branch
    outputs are scaled down so the residual stream's variance stays O(1) (GPT-2)."""
    if name.endswith("norm.weight"):  # RMSNorms, q/k norms, MLA latent norms: 1
        return None
    if name.endswith(("bias", "noise_weight")):  # biases (experts' too); noisy top-k starts noise-free: 0
        return None
    std = cfg.init_std
    if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
        return std / math.sqrt(2 * cfg.n_layer)
    return std


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, shard_of: Optional[ShardOf] = None) -> None:
    """Fill every parameter of a MoETransformerLM (or this rank's slice of it) with the one-device model's
    initial values, and recompute its buffers."""
    for name, p in model.named_parameters():
        shape, indices, local = (shard_of or _whole)(p)
        std = init_std(model.config, name)
        if std is None:
            local.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        elif local.numel():
            fill_normal_(local, shape, indices, std, f"{seed}:{name}")
    model.reset_buffers()
