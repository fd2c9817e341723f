from .build import build_model
from .moe import MoELayer, MoEStats
from .transformer import HybridMoETransformerLM, MoETransformerLM

__all__ = ["MoETransformerLM", "HybridMoETransformerLM", "MoELayer", "MoEStats", "build_model"]
