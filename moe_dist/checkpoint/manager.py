"""Checkpoints: sharded (torch.distributed.checkpoint), verified, written atomically, keep-last-N.

    run_dir/checkpoints/step_00000100/   .metadata  __*_*.distcp      DCP: every rank writes its own shards
                                         rank_00000.pt ...            per rank: RNG, sampler, step, extras
                                         meta.json  config.yaml       layout (world, dp, tp, ep) and config
                                         manifest.json                sizes + sha256 of all files; written last
    run_dir/checkpoints/latest           "step_00000100"

Protocol: rank 0 makes a temporary directory; every rank `dcp.save`s its shards and its rank file
into it; after a barrier every rank checksums a share of the files, and rank 0 writes the manifest
(the completion marker), renames the directory into place, replaces `latest` and deletes
checkpoints beyond keep_last. A crash at any moment leaves the previous checkpoint usable. On load
the manifest is checked (sizes, and checksums again shared by the ranks); a truncated or corrupt
checkpoint is reported with a warning and the one before it is used.

Layouts: expert and tp shards are saved as DTensor slices of the one-device tensors
(moe_dist.checkpoint.state), so a checkpoint loads at any (dp, tp, ep) or in one process. The
sampler position is global (every dp rank holds the same state), so it carries over. RNG states are
per rank and restored only when the layout is the same; after a change of layout the ranks keep
the RNG they were seeded with (a warning says so). Optimizer state is saved per parameter, beside its
parameter, for AdamW and ZeRO alike (DeepSpeed ZeRO 1/2 or the torch ZeRO-1 fallback, whose partitions
are regathered with checkpoint.zero_state=gathered: each rank then holds its parameters' full moments on
its device while saving), so it too loads at any layout, and across optimizers. ZeRO state saved per
rank (checkpoint.zero_state=per_rank, no extra memory) resumes only at the same layout, where
checkpoint.load_optimizer=false resumes everything else at another layout with a fresh optimizer. A
single-process `Checkpointer` needs no process group; the `moe-dist eval/generate/export` commands read
the consolidated model from any checkpoint (load_model_state).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read; the message names the path and the fix."""


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": np.array(n["key"], dtype=np.uint32), "pos": n["pos"]}})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


MANIFEST, META = "manifest.json", "meta.json"


def _layout(pgm) -> dict:
    if pgm is None or not pgm.distributed:
        return {"world_size": 1, "dp": 1, "tp": 1, "ep": 1}
    return {"world_size": pgm.world_size, "dp": pgm.dp, "tp": pgm.tp, "ep": pgm.ep}


def _distributed(pgm) -> bool:
    return pgm is not None and pgm.distributed


def _barrier(pgm) -> None:
    if _distributed(pgm):
        torch.distributed.barrier()


@contextlib.contextmanager
def _dcp_call():
    """Around dcp.save/load: re-raise a rank's own error (OSError, ValueError for a shape mismatch, ...)
    instead of DCP's CheckpointException (a BaseException), and silence DCP's warning that it assumes
    one process when torch.distributed is not initialised (that is our intent)."""
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            yield
        except CheckpointException as e:
            exc = next(iter(e.failures.values()))[0]
            raise exc from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(ckpt: Path) -> list[str]:
    return [str(f.relative_to(ckpt)) for f in sorted(ckpt.rglob("*")) if f.is_file() and f.name != MANIFEST]


def _checksums(ckpt: Path, rels: list[str], pgm=None) -> dict[str, str]:
    """sha256 of each file, the reading spread over the ranks (file i on rank i % world), so checking
    a checkpoint is as parallel as writing it was; every rank gets all of them."""
    world, rank = (pgm.world_size, pgm.rank) if _distributed(pgm) else (1, 0)
    mine = {rel: _sha256(ckpt / rel) for i, rel in enumerate(rels) if i % world == rank}
    if world == 1:
        return mine
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    return {rel: digest for part in parts for rel, digest in part.items()}


def _from_main(pgm, fn):
    """fn() on rank 0 (the one that reads shared listings), its result on every rank."""
    if not _distributed(pgm):
        return fn()
    out = [fn() if pgm.is_main else None]
    torch.distributed.broadcast_object_list(out, src=0)
    return out[0]


def write_manifest(ckpt: Path, checksums: Optional[dict[str, str]] = None) -> None:
    """manifest.json: size and sha256 of every file (those in `checksums` already hashed)."""
    checksums = checksums or {}
    files = {rel: {"size": (ckpt / rel).stat().st_size, "sha256": checksums.get(rel) or _sha256(ckpt / rel)}
             for rel in _files(ckpt)}
    tmp = ckpt / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, ckpt / MANIFEST)


def _check_listing(ckpt: Path) -> tuple[Optional[str], Optional[dict]]:
    """(why `ckpt` cannot be used, None) from its manifest, file list and sizes; else (None, the
    manifest's files to checksum)."""
    if not ckpt.is_dir():
        return "missing", None
    if not (ckpt / MANIFEST).is_file():
        return f"no {MANIFEST} (the save did not finish)", None
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable {MANIFEST} ({e})", None
    for rel, info in files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing", None
        if f.stat().st_size != info["size"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {info['size']} (truncated?)", None
    return None, files


def verify(ckpt: Path, pgm=None) -> Optional[str]:
    """Why `ckpt` cannot be used (missing manifest, missing/truncated/corrupt file), or None if it is
    complete. With a process group every rank calls it: rank 0 reads the listing, all checksum."""
    reason, files = _from_main(pgm, lambda: _check_listing(ckpt))
    if reason is not None:
        return reason
    sums = _checksums(ckpt, sorted(files), pgm)
    for rel in sorted(files):
        if sums[rel] != files[rel]["sha256"]:
            return f"{rel} does not match its checksum (corrupt)"
    return None


def _load_rank_file(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        # DeepSpeed's ZeRO optimizer state holds its own classes (e.g. LossScaler); the file is one this
        # run wrote and the manifest's checksum matched, so unpickle it in full
        return torch.load(path, weights_only=False)


class Checkpointer:
    """Writes and finds a run's checkpoints. Pass the job's ProcessGroupManager (`pgm`) in a
    multi-process job: every rank then calls save/latest/load (they are collectives)."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3, zero_state: str = "gathered"):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.zero_state = zero_state  # ZeRO: "gathered" per parameter, or "per_rank" partitions

    # -- writing ------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module | dict, optimizer: Optional[torch.optim.Optimizer],
             sampler_state: Optional[dict], config: dict, extra: Optional[dict] = None, pgm=None) -> Path:
        import torch.distributed.checkpoint as dcp

        from .state import MODEL_PREFIX, dcp_optimizer_supported, sharded_state, zero_optimizer

        main, rank = (pgm is None or pgm.is_main), (pgm.rank if _distributed(pgm) else 0)
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{final.name}"  # the same name on every rank, no broadcast needed
        if main:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier(pgm)
        try:
            dcp_optimizer = optimizer if dcp_optimizer_supported(optimizer) else None
            if dcp_optimizer is not None and zero_optimizer(optimizer) and self.zero_state == "per_rank":
                dcp_optimizer = None
            if isinstance(model, torch.nn.Module):
                state = sharded_state(model, dcp_optimizer, pgm)
            else:  # a one-device model state dict
                state = {MODEL_PREFIX + k: v for k, v in model.items()}
            with _dcp_call():
                dcp.save(state, checkpoint_id=tmp, no_dist=not _distributed(pgm))
            rank_state = {"step": step, "sampler": sampler_state, "rng": rng_state(), "extra": extra or {},
                          "optimizer": None}  # hyperparameters come from the config, not from here
            if optimizer is not None and dcp_optimizer is None:  # ZeRO partitions per rank: same layout only
                rank_state["optimizer"] = optimizer.state_dict()  # this rank's ZeRO partition
            torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
            _barrier(pgm)
            checksums = _checksums(tmp, _from_main(pgm, lambda: _files(tmp)), pgm)  # every rank reads a share
            if main:
                (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
                (tmp / META).write_text(json.dumps({"format": "dcp", "step": step, "layout": _layout(pgm)}))
                _fsync_dir(tmp)
                write_manifest(tmp, checksums)  # last: its presence means the checkpoint is complete
                if final.exists():  # re-saving a step (e.g. the end step equals a periodic one)
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self._write_latest(final.name)
                self._prune()
        finally:
            if main and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _barrier(pgm)
        return final

    def _write_latest(self, name: str) -> None:
        tmp = self.dir / f".{LATEST}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(name + "\n")
        os.replace(tmp, self.dir / LATEST)

    def _prune(self) -> None:
        steps = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        for old in steps[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".tmp-*"):  # left by a crash of an earlier run
            shutil.rmtree(stale, ignore_errors=True)

    # -- reading ------------------------------------------------------------------------------
    def _candidates(self, pointer: Path) -> Optional[tuple[str, list[Path]]]:
        """(the step `latest` names, [it, then the older checkpoints, newest first]); None without a pointer."""
        if not pointer.is_file():
            return None
        named = self.dir / pointer.read_text().strip()
        older = sorted((p for p in self.dir.glob("step_*") if p.is_dir() and p.name < named.name), reverse=True)
        return named.name, [named, *older]

    def saved_config(self) -> Optional[tuple[dict, dict]]:
        """(resolved config, meta: step and layout) of the checkpoint a resume would start from, read
        from disk without verifying it (that is `latest`'s job); None for a fresh run."""
        found = self._candidates(self.dir / LATEST)
        for path in found[1] if found else []:
            if (path / "config.yaml").is_file() and (path / META).is_file():
                return load_config_dict(path), json.loads((path / META).read_text())
        return None

    def latest(self, pgm=None) -> Optional[Path]:
        """The newest usable checkpoint: the one `latest` names if it verifies, else (with a warning)
        the newest older one that does. None when there is no `latest` pointer (a fresh run).
        In a multi-process job every rank calls it: rank 0 reads the directory, all share the checksums."""
        pointer = self.dir / LATEST
        found = _from_main(pgm, lambda: self._candidates(pointer))
        if found is None:
            return None
        named, candidates = found
        for path in candidates:
            reason = verify(path, pgm)
            if reason is None:
                return path
            if pgm is None or pgm.is_main:
                warnings.warn(f"checkpoint {path}: {reason}; falling back to the previous checkpoint", stacklevel=2)
        raise CheckpointError(f"{pointer} points at {named}, which is missing or incomplete, and no earlier "
                              f"checkpoint is complete; fix the pointer to an existing step_* directory or delete "
                              f"{self.dir}")

    def load(self, ckpt: Path, model: torch.nn.Module, optimizer, pgm=None, load_optimizer: bool = True) -> dict:
        """Load `ckpt` into this rank's model and optimizer at the current layout. Returns the train
        state: {"step", "sampler", "extra", "rng_restored"} (RNG restored only at the same layout).
        load_optimizer=False leaves the optimizer's state fresh (its master weights follow the model)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        from .state import (OPTIM_PREFIX, apply_sharded_state, dcp_optimizer_supported, load_local_optimizer_state,
                            sharded_state)

        meta = json.loads((ckpt / META).read_text())
        same_layout = meta["layout"] == _layout(pgm)
        rank = pgm.rank if _distributed(pgm) else 0
        rank_state = _load_rank_file(ckpt / f"rank_{rank if same_layout else 0:05d}.pt")
        per_rank = rank_state["optimizer"] is not None
        fresh_optimizer = optimizer if not load_optimizer else None
        if not load_optimizer:
            optimizer = None
        if optimizer is not None and per_rank and not same_layout:
            raise CheckpointError(f"{ckpt}: its optimizer state was saved per rank (ZeRO) at layout {meta['layout']} "
                                  f"and cannot be split for layout {_layout(pgm)}; resume at that layout, or set "
                                  f"checkpoint.load_optimizer=false to resume the weights, step and data position "
                                  f"with a fresh optimizer")
        dcp_optimizer = optimizer if not per_rank and dcp_optimizer_supported(optimizer) else None
        saved = FileSystemReader(ckpt).read_metadata().state_dict_metadata
        # optimizer keys the checkpoint lacks (a bf16 master copy AdamW never had) are left as they are
        state = {k: v for k, v in sharded_state(model, dcp_optimizer, pgm).items()
                 if k in saved or not k.startswith(OPTIM_PREFIX)}
        with _dcp_call():
            dcp.load(state, checkpoint_id=ckpt, no_dist=not _distributed(pgm))
        apply_sharded_state(model, dcp_optimizer, state)
        if fresh_optimizer is not None:
            if hasattr(fresh_optimizer, "refresh_fp32_params"):  # DeepSpeed ZeRO: fp32 master copy <- loaded weights
                fresh_optimizer.refresh_fp32_params()
            if pgm is None or pgm.is_main:
                warnings.warn(f"{ckpt}: optimizer state not loaded (checkpoint.load_optimizer=false); "
                              f"its moments start from zero at step {rank_state['step']}", stacklevel=2)
        if optimizer is not None and per_rank:
            load_local_optimizer_state(optimizer, rank_state["optimizer"], _layout(pgm)["world_size"])
        if same_layout:
            set_rng_state(rank_state["rng"])
        elif pgm is None or pgm.is_main:
            warnings.warn(f"{ckpt} was saved at layout {meta['layout']} and is loaded at {_layout(pgm)}: model, "
                          f"optimizer and data position carry over; per-rank RNG states are not restored", stacklevel=2)
        return {"step": rank_state["step"], "sampler": rank_state["sampler"], "extra": rank_state["extra"],
                "rng_restored": same_layout}


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a run dir (its latest), a checkpoints dir, or a step_* dir."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    for candidate in (p, p / "checkpoints"):
        if (candidate / LATEST).is_file():
            return Checkpointer(candidate.parent if candidate.name == "checkpoints" else candidate).latest()
    raise CheckpointError(f"{path}: no checkpoint found (expected {p}/checkpoints/{LATEST}); "
                          f"train first with `moe-dist train`, or pass the run's logging.run_dir")


def checkpoint_bytes(ckpt: Path) -> int:
    """Bytes on disk of a checkpoint: its manifest's sizes (plus the manifest), else its files."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        return sum(f["size"] for f in files.values()) + (ckpt / MANIFEST).stat().st_size
    except (OSError, ValueError, KeyError):
        return sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())


def list_checkpoints(run_dir: str | os.PathLike) -> list[dict]:
    """The run's checkpoints, oldest first: {"path", "step", "bytes", "problem" (None when the listing and
    sizes match the manifest; checksums are not read), "layout", "latest"}."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    pointer = ckpt_dir / LATEST
    latest = pointer.read_text().strip() if pointer.is_file() else None
    out = []
    for path in sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir()):
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            meta = {}
        out.append({"path": path, "step": meta.get("step", int(path.name.split("_")[1]) if path.name[5:].isdigit() else None),
                    "bytes": checkpoint_bytes(path), "problem": _check_listing(path)[0], "layout": meta.get("layout"),
                    "latest": path.name == latest})
    return out


def load_config_dict(ckpt: Path) -> dict:
    return yaml.safe_load((ckpt / "config.yaml").read_text())


def load_model_state(ckpt: Path, map_location: Any = "cpu") -> dict:
    """The consolidated one-device model state dict of any checkpoint, read in this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .state import GATE_UP, MODEL_PREFIX

    saved = FileSystemReader(ckpt).read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in saved.items()
             if k.startswith(MODEL_PREFIX) and isinstance(m, TensorStorageMetadata)}
    with _dcp_call():
        dcp.load(state, checkpoint_id=ckpt, no_dist=True)  # DCP assembles the full tensors from every rank's shards
    # the experts' gate/up weight is saved as [E, 2, F, H] (moe_dist.checkpoint.state): the model's [E, 2F, H]
    return {k[len(MODEL_PREFIX):]: (v.flatten(1, 2) if k.endswith(GATE_UP) and v.dim() == 4 else v).to(map_location)
            for k, v in state.items()}


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
