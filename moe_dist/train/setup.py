"""The composition root: everything a training run is made of, built in one place, in order.

    run = build_run(cfg)      # resolve -> preflight -> resume check -> groups -> model -> parallelism
    Trainer(cfg, run).fit()   #          -> optimizer -> runtime -> data

`build_run` discovers the launcher (torchrun, mpirun, srun or a plain process) itself, so
`Trainer(cfg)` used as a library under any of them runs the distributed job.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..checkpoint import Checkpointer
from ..config import Config, ConfigError, ParallelConfig, config_changes, describe, from_dict, preflight, resolve
from ..data import Data, build_data
from ..interop.hf import load_weights
from ..config.preflight import INSTALL_DS
from ..model.build import build_model, materialize
from ..parallel.env import LaunchEnv, discover
from .optimizer import build_optimizer, param_groups
from .runtime import DistributedRuntime, Runtime


@dataclass
class Run:
    cfg: Config  # resolved
    launch: LaunchEnv
    runtime: Runtime
    model: nn.Module  # this rank's shard
    optimizer: torch.optim.Optimizer
    data: Data
    checkpointer: Checkpointer
    n_params: int  # the whole model's
    engine: Optional[object] = None  # DeepSpeed ZeRO: reduces, clips and steps (engine.backward / engine.step)
    schedule_changes: tuple = ()  # [(field, saved, new)] accepted with checkpoint.allow_config_change
    pipeline: Optional[object] = None  # parallel.pp > 1: runs each step's forward and backward (parallel.pipeline)


def check_resume(saved: dict, meta: dict, cfg: Config, world_size: int) -> list:
    """Refuse a resume that would train another model or on other data, or past its end; returns the
    schedule changes (allowed only with checkpoint.allow_config_change=true)."""
    where = f"{cfg.logging.run_dir}/checkpoints/step_{meta['step']:08d}"
    if meta["step"] > cfg.train.steps:
        raise ConfigError(f"train.steps: {cfg.train.steps}, but {where} is at step {meta['step']}; raise train.steps "
                          f"(with checkpoint.allow_config_change=true) to continue, or use a new logging.run_dir")
    before = from_dict(Config, saved)
    refused, schedule = config_changes(before, meta["layout"]["world_size"], cfg, world_size)
    if refused:
        lines = "\n  ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in refused)
        raise ConfigError(f"{where} was trained with another model or data; resuming would silently train something "
                          f"else:\n  {lines}\nuse the checkpoint's values, a new logging.run_dir, or "
                          f"checkpoint.resume=false")
    if schedule and not cfg.checkpoint.allow_config_change:
        lines = "\n  ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in schedule)
        raise ConfigError(f"{where} was trained with another schedule:\n  {lines}\nset "
                          f"checkpoint.allow_config_change=true to resume with the new one, or use the checkpoint's values")
    return schedule


def zero_engine(cfg: Config) -> tuple[bool, bool]:
    """(DeepSpeed ZeRO, FSDP2) for the resolved config's zero_stage: 1 and 2 through DeepSpeed where it is
    installed and the weights are plain tensors (tp = 1); under pp > 1 only 1, and only when every pp rank
    holds MoE layers or none does (DeepSpeed's per-group norms are summed over the stages group by group);
    3, and 1 and 2 otherwise, through FSDP2."""
    from ..parallel import zero

    stage, par = cfg.train.zero_stage, cfg.parallel
    pipeline = par.pp == 1 or (stage == 1 and _stages_alike(cfg))
    deepspeed = stage in (1, 2) and par.tp == 1 and pipeline and zero.deepspeed_available()
    return deepspeed, stage in (1, 2, 3) and not deepspeed


def _stages_alike(cfg: Config) -> bool:
    """Whether every pp rank holds MoE layers, or none does (then all hold the same parameter groups)."""
    from ..parallel.pipeline import layer_ranges, stages_of

    par, moe = cfg.parallel, set(cfg.model.moe_layers())
    ranges = layer_ranges(cfg)
    holds = {any(i in moe for s in stages_of(r, par.pp, par.pp_virtual_stages) for i in ranges[s])
             for r in range(par.pp)}
    return len(holds) == 1


def _fsdp_instead(cfg: Config) -> str:
    """Why zero_stage 1/2 runs on FSDP2 rather than DeepSpeed (zero_engine), with what would change it."""
    if cfg.parallel.tp > 1:
        return "DeepSpeed holds plain tensors, tensor parallelism DTensors"
    if cfg.parallel.pp > 1 and cfg.train.zero_stage == 2:
        return ("DeepSpeed's ZeRO-2 partitions gradients in hooks that fire in every micro-batch's backward, which "
                "the pipeline schedule runs itself (DeepSpeed's PipelineEngine refuses ZeRO-2 too; zero_stage=1 "
                "runs on DeepSpeed under pp)")
    if cfg.parallel.pp > 1:
        return ("some pipeline stages hold MoE layers and some none, so DeepSpeed's parameter groups differ between "
                "them (set parallel.pp_layers so that every pp rank holds a MoE layer to run on DeepSpeed)")
    return f"DeepSpeed is not installed (`{INSTALL_DS}`)"


def build_run(cfg: Config, launch: Optional[LaunchEnv] = None) -> Run:
    """Build this process's part of the run `cfg` describes (an unresolved config; see module docstring)."""
    launch = launch or discover()
    ck = cfg.checkpoint
    checkpointer = Checkpointer(cfg.logging.run_dir, ck.keep_last, ck.zero_state, ck.async_save, ck.checksums,
                                cfg.parallel.timeout_s)
    saved = checkpointer.saved_config() if cfg.checkpoint.resume else None
    cfg = resolve(cfg, launch.world_size, from_dict(Config, saved[0]) if saved else None)
    preflight(cfg)
    schedule = check_resume(*saved, cfg, launch.world_size) if saved else []
    tr = cfg.train
    pgm = None
    if launch.world_size > 1 or tr.zero_stage > 0:  # ZeRO (FSDP2, DeepSpeed) needs a process group, one process too
        from ..parallel.groups import ProcessGroupManager

        pgm = ProcessGroupManager(cfg.parallel, n_experts=cfg.moe.n_experts if cfg.model.moe_layers() else None,
                                  device=tr.device, launch=launch, process_group=tr.zero_stage > 0)
    device = pgm.device if pgm is not None else torch.device(tr.device)
    # Built on the meta device, sharded there, then each rank allocates and initialises only its shards
    # and reads only its slices of checkpoint.init_from.
    model = build_model(cfg, device="meta")  # weights from cfg.train.seed, at any layout
    torch.manual_seed(tr.seed)  # the run's other randomness (router noise and jitter), the same on every rank
    n_params = sum(p.numel() for p in model.parameters())
    engine = pipeline = None
    if pgm is not None:
        from ..parallel import zero
        from ..parallel.data_parallel import apply_fsdp, shard_of
        from ..parallel.parallelize import parallelize

        deepspeed, fsdp = zero_engine(cfg)
        if tr.zero_stage in (1, 2) and not deepspeed and pgm.is_main:
            warnings.warn(f"train.zero_stage={tr.zero_stage}: {_fsdp_instead(cfg)}, so FSDP2 shards instead, keeping "
                          "its parameters gathered from forward to backward (ZeRO-2's trade-off)", stacklevel=2)
        stages = _pipeline_stages(model, cfg, pgm)
        model = parallelize(model, cfg, pgm)
        bf16_params = fsdp and device.type == "cuda" and tr.dtype == "bf16"
        if fsdp:
            apply_fsdp(model, pgm, bf16=bf16_params, reshard_after_forward=tr.zero_stage == 3, stages=stages)
        model = materialize(model, device, tr.seed, shard_of)
        if cfg.checkpoint.init_from:
            load_weights(model, cfg.checkpoint.init_from, shard_of)
        if deepspeed:
            groups = param_groups(zero.local_parameters(model, pgm), tr.weight_decay)
            engine, optimizer = zero.initialize_deepspeed(model, cfg, pgm, groups)
        else:
            optimizer = build_optimizer(model, tr, device)
        runtime: Runtime = DistributedRuntime(cfg, pgm, model, fsdp=fsdp)
        if stages is not None:
            from ..parallel.pipeline import Pipeline

            bf16_hidden = bf16_params or (deepspeed and zero.deepspeed_bf16(cfg, device))
            # under DeepSpeed the gradients stay in p.grad until the engine reduces them after the schedule
            reduce = None if deepspeed else lambda stage: runtime.reduce_gradients_in_backward(stage.parameters())
            pipeline = Pipeline(stages, cfg, pgm, runtime.loss, torch.bfloat16 if bf16_hidden else torch.float32,
                                on_last_backward=reduce)
    else:
        model = materialize(model, device, tr.seed)
        if cfg.checkpoint.init_from:
            load_weights(model, cfg.checkpoint.init_from)
        optimizer = build_optimizer(model, tr, device)
        runtime = Runtime(cfg, device)
    data = build_data(cfg.data, cfg.data.seq_len, tr.seed, rank=runtime.dp_rank, world=runtime.dp_world,
                      micro_batch_size=tr.micro_batch_size)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {data.vocab_size} "
                          f"(data.tokenizer={cfg.data.tokenizer}); set model.vocab_size={data.vocab_size} or more")
    return Run(cfg, launch, runtime, model, optimizer, data, checkpointer, n_params, engine, tuple(schedule), pipeline)


def _pipeline_stages(model: nn.Module, cfg: Config, pgm) -> Optional[list]:
    """parallel.pp > 1: cut the meta model to this rank's stages; their StageModules (else None)."""
    if pgm.pp == 1:
        return None
    from ..parallel.pipeline import keep_stages, stage_modules

    keep_stages(model, cfg, pgm.pp_rank)
    return stage_modules(model, cfg, pgm.pp_rank)


def local_run(cfg: Config, model: nn.Module) -> Run:
    """A one-process Run around an already built model (evaluation of a checkpoint): no optimizer state."""
    # one process: the layout goes, the model's layout-derived values (numbers by now) stay
    cfg = resolve(dataclasses.replace(cfg, parallel=ParallelConfig(),
                                      checkpoint=dataclasses.replace(cfg.checkpoint, resume=False)), 1)
    preflight(cfg)
    device = torch.device(cfg.train.device)
    model = model.to(device)
    data = build_data(cfg.data, cfg.data.seq_len, cfg.train.seed, micro_batch_size=cfg.train.micro_batch_size)
    return Run(cfg, LaunchEnv(0, 1, 0, "single"), Runtime(cfg, device), model, build_optimizer(model, cfg.train, device),
               data, Checkpointer(cfg.logging.run_dir), sum(p.numel() for p in model.parameters()))


def dry_run(cfg: Config, world_size: int, gpu: str = "h100") -> str:
    """What `world_size` ranks would build, seen from rank 0, without allocating any of it: the config
    resolved and validated as that job would, the model built on the meta device and sharded there by
    the real parallelize / FSDP2 code on a fake process group of world_size ranks; with the plan's
    per-GPU figures (moe_dist.plan) for that layout."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from .. import plan
    from ..parallel import zero
    from ..parallel.data_parallel import apply_fsdp, local
    from ..parallel.groups import ProcessGroupManager
    from ..parallel.parallelize import parallelize

    cfg = resolve(cfg, world_size, cuda_available=cfg.train.device != "cpu")
    preflight(cfg, machine=False)  # the files; the devices are the cluster's
    model = build_model(cfg, device="meta")
    n_params = sum(p.numel() for p in model.parameters())
    tr, local_params = cfg.train, None
    if world_size > 1:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
        try:
            pgm = ProcessGroupManager(cfg.parallel, n_experts=cfg.moe.n_experts, device="cpu",
                                      launch=LaunchEnv(0, world_size, 0, "dry-run"))
            stages = _pipeline_stages(model, cfg, pgm)
            model = parallelize(model, cfg, pgm)
            if zero_engine(cfg)[1]:
                apply_fsdp(model, pgm, bf16=tr.dtype == "bf16", reshard_after_forward=tr.zero_stage == 3, stages=stages)
            local_params = sum(local(p).numel() for p in model.parameters())
        finally:
            dist.destroy_process_group()
    est = plan.estimate(cfg, world_size, gpu=gpu)
    mem, GiB = est["memory_bytes"], 2 ** 30
    lines = [describe(cfg, world_size),
             f"parameters: {n_params / 1e9:.2f}B in all, {est['params']['active'] / 1e9:.2f}B active per token, "
             f"{(local_params if local_params is not None else est['params']['per_rank']) / 1e9:.3f}B held by rank 0"
             + (" (built on the meta device and sharded as the job would)" if local_params is not None else " (plan)"),
             f"plan, per {gpu} GPU: {mem['total'] / GiB:.1f} GiB = params {mem['params'] / GiB:.1f} + grads "
             f"{mem['grads'] / GiB:.1f} + optimizer {mem['optimizer'] / GiB:.1f} + activations {mem['activations'] / GiB:.1f} "
             f"({'fits' if est['fits'] else 'does not fit'} {plan.GPUS[gpu].memory_gb:g} GB); step "
             f"{est['step_time_s']:.2f} s, MFU {100 * est['mfu']:.1f}% (a roofline: `moe-dist plan` compares layouts)"]
    if cfg.parallel.pp > 1:
        pipe, par = est["pipeline"], cfg.parallel
        lines.append(f"pipeline: {par.pp_schedule}, {par.pp_virtual_stages} stage(s) per rank, layers per stage "
                     f"{pipe['stage_layers']}, {int(est['micro_batches'])} micro-batches, bubble "
                     f"{100 * est['bubble_fraction']:.1f}%; the memory above is pp rank {pipe['memory_pp_rank']}'s "
                     f"(the fullest), the parameters held rank 0's")
    return "\n".join(lines)
