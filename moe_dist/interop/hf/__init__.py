"""Hugging Face checkpoints <-> moe_dist, for the families registered by the modules of this package.

A checkpoint is a local directory: config.json plus model.safetensors, or safetensors shards listed in
model.safetensors.index.json. No hub access and no `transformers` import: each family's mapping is
written out against the maths of transformers' modelling code (5.24), and tested against it in tests/interop.

    model, model_cfg, moe_cfg = import_hf("path/to/Mixtral-tiny")
    export_hf(model, "out/dir", family="mixtral")      # config.json + model.safetensors

    io.py        reading and writing checkpoint directories (tensor by tensor)
    registry.py  Family, lookup by model_type; for unsupported types, what moe_dist lacks
    tensors.py   tensor names and layouts both ways (TensorMap), original and transformers-5 spellings
    common.py    the config.json fields all families share
    convert.py   import_hf / export_hf; what a family can express (the config round trip)
    mixtral.py qwen_moe.py deepseek.py glm4_moe.py ...  one module per family lineage

Anything a checkpoint uses that moe_dist does not compute (rope scaling other than YaRN, quantized weights,
non-SiLU activations, linear-attention layers, ...) raises HFInteropError naming it; the import never
returns a model that computes something else. Attention dropout is ignored (it is 0 at evaluation).
Training-only choices are set from the checkpoint where it names them (aux loss coefficient, router
jitter) and otherwise left at moe_dist defaults; routing is dropless, as in transformers.
"""
from . import mixtral, qwen_moe, deepseek  # noqa: F401  (registration order: export tries families in it)
from . import glm4_moe, dots1, aria, ernie, olmoe, granite, hunyuan, gpt_oss, dense  # noqa: F401
from .convert import (check_exportable, checkpoint_dtype, configs_to_hf, export_hf, hf_state_to_ours, hf_to_configs,
                      import_hf, infer_family, load_weights, ours_to_hf_state, save_weights)
from .io import CheckpointReader, load_safetensors, read_config, save_safetensors
from .registry import HFInteropError, families

FAMILIES = families()
DENSE_FAMILIES = families(moe=False)

__all__ = ["FAMILIES", "DENSE_FAMILIES", "HFInteropError", "import_hf", "export_hf", "load_weights", "save_weights",
           "hf_to_configs", "configs_to_hf", "check_exportable", "hf_state_to_ours", "ours_to_hf_state", "infer_family",
           "checkpoint_dtype", "CheckpointReader", "load_safetensors", "save_safetensors", "read_config"]
