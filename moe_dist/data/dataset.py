"""Packed windows over a token stream, and the deterministic, resumable, dp-sharded batch sampler.

Documents sit back to back with eos between them; the stream is cut into windows of seq_len+1
tokens at stride seq_len (neighbours share one token), so every token after the first is a target
exactly once. inputs = window[:-1], targets = window[1:].
"""
from __future__ import annotations

import numpy as np
import torch

from moe_dist.data.corpus import DataError


class TokenDataset:
    """Windows of a 1-D token array (usually a memmap); window i = tokens[i*S : i*S + S + 1]."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if seq_len < 1:
            raise DataError(f"seq_len: must be >= 1, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def window(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return self.tokens[start:start + self.seq_len + 1]  # [S+1]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [B, S], targets [B, S]) int64 for window indices [B]."""
        windows_BS1 = np.stack([self.window(int(i)) for i in indices]).astype(np.int64)
        windows = torch.from_numpy(windows_BS1)
        return windows[:, :-1], windows[:, 1:]


class BatchSampler:
    """Global batches of micro_batch_size * world windows in a seeded random order per epoch.

    Rank r gets rows [r*micro, (r+1)*micro) of each global batch, so the global batch at a step is
    the same for any dp size: dp=1 with micro B sees the same data as dp=2 with micro B/2.
    State is (epoch, position in windows); a restored sampler continues with the very same batches.
    Each epoch drops the last len % global_batch windows of its permutation (different ones each epoch).
    """

    def __init__(self, dataset: TokenDataset, micro_batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise DataError(f"rank {rank} is not in 0..{world - 1}")
        if micro_batch_size < 1:
            raise DataError(f"train.micro_batch_size: must be >= 1, got {micro_batch_size}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.global_batch = micro_batch_size * world
        self.seed = seed
        self.rank, self.world = rank, world
        if len(dataset) < self.global_batch:
            raise DataError(f"training split has {len(dataset)} windows of {dataset.seq_len + 1} tokens, fewer than one "
                            f"global batch of {self.global_batch} (micro_batch_size {micro_batch_size} x dp {world}); "
                            f"use more data, a shorter data.seq_len or a smaller train.micro_batch_size")
        self.epoch = 0
        self.position = 0  # windows of this epoch's permutation already handed out (all ranks)
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        """Window order of `epoch`: a pure function of (seed, epoch, number of windows)."""
        rng = np.random.default_rng([self.seed % 2**64, epoch])
        return rng.permutation(len(self.dataset))

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm, self._perm_epoch = self.permutation(self.epoch), self.epoch
        return self._perm

    def next_global_indices(self) -> np.ndarray:
        """Window indices [global_batch] of the next global batch (all ranks); advances the state."""
        if self.position + self.global_batch > len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
        indices = self._order()[self.position:self.position + self.global_batch]
        self.position += self.global_batch
        return indices

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs [micro, S], targets [micro, S]) of the next global batch."""
        indices = self.next_global_indices()
        mine = indices[self.rank * self.micro_batch_size:(self.rank + 1) * self.micro_batch_size]
        return self.dataset.batch(mine)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        # Position counts windows, not steps, so a run may resume on another dp size with the same global batch.
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_windows": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state["n_windows"] != len(self.dataset):
            raise DataError(f"data sampler state is for {state['n_windows']} training windows but the data now has "
                            f"{len(self.dataset)}; the dataset, tokenizer, seq_len or val_fraction changed since the "
                            f"checkpoint; restore them or start a fresh run")
        if state["seed"] != self.seed:
            raise DataError(f"data sampler state has seed {state['seed']} but this run uses {self.seed}; "
                            f"set train.seed={state['seed']} to resume or start a fresh run")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class EvalSet:
    """Fixed validation batches: global batch j holds windows j*G .. j*G+G-1 (G = batch * world), in order.

    Every call returns the same batches; rank r gets its rows of each, as in training. If the split
    has fewer windows than asked for, the windows repeat from the start.
    """

    def __init__(self, dataset: TokenDataset, rank: int = 0, world: int = 1):
        if len(dataset) < 1:
            raise DataError(f"validation split has no window of {dataset.seq_len + 1} tokens; "
                            f"raise data.val_fraction, shorten data.seq_len or add data")
        self.dataset = dataset
        self.rank, self.world = rank, world

    def eval_batches(self, n: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """n of this rank's (inputs [batch_size, S], targets [batch_size, S])."""
        G = batch_size * self.world
        out = []
        for j in range(n):
            first = j * G + self.rank * batch_size
            indices = [(first + k) % len(self.dataset) for k in range(batch_size)]
            out.append(self.dataset.batch(indices))
        return out
