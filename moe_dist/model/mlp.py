"""Dense SwiGLU feed-forward: the FFN of dense layers and of shared experts."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .gemm import Linear


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); names follow Hugging Face Llama/Mixtral for checkpoint import."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = Linear(d_model, d_ff, bias=False)
        self.up_proj = Linear(d_model, d_ff, bias=False)
        self.down_proj = Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
