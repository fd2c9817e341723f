from .build import build_model
from .moe import MoELayer
from .transformer import HybridMoETransformerLM, MoETransformerLM

__all__ = ["MoETransformerLM", "HybridMoETransformerLM", "MoELayer", "build_model"]
