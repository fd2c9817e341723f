"""Router: scores, top-k variants, expert bias, noise, capacity -> a Routing result.

Every routing variant is expressed as a flat list of assignments (token, expert, gate),
so top-k, top-p (variable k) and expert-choice share one dispatcher and one set of losses.
See REFERENCE.md: Routing, Capacity and dropping.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import MoEConfig
from . import losses as L
from .capacity import capacity, slot_positions


@dataclass
class Routing:
    logits: Tensor  # [T, E] router logits (after noise)
    scores: Tensor  # [T, E] softmax or sigmoid scores
    token: Tensor  # [A] token of each assignment, token-major order
    expert: Tensor  # [A] chosen expert
    gate: Tensor  # [A] combine weight
    keep: Optional[Tensor]  # [A] bool, False = dropped by capacity; None = nothing dropped
    k: float  # assignments per token before dropping (top_k, or the average for top-p/expert-choice)
    capacity: Optional[int]  # C per (routing group, expert); None = dropless
    entropy_loss: Optional[Tensor] = None  # top-p dynamic-routing loss (weighted)
    groups: int = 1  # capacity groups: G contiguous equal chunks of the T tokens, C slots per (group, expert)
    # The layer's one token count, on the device; capacity, dispatch, losses and stats all read it.
    load: Optional[Tensor] = None  # [T // chunk, E] assignments of each chunk of `chunk` tokens per expert, drops included
    chunk: int = 0  # divides every group the count is read by: loss groups, capacity groups, sequences
    kept_per_expert: Optional[Tensor] = None  # [E] assignments that survive capacity (the rows dispatched)
    slot: Optional[Tensor] = None  # capacity: [A] position among its (group, expert) pair's assignments; kept = slot < C

    def group_load(self, n_groups: int) -> Tensor:
        """[n_groups, E] assignments per expert of each of n_groups contiguous equal token groups."""
        return self.load.view(n_groups, -1, self.load.shape[-1]).sum(1)


def count_routing(r: Routing, chunk: int) -> Routing:
    """Fill r's count (load, chunk, kept_per_expert) from its assignments: one scatter_add_ on the device."""
    T, E = r.scores.shape
    r.load, r.chunk = L.group_counts(r.token, r.expert, chunk, T // chunk, E), chunk
    r.kept_per_expert = r.load.sum(0) if r.capacity is None else r.group_load(r.groups).clamp(max=r.capacity).sum(0)
    return r


def check_groups(n_tokens: int, n_groups: int) -> int:
    """Routing groups are G contiguous, equal chunks of the flattened batch."""
    if n_tokens % n_groups:
        raise ValueError(f"moe.routing_groups={n_groups} does not divide the {n_tokens} tokens of the batch; "
                         "pick routing_groups dividing batch*seq")
    return n_groups


class Router(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_experts
        self.weight = nn.Parameter(torch.empty(E, d_model))  # l = x . W_r^T (+ b with router_bias, gpt-oss)
        self.bias = nn.Parameter(torch.zeros(E)) if cfg.router_bias else None
        self.noise_weight = nn.Parameter(torch.zeros(E, d_model)) if cfg.noisy_gating else None
        # Aux-loss-free balancing (DeepSeek-V3): selection-only bias, updated outside autograd.
        self.register_buffer("expert_bias", torch.zeros(E), persistent=cfg.expert_bias)
        nn.init.normal_(self.weight, std=0.02)

    def scores_of(self, logits: Tensor) -> Tensor:
        if self.cfg.score_func == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def forward(self, x: Tensor, seq_len: Optional[int] = None) -> Routing:
        """x: [T, H]; seq_len: tokens per sequence when x is a flattened [B, S] batch."""
        cfg = self.cfg
        if self.training and cfg.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - cfg.router_jitter, 1 + cfg.router_jitter)
        logits = F.linear(x, self.weight, self.bias)  # [T, E]; routing maths in fp32 at least
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.training and self.noise_weight is not None:
            noise_std = F.softplus(F.linear(x, self.noise_weight).float())
            logits = logits + torch.randn_like(logits) * noise_std
        scores = self.scores_of(logits)
        T, E = scores.shape
        if cfg.router == "expert_choice":
            return self._expert_choice(logits, scores, seq_len)
        if cfg.router == "top_p":
            token, expert, gate, k, entropy = self._top_p(scores)
        else:
            token, expert, gate = self._top_k(logits, scores)
            k, entropy = cfg.top_k, None
        cf = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        G = self._n_capacity_groups(T, seq_len)
        cap = capacity(cf, T // G, k, cfg.n_experts, cfg.min_capacity)
        r = Routing(logits, scores, token, expert, gate, None, k, cap, entropy, G if cap is not None else 1)
        count_routing(r, self._chunk(T, seq_len, r.groups))
        if cap is not None:  # drops decided on the device: no nonzero, the shapes stay [A]
            priority = gate if cfg.drop_policy == "probs" else None
            bucket = (token // (T // G)) * cfg.n_experts + expert
            r.slot = slot_positions(bucket, priority, G * cfg.n_experts, r.group_load(G).reshape(-1))
            r.keep = r.slot < cap
        return r

    def _chunk(self, T: int, seq_len: Optional[int], capacity_groups: int) -> int:
        """Tokens per counted chunk: divides the loss groups (routing_groups), the capacity groups and the
        sequences, so each of them sums whole chunks of the one count."""
        return math.gcd(T // check_groups(T, self.cfg.routing_groups), T // capacity_groups, seq_len or T)

    # -- selection -------------------------------------------------------------------------

    def _top_k(self, logits: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        T, E = scores.shape
        k = cfg.top_k
        select = logits if cfg.topk_then_softmax else scores
        if cfg.expert_bias:
            select = select + self.expert_bias
        if cfg.n_groups:
            select = self._limit_groups(select)
        idx = torch.topk(select, k, dim=-1).indices  # [T, k]
        if cfg.topk_then_softmax:
            gate = torch.softmax(logits.gather(1, idx), dim=-1)
        else:
            gate = scores.gather(1, idx)
            if cfg.norm_topk_prob:
                gate = gate / (gate.sum(-1, keepdim=True) + 1e-20)
        gate = gate * cfg.routed_scaling_factor
        token = torch.arange(T, device=scores.device).repeat_interleave(k)
        return token, idx.reshape(-1), gate.reshape(-1)

    def _limit_groups(self, select: Tensor) -> Tensor:
        """Group-limited routing: keep the top M expert groups per token, mask the rest."""
        cfg = self.cfg
        T, E = select.shape
        grouped = select.view(T, cfg.n_groups, E // cfg.n_groups)
        if cfg.group_score == "top2_sum":
            affinity = grouped.topk(2, dim=-1).values.sum(-1)  # DeepSeek-V3
        else:
            affinity = grouped.max(dim=-1).values  # DeepSeek-V2
        top_groups = affinity.topk(cfg.topk_groups, dim=-1).indices  # [T, M]
        group_mask = torch.zeros_like(affinity, dtype=torch.bool).scatter_(1, top_groups, True)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(T, E)
        return select.masked_fill(~expert_mask, float("-inf"))

    def _top_p(self, scores: Tensor) -> tuple[Tensor, Tensor, Tensor, float, Tensor]:
        """Dynamic routing: experts in score order until their cumulative score exceeds p."""
        cfg = self.cfg
        T, E = scores.shape
        max_k = cfg.max_k or E
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        before = sorted_scores.cumsum(-1) - sorted_scores  # mass of the experts ahead
        chosen = before < cfg.top_p  # always takes the first
        chosen[:, max_k:] = False
        token, slot = chosen.nonzero(as_tuple=True)  # token-major
        expert = order[token, slot]
        gate = sorted_scores[token, slot]
        if cfg.norm_topk_prob:
            sums = torch.zeros(T, device=scores.device, dtype=gate.dtype).index_add_(0, token, gate)
            gate = gate / sums[token]
        gate = gate * cfg.routed_scaling_factor
        entropy = -(scores * torch.log(scores.clamp_min(1e-20))).sum(-1).mean()
        return token, expert, gate, token.numel() / T, cfg.top_p_entropy_weight * entropy

    def _expert_choice(self, logits: Tensor, scores: Tensor, seq_len: Optional[int]) -> Routing:
        """Each expert takes its top C tokens per capacity group (Zhou et al. 2022).

        Not causal: whether a token is taken depends on the scores of the later tokens of its group.
        """
        cfg = self.cfg
        T, E = scores.shape
        G = self._n_capacity_groups(T, seq_len)
        Tg = T // G
        cf = cfg.capacity_factor if self.training else (cfg.eval_capacity_factor or cfg.capacity_factor)
        C = min(capacity(cf, Tg, cfg.top_k, E, cfg.min_capacity), Tg)
        idx = scores.view(G, Tg, E).topk(C, dim=1).indices  # [G, C, E]
        token = (idx + (torch.arange(G, device=scores.device) * Tg).view(G, 1, 1)).reshape(-1)
        expert = torch.arange(E, device=scores.device).expand(G, C, E).reshape(-1)
        order = torch.argsort(token, stable=True)  # token-major like the other routers
        token, expert = token[order], expert[order]
        slot = torch.arange(C, device=scores.device).view(1, C, 1).expand(G, C, E).reshape(-1)[order]
        gate = scores[token, expert] * cfg.routed_scaling_factor
        r = Routing(logits, scores, token, expert, gate, None, token.numel() / T, C, groups=G, slot=slot)
        return count_routing(r, self._chunk(T, seq_len, G))

    # -- capacity --------------------------------------------------------------------------

    def _n_capacity_groups(self, T: int, seq_len: Optional[int]) -> int:
        if self.cfg.routing_group == "sequence":
            if seq_len is None or T % seq_len:
                raise ValueError("moe.routing_group=sequence needs [batch, seq, d_model] input")
            return T // seq_len
        return check_groups(T, self.cfg.routing_groups)

    # -- aux-loss-free bias ----------------------------------------------------------------

    @torch.no_grad()
    def update_bias(self, load: Tensor, apply: Optional[Tensor] = None) -> None:
        """b_i += gamma * sign(mean_load - load_i); load: [E] tokens per expert over the dp batch;
        apply: 0-dim bool, False = no update (a skipped step)."""
        load = load.float()
        step = self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_bias += step if apply is None else step * apply
