"""Where training numbers go: a JSONL log, TensorBoard scalars and histograms, and the console: a tqdm
progress bar, or (logging.progress_bar=false, as in a batch job's log) one line per record."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm


class Metrics:
    """Writes `run_dir/metrics.jsonl` (one JSON object per record) and TensorBoard scalars: per MoE
    layer (lists as moe_metrics records them) under `{kind}/{key}/layer_{block}`, and each layer's
    expert load as a histogram over the expert ids, `{kind}/expert_load/layer_{block}`.

    Only the main process (rank 0) writes; other ranks get a Metrics with enabled=False.
    """

    def __init__(self, run_dir: str, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 progress_bar: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        self._bar: Optional[tqdm] = None
        self.progress_bar = progress_bar and enabled  # the bar, else console lines (train_line)
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # a fresh run starts a new log; a resumed one continues it from its checkpoint's step, so the
        # steps a restart replays are logged once
        path = self.run_dir / "metrics.jsonl"
        if start_step:
            keep_through(path, start_step)
        self._jsonl = open(path, "a" if start_step else "w", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
            except ImportError:  # tensorboard is an install requirement, but do not die for logging
                print("moe-dist: tensorboard is not installed; logging to metrics.jsonl only", file=sys.stderr)
        if progress_bar:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                             file=sys.stderr, leave=True)

    def log(self, step: int, kind: str, values: dict) -> None:
        """One record: kind is "train", "val", "resumed" or "event"; values are numbers (or short strings,
        or for "resumed" the layouts)."""
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tensorboard(step, kind, values)

    def _tensorboard(self, step: int, kind: str, values: dict) -> None:
        layers = values.get("moe_layers") or []
        for k, v in values.items():
            if _finite(v):
                self._tb.add_scalar(f"{kind}/{k}", v, step)
            elif k == "expert_load":
                for block, shares in zip(layers, v):  # x: expert id, height: its share of the assignments
                    ids = range(len(shares))
                    self._tb.add_histogram_raw(
                        f"{kind}/expert_load/layer_{block}", min=0, max=len(shares) - 1, num=sum(shares),
                        sum=sum(i * x for i, x in zip(ids, shares)), sum_squares=sum(i * i * x for i, x in zip(ids, shares)),
                        bucket_limits=[i + 0.5 for i in ids], bucket_counts=shares, global_step=step)
            elif k.startswith("layer_") and isinstance(v, list) and len(v) == len(layers):
                for block, x in zip(layers, v):
                    if _finite(x):
                        self._tb.add_scalar(f"{kind}/{k}/layer_{block}", x, step)

    def progress(self, step: int, postfix: Optional[dict], final: bool = False) -> None:
        """Move the bar (postfix None: keep the figures shown); at the run's last step close it, so its
        final state is printed once."""
        if self._bar is not None:
            self._bar.n = step
            if postfix is not None:
                self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
            if final:  # close() draws it, with a newline; a refresh first would draw it twice in a log file
                self._bar.close()
                self._bar = None
            else:
                self._bar.refresh()

    def train_line(self, step: int, total: int, values: dict, eta_s: float) -> None:
        """Without the bar: one console line per record (the bar shows the same figures)."""
        if self.enabled and not self.progress_bar:
            self.write(train_line(step, total, values, eta_s))

    def write(self, line: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def keep_through(path: Path, step: int) -> None:
    """Drop the records of `path` after `step` (and a line cut short by a crash), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class Pace:
    """Tokens/s and the time left, averaged over the steps since the last `lap` (the last log line):
    tokens/s over the steps' own time, the ETA over the wall clock (evaluation and checkpoints included)."""

    def __init__(self, step: int):
        self.step, self.wall, self.busy, self.tokens = step, time.perf_counter(), 0.0, 0

    def add(self, seconds: float, tokens: int) -> None:
        self.busy, self.tokens = self.busy + seconds, self.tokens + tokens

    def lap(self, step: int, end: int) -> tuple[float, float]:
        """(tokens/s, seconds to `end`) since the last lap; starts the next one."""
        now = time.perf_counter()
        tok_s = self.tokens / self.busy if self.busy > 0 else 0.0
        per_step = (now - self.wall) / max(step - self.step, 1)
        self.step, self.wall, self.busy, self.tokens = step, now, 0.0, 0
        return tok_s, per_step * max(end - step, 0)


def train_line(step: int, total: int, values: dict, eta_s: float) -> str:
    """`step 20/200 | loss 2.3456 | aux 0.0123 | lr 3.00e-03 | 4,321 tok/s | ETA 1m05s`"""
    return (f"step {step}/{total} | loss {values['loss']:.4f} | aux {values['aux_loss']:.4f} | lr {values['lr']:.2e} | "
            f"{values['tokens_per_s']:,.0f} tok/s | ETA {duration(eta_s)}")


def duration(seconds: float) -> str:
    """3725 -> '1h02m', 65 -> '1m05s', 7 -> '7s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return v


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)
