"""Plan a layout before renting it: parameters, memory, communication and step time per GPU.

Pure arithmetic on the config (no torch), so every figure can be checked by hand; docs/planning.md
writes out each formula used here. Units are in the names: `_bytes`, `_s` (seconds), `_gb` (memory
in GiB = 2**30 bytes, as --gpu-memory-gb; communication in GB = 1e9 bytes, as link speeds).

    counts = param_counts(cfg.model, cfg.moe)          # total / active / per-rank parameters
    est = evaluate(cfg, layout, GPUS["h100"])           # one layout: memory, comm, time, MFU
    result = plan(cfg, gpus=64, gpu_memory_gb=80)        # every valid layout, the recommended one
    estimate(cfg, world_size)                           # the layout the config asks for (the dry run's figures)

What is modelled is what moe_dist runs (REFERENCE.md "Memory per rank"): DeepSpeed ZeRO 1/2 (FSDP2
keeping parameters gathered where DeepSpeed cannot: tp > 1, zero_stage 2 under pp > 1, stages unlike in MoE
layers), FSDP2 at zero_stage 3, sequence parallelism under tp (parallel.sequence_parallel, the default; plain
tp is not modelled), the all-to-all dispatcher's own byte count, bf16 autocast over fp32 weights at
zero_stage 0 and bf16 weights under DeepSpeed/FSDP2, and pipeline parallelism as torch.distributed.pipelining's
Schedule1F1B and ScheduleInterleaved1F1B run it (memory of the busiest pipeline rank, P2P traffic, the bubble).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from .config import (Config, ConfigError, ModelConfig, MoEConfig, resolved_d_expert, stage_layers, validate,
                     validate_layout)

GiB = 2 ** 30
GB = 1e9
DEFAULT_MAX_LOAD_RATIO = 1.5  # busiest expert's rows / the mean; `moe-dist train` logs the measured max_load_ratio
USABLE_MEMORY = 0.9  # of --gpu-memory-gb: CUDA context, NCCL buffers and allocator fragmentation take the rest
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size default (elements); moe_dist sets no other
# CPU: resident size before the first step, less the parameters: python + torch + moe_dist 0.22 GiB,
# with the trainer's data and tokenizer 0.29 GiB (measured, torch 2.13, small corpus)
PROCESS_BASELINE_BYTES = int(0.3 * GiB)


# ---------------------------------------------------------------------------------------------
# Hardware


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float  # dense bf16 tensor-core peak
    memory_gb: float
    nvlink_gb_s: float  # per GPU, one direction
    network_gb_s: float  # per GPU (its own NIC), one direction


GPUS = {
    "a100": GPU("a100", 312.0, 80.0, 300.0, 25.0),  # SXM4 80 GB; NVLink 3 600 GB/s both ways; HDR 200 Gb/s per GPU
    "h100": GPU("h100", 989.0, 80.0, 450.0, 50.0),  # SXM5; NVLink 4 900 GB/s both ways; NDR 400 Gb/s per GPU
    "h200": GPU("h200", 989.0, 141.0, 450.0, 50.0),  # H100's compute and links, 141 GB HBM3e
    "b200": GPU("b200", 2250.0, 180.0, 900.0, 50.0),  # NVLink 5 1.8 TB/s both ways; 400 Gb/s ConnectX-7 per GPU
}


# ---------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class Layout:
    """One way to run the model: world = pp * dp * tp; experts on ep ranks carved out of dp * tp."""

    tp: int
    ep: int
    dp: int
    expert_tp: bool
    zero_stage: int
    micro_batch_size: int
    activation_checkpointing: bool
    pp: int = 1  # pipeline ranks: stage s of the pp * pp_virtual_stages stages runs on pp rank s % pp
    pp_schedule: str = "1f1b"  # 1f1b | interleaved_1f1b
    pp_virtual_stages: int = 1  # stages per pp rank
    pp_layers: Optional[tuple[int, ...]] = None  # layers per stage in stage order; None = config.stage_layers' split

    @property
    def etp(self) -> int:
        """Ranks one expert is split over."""
        return self.tp if self.expert_tp else 1

    @property
    def edp(self) -> int:
        """Replicas of each expert shard: dp*tp/ep (REFERENCE.md), dp under expert_tp (shards reduce like dense tp shards)."""
        return self.dp * self.tp // (self.ep * self.etp)

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def n_stages(self) -> int:
        return self.pp * self.pp_virtual_stages

    def stages_of(self, pp_rank: int) -> list[int]:
        """The stages pp rank `pp_rank` runs, its local stages 0..v-1 in order."""
        return [j * self.pp + pp_rank for j in range(self.pp_virtual_stages)]

    def stage_layer_indices(self, n_layer: int) -> list[list[int]]:
        """Layer indices of each stage, in stage order."""
        sizes = stage_layers(n_layer, self.n_stages, list(self.pp_layers) if self.pp_layers else None)
        starts = [sum(sizes[:s]) for s in range(len(sizes))]
        return [list(range(a, a + n)) for a, n in zip(starts, sizes)]

    def rank_layers(self, n_layer: int, pp_rank: int) -> list[int]:
        by_stage = self.stage_layer_indices(n_layer)
        return [i for s in self.stages_of(pp_rank) for i in by_stage[s]]


def config_layout(cfg: Config, world_size: int) -> Layout:
    """The layout the config itself asks for at this world size (ConfigError when it is not valid there)."""
    par, tr = cfg.parallel, cfg.train
    errors = layout_errors(cfg, world_size, par.tp, par.ep, par.expert_tp, pp=par.pp, pp_schedule=par.pp_schedule,
                           pp_virtual_stages=par.pp_virtual_stages, pp_layers=par.pp_layers)
    if errors:
        raise ConfigError("invalid layout:\n  " + "\n  ".join(errors))
    return Layout(tp=par.tp, ep=par.ep, dp=world_size // (par.pp * par.tp), expert_tp=par.expert_tp and par.tp > 1,
                  zero_stage=tr.zero_stage, micro_batch_size=tr.micro_batch_size,
                  activation_checkpointing=cfg.model.activation_checkpointing, pp=par.pp,
                  pp_schedule=par.pp_schedule, pp_virtual_stages=par.pp_virtual_stages,
                  pp_layers=tuple(par.pp_layers) if par.pp_layers else None)


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class Part:
    """Parameters of one block (or of the embedding, or of the final norm + LM head)."""

    sharded: int = 0  # split by tensor parallelism: attention heads, dense and shared FFN widths, vocabulary rows
    replicated: int = 0  # whole on every tp rank: norms, routers, shared-expert gate, o_proj bias
    expert: int = 0  # routed experts: split over ep (and tp under expert_tp)

    @property
    def total(self) -> int:
        return self.sharded + self.replicated + self.expert

    def dense_local(self, layout: Layout) -> float:
        return self.sharded / layout.tp + self.replicated

    def expert_local(self, layout: Layout) -> float:
        return self.expert / (layout.ep * layout.etp)

    def local(self, layout: Layout) -> float:
        return self.dense_local(layout) + self.expert_local(layout)


@dataclass(frozen=True)
class ParamCounts:
    embedding: Part
    blocks: tuple[Part, ...]
    head: Part  # final norm + lm_head (no lm_head of its own when tied)
    active_expert: float  # routed-expert parameters one token uses: k experts of each MoE layer
    tied: bool

    @property
    def units(self) -> tuple[Part, ...]:
        """What FSDP2 gathers one at a time (torchtitan wraps each block, the embedding and the head)."""
        return (self.embedding, *self.blocks, self.head)

    @property
    def total(self) -> int:
        return sum(u.total for u in self.units)

    @property
    def expert(self) -> int:
        return sum(u.expert for u in self.units)

    @property
    def dense(self) -> int:
        return self.total - self.expert

    @property
    def active(self) -> float:
        return self.dense + self.active_expert

    @property
    def matmul_active(self) -> float:
        """Active parameters that multiply activations: all but the input embedding (a lookup) unless it is tied."""
        return self.active - (0 if self.tied else self.embedding.total)

    def dense_local(self, layout: Layout) -> float:
        return sum(u.dense_local(layout) for u in self.units)

    def expert_local(self, layout: Layout) -> float:
        return sum(u.expert_local(layout) for u in self.units)


def assignments_per_token(moe: MoEConfig) -> float:
    """k: routed experts per token. expert_choice takes cf*k on average (E experts x C tokens); top_p is
    data-dependent, planned at its cap max_k (or top_k when max_k is 0)."""
    if moe.router == "expert_choice":
        return (moe.capacity_factor or 0.0) * moe.top_k
    if moe.router == "top_p":
        return moe.max_k or moe.top_k
    return moe.top_k


def attention_dims(m: ModelConfig) -> tuple[int, int]:
    """(q/k size, v size) per head."""
    if m.attention == "mla":
        d = m.mla_dims()
        return d["qk_nope"] + d["qk_rope"], d["v"]
    return m.head_size(), m.head_size()


def attention_params(m: ModelConfig) -> Part:
    H, h = m.d_model, m.n_head
    if m.attention == "mla":
        d = m.mla_dims()
        qk = d["qk_nope"] + d["qk_rope"]
        # by heads (what tensor parallelism would split): q (or q_b), kv_b, o; low rank: q_a, kv_a and their norms
        q = H * h * qk if d["q_lora_rank"] is None else d["q_lora_rank"] * h * qk
        low = 0 if d["q_lora_rank"] is None else H * d["q_lora_rank"] + d["q_lora_rank"]
        low += H * (d["kv_lora_rank"] + d["qk_rope"]) + d["kv_lora_rank"]
        heads = q + d["kv_lora_rank"] * h * (d["qk_nope"] + d["v"]) + h * d["v"] * H
        return Part(sharded=heads, replicated=low)
    hd, kv = m.head_size(), m.n_kv_head or m.n_head
    sharded = H * (h + 2 * kv) * hd + h * hd * H + ((h + 2 * kv) * hd if m.qkv_bias else 0)
    replicated = (H if m.attn_out_bias else 0) + (2 * hd if m.qk_norm else 0)
    return Part(sharded=sharded, replicated=replicated)


def shared_expert_width(m: ModelConfig, moe: MoEConfig) -> int:
    """n shared experts of width F_s are one SwiGLU of width n * F_s (moe_dist.model.moe.layer)."""
    return moe.n_shared_experts * (moe.d_shared_expert or resolved_d_expert(m, moe))


def param_counts(m: ModelConfig, moe: MoEConfig) -> ParamCounts:
    """Every parameter of MoETransformerLM(m, moe), counted from the config."""
    H, V = m.d_model, m.vocab_size
    F = resolved_d_expert(m, moe)
    E = moe.n_experts
    attn = attention_params(m)
    moe_layers = set(m.moe_layers())
    blocks = []
    for i in range(m.n_layer):
        norms = 2 * H  # attn_norm, ffn_norm
        if i in moe_layers:
            router = E * H * (2 if moe.noisy_gating else 1)
            gate = H if moe.n_shared_experts and moe.shared_expert_gate else 0
            ffn = Part(sharded=3 * H * shared_expert_width(m, moe), replicated=router + gate, expert=3 * H * F * E)
        else:
            ffn = Part(sharded=3 * H * m.d_ff)
        blocks.append(Part(sharded=attn.sharded + ffn.sharded, replicated=attn.replicated + ffn.replicated + norms,
                           expert=ffn.expert))
    head = Part(sharded=0 if m.tie_embeddings else V * H, replicated=H)
    active_expert = len(moe_layers) * assignments_per_token(moe) * 3 * H * F
    return ParamCounts(Part(sharded=V * H), tuple(blocks), head, active_expert, m.tie_embeddings)


def rank_param_counts(cfg: Config, counts: ParamCounts, layout: Layout, pp_rank: int) -> ParamCounts:
    """What pipeline rank `pp_rank` holds: its stages' blocks, the embedding with stage 0 (on pp rank 0), the
    final norm + head with the last stage (on pp rank pp - 1). All of it when pp = 1."""
    if layout.pp == 1:
        return counts
    m, moe = cfg.model, cfg.moe
    layers = layout.rank_layers(m.n_layer, pp_rank)
    moe_layers = set(m.moe_layers())
    per_moe_layer = assignments_per_token(moe) * 3 * m.d_model * resolved_d_expert(m, moe)
    return ParamCounts(counts.embedding if pp_rank == 0 else Part(), tuple(counts.blocks[i] for i in layers),
                       counts.head if pp_rank == layout.pp - 1 else Part(),
                       sum(1 for i in layers if i in moe_layers) * per_moe_layer, counts.tied)


# ---------------------------------------------------------------------------------------------
# Precision: what each kind of tensor costs in bytes


@dataclass(frozen=True)
class Precision:
    weight_bytes: int  # working weights: fp32 under autocast (zero 0), bf16 under DeepSpeed/FSDP2 mixed precision
    resid_bytes: int  # residual stream, norm outputs, dispatched rows: the weights' dtype
    act_bytes: int  # matmul and attention outputs (bf16 under autocast)
    autocast_casts: bool  # fp32 weights under autocast: each linear saves its own bf16 cast of its input
    # CUDA kernels: the fused rms_norm saves input + rstd (the CPU composite also x * rstd); flash or
    # memory-efficient SDPA for any head sizes (on a CPU only when q/k and v sizes are equal, else the
    # math path, which saves the [S, S] probabilities)
    cuda: bool
    grouped_mm: bool  # bf16 rows take torch._grouped_mm, whose SwiGLU saves silu's input, output and product


def precision(device: str, dtype: str, zero_stage: int) -> Precision:
    """device cuda|cpu; dtype as train.dtype (auto = bf16 on CUDA, fp32 on CPU)."""
    bf16 = device == "cuda" and dtype in ("auto", "bf16")
    if not bf16:
        return Precision(4, 4, 4, False, device == "cuda", False)
    if zero_stage == 0:  # autocast over the fp32 model: bf16 matmuls, fp32 residual stream
        return Precision(4, 4, 2, True, True, False)
    return Precision(2, 2, 2, False, True, True)  # DeepSpeed bf16 / FSDP2 param_dtype=bf16


# ---------------------------------------------------------------------------------------------
# Memory: parameters, gradients, optimizer state


def state_bytes(counts: ParamCounts, layout: Layout, prec: Precision, device: str) -> dict[str, float]:
    """Per rank. n = local parameters, s = n partitioned over data parallelism: N_d/tp/dp + N_e/(ep*etp)/edp."""
    n_d, n_e = counts.dense_local(layout), counts.expert_local(layout)
    n = n_d + n_e
    s = n_d / layout.dp + n_e / layout.edp
    w = prec.weight_bytes
    if layout.zero_stage == 0:
        # fp32 weights, gradients, AdamW moments; autocast caches a bf16 copy of every weight during forward
        return {"params": 4 * n + (2 * n if prec.autocast_casts else 0), "grads": 4 * n, "optimizer": 8 * n}
    if layout.zero_stage in (1, 2):
        # DeepSpeed keeps the fp32 gradient partition (full .grads are freed once reduce-scattered, stage 1
        # too: benchmarks/RESULTS.md) and a reduce bucket: fp32 at stage 1, the weights' dtype at stage 2;
        # on a CPU only its touched pages are resident
        bucket = DS_REDUCE_BUCKET if device == "cuda" else min(n, DS_REDUCE_BUCKET)
        bucket_bytes = bucket * (4 if layout.zero_stage == 1 else w)
        return {"params": w * n, "grads": 4 * s + bucket_bytes, "optimizer": 12 * s}  # fp32 master 4 + moments 8
    # FSDP2: fp32 shards of weights, gradients and moments; prefetch holds two gathered units (running and
    # next), backward one unit's unsharded gradients before its reduce-scatter
    unit = max(u.local(layout) for u in counts.units)
    return {"params": 4 * s + 2 * unit * w, "grads": 4 * s + unit * w, "optimizer": 8 * s}


# ---------------------------------------------------------------------------------------------
# Activations


@dataclass(frozen=True)
class Rows:
    """Expert rows of one MoE layer on the busiest rank, for one micro-batch."""

    computed: float  # rows its local experts run (padding slots included)
    own: float  # assignments of the tokens it routes (the rows its combine gets back)
    sent: float  # rows its dispatch sends to OTHER ranks
    received: float  # rows it receives from other ranks


def dropless_rows(loads: list[list[int]], rank: int) -> tuple[int, int]:
    """(rows sent to other ranks, rows received from them) by ep rank `rank`; loads[s][e] = assignments
    of rank s's tokens to expert e (its MoELayer stats["load"]); rank r holds experts [r*E/ep, (r+1)*E/ep)."""
    ep, E = len(loads), len(loads[0])
    mine = range(rank * E // ep, (rank + 1) * E // ep)
    sent = sum(c for e, c in enumerate(loads[rank]) if e not in mine)
    received = sum(loads[s][e] for s in range(ep) if s != rank for e in mine)
    return sent, received


def capacity_rows(n_experts: int, ep: int, groups: int, capacity: int) -> tuple[int, int]:
    """(sent, received) with capacity: each rank sends E_l*G*C slots to every other rank, whatever they hold."""
    per_rank = n_experts // ep * groups * capacity
    return (ep - 1) * per_rank, (ep - 1) * per_rank


def capacity_of(moe: MoEConfig, tokens: float, seq_len: int) -> tuple[int, int]:
    """(routing groups G, capacity C per group and expert) of one rank's micro-batch (capacity.capacity's formula)."""
    G = max(1, round(tokens / seq_len)) if moe.routing_group == "sequence" else moe.routing_groups
    per_group = tokens // G
    k = moe.top_k if moe.router == "expert_choice" else assignments_per_token(moe)
    C = max(math.ceil(round(moe.capacity_factor * per_group * k / moe.n_experts, 9)), moe.min_capacity)
    return G, int(min(C, per_group) if moe.router == "expert_choice" else C)  # an expert takes each token once


def expert_rows(moe: MoEConfig, layout: Layout, tokens: float, seq_len: int, max_load_ratio: float) -> Rows:
    """`tokens` routed by this rank. ep = 1: the rank's own assignments, all local. Dropless ep > 1: the
    busiest rank runs max_load_ratio times the mean; capacity ep > 1: E*G*C slots (all ranks' E_l*G*C)."""
    own = tokens * assignments_per_token(moe)
    if layout.ep == 1:
        return Rows(own, own, 0.0, 0.0)
    if moe.capacity_factor is not None and moe.capacity_factor > 0:
        G, C = capacity_of(moe, tokens, seq_len)
        sent, received = capacity_rows(moe.n_experts, layout.ep, G, C)
        return Rows(moe.n_experts * G * C, own, sent, received)
    computed = own * max_load_ratio
    remote = (layout.ep - 1) / layout.ep
    return Rows(computed, own, own * remote, computed * remote)


def block_activation_bytes(cfg: Config, layout: Layout, prec: Precision, seq_len: int, moe_layer: bool,
                           max_load_ratio: float) -> dict[str, float]:
    """What autograd saves for one block of one micro-batch on one rank, by term (bytes).

    T tokens of the micro-batch; under tp, sequence parallelism keeps T/tp of them between blocks
    (norms, residual, routing) and gathers all T for the attention and FFN matmuls, which split heads
    and widths by tp. Index tensors and per-token scalars other than attention's logsumexp are left out.
    """
    m, moe = cfg.model, cfg.moe
    H, tp = m.d_model, layout.tp
    T = layout.micro_batch_size * seq_len
    Ts = T / tp
    rb, ab = prec.resid_bytes, prec.act_bytes
    norm = Ts * H * rb * (1 if prec.cuda else 2)  # input (+ x * rstd in the CPU composite)

    def inputs(consumers: int) -> float:
        """The normalised input saved by the linears that read it: once, or a bf16 cast per linear under autocast."""
        return T * H * (consumers * ab if prec.autocast_casts else rb if consumers else 0)

    out: dict[str, float] = {}
    h = m.n_head / tp
    if m.attention == "mla":
        d = m.mla_dims()
        qk, r, v = d["qk_nope"] + d["qk_rope"], d["kv_lora_rank"], d["v"]
        out["attn_norm"] = norm + inputs(2)  # read by q_proj (or q_a_proj) and kv_a_proj
        if d["q_lora_rank"] is not None:  # q_a output: the q_a_layernorm's input (+ x * rstd), its output for q_b
            out["attn_q_latent"] = T * d["q_lora_rank"] * ab * (2 if prec.cuda else 3)
        # kv_a output [r + rope] (the latent norm keeps the whole storage), x * rstd (CPU), normalised latent for kv_b
        out["attn_kv_latent"] = T * ((r + d["qk_rope"]) + (0 if prec.cuda else r) + r) * ab
        if prec.cuda or qk == v:  # q and k [h, qk], v (a view of kv_b's output [h, nope + v]), output [h, v], logsumexp
            out["attn_sdpa"] = T * (h * (2 * qk + d["qk_nope"] + v + v) * ab + h * 4)
        else:  # CPU math path: q, k, the probabilities [h, S], v, and o_proj's copy of the output
            out["attn_sdpa"] = T * h * (2 * qk + seq_len + 2 * v) * ab
    else:
        hd, kv = m.head_size(), (m.n_kv_head or m.n_head) / tp
        out["attn_norm"] = norm + inputs(3)  # q, k, v projections
        if m.qk_norm:  # q_norm, k_norm save their inputs (+ x * rstd)
            out["attn_qk_norm"] = T * (h + kv) * hd * ab * (1 if prec.cuda else 2)
        # SDPA saves q, k, v (after RoPE), its output (o_proj's input) and logsumexp
        out["attn_sdpa"] = T * ((h + 2 * kv) * hd * ab + h * hd * ab + h * 4)
    if not moe_layer:
        out["ffn_norm"] = norm + inputs(2)  # gate, up
        out["ffn_swiglu"] = T * 4 * m.d_ff / tp * ab  # gate out (silu input), silu out, up out, product (down's input)
        return out
    shared_width = shared_expert_width(m, moe) / tp
    # the router reads the normalised input (a jittered copy under router_jitter), the shared experts too
    consumers = (0 if moe.router_jitter else 1) + (2 if shared_width else 0) + (1 if moe.n_shared_experts and moe.shared_expert_gate else 0)
    out["ffn_norm"] = norm + inputs(consumers)
    E = moe.n_experts
    router = Ts * E * 4  # fp32 scores (softmax or sigmoid output)
    if moe.z_loss_weight:
        router += Ts * E * 4  # fp32 logits for logsumexp
    if moe.noisy_gating:
        router += 2 * Ts * E * 4 + (Ts * H * ab if prec.autocast_casts else 0)  # softplus input, the noise; noise linear's cast
    if moe.router_jitter:
        router += Ts * H * (rb + (ab if prec.autocast_casts else rb))  # the uniform factor, the jittered input
    out["router"] = router
    # routed experts: tp ranks route their own T/tp tokens (sequence parallel); expert_tp runs all T
    # tokens through 1/tp of every expert's width
    F = resolved_d_expert(m, moe) / layout.etp
    rows = expert_rows(moe, layout, T if layout.expert_tp else Ts, seq_len, max_load_ratio)
    per_row = H * rb + 2 * F * ab  # the rows (grouped matmul input), gate_up output [2F]
    if prec.grouped_mm:
        per_row += 2 * F * ab  # silu output and silu * up (the down projection's input)
    out["experts"] = rows.computed * per_row
    out["combine"] = rows.own * (H * ab + 4)  # the returned rows and their fp32 gates
    if shared_width:
        out["shared_experts"] = T * 4 * shared_width * ab
        if moe.shared_expert_gate:
            out["shared_experts"] += Ts * H * ab  # the shared output, saved by the gate's product
    return out


def a2a_buffer_bytes(cfg: Config, layout: Layout, prec: Precision, seq_len: int, max_load_ratio: float) -> float:
    """All-to-all buffers live during one MoE layer: the send buffer and what arrives (capacity: E*G*C padded slots each)."""
    if layout.ep == 1 or not cfg.model.moe_layers():
        return 0.0
    tokens = layout.micro_batch_size * seq_len / layout.tp
    rows = expert_rows(cfg.moe, layout, tokens, seq_len, max_load_ratio)
    padded = cfg.moe.capacity_factor is not None and cfg.moe.capacity_factor > 0
    return (2 * rows.computed if padded else rows.own + rows.computed) * cfg.model.d_model * prec.resid_bytes


def head_activation_bytes(cfg: Config, layout: Layout, prec: Precision, seq_len: int) -> dict[str, float]:
    """Final norm, the LM head's input, and [T, V/tp] logits. "saved" until the micro-batch's backward: the
    norm's and the head's inputs, the logits and the saved fp32 log-probabilities; "backward", at its start
    only: the log-probabilities' gradient and the fp32 logits' gradient."""
    H, V, tp = cfg.model.d_model, cfg.model.vocab_size, layout.tp
    T = layout.micro_batch_size * seq_len
    norm = T / tp * H * prec.resid_bytes * (1 if prec.cuda else 2)
    lm_input = T * H * (prec.act_bytes if prec.autocast_casts else prec.resid_bytes)
    return {"saved": norm + lm_input + T * V / tp * (prec.act_bytes + 4), "backward": T * V / tp * (4 + 4)}


def bubble_fraction(schedule: str, pp: int, virtual_stages: int, micro_batches: float) -> float:
    """Share of a pipeline step each rank idles (Narayanan et al. 2021): (pp - 1)/(m + pp - 1) for 1F1B,
    (pp - 1)/(v m + pp - 1) for interleaved 1F1B with v stages per rank; 0 without a pipeline."""
    if pp == 1:
        return 0.0
    v = virtual_stages if schedule == "interleaved_1f1b" else 1
    return (pp - 1) / (v * micro_batches + pp - 1)


def schedule_actions(schedule: str, pp: int, virtual_stages: int, micro_batches: int,
                     pp_rank: int) -> list[tuple[str, int]]:
    """The order in which pp rank `pp_rank` runs forwards ("F") and full backwards ("B") of its local stages
    (local stage j is stage j*pp + pp_rank), as torch.distributed.pipelining does: Schedule1F1B's warmup of
    min(m, pp - rank) forwards then backward-forward pairs; ScheduleInterleaved1F1B's pipeline_order
    (_get_warmup_ops and _get_1f1b_rank_ops, idle slots left out). pp = 1: gradient accumulation."""
    m, v = micro_batches, virtual_stages
    if pp == 1:
        return [("F", 0), ("B", 0)] * m
    if schedule == "1f1b":
        w = min(m, pp - pp_rank)
        return [("F", 0)] * w + [("B", 0), ("F", 0)] * (m - w) + [("B", 0)] * w
    per_round = m // max(1, m // pp)
    warmup = min((v - 1) * per_round + 2 * (pp - 1 - pp_rank), m * v)
    steady = m * v - warmup

    def fwd(op: int) -> int:
        return (op // per_round) % v

    def bwd(op: int) -> int:
        return v - 1 - ((op - warmup) // per_round) % v

    actions = [("F", fwd(op)) for op in range(warmup)]
    for op in range(warmup, warmup + steady):  # a forward, then a backward, each step
        actions += [("F", fwd(op)), ("B", bwd(op))]
    return actions + [("B", bwd(op)) for op in range(warmup + steady, 2 * warmup + steady)]


def in_flight(layout: Layout, micro_batches: int, pp_rank: int, held: Sequence[float]) -> tuple[int, ...]:
    """Micro-batches whose activations pp rank `pp_rank` holds, per local stage, when the bytes it holds
    (held[j] per micro-batch of local stage j) peak: forwards done whose backward has not run."""
    if layout.pp == 1:
        return (1,)
    if layout.pp_schedule == "1f1b":  # closed form of schedule_actions: the peak is the warmup
        return (min(micro_batches, layout.pp - pp_rank),)
    counts, peak, at_peak = [0] * len(held), -1.0, (0,) * len(held)
    for kind, j in schedule_actions(layout.pp_schedule, layout.pp, layout.pp_virtual_stages, micro_batches, pp_rank):
        counts[j] += 1 if kind == "F" else -1
        now = sum(c * h for c, h in zip(counts, held))
        if now > peak:
            peak, at_peak = now, tuple(counts)
    return at_peak


def stage_boundary_bytes(cfg: Config, layout: Layout, prec: Precision, seq_len: int) -> float:
    """One micro-batch's residual stream [b, S/tp, H] (sequence parallel) in its dtype: what crosses a stage
    boundary forward, and its gradient backward."""
    return layout.micro_batch_size * seq_len / layout.tp * cfg.model.d_model * prec.resid_bytes


def pipeline_activation_bytes(cfg: Config, layout: Layout, prec: Precision, seq_len: int, max_load_ratio: float,
                              micro_batches: int = 1) -> list[dict]:
    """Peak activation memory of each pp rank (one entry when pp = 1), by term, and the micro-batches in
    flight per local stage at that peak ("in_flight").

    Per micro-batch, a stage keeps every block's saved tensors (activation checkpointing: each block's
    input), its output until its backward (torch's fwd_cache; not on the last stage, which keeps the
    head's saved tensors instead), less its input, which is the P2P receive buffer already counted. Times
    the micro-batches in flight; then, once: the largest block recomputed, the head's backward, one MoE
    layer's all-to-all buffers, and torch's receive buffers: one per micro-batch for the activations (all
    but the first stage) and one for their gradients (all but the last).
    """
    m = cfg.model
    moe_layers = set(m.moe_layers())
    block = {moe: sum(block_activation_bytes(cfg, layout, prec, seq_len, moe, max_load_ratio).values())
             for moe in {i in moe_layers for i in range(m.n_layer)}}
    boundary = stage_boundary_bytes(cfg, layout, prec, seq_len)  # = one block's input [T/tp, H]
    head = head_activation_bytes(cfg, layout, prec, seq_len)
    by_stage, last = layout.stage_layer_indices(m.n_layer), layout.n_stages - 1
    a2a = a2a_buffer_bytes(cfg, layout, prec, seq_len, max_load_ratio)
    out = []
    for r in range(layout.pp):
        stages = layout.stages_of(r)
        blocks, heads = [], []
        for s in stages:
            layers = by_stage[s]
            saved = len(layers) * boundary if layout.activation_checkpointing else sum(block[i in moe_layers] for i in layers)
            blocks.append(saved - (boundary if s > 0 else 0) + (boundary if s < last else 0))
            heads.append(head["saved"] if s == last else 0.0)
        counts = in_flight(layout, micro_batches, r, [b + h for b, h in zip(blocks, heads)])
        layers = layout.rank_layers(m.n_layer, r)
        # the recomputed block's attn_norm saves that same input again: counted once
        recompute = max(block[i in moe_layers] for i in layers) - boundary if layout.activation_checkpointing else 0.0
        acts = {"blocks": sum(c * b for c, b in zip(counts, blocks)) + recompute,
                "head": sum(c * h for c, h in zip(counts, heads)) + (head["backward"] if last in stages else 0.0),
                "a2a_buffers": a2a if moe_layers & set(layers) else 0.0,
                "p2p_buffers": micro_batches * boundary * sum((s > 0) + (s < last) for s in stages)}  # 0 at pp = 1
        acts["total"] = sum(acts.values())
        acts["in_flight"] = counts
        out.append(acts)
    return out


def activation_bytes(cfg: Config, layout: Layout, prec: Precision, seq_len: int, max_load_ratio: float,
                     pp_rank: int = 0, micro_batches: int = 1) -> dict[str, float]:
    """Peak activation memory of pp rank `pp_rank` (pp = 1: one micro-batch's): every block's saved tensors,
    or, with activation checkpointing, every block's input plus the one block being recomputed; then the
    head and one MoE layer's all-to-all buffers; under pp, times the micro-batches in flight, plus P2P buffers."""
    acts = pipeline_activation_bytes(cfg, layout, prec, seq_len, max_load_ratio, micro_batches)[pp_rank]
    return {k: v for k, v in acts.items() if k != "in_flight"}


# ---------------------------------------------------------------------------------------------
# Communication


def a2a_bytes(sent: float, received: float, d_model: int, dispatch_bytes: int, combine_bytes: int,
              forward_passes: int = 1) -> float:
    """Bytes one rank sends to other ranks for one MoE layer: AllToAllDispatcher's CommStats.bytes_sent.

    Each forward pass sends `sent` dispatched rows and returns `received` expert outputs; backward sends
    the gradients the other way: `received` rows' gradients back through the dispatch, `sent` through the
    combine. Activation checkpointing runs the forward twice.
    """
    forward = sent * dispatch_bytes + received * combine_bytes
    backward = received * dispatch_bytes + sent * combine_bytes
    return (forward_passes * forward + backward) * d_model


def group_nodes(stride: int, size: int, gpus_per_node: int, start: int = 0) -> int:
    """Nodes spanned by a group of `size` ranks `stride` apart from rank `start` (ranks fill nodes in order)."""
    return len({(start + i * stride) // gpus_per_node for i in range(size)})


def crosses_nodes(pp_rank: int, peer: int, stage_size: int, gpus_per_node: int) -> bool:
    """Whether any of pp rank `pp_rank`'s stage_size = dp*tp ranks has its peer on pp rank `peer` (the same
    dp and tp coordinates, (peer - pp_rank)*dp*tp ranks away) on another node."""
    return any((pp_rank * stage_size + i) // gpus_per_node != (peer * stage_size + i) // gpus_per_node
               for i in range(stage_size))


def ring_bytes(op: str, payload: float, group: int) -> float:
    """Bytes each rank sends in a ring all-reduce (2(g-1)/g), reduce-scatter or all-gather ((g-1)/g) of `payload`."""
    if group <= 1:
        return 0.0
    return payload * (group - 1) / group * (2 if op == "all_reduce" else 1)


@dataclass
class Traffic:
    """Bytes one rank sends per step over NVLink and over the network, and the seconds they take."""

    nvlink: float = 0.0
    network: float = 0.0
    seconds: float = 0.0

    def add(self, nbytes: float, network_fraction: float, gpu: GPU, repeat: float = 1.0,
            link_bytes: Optional[float] = None) -> None:
        """`repeat` times `nbytes` sent, that fraction to other nodes; both links run at once. The time is
        that of `link_bytes` (default nbytes): what the busiest direction of the link carries."""
        link = (nbytes if link_bytes is None else link_bytes) * repeat
        self.nvlink += nbytes * (1 - network_fraction) * repeat
        self.network += nbytes * network_fraction * repeat
        self.seconds += max(link * network_fraction / (gpu.network_gb_s * GB),
                            link * (1 - network_fraction) / (gpu.nvlink_gb_s * GB))


def communication(cfg: Config, counts: ParamCounts, layout: Layout, prec: Precision, gpu: GPU, gpus_per_node: int,
                  seq_len: int, micro_batches: float, max_load_ratio: float, pp_rank: int = 0) -> dict[str, Traffic]:
    """Per rank per step: the experts' all-to-alls, tensor-parallel collectives, gradient reduction / ZeRO / FSDP,
    and the pipeline's point-to-point sends, of a rank on pp rank `pp_rank` holding `counts` (rank_param_counts).

    A collective whose group spans nodes runs at the network's speed (the ring is as slow as its slowest
    link); all-to-all traffic to peers on other nodes goes over the network, the rest over NVLink.
    """
    m, G = cfg.model, gpus_per_node
    H, T = m.d_model, layout.micro_batch_size * seq_len
    rb, ab = prec.resid_bytes, prec.act_bytes
    passes = 2 if layout.activation_checkpointing else 1
    stage_size, start = layout.dp * layout.tp, pp_rank * layout.dp * layout.tp
    layers = layout.rank_layers(m.n_layer, pp_rank)
    moe_layers = [i for i in layers if i in set(m.moe_layers())]
    stages, last = layout.stages_of(pp_rank), layout.n_stages - 1
    out = {"a2a": Traffic(), "tp": Traffic(), "dp": Traffic(), "pp": Traffic()}

    if layout.ep > 1 and moe_layers:
        rows = expert_rows(cfg.moe, layout, T / layout.tp, seq_len, max_load_ratio)
        # ep groups are consecutive ranks: G - 1 peers share my node once ep >= G
        off_node = max(0, layout.ep - G) / (layout.ep - 1)
        # time: each of the 2 (passes + 1) all-to-alls (dispatch: rows in rb bytes, combine: ab) is as
        # long as the busiest rank's larger direction, max(sent, received) rows
        link = (passes + 1) * max(rows.sent, rows.received) * H * (rb + ab)
        out["a2a"].add(a2a_bytes(rows.sent, rows.received, H, rb, ab, passes), off_node, gpu,
                       micro_batches * len(moe_layers), link)

    if layout.tp > 1:
        # sequence parallelism: each region all-gathers its [T, H] input and reduce-scatters its output
        # forward, the reverse backward (and the forward again under recompute)
        regions = len(layers)  # attention
        regions += len(layers) - len(moe_layers)  # dense FFNs
        if cfg.moe.n_shared_experts or layout.expert_tp:
            regions += len(moe_layers)  # the shared experts / expert_tp experts read all T tokens
        per_region = ring_bytes("all_gather", T * H, layout.tp) * ((passes + 1) * (rb + ab))
        # embedding: RS fwd, AG bwd (stage 0's rank); LM head: AG fwd, RS bwd (the last stage's)
        ends = (0 in stages) + (last in stages)
        head = ring_bytes("all_gather", T * H, layout.tp) * 2 * ends * rb
        tp_net = 1.0 if group_nodes(1, layout.tp, G, start) > 1 else 0.0
        out["tp"].add(regions * per_region + head, tp_net, gpu, micro_batches)

    n_dense, n_expert = counts.dense_local(layout), counts.expert_local(layout)
    # dense replicas are tp apart (the dp group); expert replicas ep apart, or tp apart under expert_tp
    dense_group, expert_group = layout.dp, layout.edp
    dense_net = 1.0 if group_nodes(layout.tp, dense_group, G, start) > 1 else 0.0
    expert_net = 1.0 if group_nodes(layout.tp if layout.expert_tp else layout.ep, expert_group, G, start) > 1 else 0.0
    dp = out["dp"]
    for n, g, net in ((n_dense, dense_group, dense_net), (n_expert, expert_group, expert_net)):
        w = prec.weight_bytes
        if layout.zero_stage == 0:  # GradReducer: all-reduce of the fp32 gradients in the last micro-batch's backward
            dp.add(ring_bytes("all_reduce", 4 * n, g), net, gpu)
        elif layout.zero_stage == 1:  # reduce-scatter at the accumulation boundary, all-gather of the updated weights
            dp.add(ring_bytes("reduce_scatter", 4 * n, g) + ring_bytes("all_gather", w * n, g), net, gpu)
        elif layout.zero_stage == 2:  # reduce-scatter at every micro-batch
            dp.add(ring_bytes("reduce_scatter", w * n, g), net, gpu, micro_batches)
            dp.add(ring_bytes("all_gather", w * n, g), net, gpu)
        else:  # FSDP2: gather forward and again backward, reduce-scatter fp32 gradients, per micro-batch
            dp.add(2 * ring_bytes("all_gather", w * n, g) + ring_bytes("reduce_scatter", 4 * n, g), net, gpu,
                   micro_batches)

    if layout.pp > 1:  # each micro-batch: activations to the next stage's rank, gradients to the previous one's
        boundary = stage_boundary_bytes(cfg, layout, prec, seq_len)
        for s in stages:
            for peer_stage in ([s + 1] if s < last else []) + ([s - 1] if s > 0 else []):
                net = 1.0 if crosses_nodes(pp_rank, peer_stage % layout.pp, stage_size, G) else 0.0
                out["pp"].add(boundary, net, gpu, micro_batches)
    return out


# ---------------------------------------------------------------------------------------------
# Compute and time


def model_flops_per_token(cfg: Config, counts: ParamCounts, seq_len: int) -> float:
    """6 x active matmul parameters + causal attention: per layer 3 (fwd + bwd) x h (d_qk + d_v) x S."""
    dqk, dv = attention_dims(cfg.model)
    attention = 3 * cfg.model.n_layer * cfg.model.n_head * (dqk + dv) * seq_len
    return 6 * counts.matmul_active + attention


def rank_flops_per_micro_batch(cfg: Config, counts: ParamCounts, layout: Layout, seq_len: int,
                               max_load_ratio: float, layers: Optional[Sequence[int]] = None) -> float:
    """FLOPs the busiest rank executes for one micro-batch: its 1/tp of the dense matmuls and attention, the
    expert rows it runs (imbalance and capacity padding included), x3 for backward, +1 forward when recomputing.
    `counts` and `layers` are a pipeline rank's (rank_param_counts, Layout.rank_layers); default all."""
    m, moe = cfg.model, cfg.moe
    layers = range(m.n_layer) if layers is None else layers
    n_moe = len(set(layers) & set(m.moe_layers()))
    T = layout.micro_batch_size * seq_len
    dense_matmul = counts.matmul_active - counts.active_expert  # dense matmul parameters
    dqk, dv = attention_dims(m)
    forward = 2 * dense_matmul / layout.tp * T + len(layers) * m.n_head / layout.tp * (dqk + dv) * seq_len * T
    if n_moe:
        rows = expert_rows(moe, layout, T if layout.expert_tp else T / layout.tp, seq_len, max_load_ratio)
        F = resolved_d_expert(m, moe) / layout.etp
        forward += n_moe * rows.computed * 2 * 3 * m.d_model * F
    return forward * (4 if layout.activation_checkpointing else 3)


def global_batch_of(cfg: Config, world_size: int) -> int:
    """Sequences per optimizer step the config asks for: micro_batch_size x grad_accum_steps x dp."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if tp < 1 or pp < 1 or world_size % (pp * tp):
        raise ConfigError(f"--global-batch-size: the config's parallel.pp={pp} x parallel.tp={tp} does not divide --gpus "
                          f"{world_size}, so its global batch is undefined; pass --global-batch-size (sequences per step)")
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * (world_size // (pp * tp))


def evaluate(cfg: Config, layout: Layout, gpu: GPU, gpus_per_node: int = 8,
             max_load_ratio: float = DEFAULT_MAX_LOAD_RATIO, global_batch: Optional[int] = None,
             device: str = "cuda") -> dict:
    """Everything predicted for one layout, per rank (bytes, seconds), and the step's MFU. Under pp, memory
    and parameters are those of the pp rank whose total is largest (pipeline["memory_pp_rank"]), time that
    of the slowest pp rank, stretched by the bubble."""
    seq_len = cfg.data.seq_len or cfg.model.max_seq_len
    if global_batch is None:
        global_batch = global_batch_of(cfg, layout.world)
    micro_batches = global_batch / (layout.micro_batch_size * layout.dp)
    counts = param_counts(cfg.model, cfg.moe)
    prec = precision(device, cfg.train.dtype, layout.zero_stage)
    acts = pipeline_activation_bytes(cfg, layout, prec, seq_len, max_load_ratio, math.ceil(micro_batches))
    ranks = []  # per pp rank: its parameters, memory, traffic and seconds
    for r in range(layout.pp):
        rc = rank_param_counts(cfg, counts, layout, r)
        memory = state_bytes(rc, layout, prec, device)
        memory["activations"] = acts[r]["total"]
        memory["total"] = memory["params"] + memory["grads"] + memory["optimizer"] + memory["activations"]
        comm = communication(cfg, rc, layout, prec, gpu, gpus_per_node, seq_len, micro_batches, max_load_ratio, r)
        flops = rank_flops_per_micro_batch(cfg, rc, layout, seq_len, max_load_ratio,
                                           layout.rank_layers(cfg.model.n_layer, r))
        compute_s = micro_batches * flops / (gpu.peak_tflops * 1e12)
        # overlap, a conservative bound: all-to-alls (which the code overlaps with shared experts only) and tp
        # collectives count in full; so do GradReducer (overlapping the last backward only) and DeepSpeed
        # (overlap_comm off); FSDP2 prefetch hides its traffic behind compute
        dp_s = comm["dp"].seconds if layout.zero_stage < 3 else max(0.0, comm["dp"].seconds - compute_s)
        ranks.append({"counts": rc, "memory": memory, "comm": comm, "compute": compute_s, "dp_exposed": dp_s,
                      "stage_s": compute_s + comm["a2a"].seconds + comm["tp"].seconds})
    mem_rank = max(range(layout.pp), key=lambda r: ranks[r]["memory"]["total"])
    slow = max(range(layout.pp), key=lambda r: ranks[r]["stage_s"])  # the pipeline runs at its slowest stage rank
    bubble = bubble_fraction(layout.pp_schedule, layout.pp, layout.pp_virtual_stages, micro_batches)
    R, M = ranks[slow], ranks[mem_rank]
    # the slowest rank's micro-batches (compute, all-to-alls, tp collectives) take 1 - bubble of the pipeline's
    # time; P2P sends and the gradient reduction after it count in full, the longest rank's
    time_s = {"compute": R["compute"], "a2a": R["comm"]["a2a"].seconds, "tp": R["comm"]["tp"].seconds,
              "bubble": R["stage_s"] * bubble / (1 - bubble),
              "p2p": max(x["comm"]["pp"].seconds for x in ranks), "dp_exposed": max(x["dp_exposed"] for x in ranks)}
    step_s = sum(time_s.values())
    tokens = global_batch * seq_len
    flops = tokens * model_flops_per_token(cfg, counts, seq_len)
    rc = M["counts"]
    return {
        "layout": layout,
        "params": {"total": counts.total, "active": counts.active, "dense": counts.dense, "expert": counts.expert,
                   "per_rank": rc.dense_local(layout) + rc.expert_local(layout),
                   "per_rank_dense": rc.dense_local(layout), "per_rank_expert": rc.expert_local(layout)},
        "memory_bytes": M["memory"],
        "activation_bytes": {k: v for k, v in acts[mem_rank].items() if k != "in_flight"},
        "comm_bytes": {k: {"nvlink": v.nvlink, "network": v.network, "seconds": v.seconds} for k, v in M["comm"].items()},
        "micro_batches": micro_batches,
        "tokens_per_step": tokens,
        "model_flops_per_step": flops,
        "time_s": time_s,
        "step_time_s": step_s,
        "mfu": flops / (step_s * gpu.peak_tflops * 1e12 * layout.world),
        "bubble_fraction": bubble,
        "pipeline": {"memory_pp_rank": mem_rank, "time_pp_rank": slow,
                     "stage_layers": [len(x) for x in layout.stage_layer_indices(cfg.model.n_layer)],
                     "in_flight": [list(a["in_flight"]) for a in acts],
                     "memory_total_bytes": [x["memory"]["total"] for x in ranks],
                     "params_per_rank": [x["counts"].dense_local(layout) + x["counts"].expert_local(layout) for x in ranks],
                     "p2p_bytes_per_micro_batch": stage_boundary_bytes(cfg, layout, prec, seq_len) if layout.pp > 1 else 0.0},
    }


# ---------------------------------------------------------------------------------------------
# Enumerating layouts


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_errors(cfg: Config, world: int, tp: int, ep: int, expert_tp: bool, pp: int = 1, pp_schedule: str = "1f1b",
                  pp_virtual_stages: int = 1, pp_layers: Optional[list[int]] = None,
                  micro_batches: Optional[int] = None) -> list[str]:
    """config.validate_layout's rules (the layout, the pipeline, and the MoE checks that depend on ep) for this
    layout; `micro_batches` stands for train.grad_accum_steps (default the config's)."""
    par = dataclasses.replace(cfg.parallel, tp=tp, ep=ep, dp=None, expert_tp=expert_tp, pp=pp, pp_schedule=pp_schedule,
                              pp_virtual_stages=pp_virtual_stages, pp_layers=pp_layers)
    train = cfg.train if micro_batches is None else dataclasses.replace(cfg.train, grad_accum_steps=micro_batches)
    try:
        validate_layout(dataclasses.replace(cfg, parallel=par, train=train), world)
    except ConfigError as e:
        return str(e).splitlines()[1:]
    if ep > 1 and not cfg.model.moe_layers():
        return [f"parallel.ep: {ep} but the model has no MoE layers; use ep=1"]
    return []


def enumerate_layouts(cfg: Config, world: int, global_batch: int) -> list[Layout]:
    """Every valid (pp, tp, ep, expert_tp) x zero_stage 0-3 x micro-batch size x activation checkpointing;
    micro-batches must split the global batch evenly, and be at least pp of them (the pipeline runs
    1F1B over layers split as evenly as possible; config.stage_layers)."""
    layouts = []
    for pp in _divisors(world):
        if pp > cfg.model.n_layer:
            continue
        for tp in _divisors(world // pp):
            dp = world // (pp * tp)
            if global_batch % dp:
                continue
            per_rank = global_batch // dp
            mbs = sorted({b for b in (2 ** i for i in range(per_rank.bit_length())) if per_rank % b == 0}
                         | ({cfg.train.micro_batch_size} if per_rank % cfg.train.micro_batch_size == 0 else set()))
            mbs = [b for b in mbs if per_rank // b >= pp]  # torch's schedules need a micro-batch per stage rank
            if not mbs:
                continue
            for ep in _divisors(world):
                for expert_tp in ((False, True) if tp > 1 and ep == 1 and cfg.model.moe_layers() else (False,)):
                    # the most micro-batches (b = 1) stand for train.grad_accum_steps; mbs keeps those >= pp
                    if layout_errors(cfg, world, tp, ep, expert_tp, pp=pp, micro_batches=per_rank):
                        continue
                    for zero in (0, 1, 2, 3):
                        for b in mbs:
                            for ac in (False, True):
                                layouts.append(Layout(tp, ep, dp, expert_tp, zero, b, ac, pp=pp))
    return layouts


def check_plan_args(gpus: int, gpu_memory_gb: float, gpus_per_node: int, max_load_ratio: float,
                    global_batch: Optional[int], gpu: GPU) -> None:
    """Bad flags: one message naming the flag and the fix."""
    problems = [
        (gpus < 1, f"--gpus: {gpus} must be >= 1"),
        (gpu_memory_gb <= 0, f"--gpu-memory-gb: {gpu_memory_gb} must be positive (GiB per GPU, e.g. 80)"),
        (gpus_per_node < 1, f"--gpus-per-node: {gpus_per_node} must be >= 1"),
        (gpus >= gpus_per_node >= 1 and gpus % gpus_per_node != 0,
         f"--gpus-per-node: {gpus_per_node} does not divide --gpus {gpus}; give whole nodes"),
        (max_load_ratio < 1, f"--max-load-ratio: {max_load_ratio} must be >= 1 (the busiest expert's rows over the "
                             "mean; 1 = perfectly balanced)"),
        (global_batch is not None and global_batch < 1, f"--global-batch-size: {global_batch} must be >= 1"),
        (gpu.peak_tflops <= 0 or gpu.nvlink_gb_s <= 0 or gpu.network_gb_s <= 0,
         "--peak-tflops / --nvlink-gb-s / --network-gb-s: must be positive"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(message)


def plan(cfg: Config, gpus: int, gpu_memory_gb: float, gpu: GPU = GPUS["h100"], gpus_per_node: int = 8,
         max_load_ratio: float = DEFAULT_MAX_LOAD_RATIO, global_batch: Optional[int] = None) -> dict:
    """Every valid layout on `gpus` GPUs with its estimate; `recommended` is the fastest that fits (ties:
    less memory), None when nothing fits."""
    check_plan_args(gpus, gpu_memory_gb, gpus_per_node, max_load_ratio, global_batch, gpu)
    validate(cfg)  # the values; each layout is checked by layout_errors
    if global_batch is None:
        global_batch = global_batch_of(cfg, gpus)
    estimates = []
    for layout in enumerate_layouts(cfg, gpus, global_batch):
        est = evaluate(cfg, layout, gpu, min(gpus_per_node, gpus), max_load_ratio, global_batch)
        est["fits"] = est["memory_bytes"]["total"] <= USABLE_MEMORY * gpu_memory_gb * GiB
        estimates.append(est)
    fitting = [i for i, e in enumerate(estimates) if e["fits"]]
    best = min(fitting, key=lambda i: (estimates[i]["step_time_s"], estimates[i]["memory_bytes"]["total"]), default=None)
    return {"estimates": estimates, "recommended": best, "gpus": gpus, "gpu": gpu, "gpu_memory_gb": gpu_memory_gb,
            "gpus_per_node": gpus_per_node, "max_load_ratio": max_load_ratio, "global_batch": global_batch,
            "seq_len": cfg.data.seq_len or cfg.model.max_seq_len}


def layout_record(est: dict) -> dict:
    """One layout in the `--json` schema of issue 17."""
    L, mem = est["layout"], est["memory_bytes"]
    comm = sum(v["nvlink"] + v["network"] for v in est["comm_bytes"].values())
    return {"tp": L.tp, "ep": L.ep, "dp": L.dp, "edp": L.edp, "expert_tp": L.expert_tp, "zero_stage": L.zero_stage,
            "micro_batch_size": L.micro_batch_size, "activation_checkpointing": L.activation_checkpointing,
            "fits": est["fits"],
            "memory_gb": {k: round(mem[k] / GiB, 3) for k in ("params", "grads", "optimizer", "activations", "total")},
            "comm_gb_per_step": round(comm / GB, 3), "step_time_s": round(est["step_time_s"], 4),
            "mfu": round(est["mfu"], 4),
            # issue 22: the pipeline (pp 1: no bubble); memory is that of pp rank memory_pp_rank
            "pp": L.pp, "pp_schedule": L.pp_schedule, "pp_virtual_stages": L.pp_virtual_stages,
            "micro_batches": est["micro_batches"], "bubble_fraction": round(est["bubble_fraction"], 4),
            "memory_pp_rank": est["pipeline"]["memory_pp_rank"]}


def to_json(result: dict) -> str:
    return json.dumps({"layouts": [layout_record(e) for e in result["estimates"]],
                       "recommended": result["recommended"]}, indent=1)


def format_table(result: dict, rows: int = 15) -> str:
    """The fastest fitting layouts (the recommended one first, marked *), and what was assumed."""
    ests, best = result["estimates"], result["recommended"]
    gpu = result["gpu"]
    lines = []
    if ests:
        p = ests[0]["params"]
        lines.append(f"model: {p['total'] / 1e9:.2f}B parameters ({p['active'] / 1e9:.2f}B active per token, "
                     f"{p['expert'] / 1e9:.2f}B in routed experts); global batch {result['global_batch']} x "
                     f"{result['seq_len']} tokens")
    lines.append(f"{result['gpus']} x {gpu.name} ({gpu.peak_tflops:g} TFLOP/s bf16, NVLink {gpu.nvlink_gb_s:g} GB/s, "
                 f"network {gpu.network_gb_s:g} GB/s per GPU, {result['gpu_memory_gb']:g} GiB, "
                 f"{result['gpus_per_node']} per node); max load ratio {result['max_load_ratio']:g}")
    fitting = sorted((i for i, e in enumerate(ests) if e["fits"]),
                     key=lambda i: (i != best, ests[i]["step_time_s"], ests[i]["memory_bytes"]["total"]))
    lines.append(f"{len(ests)} valid layouts, {len(fitting)} fit in {USABLE_MEMORY:.0%} of {result['gpu_memory_gb']:g} GiB"
                 + (f"; the {min(rows, len(fitting))} fastest:" if fitting else ""))
    header = (f"{'':1} {'pp':>3} {'tp':>3} {'ep':>3} {'dp':>4} {'edp':>4} {'etp':>3} {'zero':>4} {'mbs':>3} {'ac':>3} "
              f"{'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'total':>7} {'NVLink':>7} {'network':>7} "
              f"{'bubble':>6} {'step s':>7} {'MFU':>6}")
    if fitting:
        lines += [header, f"{'':1} {'':>35} {'GiB per GPU':-^39} {'GB/step':-^15}"]
    for i in fitting[:rows]:
        e = ests[i]
        L, mem = e["layout"], e["memory_bytes"]
        nv = sum(v["nvlink"] for v in e["comm_bytes"].values()) / GB
        net = sum(v["network"] for v in e["comm_bytes"].values()) / GB
        lines.append(f"{'*' if i == best else '':1} {L.pp:>3} {L.tp:>3} {L.ep:>3} {L.dp:>4} {L.edp:>4} "
                     f"{'y' if L.expert_tp else '':>3} {L.zero_stage:>4} {L.micro_batch_size:>3} "
                     f"{'y' if L.activation_checkpointing else '':>3} "
                     + " ".join(f"{mem[k] / GiB:>7.1f}" for k in ("params", "grads", "optimizer", "activations", "total"))
                     + f" {nv:>7.1f} {net:>7.1f} {e['bubble_fraction']:>6.1%} {e['step_time_s']:>7.3f} {e['mfu']:>6.1%}")
    if best is None:
        least = min(ests, key=lambda e: e["memory_bytes"]["total"], default=None)
        lines.append("nothing fits" + (f": the smallest layout needs {least['memory_bytes']['total'] / GiB:.1f} GiB per GPU; "
                                       "add GPUs, shorten data.seq_len or plan a larger --gpu-memory-gb" if least else ""))
    else:
        lines.append(f"recommended (*): {_describe(ests[best])}")
    lines.append("zero 3 is FSDP2; tp with sequence parallelism (the default); pp 1F1B, memory of its fullest rank. "
                 "Step time: compute at peak FLOP/s + all-to-alls + tp collectives, stretched by the pipeline "
                 "bubble, + P2P + gradient reduction (FSDP2's overlapped); see docs/planning.md")
    return "\n".join(lines)


def _describe(est: dict) -> str:
    L = est["layout"]
    keys = [f"parallel.pp={L.pp}"] if L.pp > 1 else []
    keys += [f"parallel.tp={L.tp}", f"parallel.ep={L.ep}"] + (["parallel.expert_tp=true"] if L.expert_tp else [])
    keys += [f"train.zero_stage={L.zero_stage}", f"train.micro_batch_size={L.micro_batch_size}"]
    if L.pp > 1:  # the global batch is kept: the pipeline's micro-batches are the accumulation steps
        keys.append(f"train.grad_accum_steps={est['micro_batches']:g}")
    keys.append(f"model.activation_checkpointing={'true' if L.activation_checkpointing else 'false'}")
    return " ".join(keys) + f" (dp {L.dp}, edp {L.edp})"


# ---------------------------------------------------------------------------------------------
# For the dry run and for calibration


def estimate(cfg: Config, world_size: int, gpu: str | GPU = "h100", gpus_per_node: int = 8,
             max_load_ratio: float = DEFAULT_MAX_LOAD_RATIO) -> dict:
    """Per-rank figures of the layout the config asks for on `world_size` GPUs (what the dry run prints):
    parameter counts, memory bytes (and whether they fit the GPU), communication, step time and MFU."""
    spec = GPUS[gpu] if isinstance(gpu, str) else gpu
    est = evaluate(cfg, config_layout(cfg, world_size), spec, min(gpus_per_node, world_size), max_load_ratio)
    est["fits"] = est["memory_bytes"]["total"] <= USABLE_MEMORY * spec.memory_gb * GiB
    est["layout"] = asdict(est["layout"])
    return est


def cpu_memory_estimate(cfg: Config, world_size: int, max_load_ratio: float = DEFAULT_MAX_LOAD_RATIO,
                        baseline_bytes: int = PROCESS_BASELINE_BYTES) -> dict[str, float]:
    """Per-rank peak resident bytes of an fp32 training step on a CPU at the config's layout (what
    benchmarks/memory.py measures as VmHWM): parameters, gradients, optimizer state, activations of one
    micro-batch, plus the interpreter's baseline."""
    layout = config_layout(cfg, world_size)
    seq_len = cfg.data.seq_len or cfg.model.max_seq_len
    prec = precision("cpu", "fp32", layout.zero_stage)
    counts = param_counts(cfg.model, cfg.moe)
    acts = pipeline_activation_bytes(cfg, layout, prec, seq_len, max_load_ratio, cfg.train.grad_accum_steps)
    per_rank = []
    for r in range(layout.pp):  # under pp, the fullest pipeline rank
        out = state_bytes(rank_param_counts(cfg, counts, layout, r), layout, prec, "cpu")
        out["activations"] = acts[r]["total"]
        out["baseline"] = baseline_bytes
        out["total"] = sum(out.values())
        per_rank.append(out)
    return max(per_rank, key=lambda o: o["total"])
