"""import_hf / export_hf and the config and state conversions under them, for every registered family."""
from __future__ import annotations

import re

from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from ...config import MoEConfig, ModelConfig, RopeScaling, resolved_d_expert, validate_model, validate_moe
from . import registry
from .common import hf_fields, model_fields, unsupported
from .io import CheckpointReader, read_config, save_safetensors, write_json
from .registry import HFInteropError
from .tensors import to_ours, to_theirs

SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hf_to_configs(hf: dict, max_seq_len: Optional[int] = None) -> tuple[str, ModelConfig, MoEConfig]:
    """Map a Hugging Face config.json dict to (family, ModelConfig, MoEConfig), or raise HFInteropError.

    Dense families map to a model without MoE layers, a source for upcycle().
    """
    family = registry.get(hf.get("model_type"))
    m, e = model_fields(hf, family, max_seq_len)
    family.read(hf, m, e)
    if m.get("attention") != "mla" and m["rope_scaling"].get("mscale_all_dim"):
        raise unsupported(family.model_type, "rope_parameters.mscale_all_dim", m["rope_scaling"]["mscale_all_dim"],
                          "only DeepSeek's latent attention rescales the softmax by it")
    if not family.moe:
        m["moe_layer_indices"] = []  # no MoE layers; the MoEConfig is a default for upcycle()
        e["top_k"] = MoEConfig.top_k
    try:
        cfg = ModelConfig(**{**m, "rope_scaling": RopeScaling(**m["rope_scaling"])})
        moe = MoEConfig(**e)
    except TypeError as err:  # pragma: no cover - a mapping bug, not a user error
        raise HFInteropError(f"{family.model_type}: internal mapping error {err}") from None
    errors: list[str] = []
    validate_model(cfg, errors)
    if cfg.moe_layers():
        validate_moe(moe, cfg, errors)
    if errors:
        raise HFInteropError(f"{family.model_type} config.json maps to an invalid moe_dist config:\n  " + "\n  ".join(errors))
    return family.model_type, cfg, moe


def configs_to_hf(family: str, cfg: ModelConfig, moe: MoEConfig, dtype: torch.dtype = torch.float32,
                  tokens: Optional[dict] = None) -> dict:
    """(ModelConfig, MoEConfig) -> a Hugging Face config.json dict for `family`; HFInteropError if it cannot express them.

    tokens: bos_token_id / eos_token_id / pad_token_id; the ones missing are written as null (not the family's
    defaults, which name ids of the family's own tokenizer).
    """
    check_exportable(family, cfg, moe)
    tokens = tokens or {}
    return _hf_config(registry.get(family), cfg, moe, dtype) | {k: tokens.get(k) for k in SPECIAL_TOKENS}


def _hf_config(f: registry.Family, cfg: ModelConfig, moe: MoEConfig, dtype: torch.dtype) -> dict:
    return hf_fields(f, cfg, moe, dtype) | f.write(cfg, moe)


# ---------------------------------------------------------------------------------------------
# What a family can express: its config.json of a model must import back to the same computation


def signature(cfg: ModelConfig, moe: MoEConfig) -> dict[str, object]:
    """Every config value the forward pass depends on, resolved (defaults filled in, equivalent spellings merged)."""
    layers = cfg.moe_layers()
    s: dict[str, object] = {f"model.{k}": getattr(cfg, k) for k in (
        "vocab_size", "d_model", "n_layer", "n_head", "theta", "norm_eps", "tie_embeddings", "attention",
        "rope_interleave", "qkv_bias", "attn_out_bias", "pre_norm", "post_norm", "embedding_multiplier",
        "residual_multiplier", "logits_scaling", "attn_sinks")}
    s["model.qk_norm/qk_norm_scope/qk_norm_after_rope"] = (True, cfg.qk_norm_scope, cfg.qk_norm_after_rope) if cfg.qk_norm else False
    s["model.rope_scaling"] = cfg.rope_scaling if cfg.rope_scaling.type != "none" else "none"
    s["model.moe_layer_indices"] = layers
    s["model.sliding_window"] = [cfg.layer_window(i) for i in range(cfg.n_layer)]
    if cfg.attention == "mla":
        s["model.mla_dims"] = cfg.mla_dims()
    else:
        s["model.n_kv_head"] = cfg.n_kv_head or cfg.n_head
        s["model.head_dim"] = cfg.head_size()
        s["model.rotary_dim"] = cfg.rope_dim()
        s["model.attention_multiplier"] = cfg.attention_multiplier or cfg.head_size() ** -0.5
    if len(layers) < cfg.n_layer:
        s["model.d_ff"] = cfg.d_ff
    if layers:
        s.update({f"moe.{k}": getattr(moe, k) for k in (
            "n_experts", "top_k", "router", "score_func", "routed_scaling_factor", "expert_bias", "router_bias",
            "expert_linear_bias", "expert_act")})
        gates = (moe.norm_topk_prob, moe.topk_then_softmax)
        # a softmax over the k chosen logits is the renormalised softmax over all E (the same experts win)
        if moe.topk_then_softmax and not (moe.expert_bias or moe.n_groups) and moe.router == "topk":
            gates = (True, False)
        s["moe.norm_topk_prob/topk_then_softmax"] = gates
        s["moe.d_expert"] = resolved_d_expert(cfg, moe)
        s["moe.shared_width"] = moe.n_shared_experts * (moe.d_shared_expert or resolved_d_expert(cfg, moe))
        s["moe.shared_expert_gate"] = moe.shared_expert_gate and moe.n_shared_experts > 0
        s["moe.n_groups"] = moe.n_groups
        if moe.n_groups:
            s["moe.topk_groups"], s["moe.group_score"] = moe.topk_groups, moe.group_score
        if moe.router == "top_p":
            s["moe.top_p"], s["moe.max_k"] = moe.top_p, moe.max_k
        if moe.expert_act == "clamped_swiglu":
            s["moe.swiglu_alpha"], s["moe.swiglu_limit"] = moe.swiglu_alpha, moe.swiglu_limit
    return s


def check_exportable(family: str, cfg: ModelConfig, moe: MoEConfig) -> tuple[ModelConfig, MoEConfig]:
    """Raise HFInteropError listing what `family` cannot express; returns the configs its checkpoint imports as."""
    f = registry.get(family)
    if not f.moe:
        raise HFInteropError(f"family={family!r}: export supports the MoE families {', '.join(registry.families())}")
    try:
        _, cfg2, moe2 = hf_to_configs(_hf_config(f, cfg, moe, torch.float32))
    except HFInteropError as e:
        raise HFInteropError(f"cannot export as {family}: {e}") from None
    ours, theirs = signature(cfg, moe), signature(cfg2, moe2)
    if not moe.expert_bias and theirs.get("moe.expert_bias"):
        theirs["moe.expert_bias"] = False  # the family always has the bias: it is written as zeros
    errors = [f"{k}: {ours.get(k)!r} here, {family} expresses {theirs.get(k)!r}"
              for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if errors:
        raise HFInteropError(f"cannot export as {family}:\n  " + "\n  ".join(errors))
    return cfg2, moe2


def infer_family(cfg: ModelConfig, moe: MoEConfig) -> str:
    """The first registered MoE family that expresses the model exactly."""
    for family in registry.families():
        try:
            check_exportable(family, cfg, moe)
            return family
        except HFInteropError:
            continue
    raise HFInteropError("export: no Hugging Face family expresses this model exactly; call export_hf(..., family=X) "
                         f"to see what {', '.join(registry.families())} lack")


# ---------------------------------------------------------------------------------------------
# Tensors


def _mtp_layers(hf: dict) -> int:
    """Multi-token-prediction modules saved after the decoder layers (DeepSeek-V3, GLM-4-MoE): not part of the LM."""
    return hf.get("num_nextn_predict_layers") or 0


def hf_state_to_ours(family: str, hf_state: Union[dict[str, Tensor], CheckpointReader], model, mtp_layers: int = 0) -> dict[str, Tensor]:
    """Hugging Face tensors (a dict or a CheckpointReader) -> `model`'s state dict names (unknown tensors raise)."""
    f = registry.get(family)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    return to_ours(f.tensors, family, hf_state.items(), expected, model.config.n_layer, mtp_layers, model.config.tie_embeddings)


def ours_to_hf_state(family: str, model, layout: str = "original") -> dict[str, Tensor]:
    """moe_dist model -> Hugging Face tensors. layout: original (the names released checkpoints use, which every
    loader reads: transformers 4.x and 5.x, vLLM, ...) | transformers (transformers 5's in-memory names)."""
    if layout not in ("original", "transformers"):
        raise HFInteropError(f"layout={layout!r}: use original or transformers")
    f = registry.get(family)
    cfg, moe = model.config, model.moe_config
    _, moe2 = check_exportable(family, cfg, moe)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    always = {}
    if moe2.expert_bias and not moe.expert_bias:  # the family always has the bias: zeros compute the same
        always = {f"layers.{i}.ffn.router.expert_bias": torch.zeros(moe.n_experts) for i in cfg.moe_layers()}
    return to_theirs(f.tensors, state, cfg.tie_embeddings, layout == "original", always)


def _load_exact(model, state: dict[str, Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise HFInteropError(f"{where}: tensors missing for moe_dist: {missing[:8]}; tensors without a place: {extra[:8]}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise HFInteropError(f"{where}: {k} has shape {tuple(t.shape)}, the config implies {tuple(expected[k].shape)}")
    model.load_state_dict({k: t.to(expected[k].dtype) for k, t in state.items()}, strict=True)


def _load_hf(model, path: Path, family: str, hf: dict) -> None:
    with CheckpointReader(path) as ckpt:
        state = hf_state_to_ours(family, ckpt, model, mtp_layers=_mtp_layers(hf))
    expected = model.state_dict()
    state = {**{k: expected[k] for k in expected if k not in state}, **state}  # TensorMap.may_lack: keep the initial value
    _load_exact(model, state, f"{family} checkpoint {path}")


# ---------------------------------------------------------------------------------------------
# The public entry points


def checkpoint_dtype(path: Union[str, Path]) -> torch.dtype:
    """The floating-point dtype a Hugging Face directory stores its weights in."""
    with CheckpointReader(path) as ckpt:
        return ckpt.dtype()


def import_hf(path: Union[str, Path], *, dtype: Optional[torch.dtype] = torch.float32, max_seq_len: Optional[int] = None):
    """Load a local Hugging Face checkpoint directory -> (MoETransformerLM, ModelConfig, MoEConfig).

    dtype: of the model's parameters; None = the checkpoint's. max_seq_len: RoPE table length
    (default: the checkpoint's max_position_embeddings).
    """
    from ...model import MoETransformerLM

    hf = read_config(path)
    family, cfg, moe = hf_to_configs(hf, max_seq_len=max_seq_len)
    model = MoETransformerLM(cfg, moe)
    _load_hf(model, Path(path), family, hf)
    model = model.to(dtype or checkpoint_dtype(path))
    model.eval()
    return model, cfg, moe


def _whole(t: Tensor):
    return t.shape, [0] * t.dim(), t


def _copy_slice(local: Tensor, source, global_shape, offsets, name: str, where: str) -> None:
    """local <- source[the slice at offsets]; source: a tensor or a safetensors lazy slice (reads the slice only)."""
    shape = tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)
    if shape != tuple(global_shape):
        raise HFInteropError(f"{where}: {name} has shape {shape}, the config implies {tuple(global_shape)}")
    index = tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))
    local.copy_(source[index] if index else source[...])


@torch.no_grad()
def load_weights(model, path: Union[str, Path], shard_of=None) -> None:
    """Load one-device weights into `model`, or into this rank's shards of them: a moe_dist safetensors file
    or a Hugging Face directory.

    shard_of(tensor) -> (global shape, offsets, local tensor) (moe_dist.parallel.data_parallel.shard_of)
    says which slice each parameter holds; from a moe_dist file each rank reads only those slices
    (safetensors' get_slice), from a Hugging Face directory one layer's tensors at a time. The model's
    config must be the checkpoint's (`moe-dist import-hf` writes both); any missing, extra or mis-shaped
    tensor is an error naming it.
    """
    path, shard_of = Path(path), shard_of or _whole
    targets = dict(model.named_parameters())
    targets.update({k: b for k, b in model.named_buffers() if k in model.state_dict()})
    if path.is_dir():
        hf = read_config(path)
        family = registry.get(hf.get("model_type")).model_type
        where = f"{family} checkpoint {path}"
        with CheckpointReader(path) as ckpt:
            for part, names in _by_layer(ckpt.names(), model.config.n_layer):
                expected = {k: _global_shape(t, shard_of) for k, t in targets.items() if _layer_of(k) == part}
                ours = to_ours(registry.get(family).tensors, family, ((n, ckpt.get(n)) for n in names), expected,
                               model.config.n_layer, _mtp_layers(hf), model.config.tie_embeddings and part == -1)
                for k, t in ours.items():
                    if k in targets and not (k == "lm_head.weight" and model.config.tie_embeddings):
                        shape, offsets, local = shard_of(targets[k])
                        _copy_slice(local, t.to(local.dtype), shape, offsets, k, where)
        return
    from safetensors import safe_open

    where = f"checkpoint.init_from={path}"
    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
        wanted = {k for k in targets if not (k == "lm_head.weight" and model.config.tie_embeddings)}
        if wanted - stored or stored - wanted:
            raise HFInteropError(f"{where}: tensors missing for moe_dist: {sorted(wanted - stored)[:8]}; tensors without "
                                 f"a place: {sorted(stored - wanted)[:8]}")
        for k in sorted(wanted):
            shape, offsets, local = shard_of(targets[k])
            _copy_slice(local, f.get_slice(k), shape, offsets, k, where)  # bf16 weights widen exactly


def _global_shape(t: Tensor, shard_of) -> torch.Size:
    return torch.Size(shard_of(t)[0])


_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


def _layer_of(name: str) -> int:
    """The decoder layer an (our or their) tensor name belongs to; -1 outside the layers."""
    m = re.match(r"^layers\.(\d+)\.", name) or _LAYER_RE.match(name)
    return int(m.group(1)) if m else -1


def _by_layer(names: list[str], n_layer: int):
    """(layer, its checkpoint names) for the top-level tensors (-1) and each decoder layer in turn; the
    multi-token-prediction layers after them go with the top level, where to_ours drops them."""
    parts: dict[int, list[str]] = {}
    for n in names:
        i = _layer_of(n)
        parts.setdefault(i if i < n_layer else -1, []).append(n)
    return sorted(parts.items())


def save_weights(model, path: Union[str, Path], dtype: Optional[torch.dtype] = None) -> None:
    """One-device weights as safetensors (tied lm_head stored once, as embed_tokens), in `dtype` (default: the model's)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path))


def export_hf(model, out_dir: Union[str, Path], family: Optional[str] = None, *, layout: str = "original",
              dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 5 * 2**30, tokens: Optional[dict] = None) -> str:
    """Write `model` as a Hugging Face checkpoint directory (config.json, generation_config.json, safetensors);
    returns the family.

    family: a registered MoE family, or None for the first that expresses the model exactly. The export
    refuses (HFInteropError) a model the family cannot express. layout: see ours_to_hf_state. dtype: of
    the tensors on disk (default: the model's). tokens: bos/eos/pad ids (bos_token_id, ...) to record.
    """
    cfg, moe = model.config, model.moe_config
    if not cfg.moe_layers():
        raise HFInteropError("export: the model has no MoE layers; export supports the MoE families "
                             f"{', '.join(registry.families())} (upcycle() a dense model first)")
    family = family or infer_family(cfg, moe)
    dtype = dtype or model.lm_head.weight.dtype
    hf_cfg = configs_to_hf(family, cfg, moe, dtype, tokens)
    state = ours_to_hf_state(family, model, layout)
    # the expert-bias buffers stay fp32, as transformers keeps them
    state = {k: (t.float() if "e_score_correction_bias" in k or "expert_bias" in k else t.to(dtype)).contiguous() for k, t in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out, max_shard_bytes)
    write_json(out / "config.json", hf_cfg)
    write_json(out / "generation_config.json", {k: hf_cfg[k] for k in SPECIAL_TOKENS} | {"_from_model_config": True})
    return family

