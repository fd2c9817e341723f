"""One typed config for everything.

    schema.py     the dataclasses (no torch)         load.py       YAML + `key.sub=value` overrides
    validate.py   pure validation                    resolve.py    every derived value, once
    preflight.py  what the config needs from this machine (CUDA, kernels, DeepSpeed, files)
"""
from .load import load_config, merge, parse_overrides, read_yaml
from .preflight import preflight
from .resolve import config_changes, describe, layout, resolve
from .schema import (CheckpointConfig, Config, ConfigError, DataConfig, LoggingConfig, ModelConfig, MoEConfig,
                     ParallelConfig, RopeScaling, TrainConfig, from_dict, resolved_d_expert,
                     stage_layers)
from .validate import validate, validate_layout, validate_model, validate_moe

__all__ = ["Config", "ModelConfig", "MoEConfig", "ParallelConfig", "DataConfig", "TrainConfig", "CheckpointConfig",
           "LoggingConfig", "RopeScaling", "ConfigError", "from_dict", "load_config", "read_yaml", "parse_overrides",
           "merge", "validate", "validate_layout", "validate_model", "validate_moe", "resolve", "describe", "layout",
           "config_changes", "preflight", "resolved_d_expert", "stage_layers"]
