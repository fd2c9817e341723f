"""MoELayer: route -> dispatch -> experts -> combine (+ shared experts), with its losses and stats."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ...config import MoEConfig
from ..gemm import Linear
from ..mlp import SwiGLU
from . import losses as L
from .dispatcher import LocalDispatcher, TokenDispatcher
from .experts import GroupedExperts
from .router import Router, Routing, check_groups
from .stats import MoEStats


def loss_terms(cfg: MoEConfig) -> list[str]:
    """The names of the weighted loss terms MoELayer.losses records under `cfg` (the metrics' columns where a
    rank holds no MoE layer to report them: a pipeline stage of dense layers)."""
    weights = (("expert_loss", cfg.aux_loss_weight), ("device_loss", cfg.device_loss_weight),
               ("comm_loss", cfg.comm_loss_weight), ("seq_loss", cfg.seq_aux_loss_weight), ("z_loss", cfg.z_loss_weight),
               ("entropy_loss", cfg.top_p_entropy_weight if cfg.router == "top_p" else 0.0))
    return [name for name, w in weights if w]


class MoELayer(nn.Module):
    """Sparse SwiGLU FFN on [batch, seq, d_model] or [tokens, d_model] input.

    forward(x, moe) records into the MoEStats `moe` the weighted sum of this layer's losses (a scalar
    with grad) and detached statistics (load, dropped, each loss term, router entropy); without a
    collector neither is computed.
    """

    def __init__(self, d_model: int, cfg: MoEConfig, d_expert: int):
        super().__init__()
        self.cfg = cfg
        self.router = Router(d_model, cfg)
        self.experts = GroupedExperts(cfg.n_experts, d_model, d_expert, cfg.grouped_mm, bias=cfg.expert_linear_bias,
                                      act=cfg.expert_act, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
        self.dispatcher: TokenDispatcher = LocalDispatcher(cfg.n_experts)
        self.n_devices = cfg.n_devices or 1  # device groups D of the device/comm losses (resolved from ep)
        n_shared = cfg.n_shared_experts
        # n shared experts of width F_s are one SwiGLU of width n * F_s (their outputs add up)
        self.shared_experts = SwiGLU(d_model, n_shared * (cfg.d_shared_expert or d_expert)) if n_shared else None
        self.shared_expert_gate = Linear(d_model, 1, bias=False) if n_shared and cfg.shared_expert_gate else None
        # Set by the parallel layer for global-batch balance: sums a tensor over data parallel ranks.
        self.reduce_counts: Optional[Callable[[Tensor], Tensor]] = None

    def forward(self, x: Tensor, moe: Optional[MoEStats] = None) -> Tensor:
        shape = x.shape
        seq_len = shape[1] if x.dim() == 3 else None
        x = x.reshape(-1, shape[-1])  # [T, H]
        routing = self.router(x, seq_len)
        d = self.dispatcher
        state = d.dispatch(x, routing)
        shared = self._shared(x)  # while the tokens travel (expert parallelism)
        back = d.send_back(self.experts(*d.arrived(state)), state)
        if moe is not None:  # while the outputs travel back
            moe.record(self, *self.losses(routing, seq_len or x.shape[0]))
        y = d.combine(back, state)
        return (y if shared is None else y + shared).view(shape)

    def _shared(self, x: Tensor) -> Optional[Tensor]:
        if self.shared_experts is None:
            return None
        shared = self.shared_experts(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return shared

    def losses(self, r: Routing, seq_len: int) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        T, E = r.scores.shape
        G = check_groups(T, cfg.routing_groups)
        Tg = T // G
        counts = r.group_load(G)  # [G, E], dropped included
        terms: dict[str, Tensor] = {}
        if cfg.aux_loss_weight or cfg.device_loss_weight or cfg.comm_loss_weight:
            P = L.mean_scores(r.scores, G)
            f = self._load_fraction(counts)
            if cfg.aux_loss_weight:
                terms["expert_loss"] = cfg.aux_loss_weight * L.expert_balance_loss(f, P)
            if cfg.device_loss_weight:
                terms["device_loss"] = cfg.device_loss_weight * L.device_balance_loss(f, P, self.n_devices)
            if cfg.comm_loss_weight:
                D = self.n_devices
                sends = L.device_token_counts(r.token, r.expert, T, E, D, Tg)
                terms["comm_loss"] = cfg.comm_loss_weight * L.comm_balance_loss(sends, P, D, cfg.comm_devices(D), Tg)
        if cfg.seq_aux_loss_weight:
            terms["seq_loss"] = cfg.seq_aux_loss_weight * L.sequence_balance_loss(r.group_load(T // seq_len), r.scores)
        if cfg.z_loss_weight:
            terms["z_loss"] = cfg.z_loss_weight * L.z_loss(r.logits)
        if r.entropy_loss is not None and cfg.top_p_entropy_weight:
            terms["entropy_loss"] = r.entropy_loss
        aux = torch.stack(list(terms.values())).sum() if terms else r.scores.new_zeros(())
        with torch.no_grad():
            stats = {name: v.detach() for name, v in terms.items()}
            stats["load"] = counts.sum(0)  # tokens per expert, before dropping
            A = r.token.numel()  # a shape: known on the host
            stats["assignments"] = torch.full((), A, dtype=torch.long, device=counts.device)
            stats["dropped"] = A - r.kept_per_expert.sum()
            stats["router_entropy"] = L.router_entropy(r.scores.detach())
        return aux, stats

    def _load_fraction(self, counts: Tensor) -> Tensor:
        if not self.cfg.global_batch_balance:
            return L.load_fraction(counts)
        # f from the whole (data-parallel) batch, P stays local: the mean over ranks of
        # sum_i f_i P_i is then the loss of the global batch.
        total = counts.sum(0, keepdim=True)
        if self.reduce_counts is not None:
            total = self.reduce_counts(total)
        return L.load_fraction(total)  # a tensor: no host sync per layer
