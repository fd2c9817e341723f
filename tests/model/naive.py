"""Naive references the fast paths are checked against (test- and benchmark-only)."""
import torch


def naive_experts(experts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """GroupedExperts' function (biases and gpt-oss's activation included) as a per-expert loop with autograd
    through slices. x: [N, H] by expert."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        h = x[start:start + n] @ experts.gate_up_proj[e].t()
        if experts.gate_up_proj_bias is not None:
            h = h + experts.gate_up_proj_bias[e]
        y = experts._activate(*h.chunk(2, dim=-1)) @ experts.down_proj[e].t()
        outs.append(y + experts.down_proj_bias[e] if experts.down_proj_bias is not None else y)
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, experts.d_model)


def per_expert_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [N, K] by expert, w [E, M, K] -> [N, M] (what torch._grouped_mm computes), in x's dtype."""
    return torch.cat([xe @ w[e].t() for e, xe in enumerate(x.split(counts.tolist()))])
