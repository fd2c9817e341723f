"""The training loop.

    run = build_run(cfg)        # the composition root (moe_dist.train.setup): model, parallelism, data
    Trainer(cfg, run).fit()     # accumulate -> reduce grads -> clip -> step -> expert bias -> log/eval/save
"""
from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from moe_dist.checkpoint import CheckpointError, checkpoint_bytes
from moe_dist.checkpoint.manager import layout_of
from moe_dist.config import Config, describe
from moe_dist.parallel.env import LaunchEnv
from moe_dist.parallel.faults import CollectiveWatch
from moe_dist.train.host_memory import cache_large_allocations
from moe_dist.train.metrics import Metrics, Pace
from moe_dist.train.moe_metrics import MoEStepMetrics, layer_table
from moe_dist.train.runtime import Runtime
from moe_dist.train.schedule import lr_at
from moe_dist.train.setup import Run, build_run
from moe_dist.train.signals import StopRequest


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the message says what to change."""


@torch.no_grad()
def evaluate(model, batches, runtime: Runtime) -> float:
    """Mean validation cross entropy (nats/token) over `batches`, averaged over data-parallel ranks."""
    model.eval()
    losses = []
    for inputs, targets in batches:
        with runtime.autocast():
            logits = model(inputs.to(runtime.device))
        with runtime.loss_context():
            losses.append(runtime.loss(logits, targets.to(runtime.device)))
    model.train()
    return float(runtime.reduce_mean(torch.stack(losses).mean()))


@dataclass
class StepResult:
    loss: float  # cross entropy, mean over the accumulated micro-batches
    aux_loss: float
    grad_norm: float
    drop_frac: float  # fraction of expert assignments dropped by capacity
    lr: float
    skipped: bool = False
    extra: dict = field(default_factory=dict)
    router: Optional[MoEStepMetrics] = None  # per-layer MoE figures; .record() at log steps


class Trainer:
    def __init__(self, cfg: Config, run: Optional[Run] = None):
        self.run = run or build_run(cfg)
        self.cfg = cfg = self.run.cfg  # resolved
        self.rt, self.model, self.optimizer = self.run.runtime, self.run.model, self.run.optimizer
        self.data, self.checkpointer, self.engine = self.run.data, self.run.checkpointer, self.run.engine
        t = cfg.train
        if self.rt.device.type == "cpu" and t.cpu_malloc_cache:
            cache_large_allocations()
        self.step = 0  # optimizer steps taken (skipped non-finite steps count too)
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        self.resume_record: Optional[dict] = None  # the `resumed` line of metrics.jsonl, written once by fit()
        self._in_flight: Optional[tuple] = None  # (step, path, start time) of the save being written
        self.tokens_per_step = t.micro_batch_size * cfg.data.seq_len * t.grad_accum_steps * self.rt.dp_world
        self.resumed_from = self.maybe_resume() if cfg.checkpoint.resume else None

    # -- one optimizer step --------------------------------------------------------------------
    def train_step(self) -> StepResult:
        cfg, model, opt = self.cfg, self.model, self.optimizer
        accum = cfg.train.grad_accum_steps
        lr = lr_at(self.step, cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_steps, cfg.train.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        self.rt.reset_comm_stats()  # validation forwards count too; start the step at zero
        loss_sum = aux_sum = 0.0
        table: Optional[Tensor] = None  # [L, E + K] per MoE layer, summed over micro-batches (moe_metrics)
        for _ in range(accum):
            inputs, targets = (t.to(self.rt.device, non_blocking=True) for t in self.data.train.next_batch())
            with self.rt.loss_context():
                with self.rt.autocast():
                    logits = (self.engine or model)(inputs)
                    ce, aux = self.rt.loss(logits, targets), model.get_aux_loss()
                if self.engine is not None:
                    self._deepspeed_micro_step(ce + aux)
                else:
                    ((ce + aux) / accum).backward()
            loss_sum, aux_sum = loss_sum + ce.item(), aux_sum + float(aux.detach())
            stats = model.moe_stats()
            if stats:
                micro, columns = layer_table(stats)
                table = micro if table is None else table + micro
        # one all-reduce and one host copy for what is logged of the whole dp batch: loss, aux, the MoE table
        head = torch.tensor([loss_sum / accum, aux_sum / accum], dtype=torch.float64, device=self.rt.device)
        reduced = self.rt.reduce_sum(torch.cat([head, table.double().flatten()]) if table is not None else head)
        packed = reduced.cpu()
        loss, aux_loss = (float(v) / self.rt.dp_world for v in packed[:2])
        router, loads, drop_frac, extra = None, None, 0.0, {}
        if table is not None:
            router = MoEStepMetrics(packed[2:].view(table.shape), columns, cfg.moe.n_experts, accum * self.rt.dp_world,
                                    cfg.model.moe_layers())
            drop_frac = router.drop_frac()
            extra.update(router.scalars())  # per-term losses, router entropy, max_load_ratio
            loads = list(reduced[2:].view(table.shape)[:, :cfg.moe.n_experts].float().unbind(0))  # still on the device
        extra.update(self.rt.comm_stats())
        if self.engine is not None:
            return self._deepspeed_step(StepResult(loss, aux_loss, 0.0, drop_frac, lr, extra=extra, router=router), loads)
        self.rt.reduce_gradients(model)  # data-parallel all-reduce goes here
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = float(self.rt.clip_grad_norm(model, clip))
        result = StepResult(loss, aux_loss, grad_norm, drop_frac, lr, extra=extra, router=router)
        if not (math.isfinite(result.loss) and math.isfinite(grad_norm)):
            opt.zero_grad(set_to_none=True)
            self.step, self.skipped_steps, self.nonfinite_in_a_row = self.step + 1, self.skipped_steps + 1, self.nonfinite_in_a_row + 1
            if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                raise TrainingError(f"the loss or gradient was non-finite (loss {result.loss}, grad norm {grad_norm}) "
                                    f"for {self.nonfinite_in_a_row} steps in a row (train.max_nonfinite_steps) at step "
                                    f"{self.step}; lower train.lr, raise train.warmup_steps or set train.grad_clip")
            result.skipped = True
            return result
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.moe.expert_bias and loads:
            model.update_expert_bias(loads)  # loads of the whole dp batch
        self.step, self.nonfinite_in_a_row = self.step + 1, 0
        return result

    def _deepspeed_micro_step(self, loss: Tensor) -> None:
        """ZeRO: DeepSpeed scales by 1/grad_accum_steps, reduces (dense over dp, experts over edp),
        clips and steps at the accumulation boundary; it wants backward + step per micro-batch."""
        if not math.isfinite(float(self.rt.reduce_mean(loss.detach()))):
            # DeepSpeed folds gradients into its partitions as they arrive, with no clean way to
            # drop one micro-batch; stop rather than apply a non-finite update.
            raise TrainingError(f"non-finite loss at step {self.step} under DeepSpeed ZeRO (train.zero_stage="
                                f"{self.cfg.train.zero_stage}); lower train.lr or raise train.warmup_steps, or use "
                                "zero_stage=0, where non-finite steps are skipped")
        self.engine.backward(loss)
        self.engine.step()

    def _deepspeed_step(self, result: StepResult, loads) -> StepResult:
        if self.cfg.moe.expert_bias and loads:
            self.model.update_expert_bias(loads)  # loads of the whole dp batch
        self.step += 1
        result.grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        return result

    # -- validation -----------------------------------------------------------------------------
    def evaluate(self, n_batches: Optional[int] = None) -> float:
        """Mean validation cross entropy (nats/token) over fixed batches."""
        return evaluate(self.model, self.data.eval_batches(n_batches or self.cfg.train.eval_batches), self.rt)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, until_step: Optional[int] = None) -> dict:
        """Train to train.steps (or stop early at `until_step`, as a preempted job would)."""
        cfg, t, main = self.cfg, self.cfg.train, self.rt.is_main
        started = time.perf_counter()
        end = min(t.steps, until_step) if until_step is not None else t.steps
        entropy = self.data.unigram_entropy()
        self.say(self.describe(entropy))
        log = Metrics(cfg.logging.run_dir, t.steps, self.step, cfg.logging.tensorboard,
                      cfg.logging.progress_bar, enabled=main)  # a resumed log keeps steps <= self.step only
        if self.resume_record is not None:
            log.log(self.step, "resumed", self.resume_record)
            self.resume_record = None
        val_loss, val_step = (self.evaluate(), 0) if self.step == 0 else (None, -1)
        if val_loss is not None:
            log.log(0, "val", {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
            self.say(f"step 0: val loss {val_loss:.4f}")
        history, pace = [], Pace(self.step)
        stop = StopRequest().install() if threading.current_thread() is threading.main_thread() else StopRequest()
        watch = CollectiveWatch(self.rt.pgm).install()
        stopped = None
        try:
            while self.step < end:
                t0 = time.perf_counter()
                try:
                    r = self.train_step()
                except RuntimeError as e:
                    if watch.failed is None:
                        raise
                    raise TrainingError(f"step {self.step + 1}: {watch.failed} failed or timed out "
                                        f"(parallel.timeout_s={cfg.parallel.timeout_s:g}): {str(e).splitlines()[0]}; "
                                        f"a rank died or hung; the job restarts from the latest checkpoint under "
                                        f"torchrun --max-restarts") from e
                seconds = time.perf_counter() - t0
                pace.add(seconds, self.tokens_per_step)
                history.append(r.loss)
                log.progress(self.step, {"loss": r.loss, "aux": r.aux_loss, "drop%": 100 * r.drop_frac,
                                         "tok/s": self.tokens_per_step / seconds}, final=self.step == end)
                if r.skipped:
                    log.write(f"step {self.step}: non-finite loss {r.loss} / grad norm {r.grad_norm}; step skipped")
                if self.step % t.log_every == 0 or self.step == end or r.skipped:
                    tok_s, eta_s = pace.lap(self.step, end)
                    values = {"loss": r.loss, "aux_loss": r.aux_loss, "lr": r.lr, "grad_norm": r.grad_norm,
                              "drop_frac": r.drop_frac, "tokens_per_s": tok_s, "skipped": int(r.skipped),
                              "skipped_total": self.skipped_steps, **r.extra, **(r.router.record() if r.router else {})}
                    log.log(self.step, "train", values)
                    log.train_line(self.step, t.steps, values, eta_s)
                if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
                    val_loss, val_step = self.evaluate(), self.step
                    log.log(self.step, "val", {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
                    log.write(f"step {self.step}: val loss {val_loss:.4f}")
                saved = (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or self.step == end
                if saved:
                    self.save(log)
                if self._stop_agreed(stop):  # every rank sees the same answer, so all save and leave together
                    if not saved:
                        self.save(log)
                    self._finish_save(log)
                    stopped = stop.name() or "a peer's stop request"
                    log.write(f"step {self.step}: {stopped} received; checkpoint saved, exiting")
                    break
            self._finish_save(log)  # the last save is complete before fit returns
        finally:
            watch.uninstall()
            stop.uninstall()
            log.close()
            failure = sys.exc_info()[1]
            if failure is not None and not isinstance(failure, KeyboardInterrupt):  # a second Ctrl-C leaves at once
                self.checkpointer.drain()
        if stopped:
            self.say(f"stopped at step {self.step} by {stopped}; resume by running the same command again")
            return {"step": self.step, "val_loss": val_loss, "unigram_entropy": entropy, "losses": history,
                    "skipped_steps": self.skipped_steps, "stopped": stopped}
        if val_step != self.step:
            val_loss = self.evaluate()
        self.say(f"final validation loss {val_loss:.4f} {self.unit} (perplexity {math.exp(min(val_loss, 50)):.2f}) "
                 f"at step {self.step} after {time.perf_counter() - started:.0f} s; unigram entropy {entropy:.4f}: "
                 + ("beats the context-free baseline" if val_loss < entropy else "not yet below the context-free baseline"))
        return {"step": self.step, "val_loss": val_loss, "unigram_entropy": entropy, "losses": history,
                "skipped_steps": self.skipped_steps}

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """True on every rank when any rank got SIGTERM/SIGUSR1."""
        return self.rt.any(stop.requested)

    def describe(self, entropy: float) -> str:
        local = sum(p.numel() for p in self.model.parameters())
        n_params = self.run.n_params
        here = f" ({local / 1e6:.2f}M on this rank)" if local != n_params else ""
        start = f"resuming from {self.resumed_from.name}" if self.resumed_from else "starting fresh"
        changed = "".join(f"\n  {k}: {a!r} in the checkpoint, now {b!r} (checkpoint.allow_config_change)"
                          for k, a, b in self.run.schedule_changes)
        return (f"moe-dist: {n_params / 1e6:.2f}M parameters{here} on {self.rt.device}; corpus {self.cfg.data.dataset}: "
                f"{len(self.data.train.dataset.tokens):,} training tokens, unigram entropy {entropy:.4f} {self.unit} "
                f"(the loss of a model that ignores context); {start} at step {self.step} of {self.cfg.train.steps}\n"
                f"{describe(self.cfg, self.rt.world_size)}{changed}")

    @property
    def unit(self) -> str:
        return "nats/byte" if self.data.tokenizer.name == "byte" else "nats/token"

    def say(self, line: str) -> None:
        if self.rt.is_main:
            print(line, flush=True)

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, log: Optional[Metrics] = None):
        """Every rank calls this: each writes its own shards (torch.distributed.checkpoint), in the
        background with checkpoint.async_save; the save before is waited for first. `log` says when a
        checkpoint is complete: its step, path, size and the seconds from the save's start."""
        self._finish_save(log)
        t0 = time.perf_counter()
        path = self.checkpointer.save(self.step, self.model, self.optimizer, self.data.train.state_dict(),
                                      self.cfg.to_dict(), extra={"skipped_steps": self.skipped_steps}, pgm=self.rt.pgm)
        self._in_flight = (self.step, path, t0)
        if not self.checkpointer.async_save:
            self._finish_save(log)
        return path

    def _finish_save(self, log: Optional[Metrics] = None) -> None:
        """Wait for the save in flight (a collective) and say that it is complete."""
        self.checkpointer.wait(self.rt.pgm)
        if self._in_flight is None:
            return
        (step, path, t0), self._in_flight = self._in_flight, None
        if log is not None and self.rt.is_main:
            log.write(f"step {step}: checkpoint {path} ({checkpoint_bytes(path) / 1e6:.1f} MB, "
                      f"{time.perf_counter() - t0:.1f} s)")

    def maybe_resume(self):
        ckpt = self.checkpointer.latest(self.rt.pgm)
        if ckpt is None:
            return None
        try:
            state = self.checkpointer.load(ckpt, self.model, self.optimizer, self.rt.pgm,
                                           load_optimizer=self.cfg.checkpoint.load_optimizer)
        except (RuntimeError, ValueError, KeyError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{ckpt}: does not fit this config ({str(e).splitlines()[0]}); resume with the "
                                  f"config it was written with, set checkpoint.resume=false, or use a new "
                                  f"logging.run_dir") from None
        self.data.train.load_state_dict(state["sampler"])
        self.step = state["step"]
        self.skipped_steps = state["extra"].get("skipped_steps", 0)
        self.resume_record = {"checkpoint": ckpt.name, "layout": layout_of(self.rt.pgm), "saved_layout": state["layout"]}
        return ckpt


def train(cfg: Config, launch: Optional[LaunchEnv] = None) -> dict:
    """Train the run `cfg` describes, as this process's rank of the job `launch` (default: discovered)."""
    trainer = Trainer(cfg, build_run(cfg, launch))
    try:
        result = trainer.fit()
    except KeyboardInterrupt:  # a second Ctrl-C: no goodbye barrier with ranks that may still be saving
        raise
    except BaseException:
        with contextlib.suppress(RuntimeError):  # a dead peer fails the barrier; the error to report is this one
            trainer.rt.close()
        raise
    trainer.rt.close()
    return result
