"""Balance and z losses as pure functions of the routing (REFERENCE.md: Balance losses).

Shapes: G routing groups (one rank's micro-batch each) of Tg tokens, E experts, D devices.
Each loss is computed per group and averaged over groups, which is exactly what data
parallelism does when every rank computes the loss on its own micro-batch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .capacity import bucket_counts


def group_counts(token: Tensor, expert: Tensor, tokens_per_group: int, n_groups: int, n_experts: int) -> Tensor:
    """[G, E] number of tokens of each group that chose each expert (dropped ones included); the router
    counts once per layer with it (Routing.load), and capacity, dispatch, losses and stats read that."""
    bucket = (token // tokens_per_group) * n_experts + expert
    return bucket_counts(bucket, n_groups * n_experts).view(n_groups, n_experts)


def mean_scores(scores: Tensor, n_groups: int) -> Tensor:
    """P[g, i] = mean over the group's tokens of s[t, i]. scores: [T, E] -> [G, E]."""
    return scores.view(n_groups, -1, scores.shape[-1]).mean(1)


def load_fraction(counts: Tensor) -> Tensor:
    """f_i = E / (k T) * count_i per row of counts [..., E]; uniform routing gives f_i = 1.

    k T is the row's assignments (its sum): exactly top_k * T for top-k, and for top-p, whose k
    varies per token, the group's own average, so a group's f never depends on the other groups."""
    counts = counts.float()
    return counts * (counts.shape[-1] / counts.sum(-1, keepdim=True).clamp(min=1))


def expert_balance_loss(f: Tensor, P: Tensor) -> Tensor:
    """mean_g sum_i f[g, i] P[g, i] (Switch / GShard / DeepSeek-V2 expert-level)."""
    return (f * P).sum(-1).mean()


def device_balance_loss(f: Tensor, P: Tensor, n_devices: int) -> Tensor:
    """f'_d = mean of f over the device's experts, P'_d = sum of P over them (DeepSeek-V2)."""
    G, E = P.shape
    f_dev = f.reshape(G, n_devices, E // n_devices).mean(-1)
    P_dev = P.reshape(G, n_devices, E // n_devices).sum(-1)
    return (f_dev * P_dev).sum(-1).mean()


def device_token_counts(token: Tensor, expert: Tensor, n_tokens: int, n_experts: int, n_devices: int,
                        tokens_per_group: int) -> Tensor:
    """[G, D] number of tokens of each group that send to each device (a token counts once per device)."""
    sends = torch.zeros(n_tokens, n_devices, device=token.device, dtype=torch.bool)
    sends[token, expert // (n_experts // n_devices)] = True
    return sends.view(-1, tokens_per_group, n_devices).sum(1)


def comm_balance_loss(device_counts: Tensor, P: Tensor, n_devices: int, max_devices: int, tokens_per_group: int) -> Tensor:
    """f''_d = D / (M T) * count_d, P''_d = sum of P over the device's experts (DeepSeek-V2)."""
    G, E = P.shape
    f = device_counts.float() * (n_devices / (max_devices * tokens_per_group))
    P_dev = P.reshape(G, n_devices, E // n_devices).sum(-1)
    return (f * P_dev).sum(-1).mean()


def sequence_balance_loss(counts: Tensor, scores: Tensor) -> Tensor:
    """DeepSeek-V3 sequence-wise loss: expert-level loss per sequence with s normalised per token.
    counts: [B, E] assignments of each sequence per expert; scores: [B * S, E]."""
    B = counts.shape[0]
    normed = scores / scores.sum(-1, keepdim=True)
    return expert_balance_loss(load_fraction(counts), mean_scores(normed, B))


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean_t (logsumexp_i l[t, i])^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def router_entropy(scores: Tensor) -> Tensor:
    """Mean over tokens of the entropy of the (normalised) router distribution, in nats."""
    p = scores / scores.sum(-1, keepdim=True)
    return -(p * torch.log(p.clamp_min(1e-20))).sum(-1).mean()
