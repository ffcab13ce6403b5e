"""ckpt_daemon.checkpoint: crash-safe save and verified load of the full training state.

Usable from any training script:

    mgr = CheckpointManager("checkpoints", best_metric="val_loss", best_mode="min")
    loaded = mgr.load("latest", model=model, optimizer=opt, scheduler=sched)   # None on a fresh start
    ...
    mgr.save(step, model=model, optimizer=opt, scheduler=sched, epoch=epoch,
             data_state={"pos": pos}, metrics={"val_loss": v}, blocking=False)
    mgr.close()

Native format (see store/manifest.py): `checkpoint-<step>/` built in the state folder's scratch space
(store/commit.py), each file fsynced with its checksum (blake3 by default, sha256 on request: `checksum=` or $CKPT_CHECKSUM)
computed while writing, manifest.json written last, the folder renamed into place under the commit lock and
the parent fsynced.
`latest` and `best` are symlinks replaced atomically.
Loading reads each file once, checking size and checksum in the same pass, and never unpickles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ckpt_daemon import devio, runtime
from ckpt_daemon.errors import CheckpointError, DiskFullError, NoValidCheckpoint, crash_summary
from ckpt_daemon.fsutil import (
    atomic_symlink,
    atomic_write_json,
    default_checksum,
    digest_record,
    disk_full_error,
    free_bytes,
    is_enospc,
    new_hasher,
    record_checksum,
)
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import delete, verifyonce
from ckpt_daemon.store import manifest as mf
from ckpt_daemon.store import resolve as rs
from ckpt_daemon.store import safetensors_file as stfile
from ckpt_daemon.store.commit import Scratch
from ckpt_daemon.store.names import NATIVE_PATTERN, native_name  # (also imported from here by users)
from ckpt_daemon.store.statecodec import decode, encode

log = logging.getLogger("ckpt_daemon.checkpoint")

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
# Optimizer state above this is split into several files: a checkpoint's files are verified in
# parallel (one thread each), so shards let a resume use every core for the checksums.
STATE_SHARD_BYTES = 256 << 20


# ---------------------------------------------------------------------------------------- capture
def capture_rng() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    if "python" in state:
        v = state["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))
    if "torch" in state:
        torch.set_rng_state(state["torch"].clone())
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.clone() for s in states])
        else:
            log.warning("cuda RNG states saved for %d devices, %d present: not restored",
                        len(states), torch.cuda.device_count())


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def split_tied(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Unique tensors of a state dict, and aliases (name -> stored name) for tied ones: safetensors
    stores no shared storage, and a tied weight written twice would come back untied."""
    seen: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in sd.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t
    return tensors, aliases


def join_tied(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, torch.Tensor]:
    """The inverse of split_tied, from the aliases kept in the safetensors metadata."""
    for alias, target in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[target]
    return tensors


def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return split_tied(_unwrap(model).state_dict())


def _snapshot(tensors: dict[str, torch.Tensor], copy: bool, staging: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Detach to CPU; copy when the write happens in the background (training mutates in place).

    Copies go into `staging` buffers kept from the previous save when shapes match: writing into
    memory that is already mapped avoids a page fault per 4 KiB, which is most of the cost of a fresh
    allocation of a multi-GB state. GPU tensors are staged in pinned memory for a fast device copy."""
    out = {}
    on_gpu = False
    for k, t in tensors.items():
        t = t.detach()
        if t.device.type == "cpu" and not copy:
            out[k] = t
            continue
        buf = staging.get(k) if staging is not None else None
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type != "cpu" and torch.cuda.is_available())
            if staging is not None:
                staging[k] = buf
        buf.copy_(t, non_blocking=t.device.type != "cpu")
        on_gpu = on_gpu or t.device.type != "cpu"
        out[k] = buf
    if on_gpu:
        torch.cuda.synchronize()
    return out


@dataclass
class Loaded:
    """What `CheckpointManager.load` restored."""

    path: Path
    step: int
    epoch: int
    data_state: dict
    metrics: dict
    config: dict
    extra: dict
    world_size: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why) of checkpoints passed over
    from_memory: bool = False  # restored from a memory checkpoint (path: the name it has on disk once persisted)

    def source(self) -> dict:
        """Where this state came from, small enough to send to the other ranks of a job, which load exactly
        the same with `CheckpointManager.load_same`."""
        return {"path": str(self.path), "step": int(self.step), "from_memory": bool(self.from_memory)}


@dataclass
class _Prepared:
    step: int
    model: dict[str, torch.Tensor]
    model_meta: dict[str, str]
    state: dict[str, torch.Tensor]
    state_json: dict
    manifest_extra: dict
    nbytes: int


class CheckpointManager:
    """Saves and loads native checkpoints in one folder. Only rank 0 of a job should save."""

    def __init__(self, directory: str | os.PathLike, *, best_metric: str = "val_loss", best_mode: str = "min",
                 save_margin_bytes: int = 64 << 20, patterns: Optional[list[str]] = None, rank: int = 0,
                 memory: Optional[str | os.PathLike | bool] = None, memory_max_bytes: Optional[int] = None,
                 checksum: Optional[str] = None):
        """`memory`: the shared-memory region for memory-first checkpoints (`save(..., memory=True)`, and
        `load` prefers a verified memory state as new as the disk's): a folder on a tmpfs, True for
        $CKPT_DAEMON_MEMORY (set by the daemon when checkpoints.memory.enabled), None for the same but
        off when it is unset, False for off. Every rank of a job reads it; only rank 0 writes it."""
        self.dir = Path(directory).resolve()
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.save_margin = int(save_margin_bytes)
        self.patterns = patterns or [NATIVE_PATTERN]
        self.rank = rank
        # The checksum new checkpoints get: blake3 unless "sha256" is asked for here or in $CKPT_CHECKSUM.
        self.checksum = checksum
        self.last_save_bytes = 0
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._best: Optional[float] = None
        self.saving: Optional[str] = None  # name being written, for the heartbeat
        # Reused copies of the state for background saves (free again once the previous save is joined).
        self._staging_model: dict[str, torch.Tensor] = {}
        self._staging_state: dict[str, torch.Tensor] = {}
        self.skipped_saves = 0
        self._pointer_error: Optional[str] = None
        if memory is None or memory is True:
            memory = os.environ.get("CKPT_DAEMON_MEMORY") or None
        self.memory_dir: Optional[Path] = Path(memory).resolve() if memory else None
        self.memory_max_bytes = memory_max_bytes
        self._memory = None  # memsave.MemoryWriter, opened at the first memory save
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._best = self._current_best()

    # ------------------------------------------------------------------------------------ save
    def save(self, step: int, *, model: torch.nn.Module, optimizer: Any = None, scheduler: Any = None,
             scaler: Any = None, epoch: int = 0, data_state: Optional[dict] = None, metrics: Optional[dict] = None,
             config: Optional[dict] = None, extra: Optional[dict] = None, pin: Optional[str] = None,
             world_size: int = 1, rng: Optional[dict] = None, blocking: bool = True,
             memory: bool = False) -> Optional[Path]:
        """Save the full state as checkpoint-<step>. Returns the final path, or None if the save was
        skipped (not enough disk space: logged; training should go on). With blocking=False the state
        is copied to CPU memory and written by a background thread; at most one save is in flight.
        With memory=True (and a memory region, see __init__) the state is copied into shared memory
        instead (the daemon persists it as checkpoint-<step> on its cadence); returns the path it will
        have, or None if no memory checkpoint was written."""
        if memory:
            return self._save_memory(step, model, optimizer, scheduler, scaler, epoch, data_state, metrics,
                                     config, extra, pin, world_size, rng)
        self._join()  # one in flight; surfaces the previous one's error
        final = self.dir / native_name(step)
        if final.exists():
            log.info("checkpoint %s already exists; not saving it again", final.name)
            return final
        prepared = self._prepare(step, model, optimizer, scheduler, scaler, epoch, data_state, metrics, config,
                                 extra, pin, world_size, rng, copy=not blocking)
        need = max(self.last_save_bytes, prepared.nbytes) + self.save_margin
        free = free_bytes(self.dir)
        if free < need:
            self.skipped_saves += 1
            log.error(
                "Not saving checkpoint %s: %.0f MiB free in %s, a save needs about %.0f MiB (last save plus the "
                "%.0f MiB margin). Every earlier checkpoint is intact and training goes on; the save will be tried "
                "again at the next interval. Free space, e.g. `python -m maintenance.cleanup --dry-run`.",
                final.name, free / 2**20, self.dir, need / 2**20, self.save_margin / 2**20)
            return None
        if blocking:
            return self._write_logged(prepared)
        self.saving = final.name
        self._thread = threading.Thread(target=self._bg_write, args=(prepared,), name=f"save-{step}", daemon=True)
        self._thread.start()
        return final

    def reserve_memory(self, *, model: torch.nn.Module, optimizer: Any = None, nbytes: Optional[int] = None,
                       background: bool = False) -> bool:
        """Reserve the memory slots now for a state like this model's and optimizer's (`nbytes` if given,
        else estimated, the optimizer's state still to be created included): their space, their pages and,
        for a model on a GPU, their registration as pinned memory are paid here, at start, instead of inside
        the first memory saves. False when memory checkpoints are off. Raises MemoryCheckpointError when the
        region cannot hold two copies (the first save would fail the same way); with background=True the
        work runs on the memory writer's thread while training goes on, and the first memory save waits for
        it (and raises its error). False on a rank other than 0 (rank 0 writes the job's state)."""
        if self.memory_dir is None or self.rank != 0:
            return False
        from ckpt_daemon.memsave import MemoryWriter

        if self._memory is None:
            self._memory = MemoryWriter(self.memory_dir, self.dir, self.memory_max_bytes)
        est = nbytes if nbytes is not None else devio.estimate_state_bytes(model, optimizer)
        gpu = devio.state_on_gpu(_unwrap(model).parameters())
        (self._memory.reserve_in_background if background else self._memory.reserve)(est, gpu=gpu)
        return True

    def _save_memory(self, step, model, optimizer, scheduler, scaler, epoch, data_state, metrics, config, extra,
                     pin, world_size, rng) -> Optional[Path]:
        if self.memory_dir is None or self.rank != 0:
            return None
        from ckpt_daemon.memsave import MemoryWriter

        if self._memory is None:
            self._memory = MemoryWriter(self.memory_dir, self.dir, self.memory_max_bytes)
        # The tensors are not snapshotted: the slot copy is the only copy (the training thread waits for it).
        prepared = self._prepare(step, model, optimizer, scheduler, scaler, epoch, data_state, metrics, config,
                                 extra, pin, world_size, rng, copy=False, raw=True)
        return self.dir / native_name(step) if self._memory.save(prepared) else None

    def _prepare(self, step, model, optimizer, scheduler, scaler, epoch, data_state, metrics, config, extra, pin,
                 world_size, rng, copy: bool, raw: bool = False) -> _Prepared:
        mt, aliases = model_tensors(model)
        state_t: dict[str, torch.Tensor] = {}
        skeleton = {
            "optimizer": encode(optimizer.state_dict(), "optimizer", state_t) if optimizer is not None else None,
            "scheduler": encode(scheduler.state_dict(), "scheduler", state_t) if scheduler is not None else None,
            "scaler": encode(scaler.state_dict(), "scaler", state_t) if scaler is not None else None,
            "rng": encode(rng if rng is not None else capture_rng(), "rng", state_t),
            "data": encode(data_state or {}, "data", state_t),
            "extra": encode(extra or {}, "extra", state_t),
            "config": config or {},
        }
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        manifest_extra = {
            "epoch": int(epoch), "metrics": metrics, "pin": pin, "world_size": int(world_size),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "created_unix": time.time(),
            "torch": torch.__version__,
        }
        model_meta = {"format": "ckpt-daemon/1", "step": str(step), "aliases": json.dumps(aliases)}
        model_s = {k: t.detach() for k, t in mt.items()} if raw else _snapshot(mt, copy, self._staging_model)
        state_s = {k: t.detach() for k, t in state_t.items()} if raw else _snapshot(state_t, copy, self._staging_state)
        nbytes = sum(t.numel() * t.element_size() for t in list(model_s.values()) + list(state_s.values()))
        return _Prepared(step, model_s, model_meta, state_s, skeleton, manifest_extra, nbytes)

    def _bg_write(self, prepared: _Prepared) -> None:
        try:
            self._write_logged(prepared)
        except BaseException as exc:  # surfaced by the next save() or close()
            self._error = exc
        finally:
            self.saving = None

    def _write_logged(self, prepared: _Prepared) -> Optional[Path]:
        try:
            return self._write(prepared)
        except DiskFullError as exc:
            self.skipped_saves += 1
            log.error("%s", exc)
            return None

    def _write(self, p: _Prepared) -> Path:
        name = native_name(p.step)
        final = self.dir / name
        t0 = time.perf_counter()
        files: dict[str, dict] = {}
        scratch = None
        try:
            # Built in the state folder's scratch space (with a lock that marks it as live work), so a
            # killed save is told apart from a live one and removed by whoever starts next.
            with Scratch(self.dir, name) as scratch:
                tmp = scratch.path
                shards = shard_tensors(p.state, STATE_SHARD_BYTES)
                names = [STATE_TENSORS] if len(shards) == 1 else [
                    f"state-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
                algo = default_checksum(self.checksum)
                writers = [(mf.MODEL_FILE, lambda f: stfile.write_safetensors(f, p.model, p.model_meta, algo))]
                writers += [(n, lambda f, sh=sh: stfile.write_safetensors(f, sh, {"format": "ckpt-daemon/1"}, algo))
                            for n, sh in zip(names, shards)]
                writers.append((STATE_JSON, lambda f: _write_json(f, p.state_json, algo)))
                files.update(_write_files(tmp, writers, algo))
                manifest = mf.build_manifest(p.step, files, **p.manifest_extra)
                with open(tmp / mf.MANIFEST, "xb") as f:
                    f.write(mf.dumps_manifest(manifest, algo))
                    f.flush()
                    os.fsync(f.fileno())
                scratch.commit(final, then=lambda: self._update_pointers(name, p.manifest_extra["metrics"]))
        except OSError as exc:
            if not is_enospc(exc):
                raise
            if scratch is not None and scratch.committed is not None:  # committed; only the bookkeeping after the commit failed
                log.error("checkpoint %s is committed and valid; what came after the commit failed: %s", name, exc)
                return final
            raise disk_full_error(f"save checkpoint {name}", self.dir, exc) from exc
        self.last_save_bytes = sum(f["size"] for f in files.values())
        log.info("saved %s (%.1f MiB in %.2fs)", name, self.last_save_bytes / 2**20, time.perf_counter() - t0)
        return final

    def _update_pointers(self, name: str, metrics: dict) -> None:
        """`latest` and `best` after a commit. The checkpoint is already committed and valid whatever
        happens here: a pointer that cannot be written (no inode left, say) is logged and caught up at
        the next save, and the save is not reported as failed."""
        try:
            atomic_symlink(name, self.dir / "latest")
            self._maybe_best(name, metrics)
            self._pointer_error = None
        except OSError as exc:
            self._pointer_error = str(exc)
            log.error("checkpoint %s is committed and valid, but the latest/best pointers could not be updated "
                      "(%s); the daemon and resume use the newest valid checkpoint regardless, and the pointers "
                      "are retried at the next save", name, exc)

    @property
    def best_value(self) -> Optional[float]:
        """The best_metric value of the current `best` checkpoint (None before the first)."""
        return self._best

    def _better(self, value: float) -> bool:
        if self._best is None:
            return True
        return value < self._best if self.best_mode == "min" else value > self._best

    def _maybe_best(self, name: str, metrics: dict) -> None:
        value = metrics.get(self.best_metric)
        if value is None or value != value or not self._better(value):
            return
        atomic_symlink(name, self.dir / "best")
        self._best = value

    def _current_best(self) -> Optional[float]:
        c = cat.scan(self.dir, self.patterns, stats=False)
        e = c.pointer("best")
        if e is not None and e.valid:
            return e.metrics.get(self.best_metric)
        return None

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"The background save failed: {err}") from err

    def wait(self) -> None:
        """Block until the in-flight save (if any) is on disk; raise its error if it failed."""
        self._join()
        if self._memory is not None:
            self._memory.join()

    def close(self) -> None:
        self._join()
        if self._memory is not None:
            self._memory.close()
            self._memory = None

    # ------------------------------------------------------------------------------------ load
    def _scan(self) -> cat.Catalog:
        """This folder as every command sees it (the same best metric, so `best` names the same checkpoint)."""
        return cat.scan(self.dir, self.patterns, stats=False, best_metric=self.best_metric, best_mode=self.best_mode)

    def candidates(self, which: str | int | os.PathLike = "latest") -> tuple[list[cat.Entry], list[tuple[str, str]]]:
        """Native checkpoints to try, newest first, for `which` = latest | best | step | path (what it names
        is store.resolve's rule, the same for every command); and the ones passed over with why (found
        incomplete or corrupt by the quick structural check, or of a layout CheckpointManager does not load)."""
        try:
            w = rs.parse_which(which)
        except rs.Unresolved:
            raise NoValidCheckpoint(
                f"--resume {which!r} is not understood: use latest, best, none, a step number or a path.") from None
        c = self._scan()
        if isinstance(w, Path):
            p = w.resolve()  # a path the user gave: `latest`, `best` and other links are followed once
            if not os.path.lexists(p) or (p.is_dir() and not (p / mf.MANIFEST).exists()
                                          and c.by_name(p.name) is None):
                raise NoValidCheckpoint(
                    f"{p} is not a ckpt-daemon checkpoint (a checkpoint-<step> folder with manifest.json). "
                    "Pass a checkpoint folder, or latest, best or a step number.")
            w = p
        out, skipped = [], []
        for e, stage, why in rs.steps_back(c, w, layouts=("native",), patterns=[NATIVE_PATTERN]):
            if stage is None:
                out.append(e)
            elif stage == "layout":
                skipped.append((e.name, f"{why}, which CheckpointManager does not load"))
            else:
                skipped.append((e.name, e.reason or e.status))
        return out, skipped

    def load(self, which: str | int | os.PathLike = "latest", *, model: torch.nn.Module, optimizer: Any = None,
             scheduler: Any = None, scaler: Any = None, restore_rng_state: bool = True,
             map_location: str | torch.device = "cpu", strict: bool = True) -> Optional[Loaded]:
        """Restore state from the newest valid checkpoint at or before `which`. Each candidate is fully
        verified (sizes and checksums) while it is read; a corrupt one is logged and the previous valid
        one is used. Returns None if there is no checkpoint at all, and for `which="none"` (a fresh start:
        what the daemon passes as $CKPT_RESUME when there is nothing to resume from).

        The state is copied out of the checkpoint's files (which are memory-mapped while they are read and
        verified), so that once load returns no file of the checkpoint stays open or mapped: retention,
        snapshots and `cleanup` see no reader, and the optimizer's moments are updated in memory of its own."""
        if which == "none":
            return None
        mem_step = self._memory_choice(which)
        if mem_step is not None:
            # The daemon chose its verified memory state (still being persisted under this name): read it.
            loaded = self._load_memory("latest", [], model, optimizer, scheduler, scaler, restore_rng_state,
                                       map_location, strict, [], exact_step=mem_step)
            if loaded is not None:
                return loaded
            if not os.path.isdir(which):
                log.error("the memory checkpoint at step %d chosen by the daemon could not be read; loading the "
                          "newest valid checkpoint on disk instead", mem_step)
                which = "latest"
        cands, skipped = self.candidates(which)
        for name, why in skipped:
            log.warning("skipping checkpoint %s: %s", name, why)
        by_name = {e.name: e for e in cat.scan(self.dir, self.patterns, stats=False).entries} if skipped else {}
        for name, why in skipped:
            if name in by_name and by_name[name].layout == "native":
                self._quarantine(by_name[name], why)
        mem_loaded = self._load_memory(which, cands, model, optimizer, scheduler, scaler, restore_rng_state,
                                       map_location, strict, skipped)
        if mem_loaded is not None:
            return mem_loaded
        if not cands:
            if skipped:
                raise NoValidCheckpoint(
                    f"No valid checkpoint to resume from in {self.dir}: "
                    + "; ".join(f"{n}: {w}" for n, w in skipped)
                    + ". Restore one from snapshots/ (python -m maintenance.restore) or start fresh with --resume none."
                )
            return None
        misfits: list[str] = []
        states: dict[str, dict] = {}

        def read_and_apply(e: cat.Entry) -> cat.Entry:  # the verification here is the read itself
            try:
                state = read_checkpoint(e.path, map_location=map_location, copy=True)
            except (CheckpointError, ValueError, OSError) as exc:
                return dataclasses.replace(e, status="corrupt", reason=str(exc))
            try:
                self._apply(state, model, optimizer, scheduler, scaler, restore_rng_state, strict)
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError, CheckpointError) as exc:
                # Intact (its checksums hold) but not this model's: a changed architecture, or a checkpoint of
                # another run. Not quarantined (nothing is wrong with it); an older one may still fit.
                misfits.append(e.name)
                return dataclasses.replace(
                    e, status="invalid", reason=f"does not fit the model or optimizer ({str(exc).splitlines()[0][:300]})")
            states[e.name] = state
            return e

        def passed_over(e: cat.Entry, stage: str, why: str) -> None:
            skipped.append((e.name, why))
            if e.name in misfits:
                log.error("checkpoint %s %s; trying the previous one", e.name, why)
            else:
                log.error("checkpoint %s failed verification and will not be used: %s", e.name, why)
                self._quarantine(e, why)

        e = rs.first_good(((e, None, "") for e in cands), verify=read_and_apply, on_skip=passed_over)
        if e is not None:
            state = states[e.name]
            m = state["manifest"]
            if self.rank == 0:
                runtime.record_resumed_from(self.dir, e.name if e.path.parent == self.dir else str(e.path), m["step"])
            return Loaded(e.path, m["step"], m.get("epoch", 0), state["data"], m.get("metrics", {}),
                          state["config"], state["extra"], m.get("world_size", 1), skipped)
        if misfits:
            raise NoValidCheckpoint(
                f"No checkpoint in {self.dir} fits this model: {'; '.join(f'{n}: {w}' for n, w in skipped)}. If the "
                "model settings changed on purpose, start a new run in another checkpoints.dir (or --resume none); "
                "otherwise restore the settings the run was started with. Nothing was changed.")
        raise NoValidCheckpoint(
            f"Every checkpoint in {self.dir} failed verification ("
            + "; ".join(f"{n}: {w}" for n, w in skipped)
            + "). Restore one from snapshots/ (python -m maintenance.restore) or start fresh with --resume none."
        )

    def load_same(self, source: dict, *, model: torch.nn.Module, optimizer: Any = None, scheduler: Any = None,
                  scaler: Any = None, restore_rng_state: bool = True, map_location: str | torch.device = "cpu",
                  strict: bool = True) -> Loaded:
        """Load exactly what another rank loaded (its `Loaded.source()`): the same memory checkpoint, or the
        same folder, verified here too. Under torchrun rank 0 chooses and loads first; the others follow, so
        that every rank starts from the same state even when rank 0 passed over a damaged checkpoint or read
        a memory state the disk does not have yet. Raises NoValidCheckpoint when that state cannot be read
        here (the job then restarts and chooses again)."""
        step, path = int(source["step"]), str(source["path"])
        if source.get("from_memory"):
            loaded = self._load_memory("latest", [], model, optimizer, scheduler, scaler, restore_rng_state,
                                       map_location, strict, [], exact_step=step)
            if loaded is not None:
                return loaded
            if not os.path.isdir(path):  # persisted since? then the same state is on disk
                raise NoValidCheckpoint(
                    f"rank {self.rank} could not read the memory checkpoint at step {step} that rank 0 resumed from, "
                    f"and {path} is not on disk yet; the job stops so that the daemon restarts it from one state.")
        loaded = self.load(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                           restore_rng_state=restore_rng_state, map_location=map_location, strict=strict)
        if loaded is None or loaded.step != step:
            raise NoValidCheckpoint(
                f"rank {self.rank} could not load {Path(path).name} (step {step}), which rank 0 resumed from"
                + (f"; it found step {loaded.step}" if loaded is not None else "")
                + "; the job stops so that the daemon restarts it from one state.")
        return loaded

    def _memory_choice(self, which) -> Optional[int]:
        """The step of the memory state the daemon chose for this restart ($CKPT_DAEMON_MEMORY_RESUME),
        if `which` is its checkpoint-<step> path in this folder (it may not be on disk yet)."""
        raw = os.environ.get("CKPT_DAEMON_MEMORY_RESUME", "")
        if self.memory_dir is None or not re.fullmatch(r"[0-9]{1,19}", raw) or not isinstance(which, (str, os.PathLike)):
            return None
        step = int(raw)
        p = Path(which)
        if p.name != native_name(step) or os.path.realpath(p.parent) != os.path.realpath(self.dir):
            return None
        return step

    def _load_memory(self, which, cands, model, optimizer, scheduler, scaler, restore_rng_state, map_location,
                     strict, skipped, exact_step: Optional[int] = None) -> Optional[Loaded]:
        """The newest committed memory checkpoint, if it is what `which` asks for: for latest, one at
        least as new as the newest valid disk checkpoint; for a path, best or a step, one of exactly the
        step the disk would give (the same state, read faster); with exact_step, that step. Verified
        (or verified by the daemon just before, see memory.verified_by_daemon); None to use the disk."""
        if self.memory_dir is None or not os.path.isdir(self.memory_dir):
            return None
        from ckpt_daemon import memory as mem
        from ckpt_daemon.memsave import read_slot_state

        info, problems = mem.Region(self.memory_dir).newest(self.dir)
        for pr in problems:
            log.warning("memory checkpoint ignored: %s", pr)
        if info is None:
            return None
        disk_step = cands[0].step if cands else None
        if exact_step is not None:
            if info.step != exact_step:
                return None
        elif which == "latest" and disk_step is not None and info.step < disk_step:
            return None
        elif which != "latest" and info.step != disk_step:
            return None
        t0 = time.perf_counter()
        state, why = read_slot_state(self.memory_dir, self.dir, map_location, info)
        if state is None:
            log.error("the memory checkpoint at step %d is not usable (%s); loading from disk", info.step, why)
            return None
        try:
            self._apply(state, model, optimizer, scheduler, scaler, restore_rng_state, strict)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, CheckpointError) as exc:
            log.error("the memory checkpoint at step %d does not fit the model (%s); loading from disk", info.step,
                      str(exc).splitlines()[0][:300])
            return None
        m = state["manifest"]
        name = native_name(m["step"])
        if self.rank == 0:
            runtime.record_resumed_from(self.dir, name, m["step"])
        log.info("loaded the memory checkpoint at step %d from %s (%.2fs)", m["step"], self.memory_dir,
                 time.perf_counter() - t0)
        return Loaded(self.dir / name, m["step"], m.get("epoch", 0), state["data"], m.get("metrics", {}),
                      state["config"], state["extra"], m.get("world_size", 1), skipped, from_memory=True)

    def _quarantine(self, e: cat.Entry, why: str) -> None:
        if self.rank != 0 or e.path.parent != self.dir:
            return
        dst = delete.quarantine(self.dir, e.name, why)
        if dst is not None:
            log.warning("moved %s to %s (it failed verification: %s)", e.name, dst, why)

    @staticmethod
    def _apply(state, model, optimizer, scheduler, scaler, restore_rng_state, strict) -> None:
        _unwrap(model).load_state_dict(state["model"], strict=strict)
        if optimizer is not None:
            if state["optimizer"] is None:
                raise CheckpointError("The checkpoint has no optimizer state; it is a weights-only export.")
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        if restore_rng_state and state["rng"]:
            restore_rng(state["rng"])


def shard_tensors(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Split into groups of at most `limit` bytes (a larger single tensor gets a group of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def _write_files(folder: Path, writers: list, algo: str) -> dict[str, dict]:
    """Run each (file name, writer) into a new file of `folder`, fsynced; return the manifest's file
    records in the writers' order. Files are written by parallel threads (each with its hasher): the
    memory copies into the page cache use every core and each file's writeback and fsync overlap the
    others' writes, so the save's time approaches the disk's own."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item) -> tuple[int, str]:
        fname, writer = item
        with open(folder / fname, "xb") as f:
            size, digest = writer(f)
            f.flush()
            os.fsync(f.fileno())
        return size, digest

    workers = max(1, min(len(writers), os.cpu_count() or 1, 4))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckpt-write") as pool:
        results = list(pool.map(one, writers))
    return {fname: {"size": size, **digest_record(algo, digest)} for (fname, _), (size, digest) in zip(writers, results)}


def _write_json(f, obj, algo: str = "sha256") -> tuple[int, str]:
    data = (json.dumps(obj, indent=1, allow_nan=True) + "\n").encode()
    f.write(data)
    h = new_hasher(algo)
    h.update(data)
    return len(data), h.hexdigest()


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu", verify: bool = True,
                    copy: bool = False) -> dict:
    """Read and verify a native checkpoint folder into plain state (no pickle). Raises CheckpointError.

    The tensors view the files' memory mappings (no copy), which keeps each file open (a mapping holds
    its file) as long as any of them lives. With copy=True every tensor but the model's (which
    load_state_dict copies into the parameters) is copied into memory of its own, so that the mappings
    and files are released once the model is loaded: what a resume keeps (optimizer moments, data state)
    must never pin the checkpoint's files for the rest of the run."""
    path = Path(path)
    status, reason, m = mf.check_native(path, verify=False)
    if status != "complete":
        raise CheckpointError(f"{path.name} is {status}: {reason}")
    files = m["files"]
    # Verify once per restart: files the daemon hashed moments ago and that are unchanged since (same
    # size, mtime, ctime, inode) are not hashed again; see ckpt_daemon/store/verifyonce.py.
    trusted = verifyonce.trusted_stats(path, mf.MANIFEST) if verify else None
    if trusted:
        log.info("%s was verified by the daemon for this resume; files unchanged since are not hashed again", path.name)

    # Map every file (sizes checked against the manifest), then verify the ones to hash together: the
    # reads of two files at a time overlap their hashing (stfile.verify_buffers).
    state_files = sorted(n for n in files if n.startswith("state") and n.endswith(".safetensors"))
    wanted = [n for n in [mf.MODEL_FILE, *state_files, STATE_JSON] if n in files]
    bufs: dict = {}
    jobs: list = []
    # Onto a GPU: the tensor files go through pinned buffers to the device, hashed on the way (devio).
    to_device = [n for n in wanted if n.endswith(".safetensors")] if devio.is_gpu(map_location) else []
    try:
        if to_device:
            bufs.update(devio.read_files(path, {n: files[n] for n in to_device}, trusted, verify, map_location))
        for name in wanted:
            if name in bufs:
                continue
            meta = files[name]
            algo, digest = record_checksum(meta)  # checked by read_manifest
            bufs[name], st = stfile.map_file(path / name, meta["size"])
            if verify and not stfile.same_file(st, trusted.get(name) if trusted else None):
                jobs.append(stfile.VerifyJob(name, bufs[name], algo, digest))
        stfile.verify_buffers(jobs)
    except stfile.ChecksumMismatch as exc:
        raise CheckpointError(f"{path.name} is corrupt: {exc}") from None
    get = bufs.__getitem__
    try:
        model, meta = stfile.parse_safetensors(get(mf.MODEL_FILE))
        join_tied(model, meta)
        state_t: dict = {}
        skeleton: dict = {}
        for name in state_files:
            state_t.update(stfile.parse_safetensors(get(name))[0])
        if copy and not to_device:  # device buffers hold no file; the files are closed already
            state_t = {k: v.clone() for k, v in state_t.items()}
        if STATE_JSON in files:
            skeleton = json.loads(bytes(get(STATE_JSON)))
        if not isinstance(skeleton, dict):
            raise ValueError(f"{STATE_JSON} is not a JSON object")
        if to_device:
            state_t = devio.host_side(state_t)  # RNG, scheduler, data state: CPU; the optimizer's moments: the GPU
        if map_location not in ("cpu", torch.device("cpu")):
            model = {k: v.to(map_location) for k, v in model.items()}
        out = {k: decode(skeleton.get(k), state_t) for k in ("optimizer", "scheduler", "scaler", "rng", "data", "extra")}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError, OverflowError) as exc:
        # Its checksums hold, so these bytes were written as they are: by a bug, or crafted to match.
        raise CheckpointError(f"{path.name} cannot be read although its checksums match ({crash_summary(exc)}); it "
                              "was not used.") from None
    out.update(model=model, config=skeleton.get("config") or {}, manifest=m)
    out["data"] = out["data"] or {}
    out["extra"] = out["extra"] or {}
    return out


def export_weights(src: Path, dst_dir: Path, dtype: Optional[torch.dtype] = None, extra_meta: Optional[dict] = None) -> Path:
    """Write a weights-only model (model.safetensors + metadata.json) from a native checkpoint or a
    state dict into the new folder `dst_dir` (temp sibling, fsync, rename)."""
    state = read_checkpoint(src)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state["model"].items()}
    return write_weights(tensors, dst_dir, {"source": str(src), "step": state["manifest"]["step"],
                                            "metrics": state["manifest"].get("metrics", {}),
                                            "config": state["config"], **(extra_meta or {})})


def write_weights(tensors: dict[str, torch.Tensor], dst_dir: Path, meta: dict) -> Path:
    """Write tensors (tied ones stored once) and metadata.json into a new folder, atomically."""
    dst_dir = Path(dst_dir)
    if os.path.lexists(dst_dir):
        raise FileExistsError(f"{dst_dir} already exists; refusing to overwrite it")
    dst_dir.parent.mkdir(parents=True, exist_ok=True)
    # built in the destination folder's scratch space, removed whatever fails; committed under its lock
    with Scratch(dst_dir.parent, f"weights-{dst_dir.name}") as scratch:
        tmp = scratch.path
        uniq, aliases = split_tied(tensors)
        with open(tmp / mf.MODEL_FILE, "xb") as f:
            # exports keep sha256: a deployable artifact anyone can check with `sha256sum`
            size, digest = stfile.write_safetensors(f, uniq, {"format": "ckpt-daemon/weights-1", "aliases": json.dumps(aliases)}, "sha256")
            f.flush()
            os.fsync(f.fileno())
        atomic_write_json(tmp / "metadata.json", {**meta, "files": {mf.MODEL_FILE: {"size": size, "sha256": digest}}})
        scratch.commit(dst_dir)
    return dst_dir


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Model weights from a native checkpoint folder or a weights-only export folder (verified). Every
    file is untrusted: anything malformed is a CheckpointError naming the file."""
    from ckpt_daemon.fsutil import read_json_file

    path = Path(path)
    if not os.path.lexists(path):
        raise CheckpointError(f"{path} does not exist.")
    if path.is_symlink():
        # the folder's own pointers (checkpoints/best, checkpoints/latest) name a sibling: that one is read,
        # never a link that leads elsewhere
        target = os.readlink(path)
        if "/" in target or target in (".", "..") or os.path.islink(path.parent / target):
            raise CheckpointError(f"{path} is a symbolic link to {target!r}, which is not a checkpoint beside it: give "
                                  "the checkpoint folder itself.")
        path = path.parent / target
    if not path.is_dir() or path.is_symlink():
        raise CheckpointError(f"{path} is not a folder: give a checkpoint-<step> folder or a folder written by "
                              "`ckpt-daemon consolidate` (which also exports a single-file checkpoint).")
    if (path / mf.MANIFEST).exists():
        st = read_checkpoint(path)
        return st["model"], {"config": st["config"], "step": st["manifest"]["step"]}
    meta = read_json_file(path / "metadata.json", 16 << 20)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has neither a manifest.json (a ckpt-daemon checkpoint) nor a readable "
                              "metadata.json (an export): it is not a model ckpt-daemon can load.")
    files = meta.get("files")
    f = files.get(mf.MODEL_FILE) if isinstance(files, dict) else None
    if f is not None and not isinstance(f, dict):
        raise CheckpointError(f"{path.name} has an unusable metadata.json: its record of {mf.MODEL_FILE} is not an object")
    size = f.get("size") if f else None
    try:
        algo, digest = record_checksum(f) if f else ("sha256", None)
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
            raise ValueError(f"the size of {mf.MODEL_FILE} is not a number")
    except ValueError as exc:
        raise CheckpointError(f"{path.name} has an unusable metadata.json: {exc}") from None
    try:
        tensors, smeta = stfile.load_safetensors(path / mf.MODEL_FILE, size, digest, algo)
        return join_tied(tensors, smeta), meta
    except stfile.ChecksumMismatch as exc:
        raise CheckpointError(f"{path.name} is corrupt: {exc}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {mf.MODEL_FILE}; there are no weights to load.") from None
    except OSError as exc:
        raise CheckpointError(f"{path / mf.MODEL_FILE} cannot be read ({exc.strerror or exc}).") from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"{path / mf.MODEL_FILE} is not a readable safetensors file ({crash_summary(exc)}).") from None
