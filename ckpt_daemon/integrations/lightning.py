"""ckpt-daemon for PyTorch Lightning (`lightning.pytorch`, or `pytorch_lightning` alone).

    import ckpt_daemon
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from ckpt_daemon.integrations.lightning import CkptDaemonCallback

    ckpt = ModelCheckpoint(dirpath=ckpt_daemon.checkpoint_dir("checkpoints"), filename="{epoch}-{step}",
                           every_n_train_steps=500, save_top_k=-1)
    trainer = pl.Trainer(callbacks=[ckpt, CkptDaemonCallback()], ...)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_daemon.resume_path())
    # reached only when training finished

and in config.yaml `checkpoints.pattern: "epoch={epoch}-step={step}.ckpt"`. With only
`pytorch_lightning` installed the same import works; with both installed and a
`pytorch_lightning.Trainer`, use `PLCkptDaemonCallback` (Lightning checks the callback's base class).

What Lightning 2.6 does on SIGTERM by itself: its signal connector (installed for the length of
`fit`) sets `trainer.received_sigterm` (and, under DDP, broadcasts it from rank 0 at the next
batch); the loops then raise `SIGTERMException` at the end of the current batch, at the end of an
epoch, or at the next validation batch. That exception is a `SystemExit` without a code: nothing is
saved (unless `ModelCheckpoint(save_on_exception=True)`), `fit` unwinds, and the process exits
**0**, which reads as "training finished".

How the callback cooperates with it:
- Stop: a `StopRequest` is installed at `on_fit_start`, just before Lightning installs its own
  handler, which keeps calling ours. SIGINT (Ctrl+C) is recorded too, instead of Lightning's
  KeyboardInterrupt path (exit 1, no save). At the first `on_train_batch_end` that completes an
  optimizer step after the signal (a step in the middle of gradient accumulation would lose its
  partial gradients), the decision is reduced over ranks (`strategy.reduce_boolean_decision`, so that
  all ranks save the same step) and the callback raises `TrainingStopped`, a `SystemExit` subclass
  with code 128+signal. Lightning handles it like its own `SIGTERMException`: `on_exception` hooks,
  teardown, re-raise; the process exits 143.
- Save: in `on_exception` (for `TrainingStopped`, and for Lightning's own `SIGTERMException` raised
  after a validation, at an epoch end or mid-validation) the current step is written through the
  trainer's `ModelCheckpoint` (the one writing into the daemon's folder, else the first whose names
  carry the step): its `dirpath` and `format_checkpoint_name(...)`, so the file is named like its
  other checkpoints (`epoch=0-step=1234.ckpt`). Its `_save_checkpoint` is used (when there) so that
  it records the step and its own `save_on_exception` does not write it a second time; `last.ckpt` is
  refreshed when `save_last` is on. An existing file is never overwritten (the one this run resumed
  from), and nothing is saved when no step was trained since the start. A save that fails is logged
  and the stop goes on. The exception's code is set to 128+signal before anything else, then
  Lightning tears down and re-raises it. A signal seen only as training reaches its end (max_steps,
  or the last epoch completed) still gets the final step saved, but the exit stays 0: finished.
- Distributed: the callback's own stop is agreed on by all ranks before anyone saves. Lightning's
  own `SIGTERMException` is raised from each rank's local flag; with the daemon signalling every
  process of the tree at once the ranks agree in practice, but a rank that got the signal a whole
  validation later than the others would leave the collective save waiting until the daemon's
  `stop_timeout_s` kills the job (the newest earlier checkpoint is then where it resumes).
- Resume: at `on_train_start` `trainer.global_step` is compared with the step of the checkpoint the
  daemon chose; a mismatch (the script ignored `$CKPT_RESUME`) is logged as a warning, as is a
  `ModelCheckpoint.dirpath` that is not the folder the daemon manages.
- Memory-first checkpoints (`checkpoints.memory.enabled` in the daemon's config; `memory=False` turns
  them off): at `setup` the callback puts a `MemoryCheckpointIO` in place of Lightning's default
  `TorchCheckpointIO` (a custom one is left alone: pass `plugins=[MemoryCheckpointIO()]` to combine
  by hand). ModelCheckpoint's saves into the daemon's folder whose names carry the step are then
  `torch.save`d into memory and copied into a memory slot: training pauses for a save to memory, not to
  disk, and the daemon writes every `persist_every`-th one (and the newest at a crash or stop) under the
  very name Lightning gave it, with its checksum recorded as the sidecar manifest. What must exist as
  a file goes to disk: a new `best_model_path` of a ModelCheckpoint with a `monitor`, and with a
  bounded `save_top_k` every file it keeps in `best_k_models` (also written to disk by the writer's
  thread, done by the end of `fit`: at once with `checkpoints.memory.best_to_disk: every`, the default,
  which with an improving metric is most saves; at most every `best_to_disk_interval_s` with `interval`;
  only when `fit` ends, stopped or not, with `at_end`; one that waits is held as torch.save's bytes in
  this process, and dropped if Lightning removes it from its top k),
  `last.ckpt` (no step in its name: prefer `save_last="link"`, a link to the newest step file), and,
  when `fit` finishes, the newest memory save. After a crash the restarted trainer's `resume_path()` is a verified copy of the newest memory
  state, made at memory speed and freed after the first step. Single process only (not under DDP).
- Heartbeat and metrics: the step at every train batch end (rate-limited), and on rank zero a line of
  `trainer.callback_metrics` in logs/metrics.jsonl every `log_every_n_steps` steps and at every
  validation end.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any, Optional

from ckpt_daemon.integrations.common import (
    ENV_CHECKPOINTS,
    BestToDisk,
    Heartbeat,
    StopRequest,
    checkpoint_dir,
    commit_to_disk,
    daemon_choice,
    memory_region,
    memory_writer,
    release_memory_resume,
    reserve_slots,
    same_folder,
    step_of,
)

try:
    import lightning.pytorch as _pl
except ImportError:  # only the standalone package is installed
    import pytorch_lightning as _pl

log = logging.getLogger("ckpt_daemon.integrations.lightning")

__all__ = ["CkptDaemonCallback", "MemoryCheckpointIO", "TrainingStopped"]


class TrainingStopped(SystemExit):
    """Raised from a train batch end after a stop signal; its code is 128+signal (143 for SIGTERM)."""


def _is_stop_exception(exc: BaseException) -> bool:
    return isinstance(exc, TrainingStopped) or (
        isinstance(exc, SystemExit) and type(exc).__name__ == "SIGTERMException")


def _scalars(metrics: Any) -> dict:
    out = {}
    for k, v in dict(metrics or {}).items():
        numel = getattr(v, "numel", None)
        if callable(numel) and numel() != 1:
            continue
        out[str(k)] = v
    return out


def _finished(trainer) -> bool:
    """Training reached its end (max_steps, or max_epochs completed): a signal seen now does not make
    it a stopped run."""
    max_steps, max_epochs = getattr(trainer, "max_steps", -1), getattr(trainer, "max_epochs", None)
    if isinstance(max_steps, int) and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    return isinstance(max_epochs, int) and max_epochs >= 0 and trainer.current_epoch >= max_epochs


def _exists_on_rank_zero(trainer, path: str) -> bool:
    """Whether `path` exists, as rank 0 sees it, on every rank: a rank that looked after rank 0 wrote
    would skip the collective save and leave the others waiting at its barrier."""
    exists = os.path.lexists(path)
    return bool(trainer.strategy.broadcast(exists, src=0)) if trainer.world_size > 1 else exists


def _checkpoint_callback(trainer) -> Any:
    """The ModelCheckpoint whose files the daemon manages: among the trainer's, the first that writes
    into the daemon's folder, else the first whose names carry the step, else the first."""
    cbs = [cb for cb in getattr(trainer, "checkpoint_callbacks", None) or [trainer.checkpoint_callback]
           if cb is not None and callable(getattr(cb, "format_checkpoint_name", None))]
    daemon_dir = os.environ.get(ENV_CHECKPOINTS)
    for cb in cbs:
        if daemon_dir and getattr(cb, "dirpath", None) and same_folder(cb.dirpath, daemon_dir):
            return cb
    for cb in cbs:
        if "step" in (getattr(cb, "filename", None) or "{epoch}-{step}"):
            return cb
    return cbs[0] if cbs else None


class _CkptDaemonHooks:
    """The callback's behaviour, shared by the `lightning.pytorch` and `pytorch_lightning` classes."""

    def __init__(self, heartbeat_every_s: float = 1.0, checkpoint_dir: Optional[str | os.PathLike] = None,
                 signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), memory: Optional[bool] = None):
        super().__init__()
        self.memory = memory
        self.heartbeat_every_s = heartbeat_every_s
        self.checkpoint_dir = checkpoint_dir
        self.signals = signals
        self.stop: Optional[StopRequest] = None
        self.heartbeat: Optional[Heartbeat] = None
        self.start_step: Optional[int] = None
        self.stopped_at: Optional[int] = None
        self.saved: Optional[str] = None
        self._prev_step: Optional[int] = None
        self._metrics_step: Optional[int] = None
        self._filters: list = []  # warning filters this callback put in place for the length of setup

    # ------------------------------------------------------------------------------ life cycle
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._quiet_state_folder(trainer)
        if stage != "fit" or self.memory is False:
            return
        io = getattr(trainer.strategy, "_checkpoint_io", None)
        if isinstance(io, MemoryCheckpointIO):
            io.trainer = io.trainer or trainer
            return
        if memory_region() is None:
            if self.memory:
                log.warning("ckpt-daemon: memory=True but the daemon has no memory region for this run "
                            "(checkpoints.memory.enabled is off, not under the daemon, or distributed); saving to disk")
            return
        if io is not None and type(io) is not _TorchCheckpointIO:
            log.warning("ckpt-daemon: memory checkpoints are off: the trainer has its own CheckpointIO (%s); pass "
                        "MemoryCheckpointIO() in its place to keep checkpoints in memory", type(io).__name__)
            return
        trainer.strategy.checkpoint_io = MemoryCheckpointIO()
        trainer.strategy.checkpoint_io.trainer = trainer
        log.info("ckpt-daemon: Lightning checkpoints go to memory; the daemon writes them to disk")

    def _quiet_state_folder(self, trainer) -> None:
        """ModelCheckpoint's setup (which Lightning runs after ours) warns "Checkpoint directory X exists and
        is not empty" when its folder holds anything, and under the daemon the folder always holds the
        daemon's state folder (.ckpt-daemon): every fresh run would warn. Where that is all the folder holds,
        exactly that warning, for that folder, is filtered until `on_fit_start`; a folder that holds anything
        else (the user's files, older checkpoints) keeps its warning."""
        import re
        import warnings

        from ckpt_daemon.runtime import STATE_DIR

        for cb in getattr(trainer, "checkpoint_callbacks", None) or []:
            d = getattr(cb, "dirpath", None)
            if not d or not getattr(cb, "save_top_k", 0):
                continue
            try:
                names = os.listdir(d)
            except OSError:
                continue
            if names and set(names) <= {STATE_DIR}:
                msg = f"Checkpoint directory {d} exists and is not empty."
                warnings.filterwarnings("ignore", message=re.escape(msg) + r"\Z")
                self._filters.append(warnings.filters[0])

    def _unquiet(self) -> None:
        import warnings

        for f in self._filters:
            try:
                warnings.filters.remove(f)
            except ValueError:
                pass  # someone reset the filters meanwhile
        if self._filters:
            mutated = getattr(warnings, "_filters_mutated", None)  # let cached decisions be taken again
            if callable(mutated):
                mutated()
        self._filters = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self._unquiet()  # every ModelCheckpoint's setup has run
        self.stopped_at, self.saved, self.start_step = None, None, None
        if self.stop is None or not self.stop.installed:
            self.stop = StopRequest(self.signals)
        self.heartbeat = Heartbeat(self.checkpoint_dir, every_s=self.heartbeat_every_s,
                                   enabled=trainer.is_global_zero)
        daemon_dir = os.environ.get(ENV_CHECKPOINTS)
        cb = _checkpoint_callback(trainer)
        dirpath = getattr(cb, "dirpath", None)
        if trainer.is_global_zero and daemon_dir and dirpath and not same_folder(dirpath, daemon_dir):
            log.warning("ckpt-daemon: ModelCheckpoint saves to %s but the daemon manages %s; it will neither see nor "
                        "resume from these checkpoints. Set ModelCheckpoint(dirpath=...) to %s.",
                        dirpath, daemon_dir, daemon_dir)

    def on_train_start(self, trainer, pl_module) -> None:
        step = trainer.global_step
        self.start_step = self._prev_step = step
        io = getattr(trainer.strategy, "_checkpoint_io", None)
        if trainer.is_global_zero and isinstance(io, MemoryCheckpointIO):
            io.reserve(pl_module, getattr(trainer, "optimizers", None))  # the optimizers exist by now
        if trainer.is_global_zero:
            choice = daemon_choice()
            if choice is not None and choice[1] is not None and choice[1] != step:
                log.warning("ckpt-daemon: the daemon chose to resume from %s (step %s) but training starts at step %d. "
                            "Pass trainer.fit(..., ckpt_path=ckpt_daemon.resume_path()) so that a restart continues "
                            "where the daemon verified it can.", choice[0] or "nothing (a fresh start)", choice[1], step)
        if self.heartbeat is not None:
            self.heartbeat.beat(step, force=True, epoch=trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        hb = self.heartbeat
        if hb is not None:
            hb.beat(step, epoch=trainer.current_epoch)
            every = getattr(trainer, "log_every_n_steps", 0) or 0
            if every and step % every == 0 and step != self._metrics_step:
                self._metrics_step = step
                hb.metrics(step, epoch=trainer.current_epoch, **_scalars(trainer.callback_metrics))
        stepped, self._prev_step = step != self._prev_step, step
        if stepped and step == (self.start_step or 0) + 1:
            release_memory_resume()  # the state this run resumed from is loaded by now
        if not stepped:
            return  # mid gradient accumulation: stopping here would lose the partial gradients
        local = bool((self.stop is not None and self.stop.requested) or getattr(trainer, "received_sigterm", False))
        if trainer.world_size > 1:
            local = trainer.strategy.reduce_boolean_decision(local, all=False)
        if local and not _finished(trainer):
            if self.stop is not None and not self.stop.requested:
                self.stop.request(signal.SIGTERM)  # Lightning's handler or another rank saw it
            raise TrainingStopped(self.exit_code_for_stop())

    def on_train_end(self, trainer, pl_module) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat(trainer.global_step, force=True, epoch=trainer.current_epoch)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.heartbeat is not None and not trainer.sanity_checking:
            self.heartbeat.metrics(trainer.global_step, epoch=trainer.current_epoch,
                                   **_scalars(trainer.callback_metrics))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not _is_stop_exception(exception):
            return
        if self.stop is not None and not self.stop.requested:
            self.stop.request(signal.SIGTERM)
        finished = _finished(trainer)
        code = 0 if finished else self.exit_code_for_stop()
        self.stopped_at = None if finished else trainer.global_step
        exception.code = code  # Lightning re-raises it after teardown: the process exits 143, not 0
        try:
            self.saved = self._save(trainer)
        except Exception as exc:  # noqa: BLE001 - a failed final save is reported; the stop goes on
            log.error("ckpt-daemon: could not save step %d before stopping (%s: %s); the newest checkpoint on "
                      "disk is where the next run resumes", trainer.global_step, type(exc).__name__, exc)
        if self.heartbeat is not None:
            extra = {} if finished else {"stopped": True}
            self.heartbeat.beat(trainer.global_step, force=True, epoch=trainer.current_epoch, **extra)
        if trainer.is_global_zero:
            saved = f" after saving {self.saved}" if self.saved else " (nothing new to save)"
            if finished:
                log.warning("ckpt-daemon: a stop signal came as training reached its end (step %d)%s; exiting 0 "
                            "(finished)", trainer.global_step, saved)
            else:
                log.warning("ckpt-daemon: stopped by %s at step %d%s; exiting %d (not finished)",
                            signal.Signals(code - 128).name, trainer.global_step, saved, code)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._unquiet()  # a fit that failed before on_fit_start
        if self.stop is not None:
            self.stop.restore()

    # ------------------------------------------------------------------------------------ saving
    def _save(self, trainer) -> Optional[str]:
        """Write the current step where the trainer's ModelCheckpoint writes, named as it names files.
        Every rank calls this (saving is collective under DDP/FSDP)."""
        step = trainer.global_step
        if trainer.sanity_checking or self.start_step is None or step <= self.start_step:
            return None
        cb = _checkpoint_callback(trainer)
        if cb is not None and getattr(cb, "dirpath", None):
            if getattr(cb, "_last_global_step_saved", None) == step and getattr(cb, "_last_checkpoint_saved", None):
                return str(cb._last_checkpoint_saved)  # it saved this very step already
            monitor = getattr(cb, "_monitor_candidates", None)
            candidates = monitor(trainer) if callable(monitor) else {
                **_scalars(trainer.callback_metrics), "epoch": trainer.current_epoch, "step": step}
            path = cb.format_checkpoint_name(candidates)
            if _exists_on_rank_zero(trainer, path):
                log.warning("ckpt-daemon: %s exists already; not overwriting it", path)
                return path
            if self.heartbeat is not None:
                self.heartbeat.beat(step, force=True, epoch=trainer.current_epoch, saving=os.path.basename(path))
            if callable(getattr(cb, "_save_checkpoint", None)):
                cb._save_checkpoint(trainer, path)  # also records the step, so it does not save it again
            else:
                trainer.save_checkpoint(path)
            if getattr(cb, "save_last", False) and callable(getattr(cb, "_save_last_checkpoint", None)):
                cb._save_last_checkpoint(trainer, candidates)
            return path
        folder = Path(checkpoint_dir() or os.path.join(trainer.default_root_dir, "checkpoints"))
        path = str(folder / f"epoch={trainer.current_epoch}-step={step}.ckpt")
        if _exists_on_rank_zero(trainer, path):
            return path
        trainer.save_checkpoint(path)
        return path

    # ---------------------------------------------------------------------------------- queries
    def exit_code_for_stop(self) -> int:
        return (self.stop.exit_code if self.stop is not None else None) or 128 + signal.SIGTERM

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None


_TorchCheckpointIO = _pl.plugins.io.TorchCheckpointIO


class MemoryCheckpointIO(_TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO`, with saves into memory slots under the daemon's memory
    checkpoints (see the module docstring): a save whose file goes into the daemon's folder under a name
    that carries its step is `torch.save`d into memory and copied into a slot, which the daemon persists
    under that name. Anything else, or a save that memory cannot take (no room, both slots busy), is
    written to disk by `TorchCheckpointIO`. Loading reads files as Lightning does (`resume_path()` gives a
    copy of a memory state as a file)."""

    def __init__(self) -> None:
        import threading

        super().__init__()
        self._writer = None
        self._off: Optional[str] = None
        self.saves = 0
        self.trainer = None  # set by CkptDaemonCallback: to tell a new best, and a fit that finished
        # checkpoints.memory.best_to_disk: files that must exist (a best, a bounded top k's) waiting for their
        # write to disk, held as the bytes torch.save made (path -> (step, bytes))
        self.best: Optional[BestToDisk] = None
        self.pending: dict[str, Any] = {}
        self.pending_lock = threading.Lock()

    def _best(self, path: str) -> bool:
        """Whether `path` is what a ModelCheckpoint with a monitor has just made its best_model_path
        (it sets that before it saves): such a file is named as the best and must exist."""
        cbs = getattr(self.trainer, "checkpoint_callbacks", None) or []
        here = os.path.abspath(path)
        for cb in cbs:
            if not getattr(cb, "monitor", None):
                continue
            if getattr(cb, "best_model_path", "") and os.path.abspath(str(cb.best_model_path)) == here:
                return True
            # a bounded top k (save_top_k > 0) names its files in best_k_models: they must exist too
            k = getattr(cb, "save_top_k", -1)
            if isinstance(k, int) and k > 0 and here in {os.path.abspath(str(x)) for x in getattr(cb, "best_k_models", {})}:
                return True
        return False

    def _memory_name(self, checkpoint: dict, path) -> Optional[str]:
        if self._off is not None or memory_region() is None:
            return None
        daemon_dir = os.environ.get(ENV_CHECKPOINTS, "")
        path = str(path)
        if not same_folder(os.path.dirname(os.path.abspath(path)), daemon_dir):
            return None
        step = checkpoint.get("global_step")
        if not isinstance(step, int) or step_of(path) != step:
            return None  # last.ckpt and the like: to disk
        return os.path.basename(path)

    def reserve(self, module, optimizers) -> bool:
        """Reserve the memory slots at the start of fit (space and pages paid while training starts, not in
        the first saves; common.reserve_slots). False when memory checkpoints are off for this run."""
        if self._off is not None or memory_region() is None:
            return False
        try:
            if self._writer is None:
                self._writer = memory_writer()
        except Exception as exc:  # noqa: BLE001 - as a save would: memory off, saves to disk
            self._off = f"{type(exc).__name__}: {exc}"
            log.warning("ckpt-daemon: memory checkpoints are off for this run (%s); saving to disk", self._off)
            return False
        return reserve_slots(self._writer, module, optimizers, "this LightningModule")

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        name = self._memory_name(checkpoint, path)
        if name is not None:
            import io

            import torch

            try:
                if self._writer is None:
                    self._writer = memory_writer()
                if self.best is None:
                    self.best = BestToDisk.from_config()
                buf = io.BytesIO()
                torch.save(checkpoint, buf)
                data = buf.getbuffer()
                must = self._best(str(path))  # named as the best (or kept in a top k): it must exist as a file
                flush = bool(self.pending) and self.best.due()  # those waiting: their interval is over
                now = must and self.best.now()
                if now:
                    self.best.written()
                elif must:
                    with self.pending_lock:  # written at a later save (interval) or when fit ends
                        self.pending[str(path)] = data

                def after(committed: bool) -> None:
                    # on the writer's thread, once the copy into the slot is done (the loop went on meanwhile)
                    if not committed:
                        log.warning("ckpt-daemon: %s could not be committed to memory; writing it to disk", name)
                    if not committed or now:
                        commit_to_disk(path, lambda p: p.write_bytes(data), single_file=True)
                        with self.pending_lock:
                            self.pending.pop(str(path), None)
                    if flush:
                        self.flush()

                # the copy into the slot runs on the writer's thread: the loop waits for torch.save only
                if self._writer.save_files(checkpoint["global_step"], name, "file", [(name, data)],
                                           background=True, after=after):
                    self.saves += 1
                    return
                log.warning("ckpt-daemon: %s could not be kept in memory (both slots are busy); writing it to disk", name)
            except Exception as exc:  # noqa: BLE001 - memory is an optimisation: the save goes to disk
                self._off = f"{type(exc).__name__}: {exc}"
                log.warning("ckpt-daemon: memory checkpoints are off for this run (%s); saving to disk", self._off)
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)

    def remove_checkpoint(self, path) -> None:
        with self.pending_lock:
            waited = self.pending.pop(str(path), None) is not None
        if waited and self._writer is not None:
            try:  # a flush on the writer's thread may be writing it: let it end, then remove what it wrote
                self._writer.join()
            except Exception:  # noqa: BLE001 - reported by its own save
                pass
        if os.path.lexists(path):  # a memory checkpoint not yet written to disk has nothing to remove
            super().remove_checkpoint(path)

    def flush(self) -> None:
        """Write the files that wait (best_to_disk) to disk. Never raises: a failure is reported."""
        with self.pending_lock:
            waiting, self.pending = self.pending, {}
        for path, data in waiting.items():
            try:
                if not _same_file(path, data):  # the daemon may have persisted it meanwhile
                    commit_to_disk(path, lambda p, data=data: p.write_bytes(data), single_file=True)
                log.info("ckpt-daemon: %s written to disk (checkpoints.memory.best_to_disk: %s)", os.path.basename(path),
                         self.best.mode if self.best else "every")
            except Exception as exc:  # noqa: BLE001
                log.error("ckpt-daemon: %s could not be written to disk (%s: %s); it is in memory only, and on disk "
                          "once the daemon persists it", path, type(exc).__name__, exc)
        if waiting and self.best is not None:
            self.best.written()

    def teardown(self) -> None:
        """Wait for the last memory save's commit (the process may exit right after); write the best (and a
        bounded top k's files) that wait to disk; at the end of a fit that finished, write the newest memory
        save to disk, so that the script's next steps (`ckpt_path="last"`, a `save_last="link"` link,
        `best_model_path`) find files."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as exc:  # noqa: BLE001
                log.error("ckpt-daemon: the last memory checkpoint could not be committed (%s)", exc)
            self._writer = None
            self.flush()  # also after a stop or an error: the best is on disk whenever fit ends
            if self.trainer is not None and not getattr(self.trainer, "interrupted", True):
                self._persist_newest()
        super().teardown()

    def _persist_newest(self) -> None:
        from pathlib import Path

        from ckpt_daemon import memory as mem

        region, ckdir = memory_region(), Path(os.environ.get(ENV_CHECKPOINTS, ""))
        try:
            info, _ = mem.Region(region).newest(ckdir) if region is not None else (None, [])
            if info is not None and info.pid == os.getpid() and not os.path.lexists(ckdir / info.name):
                r = mem.persist_slot(info, ckdir)
                log.info("ckpt-daemon: %s written to disk at the end of fit (%s)", info.name, r.note)
        except (OSError, ValueError) as exc:
            log.error("ckpt-daemon: the newest memory checkpoint could not be written to disk at the end of fit "
                      "(%s); the daemon writes it when this trainer exits", exc)


def _same_file(path: str, data) -> bool:
    """Whether the file at `path` (a regular file, not followed if a link) holds exactly `data`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        mv = memoryview(data).cast("B")
        if os.fstat(fd).st_size != len(mv):
            return False
        pos, chunk = 0, 16 << 20
        while pos < len(mv):
            got = os.pread(fd, chunk, pos)
            if not got or got != mv[pos:pos + len(got)]:
                return False
            pos += len(got)
        return True
    finally:
        os.close(fd)


class CkptDaemonCallback(_CkptDaemonHooks, _pl.Callback):
    """Resume check, save-and-exit-143 on SIGTERM, heartbeat and metrics for a Lightning Trainer.

    Args:
        heartbeat_every_s: at most one heartbeat write per this many seconds.
        checkpoint_dir: where heartbeat.json goes (default: `$CKPT_DAEMON_CHECKPOINTS`).
        signals: the signals that mean "save and stop".
    """


_pl_variant: Optional[type] = None


def __getattr__(name: str) -> Any:
    """`PLCkptDaemonCallback`: the same callback for `pytorch_lightning.Trainer` when both packages are
    installed (built on first use, so that importing this module does not import both)."""
    global _pl_variant
    if name == "PLCkptDaemonCallback":
        if _pl_variant is None:
            import pytorch_lightning

            _pl_variant = type("PLCkptDaemonCallback", (_CkptDaemonHooks, pytorch_lightning.Callback),
                               {"__doc__": CkptDaemonCallback.__doc__, "__module__": __name__})
        return _pl_variant
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
