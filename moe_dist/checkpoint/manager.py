"""Checkpoints: sharded (torch.distributed.checkpoint), written in the background, sealed, keep-last-N.

    run_dir/checkpoints/step_00000100/   .metadata  __*_*.distcp      DCP: every rank writes its own shards
                                         rank_00000.pt ...            per rank: step, sampler, RNG, extras
                                         meta.json  config.yaml       layout (world, dp, tp, ep) and config
                                         manifest.json                every file's size
                                         COMPLETE                     written last: the checkpoint is whole
                                         SHA256SUMS                   only with checkpoint.checksums=true
    run_dir/checkpoints/latest           "step_00000100"

Saving: the save before is waited for; rank 0 makes `.tmp-step_N` and writes the config and layout;
every rank writes its rank file, then `dcp.async_save` stages its shards in host memory and a
thread writes them (fsynced) while training goes on, its collectives on a gloo group of their
own. When DCP's last collective says every rank's shards are on disk, a thread on rank 0 seals
the checkpoint: manifest.json, then COMPLETE, each fsynced, the directory fsynced, renamed to
`step_N`, the parent fsynced, `latest` replaced atomically and fsynced, older checkpoints pruned.
The next save, and the end of `fit`, wait for it (`wait`, a collective that raises on every rank
if any rank's write failed). A crash at any moment leaves the previous checkpoint as it was.
checkpoint.async_save=false writes in the caller instead (no host copy of the shards).

Finding: `latest` names the checkpoint to resume from; if it is missing or incomplete, the newest
complete checkpoint is used, with a warning (`_choose`). Complete means COMPLETE present, every
file of the manifest at its size, and every byte range DCP's metadata names inside its file
(`check`: no tensor data read, so it fits a preemption window whatever the checkpoint's size).
sha256 of every byte only on request: `moe-dist ckpt verify`, against the SHA256SUMS that
checkpoint.checksums=true writes in the background after each save.

Reading runs no code from the run dir: rank files load with torch.load(weights_only=True), and
DCP's `.metadata` (a pickle) through an unpickler that admits only the classes DCP's metadata is
made of. ZeRO state saved per rank (checkpoint.zero_state=per_rank) is DeepSpeed's own
state_dict, which holds three DeepSpeed data classes (a loss scaler, fragment offsets, an enum of
the stage): they are admitted by name when DeepSpeed is in use (torch.serialization.safe_globals),
nothing else. It stays DeepSpeed's format because that is what per_rank is for: no extra memory
while saving, and DeepSpeed's exact state at the same layout (its flat, padded partitions mean
nothing at another one, so DCP's resharding would buy nothing).

Layouts: expert and tp shards are saved as DTensor slices of the one-device tensors
(moe_dist.checkpoint.state), so a checkpoint loads at any (dp, tp, ep) or in one process. The
sampler position is global (every dp rank holds the same state), so it carries over. RNG states are
per rank and restored only when the layout is the same; after a change of layout the ranks keep
the RNG they were seeded with (a warning says so). Optimizer state is saved per parameter, beside its
parameter, for AdamW and ZeRO alike (FSDP2's moments stay DTensor shards through DCP's state-dict API, no rank
holding more than its own; DeepSpeed ZeRO 1/2's partitions are regathered with
checkpoint.zero_state=gathered: each rank then holds its parameters' full moments on its device while
saving), so it too loads at any layout, and across optimizers. ZeRO state saved per
rank resumes only at the same layout, where checkpoint.load_optimizer=false resumes everything else at
another layout with a fresh optimizer. A single-process `Checkpointer` needs no process group; the
`moe-dist eval/generate/export` commands read the consolidated model from any checkpoint
(load_model_state).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
import threading
import uuid
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import yaml

LATEST, MANIFEST, META, COMPLETE, SUMS = "latest", "manifest.json", "meta.json", "COMPLETE", "SHA256SUMS"
_STEP_DIR = re.compile(r"step_\d{8,}")
# DCP warns that it assumes one process when torch.distributed is not initialised: that is our intent
# (no_dist=True), and async_save warns from its writing thread, where a catch_warnings block cannot reach
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read or written; the message names the path and the fix."""


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


def layout_of(pgm) -> dict:
    """The layout a checkpoint records and a resume compares: world size, pp, dp, tp, ep."""
    if pgm is None or not pgm.distributed:
        return {"world_size": 1, "pp": 1, "dp": 1, "tp": 1, "ep": 1}
    return {"world_size": pgm.world_size, "pp": pgm.pp, "dp": pgm.dp, "tp": pgm.tp, "ep": pgm.ep}


def _distributed(pgm) -> bool:
    return pgm is not None and pgm.distributed


def _barrier(pgm) -> None:
    if _distributed(pgm):
        torch.distributed.barrier()


def _unwrap(e: BaseException) -> BaseException:
    """A rank's own error (OSError, ValueError for a shape mismatch, ...) from DCP's CheckpointException."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


@contextlib.contextmanager
def _dcp_call():
    """Around dcp.save/load: re-raise a rank's own error instead of DCP's CheckpointException (a
    BaseException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        raise _unwrap(e) from None


def _from_main(pgm, fn):
    """fn() on rank 0 (the one that reads shared listings), its result on every rank."""
    if not _distributed(pgm):
        return fn()
    out = [fn() if pgm.is_main else None]
    torch.distributed.broadcast_object_list(out, src=0)
    return out[0]


def _all_gather(pgm, obj) -> list:
    if not _distributed(pgm):
        return [obj]
    out: list = [None] * pgm.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


# -- durable files ------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable: a node crash, not only a process crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_durable(path: Path, data: bytes) -> None:
    """Write `path` atomically: a fsynced temporary file renamed over it, then the directory fsynced."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    _write_durable(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _torch_bytes(obj) -> bytes:
    """torch.save into memory, so a full disk is an OSError of our own write, not a zip-writer error."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _free_space(path: Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown space"
    return f"{free / 2**30:.2f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"


# -- reading without running code ---------------------------------------------------------------

_DCP_METADATA_CLASSES = {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                         "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle (protocol 4, which torch's weights_only loader does not read):
    admit the classes DCP's metadata is made of and torch's dtypes, sizes and layouts, nothing else."""

    def find_class(self, module: str, name: str):
        if module == "torch.distributed.checkpoint.metadata" and name in _DCP_METADATA_CLASSES:
            from torch.distributed.checkpoint import metadata

            return getattr(metadata, name)
        if (module, name) == ("torch.distributed.checkpoint.filesystem", "_StorageInfo"):
            from torch.distributed.checkpoint.filesystem import _StorageInfo

            return _StorageInfo
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):  # a table lookup by name
            return torch.serialization._get_layout
        if module == "pathlib" and name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            import pathlib

            return getattr(pathlib, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_dcp_metadata(ckpt: Path):
    """DCP's Metadata of `ckpt` (tensor keys, shapes, dtypes, where each chunk's bytes are)."""
    with open(ckpt / ".metadata", "rb") as f:
        return _MetadataUnpickler(f).load()


@functools.cache
def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """FileSystemReader whose metadata goes through _MetadataUnpickler (its tensors already load
        with weights_only=True)."""

        def read_metadata(self, *args, **kwargs):
            metadata = read_dcp_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader


def _reader(ckpt: Path):
    return _safe_reader_class()(ckpt)


def _deepspeed_state_classes() -> list:
    """The data classes DeepSpeed's ZeRO 1/2 state_dict holds, when DeepSpeed is in use (imported)."""
    if "deepspeed" not in sys.modules:
        return []
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load_rank_file(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else str(e).splitlines()[0]
        hint = (" (DeepSpeed ZeRO state saved with checkpoint.zero_state=per_rank: it loads only into DeepSpeed at the "
                "layout that saved it; set checkpoint.load_optimizer=false to resume without it)" if "deepspeed" in what
                else "")
        raise CheckpointError(f"{path}: holds {what}, which is neither a tensor nor a plain value{hint}; moe_dist loads "
                              f"rank files with torch.load(weights_only=True) only, so no code from the run dir runs") from None
    except (OSError, RuntimeError, EOFError) as e:  # unreadable, or a zip record that fails its CRC
        raise CheckpointError(f"{path}: unreadable ({str(e).splitlines()[0]}); resume from an earlier checkpoint by "
                              f"writing its name into {path.parent.parent / LATEST}") from None


# -- what a complete checkpoint is ----------------------------------------------------------------


def _files(ckpt: Path) -> list[str]:
    """The checkpoint's files (relative), without the ones that describe the others."""
    return [str(f.relative_to(ckpt)) for f in sorted(ckpt.rglob("*"))
            if f.is_file() and f.name not in (MANIFEST, COMPLETE, SUMS)]


def _manifest_files(ckpt: Path) -> dict:
    return json.loads((ckpt / MANIFEST).read_text())["files"]


def check(ckpt: Path) -> Optional[str]:
    """Why `ckpt` is not a complete checkpoint, or None: COMPLETE present, every file of the manifest
    at its size, DCP's metadata readable and every byte range it names inside its file. Reads the
    small files only, never the shards."""
    if not ckpt.is_dir():
        return "missing"
    unfinished = f"no {COMPLETE} (the save did not finish)"
    if not (ckpt / MANIFEST).is_file():
        return unfinished
    try:
        files = _manifest_files(ckpt)
        sizes = {rel: int(info["size"]) for rel, info in files.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    # before COMPLETE existed, the manifest (then with every file's sha256) was written last
    if not (ckpt / COMPLETE).is_file() and not all("sha256" in info for info in files.values()):
        return unfinished
    for rel, size in sizes.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {size} (truncated?)"
    try:
        metadata = read_dcp_metadata(ckpt)
        for info in metadata.storage_data.values():
            if info.relative_path not in sizes:
                return f"{info.relative_path}, named by .metadata, is not in {MANIFEST}"
            if info.offset + info.length > sizes[info.relative_path]:
                return (f"{info.relative_path} has {sizes[info.relative_path]} bytes, .metadata needs "
                        f"{info.offset + info.length} (truncated?)")
    except Exception as e:  # a damaged or foreign pickle: any error of parsing it says the same
        return f".metadata unreadable ({type(e).__name__}: {e})"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recorded_sums(ckpt: Path) -> dict[str, str]:
    """{file: sha256} from SHA256SUMS (`sha256sum -c SHA256SUMS` in the checkpoint dir reads it too),
    or from a manifest of the time when every save hashed every file; {} when none were recorded."""
    if (ckpt / SUMS).is_file():
        pairs = (line.split(None, 1) for line in (ckpt / SUMS).read_text().splitlines() if line.strip())
        return {rel.strip().lstrip("*"): digest for digest, rel in pairs}
    try:
        return {rel: info["sha256"] for rel, info in _manifest_files(ckpt).items() if "sha256" in info}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_sums(ckpt: Path) -> None:
    """SHA256SUMS of every file of a complete checkpoint (checkpoint.checksums=true, after the save)."""
    lines = [f"{_sha256(ckpt / rel)}  {rel}\n" for rel in _files(ckpt)]
    _replace_durable(ckpt / SUMS, "".join(lines).encode())


def audit(ckpt: Path) -> tuple[Optional[str], int, int, bool]:
    """(why `ckpt` cannot be used or None, files read, bytes read, whether recorded sha256 sums were
    compared): `check`, then every byte of every file read and hashed (`moe-dist ckpt verify`)."""
    reason = check(ckpt)
    if reason is not None:
        return reason, 0, 0, False
    sums, n_bytes, files = recorded_sums(ckpt), 0, _files(ckpt)
    for rel in files:
        digest = _sha256(ckpt / rel)
        n_bytes += (ckpt / rel).stat().st_size
        if rel in sums and sums[rel] != digest:
            return f"{rel} does not match its recorded sha256 (corrupt)", len(files), n_bytes, True
    return None, len(files), n_bytes, bool(sums)


def verify(ckpt: Path, checksums: bool = False) -> Optional[str]:
    """Why `ckpt` cannot be used, or None: `check`, and with checksums=True every byte read and
    hashed against the recorded sha256 sums (where there are any: `recorded_sums`)."""
    return audit(ckpt)[0] if checksums else check(ckpt)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t`'s own elements in host memory; for a DTensor, of its local shard, placement kept."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t.detach().to("cpu", copy=True)
    if t.device.type != "cpu":
        return t.detach().to("cpu")  # what DCP's stager does: a DTensor whose local shard is on the host
    return DTensor.from_local(t.to_local().detach().clone(), t.device_mesh, t.placements, run_check=False,
                              shape=t.size(), stride=t.stride())


class _HostStager:
    """dcp.async_save's staging (the AsyncStager protocol), tensor by tensor: each tensor's own
    elements copied to host memory, so training may go on changing the originals. DCP's default
    stager copies whole storages instead, which for a view (DeepSpeed keeps ZeRO parameters as views
    of one flat buffer) is the whole buffer, and fails on DeepSpeed's expert views."""

    _synchronize_after_execute = False
    should_synchronize_after_execute = False

    def stage(self, state_dict: dict) -> dict:
        return {k: _host_copy(v) if torch.is_tensor(v) else v for k, v in state_dict.items()}

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Pending:
    """A save in flight: DCP's future, and on rank 0 the thread that seals the checkpoint once every
    rank's shards are written."""

    def __init__(self, final: Path, tmp: Path, future, seal: Optional[Callable[[], None]]):
        self.final, self.tmp, self.future = final, tmp, future
        self.error: Optional[BaseException] = None
        self.thread = None
        if seal is not None:
            self.thread = threading.Thread(target=self._run, args=(seal,), name="moe-dist-checkpoint", daemon=True)
            self.thread.start()

    def _run(self, seal) -> None:
        try:
            self.future.result()  # DCP's last collective: every rank's shards are on disk
            seal()
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by result()
            self.error = _unwrap(e)
            shutil.rmtree(self.tmp, ignore_errors=True)

    def result(self) -> Optional[BaseException]:
        """Block until this rank's part is done; its error, if any."""
        if self.thread is not None:
            self.thread.join()
            return self.error
        try:
            self.future.result()
        except BaseException as e:  # noqa: BLE001
            return _unwrap(e)
        return None


class Checkpointer:
    """Writes and finds a run's checkpoints. Pass the job's ProcessGroupManager (`pgm`) in a
    multi-process job: every rank then calls save/wait/latest/load (they are collectives)."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3, zero_state: str = "gathered",
                 async_save: bool = True, checksums: bool = False, timeout_s: float = 600.0):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.zero_state = zero_state  # ZeRO: "gathered" per parameter, or "per_rank" partitions
        self.async_save = async_save
        self.checksums = checksums  # SHA256SUMS after each save, in the background
        self.timeout_s = timeout_s
        self._pending: Optional[_Pending] = None
        self._group = None  # the gloo group of the background writes' collectives

    # -- writing ------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module | dict, optimizer: Optional[torch.optim.Optimizer],
             sampler_state: Optional[dict], config: dict, extra: Optional[dict] = None, pgm=None) -> Path:
        """Write checkpoint `step` (every rank calls this); returns its final path. With async_save it
        returns once the shards are staged in host memory: the checkpoint is complete when `wait`
        returns, which the next save does first."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        from .state import MODEL_PREFIX, dcp_optimizer_supported, sharded_state, zero_optimizer

        self.wait(pgm)
        main, rank = (pgm is None or pgm.is_main), (pgm.rank if _distributed(pgm) else 0)
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{final.name}"  # the same name on every rank, no broadcast needed
        error = None
        if main:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                _write_durable(tmp / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
                _write_durable(tmp / META, json.dumps({"format": "dcp", "step": step, "layout": layout_of(pgm)}).encode())
            except OSError as e:
                error = e
        self._agree(pgm, error, final, tmp)
        dcp_optimizer = optimizer if dcp_optimizer_supported(optimizer) else None
        if dcp_optimizer is not None and zero_optimizer(optimizer) and self.zero_state == "per_rank":
            dcp_optimizer = None
        if isinstance(model, torch.nn.Module):
            state = sharded_state(model, dcp_optimizer, pgm)  # ZeRO: collectives regather the moments
        else:  # a one-device model state dict
            state = {MODEL_PREFIX + k: v for k, v in model.items()}
        rank_state = {"step": step, "sampler": sampler_state, "rng": rng_state(), "extra": extra or {},
                      "optimizer": None}  # hyperparameters come from the config, not from here
        if optimizer is not None and dcp_optimizer is None:  # ZeRO partitions per rank: same layout only
            rank_state["optimizer"] = optimizer.state_dict()  # this rank's ZeRO partition
        try:
            _write_durable(tmp / f"rank_{rank:05d}.pt", _torch_bytes(rank_state))
        except OSError as e:
            error = e
        self._agree(pgm, error, final, tmp)
        writer = FileSystemWriter(tmp)  # sync_files: every shard fsynced
        seal = functools.partial(self._seal, tmp, final, step)
        future = None
        try:
            with _dcp_call():
                if self.async_save:
                    future = dcp.async_save(state, storage_writer=writer, process_group=self._writer_group(pgm),
                                            async_stager=_HostStager(), no_dist=not _distributed(pgm))
                else:
                    dcp.save(state, storage_writer=writer, no_dist=not _distributed(pgm))
                    if main:
                        seal()
        except (OSError, RuntimeError, ValueError) as e:
            error = e
        self._agree(pgm, error, final, tmp)
        if future is not None:
            self._pending = _Pending(final, tmp, future, seal if main else None)
        return final

    def wait(self, pgm=None) -> Optional[Path]:
        """Block until the save in flight is complete on every rank (a collective when one is in
        flight, as it is on every rank at once); raises CheckpointError on every rank if any failed.
        Returns the checkpoint written, or None when none was in flight."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        self._agree(pgm, pending.result(), pending.final, pending.tmp)
        return pending.final

    def drain(self) -> None:
        """On the way out after an error: let this rank's part of a save in flight finish (no
        collective, errors only warned about)."""
        pending, self._pending = self._pending, None
        error = pending.result() if pending is not None else None
        if error is not None:
            warnings.warn(f"checkpoint {pending.final.name} was not completed: {error}", stacklevel=2)

    def _writer_group(self, pgm):
        """A gloo group for DCP's collectives in the writing thread, apart from training's collectives."""
        if not _distributed(pgm):
            return None
        if self._group is None:
            self._group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
        return self._group

    def _agree(self, pgm, error: Optional[BaseException], final: Path, tmp: Path) -> None:
        """Raise CheckpointError on every rank if any rank's part of the save failed (a collective)."""
        errors = _all_gather(pgm, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if not failed:
            return
        if pgm is None or pgm.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        r, why = failed[0]
        who = f"rank {r}: " if _distributed(pgm) else ""
        previous = self._pointer()
        intact = (f"the previous checkpoint {previous} is intact" if previous and previous != final.name
                  else "no earlier checkpoint was touched")
        raise CheckpointError(f"{self.dir}: could not write checkpoint {final.name} ({who}{why}); {_free_space(self.dir)} "
                              f"free there; {intact}. Free space, or point logging.run_dir at a filesystem with room "
                              f"(or lower checkpoint.keep_last), then run the same command again to resume")

    def _seal(self, tmp: Path, final: Path, step: int) -> None:
        """Rank 0, once every rank's files are written: manifest, COMPLETE, rename, latest, prune."""
        files = {rel: {"size": (tmp / rel).stat().st_size} for rel in _files(tmp)}
        _write_durable(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1).encode())
        _write_durable(tmp / COMPLETE, f"{final.name}\n".encode())  # last: the checkpoint is whole
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (after a resume from an earlier one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        _replace_durable(self.dir / LATEST, f"{final.name}\n".encode())
        self._prune(final.name)
        if self.checksums:
            write_sums(final)

    def _prune(self, current: str) -> None:
        """Keep the newest keep_last checkpoints up to `current` (later ones, left by a run that went back to an
        earlier checkpoint, are replaced as this run reaches their steps)."""
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir() and p.name <= current)
        for old in done[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".tmp-*"):  # left by a crash of an earlier run
            shutil.rmtree(stale, ignore_errors=True)
        for stale in self.dir.glob(f".{LATEST}.*"):
            stale.unlink(missing_ok=True)

    # -- reading ------------------------------------------------------------------------------
    def _pointer(self) -> Optional[str]:
        """The step directory `latest` names, or None (no pointer, or not a step directory's name)."""
        try:
            name = (self.dir / LATEST).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return name if _STEP_DIR.fullmatch(name) else None

    def checkpoints(self) -> list[Path]:
        """Every step_* directory, newest first."""
        return sorted((p for p in self.dir.glob("step_*") if p.is_dir() and _STEP_DIR.fullmatch(p.name)), reverse=True)

    def _choose(self) -> tuple[Optional[Path], list[str], Optional[str]]:
        """(the checkpoint to resume from, warnings to give, why there is none although there should
        be): `latest`'s target if complete, else the newest complete one; (None, [], None) for a fresh run."""
        steps, named, pointer = self.checkpoints(), self._pointer(), self.dir / LATEST
        reasons: dict[str, str] = {}
        if named is not None:
            reason = check(self.dir / named)
            if reason is None:
                newer = [p.name for p in steps if p.name > named and check(p) is None]
                notes = [f"{pointer} names {named}, but {newer[0]} is newer and complete; resuming from {named} as the "
                         f"pointer says (write {newer[0]} into it to resume from there)"] if newer else []
                return self.dir / named, notes, None
            reasons[named] = reason
        elif not steps and not pointer.exists():
            return None, [], None
        why = (f"{pointer} names {named}, which cannot be used ({reasons[named]})" if named is not None
               else f"{pointer} is missing or does not name a step_* directory")
        for path in steps:
            if path.name not in reasons:
                reasons[path.name] = check(path) or ""
            if not reasons[path.name]:
                skipped = "".join(f"; {k}: {v}" for k, v in reasons.items() if v and k != named)
                return path, [f"checkpoint: {why}{skipped}; falling back to {path.name}, the newest complete checkpoint"], None
        listing = "; ".join(f"{k}: {v}" for k, v in reasons.items()) or "no step_* directories"
        return None, [], (f"{why}, and {self.dir} holds no complete checkpoint ({listing}); start afresh with "
                          f"checkpoint.resume=false or a new logging.run_dir")

    def saved_config(self) -> Optional[tuple[dict, dict]]:
        """(resolved config, meta: step and layout) of the checkpoint a resume would start from; None
        for a fresh run."""
        path, _, error = self._choose()
        if error is not None:
            raise CheckpointError(error)
        return (load_config_dict(path), json.loads((path / META).read_text())) if path is not None else None

    def latest(self, pgm=None) -> Optional[Path]:
        """The checkpoint to resume from (`_choose`), None for a fresh run. In a multi-process job
        every rank calls it: rank 0 reads the directory and tells the others."""
        path, notes, error = _from_main(pgm, self._choose)
        if error is not None:
            raise CheckpointError(error)
        if pgm is None or pgm.is_main:
            for note in notes:
                warnings.warn(note, stacklevel=2)
        return path

    def load(self, ckpt: Path, model: torch.nn.Module, optimizer, pgm=None, load_optimizer: bool = True) -> dict:
        """Load `ckpt` into this rank's model and optimizer at the current layout. Returns the train
        state: {"step", "sampler", "extra", "rng_restored", "layout" (the saved one)} (RNG restored only
        at the same layout). load_optimizer=False leaves the optimizer's state fresh (its master
        weights follow the model)."""
        import torch.distributed.checkpoint as dcp

        from .state import (OPTIM_PREFIX, apply_sharded_state, dcp_optimizer_supported, load_local_optimizer_state,
                            sharded_state)

        meta = json.loads((ckpt / META).read_text())
        same_layout = meta["layout"] == layout_of(pgm)
        rank = pgm.rank if _distributed(pgm) else 0
        rank_state = _load_rank_file(ckpt / f"rank_{rank if same_layout else 0:05d}.pt")
        per_rank = rank_state["optimizer"] is not None
        fresh_optimizer = optimizer if not load_optimizer else None
        if not load_optimizer:
            optimizer = None
        if optimizer is not None and per_rank and not same_layout:
            raise CheckpointError(f"{ckpt}: its optimizer state was saved per rank (ZeRO) at layout {meta['layout']} "
                                  f"and cannot be split for layout {layout_of(pgm)}; resume at that layout, or set "
                                  f"checkpoint.load_optimizer=false to resume the weights, step and data position "
                                  f"with a fresh optimizer")
        dcp_optimizer = optimizer if not per_rank and dcp_optimizer_supported(optimizer) else None
        reader = _reader(ckpt)
        saved = reader.read_metadata().state_dict_metadata
        # optimizer keys the checkpoint lacks (a bf16 master copy AdamW never had) are left as they are
        state = {k: v for k, v in sharded_state(model, dcp_optimizer, pgm).items()
                 if k in saved or not k.startswith(OPTIM_PREFIX)}
        with _dcp_call():
            dcp.load(state, storage_reader=reader, no_dist=not _distributed(pgm))
        apply_sharded_state(model, dcp_optimizer, state)
        if fresh_optimizer is not None:
            if hasattr(fresh_optimizer, "refresh_fp32_params"):  # DeepSpeed ZeRO: fp32 master copy <- loaded weights
                fresh_optimizer.refresh_fp32_params()
            if pgm is None or pgm.is_main:
                warnings.warn(f"{ckpt}: optimizer state not loaded (checkpoint.load_optimizer=false); "
                              f"its moments start from zero at step {rank_state['step']}", stacklevel=2)
        if optimizer is not None and per_rank:
            load_local_optimizer_state(optimizer, rank_state["optimizer"], layout_of(pgm)["world_size"])
        if same_layout:
            set_rng_state(rank_state["rng"])
        elif pgm is None or pgm.is_main:
            warnings.warn(f"{ckpt} was saved at layout {meta['layout']} and is loaded at {layout_of(pgm)}: model, "
                          f"optimizer and data position carry over; per-rank RNG states are not restored", stacklevel=2)
        return {"step": rank_state["step"], "sampler": rank_state["sampler"], "extra": rank_state["extra"],
                "rng_restored": same_layout, "layout": meta["layout"]}


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A complete checkpoint directory from a run dir (the one a resume would use), a checkpoints
    dir, or a step_* dir. Checks sizes and metadata, never hashes (eval, generate and export call it)."""
    p = Path(path)
    if (p / COMPLETE).is_file() or (p / MANIFEST).is_file() or _STEP_DIR.fullmatch(p.name):
        reason = check(p)
        if reason is not None:
            raise CheckpointError(f"{p}: not a complete checkpoint ({reason}); pass its run dir to use the newest "
                                  f"complete one")
        return p
    found = Checkpointer(p.parent if p.name == "checkpoints" else p).latest()
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint found (expected {p}/checkpoints/{LATEST}); "
                              f"train first with `moe-dist train`, or pass the run's logging.run_dir")
    return found


def checkpoint_bytes(ckpt: Path) -> int:
    """Bytes on disk of a checkpoint: its manifest's sizes (plus the manifest), else its files."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        return sum(f["size"] for f in files.values()) + (ckpt / MANIFEST).stat().st_size
    except (OSError, ValueError, KeyError):
        return sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())


def list_checkpoints(run_dir: str | os.PathLike) -> list[dict]:
    """The run's checkpoints, oldest first: {"path", "step", "bytes", "problem" (None when complete:
    `check`, sizes and DCP metadata; checksums are not read), "layout", "latest"}."""
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
                    "bytes": checkpoint_bytes(path), "problem": check(path), "layout": meta.get("layout"),
                    "latest": path.name == latest})
    return out


def load_config_dict(ckpt: Path) -> dict:
    return yaml.safe_load((ckpt / "config.yaml").read_text())


def load_model_state(ckpt: Path, map_location: Any = "cpu") -> dict:
    """The consolidated one-device model state dict of any checkpoint, read in this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .state import GATE_UP, MODEL_PREFIX

    reader = _reader(ckpt)
    saved = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in saved.items()
             if k.startswith(MODEL_PREFIX) and isinstance(m, TensorStorageMetadata)}
    with _dcp_call():  # DCP assembles the full tensors from every rank's shards
        dcp.load(state, storage_reader=reader, no_dist=True)
    # the experts' gate/up weight is saved as [E, 2, F, H] (moe_dist.checkpoint.state): the model's [E, 2F, H]
    return {k[len(MODEL_PREFIX):]: (v.flatten(1, 2) if k.endswith(GATE_UP) and v.dim() == 4 else v).to(map_location)
            for k, v in state.items()}
