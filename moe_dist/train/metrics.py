"""Where training numbers go: a JSONL log, TensorBoard scalars and a tqdm progress bar."""
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
    """Writes `run_dir/metrics.jsonl` (one JSON object per record) and TensorBoard scalars.

    Only the main process (rank 0) writes; other ranks get a Metrics with enabled=False.
    """

    def __init__(self, run_dir: str, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 progress_bar: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        self._bar: Optional[tqdm] = None
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
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def progress(self, step: int, postfix: dict) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
            self._bar.refresh()

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
