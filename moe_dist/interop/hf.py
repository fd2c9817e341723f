"""Hugging Face checkpoints <-> moe_dist: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 and DeepSeek-V3.

A checkpoint is a local directory: config.json plus model.safetensors, or safetensors shards listed in
model.safetensors.index.json. No hub access and no `transformers` import: the mapping is written out here,
against the maths of transformers' modelling code (5.x), and tested against it in tests/interop.

    model, model_cfg, moe_cfg = import_hf("path/to/Mixtral-tiny")
    export_hf(model, "out/dir", family="mixtral")      # config.json + model.safetensors

Experts: the transformers-5 stacked layout (experts.gate_up_proj [E, 2F, H], experts.down_proj [E, H, F])
is ours; the older per-expert layout (Mixtral block_sparse_moe.experts.{i}.w1/w2/w3, others
mlp.experts.{i}.gate_proj/up_proj/down_proj) is read too, and written by default on export because every
loader (transformers 4.x and 5.x, vLLM, ...) reads it.

Anything a checkpoint uses that moe_dist does not compute (rope scaling other than YaRN, sliding-window
attention, quantized weights, non-SiLU activations, ...) raises HFInteropError naming it; the import never
returns a model that computes something else. Attention dropout is ignored (it is 0 at evaluation).
Training-only choices are set from the checkpoint where it names them (aux loss coefficient, router jitter)
and otherwise left at moe_dist defaults; routing is dropless, as in transformers.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from ..config import MoEConfig, ModelConfig, RopeScaling, resolved_d_expert

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # import only: dense sources for upcycle()
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
DEFAULT_ROPE_THETA = {"mixtral": 1e6}  # transformers' config defaults; 10000 for the others


class HFInteropError(ValueError):
    """A checkpoint (or model) that cannot be converted exactly; the message names the field and why."""


# ---------------------------------------------------------------------------------------------
# Reading and writing checkpoint directories


def read_config(path: Union[str, Path]) -> dict:
    p = Path(path) / "config.json"
    if not p.is_file():
        raise HFInteropError(f"{path}: no config.json; give a Hugging Face checkpoint directory (config.json + *.safetensors)")
    return json.loads(p.read_text())


def load_safetensors(path: Union[str, Path]) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory: model.safetensors, or the shards of model.safetensors.index.json."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if not found:
            bins = sorted(p.name for p in path.glob("*.bin"))
            hint = f" (found {', '.join(bins[:3])}: PyTorch pickles are not read; convert them to safetensors)" if bins else ""
            raise HFInteropError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
        files = found
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state


def save_safetensors(state: dict[str, Tensor], out_dir: Union[str, Path], max_shard_bytes: int = 5 * 2**30) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards + model.safetensors.index.json."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.contiguous()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata=meta)
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# config.json -> (ModelConfig, MoEConfig)


def _unsupported(family: str, field: str, value, why: str) -> HFInteropError:
    return HFInteropError(f"{family} config.json: {field}={value!r} is not supported by moe_dist ({why}); "
                          "importing it would compute different numbers")


_YARN_KEYS = {"factor": "factor", "original_max_position_embeddings": "original_max_seq_len", "beta_fast": "beta_fast",
              "beta_slow": "beta_slow", "mscale": "mscale", "mscale_all_dim": "mscale_all_dim",
              "attention_factor": "attention_factor", "truncate": "truncate"}


def _rope(hf: dict, family: str) -> tuple[float, dict]:
    """(theta, model.rope_scaling fields) from rope_parameters (transformers 5) or rope_scaling (4.x)."""
    old, new = hf.get("rope_scaling") or {}, hf.get("rope_parameters") or {}
    kind = lambda d: d.get("rope_type", d.get("type")) or "default"  # noqa: E731
    if old and new and kind(old) != kind(new):
        raise _unsupported(family, "rope_scaling", old, f"it disagrees with rope_parameters (rope_type {kind(new)!r}); keep one")
    rp = {**old, **new}
    rope_type = kind(rp)
    if rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _unsupported(family, "partial_rotary_factor", rp.get("partial_rotary_factor", hf.get("partial_rotary_factor")),
                           "RoPE rotates whole heads")
    theta = rp.get("rope_theta", hf.get("rope_theta"))
    theta = float(theta if theta is not None else DEFAULT_ROPE_THETA.get(family, 10000.0))
    if rope_type == "default":
        return theta, {}
    if rope_type != "yarn":
        raise _unsupported(family, "rope_type", rope_type, "plain RoPE and YaRN are implemented, not linear/dynamic/llama3/longrope scaling")
    deepseek = family.startswith("deepseek")
    if rp.get("mscale_all_dim") and not deepseek:
        raise _unsupported(family, "rope_parameters.mscale_all_dim", rp["mscale_all_dim"],
                           "only DeepSeek's attention rescales the softmax by it")
    out = {ours: rp[key] for key, ours in _YARN_KEYS.items() if rp.get(key) is not None}
    if "original_max_seq_len" not in out:
        raise _unsupported(family, "rope_parameters.original_max_position_embeddings", None, "YaRN needs it")
    if "factor" not in out:  # transformers' rule: the ratio of the context lengths
        out["factor"] = hf["max_position_embeddings"] / out["original_max_seq_len"]
    return theta, {"type": "yarn", **out}


def hf_to_configs(hf: dict, max_seq_len: Optional[int] = None) -> tuple[str, ModelConfig, MoEConfig]:
    """Map a Hugging Face config.json dict to (family, ModelConfig, MoEConfig), or raise HFInteropError.

    Dense families (DENSE_FAMILIES) map to a model without MoE layers, a source for upcycle().
    """
    family = hf.get("model_type")
    if family not in FAMILIES + DENSE_FAMILIES:
        raise HFInteropError(f"config.json: model_type={family!r} is not supported; moe_dist imports "
                             f"{', '.join(FAMILIES)} (and dense {', '.join(DENSE_FAMILIES)})")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise _unsupported(family, "quantization_config.quant_method", method, "weights must be plain floating point; dequantize first")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported(family, "hidden_act", act, "experts and FFNs are SwiGLU with SiLU")
    L = hf["num_hidden_layers"]
    n_head = hf["num_attention_heads"]
    theta, rope_scaling = _rope(hf, family)
    m = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layer=L, n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads"), d_ff=hf.get("intermediate_size") or 1,
        max_seq_len=max_seq_len or hf.get("max_position_embeddings", 4096),
        theta=theta, rope_scaling=RopeScaling(**rope_scaling), norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02),
    )
    if m["n_kv_head"] == n_head:
        m["n_kv_head"] = None
    head_dim = hf.get("head_dim")
    if family not in ("deepseek_v2", "deepseek_v3") and head_dim is not None and head_dim != hf["hidden_size"] // n_head:
        m["head_dim"] = head_dim
    e = dict(top_k=hf.get("num_experts_per_tok") or 1, capacity_factor=None, eval_capacity_factor=None)
    if family in DENSE_FAMILIES:
        e["top_k"] = MoEConfig.top_k

    if family in ("mixtral", "mistral") and hf.get("sliding_window") is not None:
        raise _unsupported(family, "sliding_window", hf["sliding_window"], "sliding-window attention is not implemented; "
                           "set it to null only if the model never sees sequences longer than the window")
    if family in ("qwen2_moe", "qwen3_moe", "qwen2", "qwen3"):
        if hf.get("use_sliding_window"):
            raise _unsupported(family, "use_sliding_window", True, "sliding-window attention is not implemented")
        layer_types = hf.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise _unsupported(family, "layer_types", sorted(set(layer_types)), "only full attention is implemented")

    if family in DENSE_FAMILIES:
        m["moe_layer_indices"] = []  # no MoE layers; the MoEConfig is a default for upcycle()
        if hf.get("mlp_bias"):
            raise _unsupported(family, "mlp_bias", True, "FFNs are bias-free")
        bias = bool(hf.get("attention_bias", False))
        if family == "llama":
            m.update(qkv_bias=bias, attn_out_bias=bias)
        elif family == "qwen2":
            m["qkv_bias"] = True  # Qwen2 always has q/k/v biases
        elif family == "qwen3":
            m.update(qk_norm=True, qkv_bias=bias, attn_out_bias=bias)
    elif family == "mixtral":
        e.update(n_experts=hf["num_local_experts"], norm_topk_prob=True, router_jitter=hf.get("router_jitter_noise", 0.0) or 0.0,
                 aux_loss_weight=hf.get("router_aux_loss_coef", 0.001))
        m["d_ff"] = hf["intermediate_size"]  # every layer is MoE; the expert width
    elif family in ("qwen2_moe", "qwen3_moe"):
        E = hf.get("num_experts", hf.get("num_local_experts"))  # Qwen3-MoE saves it as num_local_experts
        if E is None:
            raise HFInteropError(f"{family} config.json: no num_experts / num_local_experts")
        step = hf.get("decoder_sparse_step", 1) or 1
        dense = set(hf.get("mlp_only_layers") or [])
        m["moe_layer_indices"] = [i for i in range(L) if i not in dense and E > 0 and (i + 1) % step == 0]
        e.update(n_experts=max(E, 1), d_expert=hf["moe_intermediate_size"], norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                 aux_loss_weight=hf.get("router_aux_loss_coef", 0.001))
        if family == "qwen2_moe":
            m["qkv_bias"] = bool(hf.get("qkv_bias", True))
            shared = hf.get("shared_expert_intermediate_size", 0)
            if not shared:
                raise _unsupported(family, "shared_expert_intermediate_size", shared, "Qwen2-MoE's gated shared expert must have a width")
            e.update(n_shared_experts=1, d_shared_expert=shared, shared_expert_gate=True)
        else:
            bias = bool(hf.get("attention_bias", False))
            m.update(qk_norm=True, qkv_bias=bias, attn_out_bias=bias)
            m.setdefault("head_dim", head_dim if head_dim is not None else hf["hidden_size"] // n_head)
    else:  # DeepSeek-V2 / V3: MLA, first dense layers, shared experts
        for name in ("attention_bias", "mlp_bias"):
            if hf.get(name):
                raise _unsupported(family, name, True, "DeepSeek projections are bias-free in moe_dist")
        kv = hf.get("num_key_value_heads")
        if kv is not None and kv != n_head:
            raise _unsupported(family, "num_key_value_heads", kv, f"MLA decodes keys for all {n_head} heads")
        m.update(attention="mla", n_kv_head=None, q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                 qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
                 first_k_dense=hf.get("first_k_dense_replace") or 0, moe_every=1)
        if hf.get("moe_layer_freq", 1) != 1:
            raise _unsupported(family, "moe_layer_freq", hf["moe_layer_freq"], "transformers and moe_dist make every layer from first_k_dense_replace on MoE")
        E = hf["n_routed_experts"]
        e.update(n_experts=E, d_expert=hf["moe_intermediate_size"], n_shared_experts=hf.get("n_shared_experts") or 0,
                 routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
        n_group, topk_group = hf.get("n_group"), hf.get("topk_group")
        if family == "deepseek_v2":
            scoring = hf.get("scoring_func", "softmax")
            if scoring != "softmax":
                raise _unsupported(family, "scoring_func", scoring, "DeepSeek-V2 routes on softmax scores")
            if hf.get("norm_topk_prob"):
                raise _unsupported(family, "norm_topk_prob", True, "transformers' DeepSeek-V2 ignores it while DeepSeek's code normalises; the intended maths is ambiguous")
            method = hf.get("topk_method", "greedy")
            if method == "group_limited_greedy":
                e.update(n_groups=n_group, topk_groups=topk_group, group_score="max")
            elif method != "greedy":
                raise _unsupported(family, "topk_method", method, "DeepSeek-V2 routing is greedy or group_limited_greedy")
            e["aux_loss_weight"] = hf.get("aux_loss_alpha", 0.001)
            m["rope_interleave"] = True  # transformers' DeepSeek-V2 rotates (x0, x1), (x2, x3), ... pairs
        else:
            scoring = hf.get("scoring_func", "sigmoid")
            if scoring != "sigmoid":
                raise _unsupported(family, "scoring_func", scoring, "DeepSeek-V3 routes on sigmoid scores")
            method = hf.get("topk_method", "noaux_tc")
            if method != "noaux_tc":
                raise _unsupported(family, "topk_method", method, "DeepSeek-V3 routing is noaux_tc (sigmoid + e_score_correction_bias)")
            e.update(score_func="sigmoid", expert_bias=True, norm_topk_prob=bool(hf.get("norm_topk_prob", True)), aux_loss_weight=0.0)
            if n_group and n_group > 1:
                e.update(n_groups=n_group, topk_groups=topk_group, group_score="top2_sum")
            m["rope_interleave"] = bool(hf.get("rope_interleave", True))
    try:
        cfg, moe = ModelConfig(**m), MoEConfig(**e)
    except TypeError as err:  # pragma: no cover - a mapping bug, not a user error
        raise HFInteropError(f"{family}: internal mapping error {err}") from None
    _validate(cfg, moe, f"{family} config.json")
    return family, cfg, moe


def _validate(cfg: ModelConfig, moe: MoEConfig, where: str) -> None:
    from ..config import validate_model, validate_moe

    errors: list[str] = []
    validate_model(cfg, errors)
    if cfg.moe_layers():
        validate_moe(moe, cfg, errors)
    if errors:
        raise HFInteropError(f"{where} maps to an invalid moe_dist config:\n  " + "\n  ".join(errors))


# ---------------------------------------------------------------------------------------------
# Tensor names

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_PER_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "q_a_proj", "q_a_layernorm", "q_b_proj",
         "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")


def _layer_key_to_ours(rest: str) -> Optional[str]:
    """Name inside model.layers.{i}. (block_sparse_moe already renamed to mlp) -> ours, or None."""
    if rest == "input_layernorm.weight":
        return "attn_norm.weight"
    if rest == "post_attention_layernorm.weight":
        return "ffn_norm.weight"
    if rest.startswith("self_attn.") and rest.split(".")[1] in _ATTN:
        return "attn." + rest[len("self_attn."):]
    if not rest.startswith("mlp."):
        return None
    sub = rest[len("mlp."):]
    table = {
        "gate.weight": "router.weight",
        "gate.e_score_correction_bias": "router.expert_bias",
        "experts.gate_up_proj": "experts.gate_up_proj",
        "experts.down_proj": "experts.down_proj",
        "shared_expert_gate.weight": "shared_expert_gate.weight",
    }
    if sub in table:
        return table[sub]
    for prefix in ("shared_experts.", "shared_expert."):
        if sub.startswith(prefix) and sub[len(prefix):] in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
            return "shared_experts." + sub[len(prefix):]
    if sub in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
        return sub  # dense SwiGLU layer
    return None


def hf_state_to_ours(family: str, hf_state: dict[str, Tensor], cfg: ModelConfig, moe: MoEConfig,
                     mtp_layers: int = 0) -> dict[str, Tensor]:
    """Hugging Face tensor names/layouts -> moe_dist state dict names (unknown tensors raise)."""
    ours: dict[str, Tensor] = {}
    per_expert: dict[int, dict[str, dict[int, Tensor]]] = {}
    unknown: list[str] = []
    for key, t in hf_state.items():
        key = key.replace(".block_sparse_moe.", ".mlp.")
        if key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            ours[key.removeprefix("model.")] = t
            continue
        match = _LAYER.match(key)
        if match is None:
            if key.endswith("rotary_emb.inv_freq"):
                continue  # a cache some old checkpoints saved; recomputed from theta
            unknown.append(key)
            continue
        i, rest = int(match.group(1)), match.group(2)
        if i >= cfg.n_layer:
            if i < cfg.n_layer + mtp_layers:
                continue  # DeepSeek-V3 multi-token-prediction module: not part of the causal LM
            unknown.append(key)
            continue
        if rest.endswith("rotary_emb.inv_freq"):
            continue
        pe = _PER_EXPERT.match(rest)
        if pe is not None:
            per_expert.setdefault(i, {}).setdefault(_PART[pe.group(2)], {})[int(pe.group(1))] = t
            continue
        name = _layer_key_to_ours(rest)
        if name is None:
            unknown.append(key)
            continue
        ours[f"layers.{i}.ffn.{name}" if rest.startswith("mlp.") else f"layers.{i}.{name}"] = t
    if unknown:
        more = f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else ""
        raise HFInteropError(f"{family} checkpoint: tensors moe_dist has no place for: {', '.join(unknown[:8])}{more}")
    for i, parts in per_expert.items():
        E = moe.n_experts
        for part in ("gate", "up", "down"):
            got = sorted(parts.get(part, {}))
            if got != list(range(E)):
                raise HFInteropError(f"{family} checkpoint: layer {i} has per-expert {part} weights for experts {got}, expected 0..{E - 1}")
        gate = torch.stack([parts["gate"][j] for j in range(E)])  # [E, F, H]
        up = torch.stack([parts["up"][j] for j in range(E)])
        ours[f"layers.{i}.ffn.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)  # [E, 2F, H]
        ours[f"layers.{i}.ffn.experts.down_proj"] = torch.stack([parts["down"][j] for j in range(E)])  # [E, H, F]
    if cfg.tie_embeddings:
        ours.pop("lm_head.weight", None)
        if "embed_tokens.weight" in ours:
            ours["lm_head.weight"] = ours["embed_tokens.weight"]
    return ours


def import_hf(path: Union[str, Path], *, dtype: torch.dtype = torch.float32, max_seq_len: Optional[int] = None):
    """Load a local Hugging Face checkpoint directory -> (MoETransformerLM, ModelConfig, MoEConfig).

    max_seq_len: RoPE table length (default: the checkpoint's max_position_embeddings).
    """
    from ..model import MoETransformerLM

    hf = read_config(path)
    family, cfg, moe = hf_to_configs(hf, max_seq_len=max_seq_len)
    hf_state = load_safetensors(path)
    mtp = (hf.get("num_nextn_predict_layers") or 0) if family == "deepseek_v3" else 0
    state = hf_state_to_ours(family, hf_state, cfg, moe, mtp_layers=mtp)
    model = MoETransformerLM(cfg, moe).to(dtype)
    _load_exact(model, state, f"{family} checkpoint {path}")
    model.eval()
    return model, cfg, moe


def load_weights(model, path: Union[str, Path]) -> None:
    """Load one-device weights into `model`: a moe_dist safetensors file or a Hugging Face directory.

    The model's config must be the checkpoint's (`moe-dist import-hf` writes both); any missing,
    extra or mis-shaped tensor is an error naming it.
    """
    path = Path(path)
    if path.is_dir():
        hf = read_config(path)
        family, cfg, moe = hf_to_configs(hf)
        mtp = (hf.get("num_nextn_predict_layers") or 0) if family == "deepseek_v3" else 0
        state = hf_state_to_ours(family, load_safetensors(path), model.config, model.moe_config, mtp_layers=mtp)
    else:
        from safetensors.torch import load_file

        state = load_file(str(path))
        if model.config.tie_embeddings and "embed_tokens.weight" in state:
            state["lm_head.weight"] = state["embed_tokens.weight"]
    _load_exact(model, state, f"checkpoint.init_from={path}")


def save_weights(model, path: Union[str, Path]) -> None:
    """One-device weights as safetensors (tied lm_head stored once, as embed_tokens)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path))


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


# ---------------------------------------------------------------------------------------------
# Export


def infer_family(cfg: ModelConfig, moe: MoEConfig) -> str:
    """The Hugging Face family a moe_dist model looks like (export checks it can be represented)."""
    if cfg.attention == "mla":
        return "deepseek_v3" if moe.score_func == "sigmoid" else "deepseek_v2"
    if cfg.qk_norm:
        return "qwen3_moe"
    if moe.n_shared_experts or moe.shared_expert_gate or (cfg.moe_layers() != list(range(cfg.n_layer))):
        return "qwen2_moe"
    return "mixtral"


def _check_exportable(family: str, cfg: ModelConfig, moe: MoEConfig) -> None:
    errors: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    moe_layers = cfg.moe_layers()
    need(moe.router == "topk", f"moe.router={moe.router}: {family} routes top-k")
    need(not moe.topk_then_softmax, "moe.topk_then_softmax: Hugging Face families take the softmax over all experts")
    mla = family.startswith("deepseek")
    need(mla or not cfg.rope_scaling.mscale_all_dim,
         f"model.rope_scaling.mscale_all_dim: only DeepSeek's attention rescales the softmax by it; {family} would not")
    need((cfg.attention == "mla") == mla, f"model.attention={cfg.attention}: {family} uses {'mla' if mla else 'gqa'}")
    if family != "deepseek_v3":
        need(moe.score_func == "softmax", f"moe.score_func={moe.score_func}: {family} uses softmax")
        need(not moe.expert_bias, f"moe.expert_bias: {family} has no expert bias (DeepSeek-V3 does)")
        need(moe.routed_scaling_factor == 1.0 or family == "deepseek_v2", f"moe.routed_scaling_factor: {family} has none")
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        need(moe.n_groups == 0, f"moe.n_groups: {family} has no group-limited routing")
        need(not cfg.rope_interleave, f"model.rope_interleave: {family} uses the rotate_half RoPE layout")
    if family == "mixtral":
        need(moe_layers == list(range(cfg.n_layer)), "model: every Mixtral layer is MoE; export dense-layer models as qwen2_moe/qwen3_moe")
        need(moe.norm_topk_prob, "moe.norm_topk_prob: Mixtral always renormalises the top-k weights")
        need(moe.n_shared_experts == 0, "moe.n_shared_experts: Mixtral has no shared experts")
        need(not (cfg.qkv_bias or cfg.attn_out_bias or cfg.qk_norm), "model: Mixtral attention has no biases and no qk_norm")
    if family == "qwen2_moe":
        need(moe.n_shared_experts > 0 and moe.shared_expert_gate, "moe: Qwen2-MoE has a gated shared expert; set n_shared_experts >= 1 and shared_expert_gate")
        need(not (cfg.attn_out_bias or cfg.qk_norm), "model: Qwen2-MoE attention has no o_proj bias and no qk_norm")
    if family == "qwen3_moe":
        need(moe.n_shared_experts == 0, "moe.n_shared_experts: Qwen3-MoE has no shared experts")
        need(cfg.qk_norm, "model.qk_norm: Qwen3-MoE always normalises q and k")
        need(cfg.qkv_bias == cfg.attn_out_bias, "model.qkv_bias/attn_out_bias: Qwen3-MoE's attention_bias sets both")
    if mla:
        k = cfg.n_layer - len(moe_layers)
        need(moe_layers == list(range(k, cfg.n_layer)), f"model: {family} layers are dense up to first_k_dense_replace, then all MoE")
        need(not moe.shared_expert_gate, f"moe.shared_expert_gate: {family} shared experts are ungated")
        d_e = resolved_d_expert(cfg, moe)
        width = moe.n_shared_experts * (moe.d_shared_expert or d_e)
        need(width % d_e == 0, f"moe.d_shared_expert: {family} shared experts have the routed expert width {d_e}")
        if family == "deepseek_v2":
            need(cfg.rope_interleave, "model.rope_interleave: DeepSeek-V2 uses the interleaved RoPE layout")
            need(not moe.norm_topk_prob, "moe.norm_topk_prob: transformers' DeepSeek-V2 does not renormalise")
            need(moe.n_groups == 0 or moe.group_score == "max", "moe.group_score: DeepSeek-V2 groups score by max")
        else:
            need(moe.score_func == "sigmoid", "moe.score_func: DeepSeek-V3 uses sigmoid")
            need(moe.n_groups == 0 or moe.group_score == "top2_sum", "moe.group_score: DeepSeek-V3 groups score by top2_sum")
    if errors:
        raise HFInteropError(f"cannot export as {family}:\n  " + "\n  ".join(errors))


def _rope_parameters(cfg: ModelConfig) -> dict:
    r = cfg.rope_scaling
    if r.type == "none":
        return {"rope_theta": cfg.theta, "rope_type": "default"}
    out = {"rope_theta": cfg.theta, "rope_type": "yarn"}
    out.update({key: getattr(r, ours) for key, ours in _YARN_KEYS.items() if getattr(r, ours) is not None})
    return out


def configs_to_hf(family: str, cfg: ModelConfig, moe: MoEConfig, dtype: torch.dtype = torch.float32) -> dict:
    """(ModelConfig, MoEConfig) -> a Hugging Face config.json dict for `family`."""
    _check_exportable(family, cfg, moe)
    d_e = resolved_d_expert(cfg, moe)
    moe_layers = cfg.moe_layers()
    hf = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.theta,
        "rope_parameters": _rope_parameters(cfg), "attention_dropout": 0.0,
        "num_experts_per_tok": moe.top_k, "use_cache": True, "dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.rope_scaling.type != "none":  # the transformers 4.x / vLLM spelling of the same, for their loaders
        hf["rope_scaling"] = {k: v for k, v in hf["rope_parameters"].items() if k != "rope_theta"} | {"type": cfg.rope_scaling.type}
    if family == "mixtral":
        hf.update(intermediate_size=d_e, num_local_experts=moe.n_experts, head_dim=cfg.head_size(), sliding_window=None,
                  router_jitter_noise=moe.router_jitter, router_aux_loss_coef=moe.aux_loss_weight)
    elif family in ("qwen2_moe", "qwen3_moe"):
        hf.update(intermediate_size=cfg.d_ff, moe_intermediate_size=d_e, num_experts=moe.n_experts, head_dim=cfg.head_size(),
                  norm_topk_prob=moe.norm_topk_prob, decoder_sparse_step=1, router_aux_loss_coef=moe.aux_loss_weight,
                  mlp_only_layers=[i for i in range(cfg.n_layer) if i not in moe_layers], use_sliding_window=False)
        if family == "qwen2_moe":
            hf.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=moe.n_shared_experts * (moe.d_shared_expert or d_e))
        else:
            hf["attention_bias"] = cfg.qkv_bias
    else:
        d = cfg.mla_dims()
        hf.update(intermediate_size=cfg.d_ff, moe_intermediate_size=d_e, n_routed_experts=moe.n_experts,
                  n_shared_experts=moe.n_shared_experts * (moe.d_shared_expert or d_e) // d_e,
                  routed_scaling_factor=moe.routed_scaling_factor, first_k_dense_replace=cfg.n_layer - len(moe_layers),
                  q_lora_rank=d["q_lora_rank"], kv_lora_rank=d["kv_lora_rank"], qk_nope_head_dim=d["qk_nope"],
                  qk_rope_head_dim=d["qk_rope"], v_head_dim=d["v"], attention_bias=False, norm_topk_prob=moe.norm_topk_prob)
        if family == "deepseek_v2":
            grouped = moe.n_groups > 0
            hf.update(topk_method="group_limited_greedy" if grouped else "greedy", n_group=moe.n_groups if grouped else None,
                      topk_group=moe.topk_groups if grouped else None, mlp_bias=False, aux_loss_alpha=moe.aux_loss_weight)
        else:
            hf.update(n_group=moe.n_groups or 1, topk_group=moe.topk_groups or 1, rope_interleave=cfg.rope_interleave,
                      num_nextn_predict_layers=0)
    return hf


def ours_to_hf_state(family: str, model, expert_layout: str = "per_expert") -> dict[str, Tensor]:
    """moe_dist model -> Hugging Face tensor names. expert_layout: per_expert (every loader) | stacked (transformers 5)."""
    if expert_layout not in ("per_expert", "stacked"):
        raise HFInteropError(f"expert_layout={expert_layout!r}: use per_expert or stacked")
    cfg, moe = model.config, model.moe_config
    out: dict[str, Tensor] = {}
    sd = model.state_dict()
    for key, t in sd.items():
        t = t.detach()
        if key in ("embed_tokens.weight", "norm.weight"):
            out["model." + key] = t
            continue
        if key == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[key] = t
            continue
        i, rest = key.split(".", 2)[1:]
        pre = f"model.layers.{i}."
        if rest == "attn_norm.weight":
            out[pre + "input_layernorm.weight"] = t
        elif rest == "ffn_norm.weight":
            out[pre + "post_attention_layernorm.weight"] = t
        elif rest.startswith("attn."):
            out[pre + "self_attn." + rest[len("attn."):]] = t
        elif rest.startswith("ffn."):
            sub = rest[len("ffn."):]
            mlp = pre + ("block_sparse_moe." if family == "mixtral" and expert_layout == "per_expert" else "mlp.")
            if sub == "router.weight":
                out[mlp + "gate.weight"] = t
            elif sub in ("router.expert_bias", "router.noise_weight"):
                continue  # expert_bias is written below for DeepSeek-V3; noise only acts in training
            elif sub.startswith("shared_experts."):
                name = "shared_expert." if family == "qwen2_moe" else "shared_experts."
                out[mlp + name + sub[len("shared_experts."):]] = t
            elif sub == "shared_expert_gate.weight":
                out[mlp + sub] = t
            elif sub.startswith("experts."):
                if expert_layout == "stacked":
                    out[mlp + sub] = t
                elif sub == "experts.gate_up_proj":
                    gate, up = t.chunk(2, dim=1)  # [E, F, H] each
                    names = ("w1", "w3") if family == "mixtral" else ("gate_proj", "up_proj")
                    for e in range(t.shape[0]):
                        out[f"{mlp}experts.{e}.{names[0]}.weight"] = gate[e]
                        out[f"{mlp}experts.{e}.{names[1]}.weight"] = up[e]
                else:
                    name = "w2" if family == "mixtral" else "down_proj"
                    for e in range(t.shape[0]):
                        out[f"{mlp}experts.{e}.{name}.weight"] = t[e]
            else:  # dense SwiGLU
                out[pre + "mlp." + sub] = t
        else:
            raise HFInteropError(f"export: no Hugging Face name for {key}")
    if family == "deepseek_v3":
        for i, layer in enumerate(model.layers):
            if hasattr(layer.ffn, "router"):
                bias = layer.ffn.router.expert_bias if moe.expert_bias else torch.zeros_like(layer.ffn.router.expert_bias)
                out[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] = bias.detach().float()
    return out


def export_hf(model, out_dir: Union[str, Path], family: Optional[str] = None, *, expert_layout: str = "per_expert",
              dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 5 * 2**30) -> str:
    """Write `model` as a Hugging Face checkpoint directory (config.json + safetensors); returns the family.

    family: one of FAMILIES, or None to infer it from the configs. The export refuses (HFInteropError)
    a model the family cannot express. dtype: tensor dtype on disk (default: the model's).
    """
    cfg, moe = model.config, model.moe_config
    if not cfg.moe_layers():
        raise HFInteropError("export: the model has no MoE layers; export supports the MoE families "
                             f"{', '.join(FAMILIES)} (upcycle() a dense model first)")
    family = family or infer_family(cfg, moe)
    if family not in FAMILIES:
        raise HFInteropError(f"family={family!r}: export supports {', '.join(FAMILIES)}")
    dtype = dtype or model.lm_head.weight.dtype
    hf_cfg = configs_to_hf(family, cfg, moe, dtype)
    state = ours_to_hf_state(family, model, expert_layout)
    state = {k: (t if k.endswith("e_score_correction_bias") else t.to(dtype)).contiguous() for k, t in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return family


__all__ = ["FAMILIES", "DENSE_FAMILIES", "HFInteropError", "import_hf", "export_hf", "hf_to_configs", "configs_to_hf", "hf_state_to_ours",
           "ours_to_hf_state", "infer_family", "load_safetensors", "save_safetensors", "read_config"]
