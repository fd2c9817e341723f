"""Naive references the fast paths are checked against (test- and benchmark-only)."""
import torch
import torch.nn.functional as F


def naive_experts(experts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """GroupedExperts' function as a per-expert loop with autograd through slices. x: [N, H] by expert."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        gate, up = (x[start:start + n] @ experts.gate_up_proj[e].t()).chunk(2, dim=-1)
        outs.append((F.silu(gate) * up) @ experts.down_proj[e].t())
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, experts.d_model)


def per_expert_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [N, K] by expert, w [E, M, K] -> [N, M] (what torch._grouped_mm computes), in x's dtype."""
    return torch.cat([xe @ w[e].t() for e, xe in enumerate(x.split(counts.tolist()))])
