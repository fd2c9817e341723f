"""The config's schema: one dataclass per section, and building them from plain dicts with type checks.

No torch here: loading (load.py), pure validation (validate.py), resolving derived values
(resolve.py) and environment checks (preflight.py) are their own modules.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union


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
    # auto (oneDNN on x86 CPUs with AVX-512, where MKL may run AVX2 code only; torch elsewhere) | onednn | torch
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
    # group-limited routing: expert groups G (0 = off), or "ep": one group per expert-parallel rank, a number
    # fixed when the run is first resolved (saved with checkpoints; a resume at another ep keeps it)
    n_groups: Union[int, str] = 0
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
    # device groups D for device/comm losses; None = parallel.ep when the run is first resolved (then saved)
    n_devices: Optional[int] = None
    comm_max_devices: Optional[int] = None  # M in the communication loss; None = topk_groups or D
    global_batch_balance: bool = False  # all-reduce expert counts over dp before the loss
    # Shared experts (DeepSeek, Qwen2-MoE)
    n_shared_experts: int = 0
    d_shared_expert: Optional[int] = None  # width of each shared expert; None = d_expert
    shared_expert_gate: bool = False  # sigmoid(x . w) gate on the shared output (Qwen2-MoE)
    # Expert compute: auto | grouped_mm (F.grouped_mm) | onednn (per-expert oneDNN GEMMs, fp32 CPU)
    # | loop (per-expert torch.mm). auto: grouped_mm for bf16, onednn for fp32 on x86 CPUs with AVX-512, else loop
    grouped_mm: str = "auto"
    # Variants of further Hugging Face families (gpt-oss); every default is the plain router and SwiGLU expert above.
    router_bias: bool = False  # a learned bias on the router logits, for selection and gate weights alike
    expert_linear_bias: bool = False  # biases on the routed experts' gate/up and down projections
    expert_act: str = "swiglu"  # swiglu: silu(g) * u | clamped_swiglu: (clamp(u, +-limit) + 1) * g' * sigmoid(alpha g'), g' = min(g, limit)
    swiglu_alpha: float = 1.702  # clamped_swiglu: alpha
    swiglu_limit: float = 7.0  # clamped_swiglu: limit

    def comm_devices(self, n_devices: int) -> int:
        """M of the communication loss: comm_max_devices, else the devices a token can reach (its top-M
        groups' when groups are devices, else at most top_k)."""
        if self.comm_max_devices is not None:
            return self.comm_max_devices
        if self.n_groups and self.n_groups == n_devices:
            return self.topk_groups
        return min(self.top_k, n_devices)


@dataclass
class ParallelConfig:
    tp: int = 1
    ep: int = 1
    dp: Optional[int] = None  # None = world / tp
    expert_tp: bool = False  # split each expert over the tp ranks
    # with tp > 1: the activations between blocks split over the tp ranks by sequence, and each tp rank
    # dispatching only its own tokens; false replicates them (plain Megatron tp), to compare against
    sequence_parallel: bool = True
    # pipeline parallelism: the layers split into pp x pp_virtual_stages stages, stage s on pp rank s % pp
    # (the embedding with the first, the final norm, head and loss with the last)
    pp: int = 1
    pp_schedule: str = "1f1b"  # 1f1b | interleaved_1f1b (several stages per rank: pp_virtual_stages)
    pp_virtual_stages: int = 1  # stages per pp rank
    pp_layers: Optional[list[int]] = None  # layers per stage, in stage order; None = as even as possible
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
    max_nonfinite_steps: int = 5  # consecutive non-finite steps before aborting (read on log steps)
    apex: bool = False  # NVIDIA apex FusedAdam on CUDA where installed
    cpu_malloc_cache: bool = True  # on CPU, reuse freed large blocks instead of page-faulting them in each step;
    # false returns every block of 1 MiB or more to the OS when freed (the least memory)


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
    # resume although the schedule (steps, lr, warmup, betas, weight decay, clipping, global batch, dtype)
    # differs from the checkpoint's; the changes are printed. Changes of the model or the data are refused.
    allow_config_change: bool = False
    # write the shards in the background while training goes on (each rank stages a copy of its shards in
    # host memory); false: write them in the training thread, no copy
    async_save: bool = True
    # after each save, sha256 every file in the background into SHA256SUMS, which `moe-dist ckpt verify`
    # checks; loading never hashes (it checks sizes and DCP's metadata)
    checksums: bool = False


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
        for option in inner[:-1]:  # the first type that takes the value, e.g. Union[int, str]: 4 or "ep"
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], where)
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


def resolved_d_expert(m: ModelConfig, moe: MoEConfig) -> int:
    return moe.d_expert if moe.d_expert is not None else m.d_ff


def stage_layers(n_layer: int, n_stages: int, given: Optional[list[int]] = None) -> list[int]:
    """Layers per pipeline stage, in stage order: `given` (parallel.pp_layers), or as even as possible with
    the first stages taking one more (the last stage also runs the head and the loss)."""
    if given is not None:
        return list(given)
    base, extra = divmod(n_layer, n_stages)
    return [base + (s < extra) for s in range(n_stages)]
