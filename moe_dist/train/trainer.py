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
from moe_dist.train.host_memory import cache_large_allocations, return_large_allocations
from moe_dist.train.metrics import Metrics, Pace
from moe_dist.model.moe import MoEStats
from moe_dist.model.moe.layer import loss_terms
from moe_dist.train.moe_metrics import MoEStepMetrics, layer_table, table_columns
from moe_dist.train.optimizer import step_unless
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
    lr: float
    loss_t: Tensor  # this rank's cross entropy, mean over the accumulated micro-batches, on the device
    # of the whole data-parallel batch, on the host; filled only where train_step(log=True)
    loss: float = math.nan
    aux_loss: float = math.nan
    grad_norm: float = math.nan
    drop_frac: float = 0.0  # fraction of expert assignments dropped by capacity
    skipped: bool = False  # this step's gradient was not finite: no update
    skipped_total: int = 0  # such steps in the run so far
    extra: dict = field(default_factory=dict)
    router: Optional[MoEStepMetrics] = None  # per-layer MoE figures; .record() at log steps


class Trainer:
    def __init__(self, cfg: Config, run: Optional[Run] = None):
        self.run = run or build_run(cfg)
        self.cfg = cfg = self.run.cfg  # resolved
        self.rt, self.model, self.optimizer = self.run.runtime, self.run.model, self.run.optimizer
        self.data, self.checkpointer, self.engine = self.run.data, self.run.checkpointer, self.run.engine
        t = cfg.train
        if self.rt.device.type == "cpu":
            cache_large_allocations() if t.cpu_malloc_cache else return_large_allocations()
        self.step = 0  # optimizer steps taken (skipped non-finite steps count too)
        self.resume_record: Optional[dict] = None  # the `resumed` line of metrics.jsonl, written once by fit()
        self._in_flight: Optional[tuple] = None  # (step, path, start time) of the save being written
        # non-finite steps, counted on the device and read on log steps: [skipped in all, in a row now,
        # longest run since the last read]
        self._nonfinite = torch.zeros(3, dtype=torch.long, device=self.rt.device)
        self.tokens_per_step = t.micro_batch_size * cfg.data.seq_len * t.grad_accum_steps * self.rt.dp_world
        self.resumed_from = self.maybe_resume() if cfg.checkpoint.resume else None

    @property
    def skipped_steps(self) -> int:
        return int(self._nonfinite[0])

    @skipped_steps.setter
    def skipped_steps(self, n: int) -> None:
        self._nonfinite[0] = n

    # -- one optimizer step --------------------------------------------------------------------
    def train_step(self, log: bool = True) -> StepResult:
        """One optimizer step. Nothing reaches the host unless `log`: then the loss, aux loss and MoE
        figures of the whole dp batch come back in one all-reduce and one copy, and a run of
        train.max_nonfinite_steps non-finite steps raises TrainingError."""
        cfg, model, opt = self.cfg, self.model, self.optimizer
        accum = cfg.train.grad_accum_steps
        lr = lr_at(self.step, cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_steps, cfg.train.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        self.rt.reset_comm_stats()  # validation forwards count too; start the step at zero
        moe = MoEStats()  # the step's MoE figures, summed over its micro-batches on the device
        sums = torch.zeros(2, device=self.rt.device)  # cross entropy, aux loss
        pipe = self.run.pipeline
        if pipe is not None:  # the schedule runs every micro-batch's forward and backward over the stages
            batch = [self.data.train.next_batch() for _ in range(accum)]
            inputs, targets = (torch.cat(parts).to(self.rt.device, non_blocking=True) for parts in zip(*batch))
            with self.rt.loss_context():
                with self.rt.autocast():
                    sums += torch.stack(pipe.step(inputs, targets, moe))  # this rank's stages' shares
            if self.engine is not None:
                self._deepspeed_pipeline_step(sums)
        else:
            for micro in range(accum):
                inputs, targets = (t.to(self.rt.device, non_blocking=True) for t in self.data.train.next_batch())
                with self.rt.loss_context():
                    with self.rt.autocast():
                        logits = (self.engine or model)(inputs, moe=moe)
                        ce, aux = self.rt.loss(logits, targets), moe.pop_aux_loss().to(self.rt.device)
                    if self.engine is not None:
                        self._deepspeed_micro_step(ce + aux)
                    else:
                        if micro == accum - 1:
                            self.rt.reduce_gradients_in_backward()
                        ((ce + aux) / accum).backward()
                sums += torch.stack([ce.detach(), aux.detach()]).float()
        sums /= accum
        local, table, columns = self._moe_tables(moe)  # [L, E + K] (moe_metrics)
        loads = None
        if cfg.moe.expert_bias and local is not None:  # the whole dp batch's loads: on the device, every step
            loads = list(self.rt.reduce_sum(local[:, :cfg.moe.n_experts]).unbind(0))
        result = StepResult(lr, sums[0])
        if self.engine is not None:
            return self._deepspeed_step(result, loads, sums, table, columns, log)
        self.rt.reduce_gradients(model)  # waits for the data-parallel reductions launched during backward
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = self.rt.clip_grad_norm(model, clip)
        # the reduced gradient is the same on every rank: all skip a non-finite step together
        finite = torch.isfinite(grad_norm.detach())
        step_unless(opt, ~finite)
        opt.zero_grad(set_to_none=True)
        if loads is not None:
            model.update_expert_bias(loads, apply=finite)
        n = self._nonfinite
        run = torch.where(finite, 0, n[1] + 1)
        n.copy_(torch.stack([n[0] + (~finite).long(), run, torch.maximum(n[2], run)]))
        self.step += 1
        if log:
            self._host_figures(result, sums, table, columns, grad_norm)
        return result

    def _moe_tables(self, moe: MoEStats) -> tuple[Optional[Tensor], Optional[Tensor], list[str]]:
        """(this rank's MoE layers' table, in model.moe_layers() order; the whole model's table, where a
        pipeline stage's rank fills its layers' rows and the other rows are 0 until summed over stages; columns)."""
        moe_layers = self.cfg.model.moe_layers()
        if not moe_layers:
            return None, None, []
        if self.run.pipeline is None:
            table, columns = layer_table(moe.layers())
            return table, table, columns
        mine = [(moe_layers.index(i), block.ffn) for i, block in self.model.blocks() if i in moe_layers]
        terms = loss_terms(self.cfg.moe)
        if mine:
            local, columns = layer_table([moe.of(layer) for _, layer in mine], terms)
        else:
            columns = table_columns(terms)
            local = torch.zeros(0, self.cfg.moe.n_experts + len(columns), device=self.rt.device)
        rows = torch.tensor([r for r, _ in mine], dtype=torch.long, device=local.device)
        table = local.new_zeros(len(moe_layers), local.shape[1]).index_copy(0, rows, local)
        return local, table, columns

    def _host_figures(self, result: StepResult, sums: Tensor, table: Optional[Tensor], columns: list[str],
                      grad_norm: Optional[Tensor]) -> None:
        """The one all-reduce and one device-to-host copy of a log step: loss, aux loss, grad norm, the
        non-finite counters and the MoE table of the whole dp batch."""
        cfg = self.cfg
        accum = cfg.train.grad_accum_steps
        head = torch.cat([sums.double(), table.double().flatten() if table is not None else sums.new_zeros(0).double()])
        local = torch.cat([grad_norm.detach().double().view(1) if grad_norm is not None else head.new_zeros(1),
                           self._nonfinite.double()])
        packed = torch.cat([self.rt.reduce_sum(self.rt.reduce_stages(head)), local]).cpu()
        n = self._nonfinite
        n[2] = n[1]  # the longest run starts again from the current one
        result.loss, result.aux_loss = (float(v) / self.rt.dp_world for v in packed[:2])
        body = packed[2:-4]
        result.grad_norm = float(packed[-4])
        skipped_total, _, longest = (int(v) for v in packed[-3:])
        result.skipped_total = skipped_total
        result.skipped = not math.isfinite(result.grad_norm) if grad_norm is not None else False
        if table is not None:
            result.router = MoEStepMetrics(body.view(table.shape), columns, cfg.moe.n_experts,
                                           accum * self.rt.dp_world, cfg.model.moe_layers())
            result.drop_frac = result.router.drop_frac()
            result.extra.update(result.router.scalars())  # per-term losses, router entropy, max_load_ratio
        result.extra.update(self.rt.comm_stats())
        if longest >= cfg.train.max_nonfinite_steps:
            raise TrainingError(f"the gradient was non-finite for {longest} steps in a row (train.max_nonfinite_steps="
                                f"{cfg.train.max_nonfinite_steps}), last loss {result.loss}, grad norm {result.grad_norm}, "
                                f"by step {self.step} ({skipped_total} skipped in all); lower train.lr, raise "
                                "train.warmup_steps or set train.grad_clip")

    def _deepspeed_micro_step(self, loss: Tensor) -> None:
        """ZeRO: DeepSpeed scales by 1/grad_accum_steps, reduces (dense over dp, experts over edp),
        clips and steps at the accumulation boundary; it wants backward + step per micro-batch."""
        if not math.isfinite(float(self.rt.reduce_mean(loss.detach()))):
            # DeepSpeed folds gradients into its partitions as they arrive, with no clean way to
            # drop one micro-batch; stop rather than apply a non-finite update.
            self._deepspeed_nonfinite()
        self.engine.backward(loss)
        self.engine.step()

    def _deepspeed_pipeline_step(self, sums: Tensor) -> None:
        """ZeRO-1 under pp, as DeepSpeed's PipelineEngine runs it: the schedule has run every micro-batch's
        backward (p.grad holds the step's gradient; the loss came divided by the micro-batches), then DeepSpeed
        reduces it (dense over dp, experts over edp), clips by the norm over every stage (_MPU) and steps.
        DeepSpeed's gradient_accumulation_steps is 1 here (deepspeed_config): every step is a boundary."""
        if not math.isfinite(float(self.rt.reduce_mean(self.rt.reduce_stages(sums).sum()))):
            self._deepspeed_nonfinite()
        self.engine.allreduce_gradients()
        self.engine.step()

    def _deepspeed_nonfinite(self) -> None:
        raise TrainingError(f"non-finite loss at step {self.step} under DeepSpeed ZeRO (train.zero_stage="
                            f"{self.cfg.train.zero_stage}); lower train.lr or raise train.warmup_steps, or use "
                            "zero_stage=0, where non-finite steps are skipped")

    def _deepspeed_step(self, result: StepResult, loads, sums: Tensor, table, columns, log: bool) -> StepResult:
        if loads is not None:
            self.model.update_expert_bias(loads)  # loads of the whole dp batch
        self.step += 1
        if log:
            self._host_figures(result, sums, table, columns, None)
            result.grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        return result

    # -- validation -----------------------------------------------------------------------------
    def evaluate(self, n_batches: Optional[int] = None) -> float:
        """Mean validation cross entropy (nats/token) over fixed batches."""
        batches = self.data.eval_batches(n_batches or self.cfg.train.eval_batches)
        pipe, rt = self.run.pipeline, self.rt
        if pipe is None:
            return evaluate(self.model, batches, rt)
        self.model.eval()
        with rt.loss_context(), rt.autocast():
            loss = pipe.evaluate(batches, rt.loss)  # on the last stage's ranks; 0 on the others
        self.model.train()
        return float(rt.reduce_mean(rt.reduce_stages(loss)))

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
        history, pace = [], Pace(self.step)  # history: each step's loss, on the device until the end
        skipped_logged = self.skipped_steps
        stop = StopRequest().install() if threading.current_thread() is threading.main_thread() else StopRequest()
        watch = CollectiveWatch(self.rt.pgm).install()
        stopped = None
        try:
            while self.step < end:
                t0 = time.perf_counter()
                logging = (self.step + 1) % t.log_every == 0 or self.step + 1 == end
                try:
                    r = self.train_step(log=logging)
                except RuntimeError as e:
                    failed = watch.culprit(e)
                    if failed is None:
                        raise
                    raise TrainingError(f"step {self.step + 1}: {failed} failed or timed out "
                                        f"(parallel.timeout_s={cfg.parallel.timeout_s:g}): {str(e).splitlines()[0]}; "
                                        f"a rank died or hung; the job restarts from the latest checkpoint under "
                                        f"torchrun --max-restarts") from e
                seconds = time.perf_counter() - t0
                pace.add(seconds, self.tokens_per_step)
                history.append(r.loss_t)
                if not logging:  # the figures stay on the device; the bar just moves
                    log.progress(self.step, None, final=self.step == end)
                else:
                    tok_s, eta_s = pace.lap(self.step, end)
                    log.progress(self.step, {"loss": r.loss, "aux": r.aux_loss, "drop%": 100 * r.drop_frac,
                                             "tok/s": tok_s}, final=self.step == end)
                    if r.skipped_total > skipped_logged:
                        log.write(f"step {self.step}: {r.skipped_total - skipped_logged} step(s) since the last record "
                                  f"had a non-finite gradient and were skipped (last grad norm {r.grad_norm})")
                        skipped_logged = r.skipped_total
                    values = {"loss": r.loss, "aux_loss": r.aux_loss, "lr": r.lr, "grad_norm": r.grad_norm,
                              "drop_frac": r.drop_frac, "tokens_per_s": tok_s, "skipped": int(r.skipped),
                              "skipped_total": r.skipped_total, **r.extra, **(r.router.record() if r.router else {})}
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
        history = self._mean_over_dp(history)
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

    def _mean_over_dp(self, losses: list[Tensor]) -> list[float]:
        """The steps' losses of the whole dp batch: one all-reduce and one copy for the run."""
        if not losses:
            return []
        return (self.rt.reduce_sum(self.rt.reduce_stages(torch.stack(losses).double())) / self.rt.dp_world).tolist()

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
