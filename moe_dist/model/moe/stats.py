"""MoEStats: what the MoE layers of a forward report, collected where the caller can see it.

    moe = MoEStats()                       # one per training step
    logits = model(ids, moe=moe)           # each MoE layer records its aux loss and statistics
    loss = ce + moe.pop_aux_loss()         # this forward's weighted balance losses (with grad)
    ... more micro-batches into the same collector ...
    moe.layers()                           # per MoE layer: statistics summed over the forwards, on the device

Nothing is kept on the modules, so a later forward (validation, another micro-batch) overwrites nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn


class MoEStats:
    def __init__(self):
        self._aux: list[Tensor] = []
        self._sums: dict[int, dict[str, Tensor]] = {}  # id(layer) -> stats summed; insertion order = layer order
        self._recomputing = False

    def record(self, layer: nn.Module, aux: Tensor, stats: dict[str, Tensor]) -> None:
        """A layer's weighted aux loss (scalar with grad) and detached statistics of one forward."""
        if self._recomputing:  # activation checkpointing runs the forward again in backward
            return
        self._aux.append(aux)
        prev = self._sums.get(id(layer))
        self._sums[id(layer)] = stats if prev is None else {k: prev[k] + v for k, v in stats.items()}

    def pop_aux_loss(self) -> Tensor:
        """The sum of the aux losses recorded since the last call (0 without MoE layers)."""
        aux, self._aux = self._aux, []
        return torch.stack(aux).sum() if aux else torch.zeros(())

    def layers(self) -> list[dict[str, Tensor]]:
        """Per MoE layer in forward order: load [E] (assignments per expert before drops), dropped,
        assignments, router_entropy and each weighted loss term, summed over the recorded forwards."""
        return list(self._sums.values())

    def of(self, layer: nn.Module) -> dict[str, Tensor]:
        """One layer's statistics (as in layers())."""
        return self._sums[id(layer)]

    @contextmanager
    def recomputing(self) -> Iterator[None]:
        """Where activation checkpointing recomputes a block: its records would count twice."""
        self._recomputing = True
        try:
            yield
        finally:
            self._recomputing = False
