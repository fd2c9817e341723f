"""The model a config describes, built the same way for every layout."""
from __future__ import annotations

from ..config import Config
from .transformer import MoETransformerLM


def build_model(cfg: Config) -> MoETransformerLM:
    """The one-device model of a resolved config (moe.n_devices and moe.n_groups filled by resolve)."""
    return MoETransformerLM(cfg.model, cfg.moe)
