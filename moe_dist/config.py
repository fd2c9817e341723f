"""One typed config for everything: dataclasses, YAML + `key.sub=value` overrides, validation.

Every bad value is rejected here, before any work starts, with the field's dotted name and a fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A bad config value; the message names the field and the fix."""


@dataclass
class RopeScaling:
    """RoPE context extension. type none: plain RoPE. yarn: YaRN as DeepSeek-V2/V3 and Qwen use it."""
    type: str = "none"  # none | yarn
    factor: float = 1.0  # context extension: new length / original_max_seq_len
    original_max_seq_len: Optional[int] = None  # the context the model was pretrained at (yarn: required)
    beta_fast: float = 32.0  # dimensions turning more than beta_fast times over the original context keep their frequency
    beta_slow: float = 1.0  # those turning fewer than beta_slow times are interpolated by factor; a ramp between
    mscale: float = 1.0  # attention factor = mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both set
    mscale_all_dim: float = 0.0  # DeepSeek: also multiplies the softmax scale by mscale(factor, mscale_all_dim)^2
    attention_factor: Optional[float] = None  # explicit multiplier of cos/sin; None = from factor and mscale
    truncate: bool = True  # round the ramp's ends to whole dimensions (the YaRN reference does)


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # grouped-query attention; None = n_head
    d_ff: int = 1024  # width of dense SwiGLU FFNs
    max_seq_len: int = 256
    theta: float = 10000.0  # RoPE base
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    # matmuls of the dense linears (attention, dense FFN, shared experts, LM head) in fp32 on a CPU:
    # auto (oneDNN on x86 CPUs, where MKL may run AVX2 code only) | onednn | torch
    cpu_gemm: str = "auto"
    # Which layers are MoE: an explicit list wins; otherwise layers i >= first_k_dense
    # with (i - first_k_dense) % moe_every == 0. moe_every = 0 makes every layer dense.
    moe_layer_indices: Optional[list[int]] = None
    first_k_dense: int = 0
    moe_every: int = 1
    init_std: float = 0.02
    activation_checkpointing: bool = False
    # Attention variants of Hugging Face families; the defaults are Llama-style (grouped-query) attention.
    attention: str = "gqa"  # gqa (multi/grouped-query) | mla (multi-head latent attention, DeepSeek-V2/V3)
    head_dim: Optional[int] = None  # q/k/v size per head; None = d_model // n_head (Qwen3 sets it explicitly)
    qkv_bias: bool = False  # bias on q, k, v projections (Qwen2-MoE; Qwen3 attention_bias)
    attn_out_bias: bool = False  # bias on o_proj (Qwen3 attention_bias)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    rope_interleave: bool = False  # RoPE rotates pairs (x0,x1),(x2,x3)... (DeepSeek), not the two halves (Llama)
    # Multi-head latent attention (attention=mla). None = derived from the head size hd = head_dim or
    # d_model // n_head, in DeepSeek-V3's ratios: kv_lora_rank 4*hd, nope hd, rope hd/2, v hd.
    q_lora_rank: Optional[int] = None  # rank of the compressed query; None = full-rank q_proj (V2-Lite)
    kv_lora_rank: Optional[int] = None  # rank of the compressed key/value latent
    qk_nope_head_dim: Optional[int] = None  # per-head q/k dims without position
    qk_rope_head_dim: Optional[int] = None  # per-head q/k dims with RoPE (the rope key is shared by all heads)
    v_head_dim: Optional[int] = None
    # Variants of further Hugging Face families; every default is the Llama-style block above.
    rotary_dim: Optional[int] = None  # RoPE rotates the first rotary_dim dims of each head (partial rotary, GLM-4-MoE); None = all
    qk_norm_scope: str = "head"  # qk_norm over each head (Qwen3) or over the whole q and k projections: projection (OLMoE)
    qk_norm_after_rope: bool = False  # apply qk_norm to the rotated q and k (HunYuan-MoE) instead of before RoPE
    pre_norm: bool = True  # RMSNorm on the input of each attention and FFN branch; false: FlexOlmo (post_norm=all)
    post_norm: str = "none"  # RMSNorm on branch outputs before the residual add: none | all (FlexOlmo) | moe (MoE FFNs, A.X-K1)
    embedding_multiplier: float = 1.0  # Granite: scales the token embeddings
    residual_multiplier: float = 1.0  # Granite: scales every branch output before the residual add
    attention_multiplier: Optional[float] = None  # Granite: the softmax scale itself; None = head_dim^-0.5
    logits_scaling: float = 1.0  # Granite: the logits are divided by it
    sliding_window: Optional[int] = None  # sliding-window attention: each token sees the last W positions, itself included
    sliding_window_layers: Optional[list[int]] = None  # the layers that use sliding_window; None = all
    attn_sinks: bool = False  # a learned logit per head added to every softmax's denominator (gpt-oss)

    def head_size(self) -> int:
        """q/k/v size per head of gqa attention (and the base of the MLA defaults)."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_head

    def mla_dims(self) -> dict[str, Optional[int]]:
        """Resolved MLA sizes: q_lora_rank (None = uncompressed), kv_lora_rank, qk_nope, qk_rope, v."""
        hd = self.head_size()
        return {
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank if self.kv_lora_rank is not None else 4 * hd,
            "qk_nope": self.qk_nope_head_dim if self.qk_nope_head_dim is not None else hd,
            "qk_rope": self.qk_rope_head_dim if self.qk_rope_head_dim is not None else hd // 2,
            "v": self.v_head_dim if self.v_head_dim is not None else hd,
        }

    def rope_dim(self) -> int:
        """Dimensions rotated by RoPE per head."""
        if self.attention == "mla":
            return self.mla_dims()["qk_rope"]
        return self.rotary_dim if self.rotary_dim is not None else self.head_size()

    def layer_window(self, i: int) -> Optional[int]:
        """Layer i's sliding window (None: full causal attention)."""
        if self.sliding_window_layers is not None and i not in self.sliding_window_layers:
            return None
        return self.sliding_window

    def moe_layers(self) -> list[int]:
        if self.moe_layer_indices is not None:
            return sorted(self.moe_layer_indices)
        if self.moe_every == 0:
            return []
        return [i for i in range(self.first_k_dense, self.n_layer) if (i - self.first_k_dense) % self.moe_every == 0]


@dataclass
class MoEConfig:
    n_experts: int = 8
    top_k: int = 2
    d_expert: Optional[int] = None  # routed expert width (fine-grained experts); None = model.d_ff
    # Router
    router: str = "topk"  # topk | expert_choice | top_p
    score_func: str = "softmax"  # softmax | sigmoid
    topk_then_softmax: bool = False  # softmax over the k chosen logits
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    noisy_gating: bool = False  # noisy top-k (training only)
    router_jitter: float = 0.0  # multiply router input by U(1-eps, 1+eps) (training only)
    n_groups: int = 0  # group-limited routing: expert groups G (0 = off)
    topk_groups: int = 0  # groups M kept per token
    group_score: str = "max"  # max (DeepSeek-V2) | top2_sum (DeepSeek-V3)
    expert_bias: bool = False  # aux-loss-free balancing (DeepSeek-V3)
    bias_update_rate: float = 1e-3
    top_p: float = 0.5  # top_p router threshold
    max_k: int = 0  # top_p router: most experts per token (0 = n_experts)
    top_p_entropy_weight: float = 0.0
    # Capacity (None or <= 0 = dropless)
    capacity_factor: Optional[float] = None
    eval_capacity_factor: Optional[float] = None
    min_capacity: int = 0
    drop_policy: str = "probs"  # probs | position
    routing_group: str = "batch"  # batch (one micro-batch per group) | sequence
    routing_groups: int = 1  # emulate G ranks' micro-batches in one process
    # Balance losses: weights, 0 = off
    aux_loss_weight: float = 0.01  # expert-level
    device_loss_weight: float = 0.0
    comm_loss_weight: float = 0.0
    seq_aux_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    n_devices: Optional[int] = None  # device groups D for device/comm losses; None = parallel.ep
    comm_max_devices: Optional[int] = None  # M in the communication loss; None = topk_groups or D
    global_batch_balance: bool = False  # all-reduce expert counts over dp before the loss
    # Shared experts (DeepSeek, Qwen2-MoE)
    n_shared_experts: int = 0
    d_shared_expert: Optional[int] = None  # width of each shared expert; None = d_expert
    shared_expert_gate: bool = False  # sigmoid(x . w) gate on the shared output (Qwen2-MoE)
    # Expert compute: auto | grouped_mm (torch._grouped_mm) | onednn (per-expert oneDNN GEMMs, fp32 CPU)
    # | loop (per-expert torch.mm). auto: grouped_mm for bf16, onednn for fp32 on x86 CPUs, else loop
    grouped_mm: str = "auto"
    # Variants of further Hugging Face families (gpt-oss); every default is the plain router and SwiGLU expert above.
    router_bias: bool = False  # a learned bias on the router logits, for selection and gate weights alike
    expert_linear_bias: bool = False  # biases on the routed experts' gate/up and down projections
    expert_act: str = "swiglu"  # swiglu: silu(g) * u | clamped_swiglu: (clamp(u, +-limit) + 1) * g' * sigmoid(alpha g'), g' = min(g, limit)
    swiglu_alpha: float = 1.702  # clamped_swiglu: alpha
    swiglu_limit: float = 7.0  # clamped_swiglu: limit


@dataclass
class ParallelConfig:
    tp: int = 1
    ep: int = 1
    dp: Optional[int] = None  # None = world / tp
    expert_tp: bool = False  # split each expert over the tp ranks
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: float = 600.0


@dataclass
class DataConfig:
    dataset: str = "builtin:pydoc"  # builtin:pydoc, a text/JSONL file or a directory of them
    tokenizer: str = "byte"  # byte, or a path to a Hugging Face tokenizer.json
    cache_dir: str = ".cache/moe_dist"
    val_fraction: float = 0.05
    seq_len: Optional[int] = None  # None = model.max_seq_len
    jsonl_field: str = "text"


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum_steps: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    zero_stage: int = 0
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before aborting
    apex: bool = False  # NVIDIA apex FusedAdam / fused RMSNorm where installed
    cpu_malloc_cache: bool = True  # on CPU, reuse freed large blocks instead of page-faulting them in each step


@dataclass
class CheckpointConfig:
    every: int = 0  # 0 = only at the end
    keep_last: int = 3
    resume: bool = True
    # false: resume weights, step, data position and schedule but start the optimizer afresh (AdamW
    # moments from zero): how ZeRO state saved per rank moves to another layout
    load_optimizer: bool = True
    # ZeRO state (DeepSpeed or the torch fallback): gathered (per parameter, like AdamW's: loads at any layout and into AdamW;
    # each rank holds its parameters' full moments, 8 bytes each, on its device while saving) or
    # per_rank (each rank's own partition, no extra memory; resumes at the same layout only)
    zero_state: str = "gathered"
    # initial weights when not resuming: a one-device safetensors file (as `moe-dist import-hf`
    # writes) or a Hugging Face checkpoint directory; loaded before the model is sharded
    init_from: Optional[str] = None


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    tensorboard: bool = True
    progress_bar: bool = True
    comm_timing: bool = False  # expert parallelism: time all-to-alls and expert compute (syncs CUDA per layer)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts with type checks


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}; write it as [a, b, ...]")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _unknown_key(where: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
    name = f"{where}.{key}" if where else key
    return ConfigError(f"{name}: unknown key; {hint}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(where, key, names)
        name = f"{where}.{key}" if where else key
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, name)
        else:
            kwargs[key] = _coerce(value, tp, name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`model.d_model=512 moe.top_k=1` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.sub=value, for example moe.top_k=2")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, world_size: int = 1) -> Config:
    """Load YAML (optional), apply overrides, build and validate the Config."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file; pass a YAML file such as configs/tiny.yaml")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping of sections (model:, moe:, ...)")
    tree = _merge(tree, parse_overrides(overrides or []))
    cfg = from_dict(Config, tree)
    validate(cfg, world_size=world_size)
    return cfg


# ---------------------------------------------------------------------------------------------
# Validation


def _choice(errors: list[str], name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        errors.append(f"{name}: '{value}' is not one of {', '.join(allowed)}")


def _check_onednn(errors: list[str], name: str, value: str) -> None:
    if value == "onednn":
        from .model.gemm import onednn_available  # the config module stays importable without torch otherwise

        if not onednn_available():
            errors.append(f"{name}: onednn needs a torch built with oneDNN (mkldnn); use auto")


def _validate_rope_scaling(r: RopeScaling, errors: list[str]) -> None:
    _choice(errors, "model.rope_scaling.type", r.type, ("none", "yarn"))
    if r.type == "none":
        if r.factor != 1.0:
            errors.append(f"model.rope_scaling.factor: {r.factor} has no effect with rope_scaling.type=none; "
                          "set model.rope_scaling.type=yarn, or factor 1")
        return
    if r.factor < 1.0:
        errors.append(f"model.rope_scaling.factor: must be >= 1 (the context extension), got {r.factor}")
    if r.original_max_seq_len is None or r.original_max_seq_len <= 0:
        errors.append("model.rope_scaling.original_max_seq_len: YaRN needs the pretraining context length "
                      f"(a positive integer), got {r.original_max_seq_len}")
    if not r.beta_fast > r.beta_slow > 0:
        errors.append(f"model.rope_scaling.beta_fast/beta_slow: need beta_fast > beta_slow > 0, got "
                      f"{r.beta_fast}/{r.beta_slow}")
    if r.attention_factor is not None and r.attention_factor <= 0:
        errors.append(f"model.rope_scaling.attention_factor: must be positive or null, got {r.attention_factor}")


def validate_model(m: ModelConfig, errors: list[str]) -> None:
    for name in ("vocab_size", "d_model", "n_layer", "n_head", "d_ff", "max_seq_len"):
        if getattr(m, name) <= 0:
            errors.append(f"model.{name}: must be positive, got {getattr(m, name)}")
    _choice(errors, "model.attention", m.attention, ("gqa", "mla"))
    _choice(errors, "model.cpu_gemm", m.cpu_gemm, ("auto", "onednn", "torch"))
    _check_onednn(errors, "model.cpu_gemm", m.cpu_gemm)
    _validate_rope_scaling(m.rope_scaling, errors)
    if m.head_dim is not None:
        if m.head_dim <= 0 or m.head_dim % 2:
            errors.append(f"model.head_dim: {m.head_dim} must be positive and even (RoPE rotates pairs); or null for d_model / n_head")
    elif m.n_head > 0 and m.d_model % m.n_head:
        errors.append(f"model.d_model: {m.d_model} is not divisible by model.n_head={m.n_head}; pick d_model a multiple "
                      "of n_head, or set model.head_dim")
    elif m.n_head > 0 and m.attention == "gqa" and (m.d_model // m.n_head) % 2:
        errors.append(f"model.d_model: head size {m.d_model // m.n_head} is odd; RoPE needs an even head size")
    if m.attention == "mla" and m.n_head > 0 and (m.head_dim is not None or m.d_model % m.n_head == 0):
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            v = getattr(m, name)
            if v is not None and v <= 0:
                errors.append(f"model.{name}: must be positive, got {v}" + ("; use null for an uncompressed query" if name == "q_lora_rank" else ""))
        rope = m.mla_dims()["qk_rope"]
        if rope <= 0 or rope % 2:
            errors.append(f"model.qk_rope_head_dim: {rope} must be positive and even (RoPE rotates pairs)")
        for name in ("qk_norm", "qkv_bias", "attn_out_bias"):
            if getattr(m, name):
                errors.append(f"model.{name}: not supported with model.attention=mla; set it to false")
        if m.n_kv_head is not None and m.n_kv_head != m.n_head:
            errors.append(f"model.n_kv_head: {m.n_kv_head} but MLA compresses keys/values itself and uses n_head={m.n_head} "
                          "key heads; drop n_kv_head (null)")
    if m.attention == "gqa":
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(m, name) is not None:
                errors.append(f"model.{name}: only used by multi-head latent attention; set model.attention=mla or drop it")
    if m.n_kv_head is not None and (m.n_kv_head <= 0 or m.n_head % m.n_kv_head):
        errors.append(f"model.n_kv_head: {m.n_kv_head} must be positive and divide model.n_head={m.n_head}")
    if m.theta <= 0:
        errors.append(f"model.theta: must be positive, got {m.theta}")
    if m.first_k_dense < 0 or m.moe_every < 0:
        errors.append("model.first_k_dense / model.moe_every: must be >= 0")
    if m.moe_layer_indices is not None:
        bad = [i for i in m.moe_layer_indices if not 0 <= i < m.n_layer]
        if bad:
            errors.append(f"model.moe_layer_indices: {bad} out of range for n_layer={m.n_layer}; use 0..{m.n_layer - 1}")
        if len(set(m.moe_layer_indices)) != len(m.moe_layer_indices):
            errors.append("model.moe_layer_indices: has duplicates")
    _validate_model_variants(m, errors)


def _validate_model_variants(m: ModelConfig, errors: list[str]) -> None:
    """The options of further Hugging Face families (the last block of ModelConfig)."""
    _choice(errors, "model.qk_norm_scope", m.qk_norm_scope, ("head", "projection"))
    _choice(errors, "model.post_norm", m.post_norm, ("none", "all", "moe"))
    if not m.qk_norm:
        for name, on in (("qk_norm_scope", m.qk_norm_scope == "projection"), ("qk_norm_after_rope", m.qk_norm_after_rope)):
            if on:
                errors.append(f"model.{name}: has no effect without model.qk_norm; set model.qk_norm=true or drop it")
    if m.qk_norm_after_rope and m.qk_norm_scope == "projection":
        errors.append("model.qk_norm_after_rope: only with model.qk_norm_scope=head (per-head norms of the rotated heads)")
    if m.attention == "mla":
        for name, default in (("rotary_dim", None), ("sliding_window", None), ("attn_sinks", False), ("attention_multiplier", None)):
            if getattr(m, name) != default:
                hint = " (MLA rotates qk_rope_head_dim dims)" if name == "rotary_dim" else ""
                errors.append(f"model.{name}: not implemented with model.attention=mla{hint}; drop it")
    elif m.rotary_dim is not None and m.n_head > 0:
        hd = m.head_size()
        if not (0 < m.rotary_dim <= hd and m.rotary_dim % 2 == 0):
            errors.append(f"model.rotary_dim: {m.rotary_dim} must be even and between 2 and the head size {hd}; or null for all")
    for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if not getattr(m, name) > 0:
            errors.append(f"model.{name}: must be positive (1 = off), got {getattr(m, name)}")
    if m.attention_multiplier is not None and not m.attention_multiplier > 0:
        errors.append(f"model.attention_multiplier: must be positive, or null for head_dim^-0.5; got {m.attention_multiplier}")
    if m.sliding_window is not None and m.sliding_window < 1:
        errors.append(f"model.sliding_window: must be >= 1 (tokens seen, the token itself included), or null; got {m.sliding_window}")
    if m.sliding_window_layers is not None:
        if m.sliding_window is None:
            errors.append("model.sliding_window_layers: set model.sliding_window too (the window those layers use)")
        bad = [i for i in m.sliding_window_layers if not 0 <= i < m.n_layer]
        if bad:
            errors.append(f"model.sliding_window_layers: {bad} out of range for n_layer={m.n_layer}")


def validate_moe(moe: MoEConfig, m: ModelConfig, errors: list[str], ep: int = 1) -> None:
    E = moe.n_experts
    if E <= 0:
        errors.append(f"moe.n_experts: must be positive, got {E}")
        return
    _choice(errors, "moe.router", moe.router, ("topk", "expert_choice", "top_p"))
    _choice(errors, "moe.score_func", moe.score_func, ("softmax", "sigmoid"))
    _choice(errors, "moe.group_score", moe.group_score, ("max", "top2_sum"))
    _choice(errors, "moe.drop_policy", moe.drop_policy, ("probs", "position"))
    _choice(errors, "moe.routing_group", moe.routing_group, ("batch", "sequence"))
    _choice(errors, "moe.grouped_mm", moe.grouped_mm, ("auto", "grouped_mm", "onednn", "loop"))
    if moe.grouped_mm == "grouped_mm":
        import torch  # the config module stays importable without it otherwise

        if not hasattr(torch, "_grouped_mm"):
            errors.append(f"moe.grouped_mm: torch {torch.__version__} has no torch._grouped_mm (it needs torch 2.8 "
                          "or newer); use auto or loop")
    _check_onednn(errors, "moe.grouped_mm", moe.grouped_mm)
    if not 1 <= moe.top_k <= E:
        errors.append(f"moe.top_k: {moe.top_k} must be between 1 and moe.n_experts={E}; lower top_k or add experts")
    if moe.d_expert is not None and moe.d_expert <= 0:
        errors.append(f"moe.d_expert: must be positive, got {moe.d_expert}")
    for name in ("capacity_factor", "eval_capacity_factor"):
        v = getattr(moe, name)
        if v is not None and v < 0:
            errors.append(f"moe.{name}: {v} is negative; use a value > 0 (for example 1.25), or null for dropless")
    if moe.min_capacity < 0:
        errors.append(f"moe.min_capacity: must be >= 0, got {moe.min_capacity}")
    if moe.routing_groups < 1:
        errors.append(f"moe.routing_groups: must be >= 1, got {moe.routing_groups}")
    if moe.n_groups:
        if moe.n_groups < 0 or E % moe.n_groups:
            errors.append(f"moe.n_groups: {moe.n_groups} must divide moe.n_experts={E}")
        elif not 1 <= moe.topk_groups <= moe.n_groups:
            errors.append(f"moe.topk_groups: {moe.topk_groups} must be between 1 and moe.n_groups={moe.n_groups}")
        elif moe.topk_groups * (E // moe.n_groups) < moe.top_k:
            errors.append(f"moe.topk_groups: {moe.topk_groups} groups of {E // moe.n_groups} experts cannot hold top_k={moe.top_k}; raise topk_groups")
        if moe.group_score == "top2_sum" and E // max(moe.n_groups, 1) < 2:
            errors.append("moe.group_score: top2_sum needs at least 2 experts per group; use max")
    if moe.router == "top_p":
        if not 0.0 < moe.top_p <= 1.0:
            errors.append(f"moe.top_p: {moe.top_p} must be in (0, 1]")
        if not 0 <= moe.max_k <= E:
            errors.append(f"moe.max_k: {moe.max_k} must be between 0 (= n_experts) and {E}")
    if moe.topk_then_softmax and moe.score_func != "softmax":
        errors.append("moe.topk_then_softmax: only with moe.score_func=softmax")
    if moe.score_func == "sigmoid" and moe.router == "top_p":
        errors.append("moe.score_func: top_p routing needs softmax scores (they must sum to 1)")
    if moe.router == "expert_choice" and (moe.capacity_factor is None or moe.capacity_factor <= 0):
        errors.append("moe.capacity_factor: expert_choice routing needs a capacity factor > 0 (each expert takes C tokens)")
    for name in ("aux_loss_weight", "device_loss_weight", "comm_loss_weight", "seq_aux_loss_weight",
                 "z_loss_weight", "top_p_entropy_weight", "bias_update_rate", "router_jitter"):
        if getattr(moe, name) < 0:
            errors.append(f"moe.{name}: must be >= 0, got {getattr(moe, name)}")
    if moe.router_jitter >= 1:
        errors.append(f"moe.router_jitter: {moe.router_jitter} must be < 1")
    D = moe.n_devices if moe.n_devices is not None else ep
    if D <= 0 or E % D:
        errors.append(f"moe.n_devices: {D} device groups must divide moe.n_experts={E}")
    if moe.comm_max_devices is not None and not 1 <= moe.comm_max_devices <= max(D, 1):
        errors.append(f"moe.comm_max_devices: {moe.comm_max_devices} must be between 1 and the {D} devices")
    if moe.n_shared_experts < 0:
        errors.append(f"moe.n_shared_experts: must be >= 0, got {moe.n_shared_experts}")
    _validate_moe_variants(moe, errors)


def _validate_moe_variants(moe: MoEConfig, errors: list[str]) -> None:
    """The options of further Hugging Face families (the last block of MoEConfig)."""
    _choice(errors, "moe.expert_act", moe.expert_act, ("swiglu", "clamped_swiglu"))
    for name in ("swiglu_alpha", "swiglu_limit"):
        if not getattr(moe, name) > 0:
            errors.append(f"moe.{name}: must be positive, got {getattr(moe, name)}")
    if moe.grouped_mm == "onednn" and (moe.expert_linear_bias or moe.expert_act != "swiglu"):
        errors.append("moe.grouped_mm: onednn runs the plain SwiGLU experts only; expert biases and clamped_swiglu run "
                      "per-expert torch.mm or torch._grouped_mm: use auto, loop or grouped_mm")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Raise ConfigError listing every problem found; returns None when the config is usable."""
    errors: list[str] = []
    m, moe, par, tr = cfg.model, cfg.moe, cfg.parallel, cfg.train
    validate_model(m, errors)
    if m.moe_layers():
        validate_moe(moe, m, errors, ep=par.ep)
    _choice(errors, "parallel.backend", par.backend, ("auto", "nccl", "gloo"))
    for name in ("tp", "ep"):
        if getattr(par, name) < 1:
            errors.append(f"parallel.{name}: must be >= 1, got {getattr(par, name)}")
    if par.tp >= 1 and par.ep >= 1:
        if world_size % par.tp:
            errors.append(f"parallel.tp: {par.tp} does not divide the world size {world_size}; launch a multiple of tp processes")
        else:
            dp = world_size // par.tp
            if par.dp is not None and par.dp != dp:
                errors.append(f"parallel.dp: {par.dp} but world {world_size} / tp {par.tp} = {dp}; drop parallel.dp or launch dp*tp processes")
            if (dp * par.tp) % par.ep:
                errors.append(f"parallel.ep: {par.ep} does not divide dp*tp = {dp * par.tp}; pick ep dividing the world size")
        if moe.n_experts > 0 and moe.n_experts % par.ep:
            errors.append(f"parallel.ep: moe.n_experts={moe.n_experts} is not divisible by ep={par.ep}; pick ep dividing n_experts")
    if par.tp > 1 and m.n_head % par.tp:
        errors.append(f"parallel.tp: model.n_head={m.n_head} is not divisible by tp={par.tp}")
    if par.expert_tp and par.tp > 1 and par.ep > 1:
        errors.append("parallel.expert_tp: with ep > 1 the ep groups take the tp groups' ranks, so tp peers hold "
                      "different experts and cannot split one; set parallel.expert_tp=false or parallel.ep=1")
    if par.tp > 1:
        _validate_variants_under_tp(m, moe, par, errors)
    if par.timeout_s <= 0:
        errors.append(f"parallel.timeout_s: must be positive, got {par.timeout_s}")
    d = cfg.data
    if not 0.0 < d.val_fraction < 1.0:
        errors.append(f"data.val_fraction: {d.val_fraction} must be in (0, 1)")
    if d.seq_len is not None and not 1 <= d.seq_len <= m.max_seq_len:
        errors.append(f"data.seq_len: {d.seq_len} must be between 1 and model.max_seq_len={m.max_seq_len}")
    if not d.dataset.startswith("builtin:") and not Path(d.dataset).exists():
        errors.append(f"data.dataset: '{d.dataset}' does not exist; give a text/JSONL file or a directory, or builtin:pydoc")
    if d.tokenizer != "byte" and not Path(d.tokenizer).is_file():
        errors.append(f"data.tokenizer: '{d.tokenizer}' is not a file; give a tokenizer.json (make one with `moe-dist tokenize`) or byte")
    if d.tokenizer == "byte" and m.vocab_size < 256:
        errors.append(f"model.vocab_size: {m.vocab_size} is smaller than the byte tokenizer's 256; set model.vocab_size=256 or more")
    for name in ("steps", "micro_batch_size", "grad_accum_steps", "eval_batches", "log_every", "max_nonfinite_steps"):
        if getattr(tr, name) < 1:
            errors.append(f"train.{name}: must be >= 1, got {getattr(tr, name)}")
    if tr.eval_every < 0 or tr.warmup_steps < 0:
        errors.append("train.eval_every / train.warmup_steps: must be >= 0")
    if not (tr.lr > 0 and 0 <= tr.min_lr <= tr.lr):
        errors.append(f"train.lr / train.min_lr: need lr > 0 and 0 <= min_lr <= lr, got lr={tr.lr}, min_lr={tr.min_lr}")
    if not (0 <= tr.beta1 < 1 and 0 <= tr.beta2 < 1):
        errors.append("train.beta1 / train.beta2: must be in [0, 1)")
    if tr.grad_clip < 0 or tr.weight_decay < 0:
        errors.append("train.grad_clip / train.weight_decay: must be >= 0")
    _choice(errors, "checkpoint.zero_state", cfg.checkpoint.zero_state, ("gathered", "per_rank"))
    _choice(errors, "train.device", tr.device, ("auto", "cpu", "cuda"))
    _choice(errors, "train.dtype", tr.dtype, ("auto", "fp32", "bf16"))
    for name, value in (("moe.grouped_mm", moe.grouped_mm), ("model.cpu_gemm", m.cpu_gemm)):
        if value == "onednn":
            import torch

            on_gpu = tr.device == "cuda" or (tr.device == "auto" and torch.cuda.is_available())
            if on_gpu or tr.dtype == "bf16":
                errors.append(f"{name}: onednn runs fp32 on a CPU, not with train.device={tr.device}"
                              f"{' (a GPU here)' if tr.device == 'auto' and on_gpu else ''} train.dtype={tr.dtype}; "
                              "use auto, or train.device=cpu")
    if tr.zero_stage not in (0, 1, 2):
        errors.append(f"train.zero_stage: {tr.zero_stage} must be 0, 1 or 2")
    elif tr.zero_stage == 2:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            errors.append("train.zero_stage: 2 needs DeepSpeed, which is not installed; install it with "
                          "`DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed`, or use zero_stage=1 "
                          "(torch ZeroRedundancyOptimizer fallback) or 0")
    if cfg.checkpoint.init_from is not None and not Path(cfg.checkpoint.init_from).exists():
        errors.append(f"checkpoint.init_from: '{cfg.checkpoint.init_from}' does not exist; give a model.safetensors "
                      "written by `moe-dist import-hf` or a Hugging Face checkpoint directory")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 1:
        errors.append("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _validate_variants_under_tp(m: ModelConfig, moe: MoEConfig, par: ParallelConfig, errors: list[str]) -> None:
    """Options that moe_dist.parallel.tensor would compute differently with parallel.tp > 1."""
    if m.qk_norm and m.qk_norm_scope == "projection":
        errors.append(f"model.qk_norm_scope: projection normalises over all heads, which parallel.tp={par.tp} splits "
                      "over ranks; use parallel.tp=1")
    if m.attn_sinks:
        errors.append("model.attn_sinks: tensor parallelism splits the heads but not their sinks; use parallel.tp=1")
    if m.moe_layers() and moe.expert_linear_bias and par.expert_tp:
        errors.append("moe.expert_linear_bias: parallel.expert_tp splits expert widths but not their biases; "
                      "set parallel.expert_tp=false")


def resolved_d_expert(m: ModelConfig, moe: MoEConfig) -> int:
    return moe.d_expert if moe.d_expert is not None else m.d_ff

