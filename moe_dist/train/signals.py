"""Preemption and Ctrl-C: SIGTERM, SIGUSR1 and SIGINT ask the trainer to checkpoint at the next step
boundary and exit; a SIGINT after that (a second Ctrl-C) aborts at once.

A signal handler only sets a flag; the save happens in the training loop where every rank is
at the same step, so the collective save cannot deadlock half-way through a step.
"""
from __future__ import annotations

import signal
from typing import Optional


class StopRequest:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now, the checkpoint being written is abandoned
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""
