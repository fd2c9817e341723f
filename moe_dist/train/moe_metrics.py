"""What the log says about the routers: per MoE layer, one step's figures of the whole data-parallel batch.

    table, columns = layer_table(moe.layers())   # the step's MoEStats, summed over its micro-batches: [L, E + K]
    ... on a log step: all-reduce over dp with the loss, one copy to the host ...
    m = MoEStepMetrics(host_table, columns, n_experts, samples=accum * dp, moe_layers=[1, 3])
    m.scalars()   # every step (cheap): drop_frac, max_load_ratio, router_entropy, each loss term
    m.record()    # at log steps: expert_load [layer][expert] and the per-layer lists

A table row is one MoE layer: its tokens per expert before drops (E columns), then `columns`
(dropped, assignments, router_entropy and each weighted loss term). Counts add up over micro-batches
and ranks; the entropy and the loss terms are means, so they are divided by `samples` (micro-batches
x dp ranks) on the host.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

COUNTS = ("dropped", "assignments")


def table_columns(terms: list[str]) -> list[str]:
    """The K columns after the E loads: counts, router entropy, then the loss terms by name."""
    return [*COUNTS, "router_entropy", *sorted(terms)]


def layer_table(stats: list[dict[str, Tensor]], terms: Optional[list[str]] = None) -> tuple[Tensor, list[str]]:
    """MoE stats (MoEStats.layers()) as a [L, E + K] float tensor on their device (no host sync), and
    the K column names after the E loads. Layers lacking a loss term get 0 for it. terms: the loss terms'
    columns, fixed (moe_dist.model.moe.layer.loss_terms), so that tables of different pipeline stages line up."""
    found = sorted({name for s in stats for name in s if name.endswith("_loss")})
    if terms is not None and not set(found) <= set(terms):
        raise ValueError(f"loss terms {found} recorded, but the table's columns are {terms}")
    columns = table_columns(terms if terms is not None else found)
    zero = stats[0]["load"].new_zeros((), dtype=torch.float32)
    rows = [torch.cat([s["load"].float(), torch.stack([s[c].float() if c in s else zero for c in columns])])
            for s in stats]
    return torch.stack(rows), columns


class MoEStepMetrics:
    """One step's per-layer MoE figures on the host. table: [L, E + K] float64, summed over the step's
    micro-batches and the dp ranks (layer_table's columns)."""

    def __init__(self, table: Tensor, columns: list[str], n_experts: int, samples: int,
                 moe_layers: Optional[list[int]] = None):
        self.table, self.columns, self.samples = table.double(), list(columns), samples
        self.n_experts = n_experts
        self.moe_layers = list(moe_layers) if moe_layers is not None else list(range(table.shape[0]))

    @property
    def loads(self) -> Tensor:
        """[L, E] tokens per expert before drops."""
        return self.table[:, :self.n_experts]

    def column(self, name: str) -> Tensor:
        """[L] one column; means (entropy, loss terms) divided by the number of micro-batches x ranks."""
        v = self.table[:, self.n_experts + self.columns.index(name)]
        return v if name in COUNTS else v / self.samples

    @property
    def terms(self) -> list[str]:
        return [c for c in self.columns if c.endswith("_loss")]

    def layer_max_load_ratio(self) -> Tensor:
        """[L] busiest expert's tokens over the mean: 1.0 = every expert got the same number."""
        return self.loads.max(1).values / self.loads.mean(1).clamp(min=1e-9)

    def drop_frac(self) -> float:
        """Dropped assignments over all assignments, all layers."""
        return float(self.column("dropped").sum() / self.column("assignments").sum().clamp(min=1.0))

    def scalars(self) -> dict[str, float]:
        """The figures averaged (or for the loss terms: summed, as they enter the aux loss) over layers."""
        out = {"router_entropy": float(self.column("router_entropy").mean()),
               "max_load_ratio": float(self.layer_max_load_ratio().mean())}
        out.update({t: float(self.column(t).sum()) for t in self.terms})
        return out

    def record(self) -> dict[str, list]:
        """Per layer: each expert's share of the assignments before drops (rows sum to 1), the dropped
        fraction, the busiest expert over the mean, router entropy and each weighted loss term."""
        shares = self.loads / self.loads.sum(1, keepdim=True).clamp(min=1e-9)
        drop = self.column("dropped") / self.column("assignments").clamp(min=1.0)
        out = {"moe_layers": self.moe_layers, "expert_load": _rounded(shares), "layer_drop_frac": _rounded(drop),
               "layer_max_load_ratio": _rounded(self.layer_max_load_ratio()),
               "layer_router_entropy": _rounded(self.column("router_entropy"))}
        out.update({f"layer_{t}": _rounded(self.column(t)) for t in self.terms})
        return out


def _rounded(t: Tensor) -> list:
    """Nested lists of 6 significant digits: a record of 60 layers x 256 experts stays short."""
    def r(v):
        return [r(x) for x in v] if isinstance(v, list) else float(f"{v:.6g}")
    return r(t.tolist())
