"""Learning-rate schedule: linear warmup, then cosine decay to min_lr. A pure function of the step."""
from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Steps 0..warmup-1 rise linearly to lr ((step+1)/warmup, so step 0 is not wasted at 0);
    then cosine from lr at step `warmup` down to min_lr at step `total_steps` (and after).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0 or step >= total_steps:
        return min_lr if step >= total_steps else lr
    progress = (step - warmup_steps) / decay_steps  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
