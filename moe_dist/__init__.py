"""moe_dist: Mixture-of-Experts Transformer training with expert parallelism."""
from .config import Config, ConfigError, MoEConfig, ModelConfig, load_config
from .model import HybridMoETransformerLM, MoELayer, MoEStats, MoETransformerLM

__version__ = "0.1.0"
__all__ = ["MoETransformerLM", "HybridMoETransformerLM", "MoELayer", "MoEStats", "Config", "ModelConfig", "MoEConfig",
           "ConfigError", "load_config"]
