"""Which collective failed: names the group of a collective that timed out or lost a peer.

Gloo and NCCL raise after the process group's timeout (parallel.timeout_s) with a message that
names neither the step nor the group ("Timed out waiting 600000ms for recv operation"). While a
`CollectiveWatch` is installed, moe_dist's collectives (called as `dist.all_reduce(...)` etc.) go
through thin wrappers that remember the call and group that raised, so the trainer can say
"step 12: all_to_all_single on the ep group (ranks 0-3) failed". An NCCL watchdog abort that kills
the process outright is not seen here; its own log names the collective.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all_single", "reduce_scatter_tensor",
               "broadcast", "barrier")
FUNCTIONAL = ("all_to_all_single", "all_to_all_single_autograd")  # torch's functional collectives the dispatcher uses


class CollectiveWatch:
    def __init__(self, pgm):
        self.pgm = pgm
        self.failed: Optional[str] = None  # "all_to_all_single on the ep group (ranks [0, 1])"
        self.launched: Optional[str] = None  # the last functional (async) collective started
        self._originals: dict = {}
        self._functional: dict = {}

    def culprit(self, error: RuntimeError) -> Optional[str]:
        """The collective that raised; or, for an error from the process group itself, the last functional
        collective started: those fail where their result is first read, outside any wrapper."""
        if self.failed is not None:
            return self.failed
        text = str(error)
        if self.launched is not None and any(w in text for w in ("gloo", "NCCL", "Timed out", "timed out")):
            return self.launched
        return None

    def group_name(self, group) -> str:
        """e.g. "ep group (ranks [0, 1])", or "ep/dp group ..." where one group plays both roles."""
        group = dist.group.WORLD if group is None else group
        roles = [n for n in ("ep", "edp", "tp", "dp") if getattr(self.pgm, f"{n}_group", None) is group]
        name = "/".join(roles) or ("world" if group is dist.group.WORLD else "unnamed")
        return f"{name} group (ranks {dist.get_process_group_ranks(group)})"

    def _wrap(self, name: str, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except RuntimeError:
                if self.failed is None:
                    self.failed = f"{name} on the {self.group_name(kwargs.get('group'))}"
                raise
        return call

    def _note(self, name: str, fn):
        @functools.wraps(fn)
        def call(x, out_splits, in_splits, group, *args, **kwargs):
            self.launched = f"{name} on the {self.group_name(group)}"
            return fn(x, out_splits, in_splits, group, *args, **kwargs)
        return call

    def install(self) -> "CollectiveWatch":
        if self.pgm is not None and self.pgm.distributed and not self._originals:
            for name in COLLECTIVES:
                self._originals[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._originals[name]))
            for name in FUNCTIONAL:
                self._functional[name] = getattr(funcol, name)
                setattr(funcol, name, self._note("all_to_all_single", self._functional[name]))
        return self

    def uninstall(self) -> None:
        for name, fn in self._originals.items():
            setattr(dist, name, fn)
        for name, fn in self._functional.items():
            setattr(funcol, name, fn)
        self._originals.clear()
        self._functional.clear()


def elastic_store(timeout):
    """Under torchrun (TORCHELASTIC_RESTART_COUNT set): a store prefixed by the restart attempt.

    With torch 2.13's env:// rendezvous on the agent's store, a restarted gloo group reads the
    addresses the killed attempt published and fails ("connectFullMesh ... Connection refused"), so
    --max-restarts could never recover. Keys under "moe_dist/attempt_N" keep attempts apart.
    None outside torchrun (init_process_group then uses env:// as usual)."""
    import os

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"moe_dist/attempt_{attempt}", store)
