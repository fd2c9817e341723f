"""Pure validation: every bad value is found here, before any work starts, with the field's dotted name
and a fix. No torch and no file system: environment checks are preflight.py's.

    validate(cfg)                      # the values themselves
    validate_layout(cfg, world_size)   # the values against a layout of world_size processes
"""
from __future__ import annotations

import dataclasses
import math

from .schema import Config, ConfigError, ModelConfig, MoEConfig, RopeScaling, resolved_d_expert


def _finite(errors: list[str], section: str, obj, names) -> None:
    defaults = type(obj)()
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, float) and not math.isfinite(v):
            default = getattr(defaults, name)
            fix = "a finite number, or null (the default)" if default is None else f"a finite number (default {default})"
            errors.append(f"{section}.{name}: {v} is not a finite number; give {fix}")


def _choice(errors: list[str], name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        errors.append(f"{name}: '{value}' is not one of {', '.join(allowed)}")


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
    _finite(errors, "model", m, ("theta", "norm_eps", "init_std"))
    for name in ("theta", "norm_eps", "init_std"):
        if not getattr(m, name) > 0:
            errors.append(f"model.{name}: must be positive, got {getattr(m, name)}")
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
    _finite(errors, "model", m, ("embedding_multiplier", "residual_multiplier", "logits_scaling"))
    for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if not getattr(m, name) > 0:
            errors.append(f"model.{name}: must be positive (1 = off), got {getattr(m, name)}")
    if m.attention_multiplier is not None and not (m.attention_multiplier > 0 and math.isfinite(m.attention_multiplier)):
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
    """The moe section's values; `ep` stands in for what resolve fills from the layout (n_devices)."""
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
    if not 1 <= moe.top_k <= E:
        errors.append(f"moe.top_k: {moe.top_k} must be between 1 and moe.n_experts={E}; lower top_k or add experts")
    if moe.d_expert is not None and moe.d_expert <= 0:
        errors.append(f"moe.d_expert: must be positive, got {moe.d_expert}")
    for name in ("capacity_factor", "eval_capacity_factor"):
        v = getattr(moe, name)
        if v is not None and math.isfinite(v) and v < 0:  # not finite: _finite below says so
            errors.append(f"moe.{name}: {v} is negative; use a value > 0 (for example 1.25), or null for dropless")
    if moe.min_capacity < 0:
        errors.append(f"moe.min_capacity: must be >= 0, got {moe.min_capacity}")
    if moe.routing_groups < 1:
        errors.append(f"moe.routing_groups: must be >= 1, got {moe.routing_groups}")
    if moe.n_groups == "ep":
        if moe.topk_groups < 1:
            errors.append("moe.topk_groups: group-limited routing (moe.n_groups=ep) needs topk_groups >= 1")
    elif isinstance(moe.n_groups, str):
        errors.append(f"moe.n_groups: '{moe.n_groups}' is neither a number nor ep (one group per expert-parallel rank)")
    elif moe.n_groups:
        if moe.n_groups < 0 or E % moe.n_groups:
            errors.append(f"moe.n_groups: {moe.n_groups} must divide moe.n_experts={E}")
        elif not 1 <= moe.topk_groups <= moe.n_groups:
            errors.append(f"moe.topk_groups: {moe.topk_groups} must be between 1 and moe.n_groups={moe.n_groups}")
        elif moe.topk_groups * (E // moe.n_groups) < moe.top_k:
            errors.append(f"moe.topk_groups: {moe.topk_groups} groups of {E // moe.n_groups} experts cannot hold top_k={moe.top_k}; raise topk_groups")
        if moe.group_score == "top2_sum" and E // max(moe.n_groups, 1) < 2:
            errors.append("moe.group_score: top2_sum needs at least 2 experts per group; use max")
    elif moe.topk_groups:
        errors.append(f"moe.topk_groups: {moe.topk_groups} groups kept, but moe.n_groups is 0 (group-limited routing off); "
                      "set moe.n_groups to the number of expert groups, or to ep for one group per expert-parallel rank")
    if moe.router == "top_p":
        if not 0.0 < moe.top_p <= 1.0:
            errors.append(f"moe.top_p: {moe.top_p} must be in (0, 1]")
        if not 0 <= moe.max_k <= E:
            errors.append(f"moe.max_k: {moe.max_k} must be between 0 (= n_experts) and {E}")
    if moe.topk_then_softmax and moe.score_func != "softmax":
        errors.append("moe.topk_then_softmax: only with moe.score_func=softmax")
    if moe.score_func == "sigmoid" and moe.router == "top_p":
        errors.append("moe.score_func: top_p routing needs softmax scores (they must sum to 1)")
    if moe.router == "top_p" and any(v is not None and v > 0 for v in (moe.capacity_factor, moe.eval_capacity_factor)):
        errors.append("moe.capacity_factor: top_p routing is dropless (its k varies per token, so a capacity would "
                      "depend on which tokens share a rank); set moe.capacity_factor and moe.eval_capacity_factor to null")
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
    _validate_moe_variants(moe, errors)
    _finite(errors, "moe", moe, ("capacity_factor", "eval_capacity_factor", "routed_scaling_factor", "top_p",
                                 "bias_update_rate", "router_jitter", "aux_loss_weight", "device_loss_weight",
                                 "comm_loss_weight", "seq_aux_loss_weight", "z_loss_weight", "top_p_entropy_weight"))
    if moe.n_shared_experts < 0:
        errors.append(f"moe.n_shared_experts: must be >= 0, got {moe.n_shared_experts}")


def _validate_moe_variants(moe: MoEConfig, errors: list[str]) -> None:
    """The options of further Hugging Face families (the last block of MoEConfig)."""
    _choice(errors, "moe.expert_act", moe.expert_act, ("swiglu", "clamped_swiglu"))
    _finite(errors, "moe", moe, ("swiglu_alpha", "swiglu_limit"))
    for name in ("swiglu_alpha", "swiglu_limit"):
        if not getattr(moe, name) > 0:
            errors.append(f"moe.{name}: must be positive, got {getattr(moe, name)}")
    if moe.grouped_mm == "onednn" and (moe.expert_linear_bias or moe.expert_act != "swiglu"):
        errors.append("moe.grouped_mm: onednn runs the plain SwiGLU experts only; expert biases and clamped_swiglu run "
                      "per-expert torch.mm or torch._grouped_mm: use auto, loop or grouped_mm")


def validate(cfg: Config) -> None:
    """Raise ConfigError listing every problem of the values themselves (any layout)."""
    errors: list[str] = []
    m, moe, par, tr = cfg.model, cfg.moe, cfg.parallel, cfg.train
    validate_model(m, errors)
    if m.moe_layers():
        validate_moe(moe, m, errors)  # n_devices defaults to ep: checked with the layout
    _choice(errors, "parallel.backend", par.backend, ("auto", "nccl", "gloo"))
    for name in ("tp", "ep"):
        if getattr(par, name) < 1:
            errors.append(f"parallel.{name}: must be >= 1, got {getattr(par, name)}")
    if par.dp is not None and par.dp < 1:
        errors.append(f"parallel.dp: must be >= 1 or null (world / tp), got {par.dp}")
    if not (math.isfinite(par.timeout_s) and par.timeout_s > 0):
        errors.append(f"parallel.timeout_s: must be a positive number of seconds, got {par.timeout_s}")
    d = cfg.data
    if not 0.0 < d.val_fraction < 1.0:
        errors.append(f"data.val_fraction: {d.val_fraction} must be in (0, 1)")
    if d.seq_len is not None and not 1 <= d.seq_len <= m.max_seq_len:
        errors.append(f"data.seq_len: {d.seq_len} must be between 1 and model.max_seq_len={m.max_seq_len}")
    if d.tokenizer == "byte" and m.vocab_size < 256:
        errors.append(f"model.vocab_size: {m.vocab_size} is smaller than the byte tokenizer's 256; set model.vocab_size=256 or more")
    for name in ("steps", "micro_batch_size", "grad_accum_steps", "eval_batches", "log_every", "max_nonfinite_steps"):
        if getattr(tr, name) < 1:
            errors.append(f"train.{name}: must be >= 1, got {getattr(tr, name)}")
    if tr.eval_every < 0 or tr.warmup_steps < 0:
        errors.append("train.eval_every / train.warmup_steps: must be >= 0")
    _finite(errors, "train", tr, ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip"))
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
        if value == "onednn" and (tr.device == "cuda" or tr.dtype == "bf16"):
            errors.append(f"{name}: onednn runs fp32 on a CPU, not with train.device={tr.device} train.dtype={tr.dtype}; "
                          "use auto, or train.device=cpu train.dtype=fp32")
    if tr.zero_stage not in (0, 1, 2, 3):
        errors.append(f"train.zero_stage: {tr.zero_stage} must be 0, 1 or 2 (DeepSpeed ZeRO; FSDP2 without "
                      "DeepSpeed) or 3 (FSDP2)")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 1:
        errors.append("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")
    seq_len = d.seq_len or m.max_seq_len
    if m.moe_layers() and moe.routing_groups >= 1 and (tr.micro_batch_size * seq_len) % moe.routing_groups:
        errors.append(f"moe.routing_groups: {moe.routing_groups} does not divide the {tr.micro_batch_size * seq_len} tokens "
                      f"of a micro-batch (train.micro_batch_size={tr.micro_batch_size} x seq_len {seq_len}); pick a divisor")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _validate_pipeline(cfg: Config, pp: int, errors: list[str]) -> None:
    """parallel.pp and its schedule: stages, layers per stage, micro-batches (torch.distributed.pipelining's needs)."""
    par, m, tr = cfg.parallel, cfg.model, cfg.train
    _choice(errors, "parallel.pp_schedule", par.pp_schedule, ("1f1b", "interleaved_1f1b"))
    v = par.pp_virtual_stages
    if v < 1:
        errors.append(f"parallel.pp_virtual_stages: must be >= 1, got {v}")
        return
    if v > 1 and par.pp_schedule != "interleaved_1f1b":
        errors.append(f"parallel.pp_virtual_stages: {v} stages per rank need parallel.pp_schedule=interleaved_1f1b")
    n_stages = pp * v
    if par.pp_layers is not None:
        if pp == 1:
            errors.append("parallel.pp_layers: only with parallel.pp > 1; drop it")
        elif len(par.pp_layers) != n_stages or any(n < 1 for n in par.pp_layers) or sum(par.pp_layers) != m.n_layer:
            errors.append(f"parallel.pp_layers: {par.pp_layers} must give each of the {n_stages} stages (pp {pp} x "
                          f"pp_virtual_stages {v}) at least one layer, {m.n_layer} (model.n_layer) in all")
    if pp == 1:
        return
    if m.n_layer < n_stages:
        errors.append(f"parallel.pp: {n_stages} stages (pp {pp} x pp_virtual_stages {v}) but model.n_layer={m.n_layer}; "
                      "every stage needs a layer")
    accum = tr.grad_accum_steps
    if accum < pp:
        errors.append(f"train.grad_accum_steps: {accum} micro-batches but parallel.pp={pp}; the pipeline needs at least "
                      f"one micro-batch per stage rank (grad_accum_steps >= pp; 4 x pp or more keeps the bubble small)")
    elif par.pp_schedule == "interleaved_1f1b" and accum % max(1, accum // pp):
        errors.append(f"train.grad_accum_steps: {accum} must be a multiple of its rounds {accum // pp} (grad_accum_steps "
                      f"// pp) for interleaved 1F1B; use a multiple of parallel.pp={pp}")
    if m.tie_embeddings:
        errors.append("model.tie_embeddings: the embedding lives on the first pipeline stage and the head on the last; "
                      "set model.tie_embeddings=false or parallel.pp=1")


def validate_layout(cfg: Config, world_size: int) -> None:
    """Raise ConfigError listing every way `cfg` does not fit a job of world_size processes: the
    dp x tp grid, ep carved out of it, and every size a tensor- or expert-parallel split must divide."""
    errors: list[str] = []
    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    tp, ep, pp = par.tp, par.ep, max(par.pp, 1)
    if par.pp < 1:
        errors.append(f"parallel.pp: must be >= 1, got {par.pp}")
    if world_size < 1:
        errors.append(f"world size {world_size}: must be >= 1")
    elif world_size % pp:
        errors.append(f"parallel.pp: {pp} does not divide the world size {world_size}; launch a multiple of pp processes")
    elif (world_size // pp) % tp:
        errors.append(f"parallel.tp: {tp} does not divide the {world_size // pp} ranks of a pipeline stage (world "
                      f"{world_size} / pp {pp}); launch a multiple of pp x tp processes")
    else:
        dp = world_size // (pp * tp)
        if par.dp is not None and par.dp != dp:
            errors.append(f"parallel.dp: {par.dp} but world {world_size} / (pp {pp} x tp {tp}) = {dp}; drop parallel.dp "
                          f"or launch {par.dp * tp * pp} processes")
        if (dp * tp) % ep:
            where = "dp*tp" if pp == 1 else "a pipeline stage's dp*tp"
            errors.append(f"parallel.ep: {ep} does not divide {where} = {dp * tp}; pick ep dividing it")
    _validate_pipeline(cfg, pp, errors)
    has_moe = bool(m.moe_layers())
    if has_moe and moe.n_experts % ep:
        errors.append(f"parallel.ep: moe.n_experts={moe.n_experts} is not divisible by ep={ep}; pick ep dividing n_experts")
    if tp > 1:
        seq_len = cfg.data.seq_len or m.max_seq_len
        if par.sequence_parallel and seq_len % tp:
            errors.append(f"parallel.tp: the sequence length {seq_len} (data.seq_len) is not divisible by tp={tp}; "
                          "sequence parallelism gives each tp rank an equal slice of it")
        if m.n_head % tp:
            errors.append(f"parallel.tp: model.n_head={m.n_head} is not divisible by tp={tp}; pick tp dividing n_head")
        if m.attention == "gqa" and (m.n_kv_head or m.n_head) % tp:
            errors.append(f"parallel.tp: model.n_kv_head={m.n_kv_head} is not divisible by tp={tp} (replicated key/value "
                          "heads are not supported); pick tp dividing n_kv_head")
        if m.vocab_size % tp:
            errors.append(f"parallel.tp: model.vocab_size={m.vocab_size} is not divisible by tp={tp} (the vocabulary is "
                          f"split over tp); pad vocab_size to a multiple of {tp}")
        dense_layers = set(range(m.n_layer)) - set(m.moe_layers())
        if dense_layers and m.d_ff % tp:
            errors.append(f"parallel.tp: model.d_ff={m.d_ff} (the dense FFNs' width) is not divisible by tp={tp}")
        if has_moe:
            d_expert = resolved_d_expert(m, moe)
            if par.expert_tp and d_expert % tp:
                errors.append(f"parallel.expert_tp: the experts' width {d_expert} (moe.d_expert) is not divisible by "
                              f"tp={tp}; pick tp dividing it or set parallel.expert_tp=false")
            shared = moe.n_shared_experts * (moe.d_shared_expert or d_expert)
            if shared % tp:
                errors.append(f"parallel.tp: the shared experts' width {shared} (moe.n_shared_experts x "
                              f"moe.d_shared_expert) is not divisible by tp={tp}")
    if tp > 1:  # options that tensor parallelism would compute differently
        if m.qk_norm and m.qk_norm_scope == "projection":
            errors.append(f"model.qk_norm_scope: projection normalises over all heads, which parallel.tp={tp} splits "
                          "over ranks; use parallel.tp=1")
        if m.attn_sinks:
            errors.append("model.attn_sinks: tensor parallelism splits the heads but not their sinks; use parallel.tp=1")
        if has_moe and moe.expert_linear_bias and par.expert_tp:
            errors.append("moe.expert_linear_bias: parallel.expert_tp splits expert widths but not their biases; "
                          "set parallel.expert_tp=false")
    if par.expert_tp and tp > 1 and ep > 1:
        errors.append("parallel.expert_tp: with ep > 1 the ep groups take the tp groups' ranks, so tp peers hold "
                      "different experts and cannot split one; set parallel.expert_tp=false or parallel.ep=1")
    if has_moe and not errors:  # the moe values with what the layout fills in (resolve.py)
        filled = dataclasses.replace(moe, n_groups=ep if moe.n_groups == "ep" else moe.n_groups)
        validate_moe(filled, m, errors, ep=ep)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
