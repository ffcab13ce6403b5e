"""ckpt-daemon for the Hugging Face `transformers.Trainer`.

    import ckpt_daemon
    from ckpt_daemon.integrations.hf import CkptDaemonCallback

    args = TrainingArguments(output_dir=str(ckpt_daemon.checkpoint_dir("out")), save_steps=500, ...)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[CkptDaemonCallback()])
    trainer.train(resume_from_checkpoint=ckpt_daemon.resume_path())
    # reached only when training finished (or was stopped with exit_on_stop=False)

and in config.yaml `checkpoints.pattern: "checkpoint-{step}"` (Hugging Face's folder names).

What the callback does:
- Resume: `resume_path()` is the checkpoint the daemon chose and verified. At `on_train_begin` the
  step Hugging Face actually resumed at is compared with that choice, and a mismatch is logged as a
  warning (the script resumed from something else, or from nothing). A warning also says so when
  `output_dir` is not the folder the daemon manages: the daemon would never see the checkpoints.
- Stop: SIGTERM and SIGINT are recorded by a `StopRequest` installed at `on_train_begin` (a handler
  installed before it keeps being called). At the next `on_step_end` the callback asks for a save
  and a stop (`control.should_save = should_training_stop = True`, evaluation skipped to save time),
  so Hugging Face writes the current step into its usual `checkpoint-<step>/` folder and leaves the
  loop. Under torch.distributed the stop flag is all-reduced at every step end, so that every rank
  saves the same step (a rank that saved alone would hang the others).
- Exit code: `on_train_end` raises `SystemExit(128+signal)` (143 for SIGTERM) when training was
  stopped. This is the choice that needs no extra user code and cannot be forgotten: the process
  exits 143 and the code after `trainer.train()` (saving a "final" model, evaluating, pushing),
  which assumes training finished, does not run for a stopped run. `on_train_end` comes after the
  stop checkpoint is written and after the reporting integrations (TensorBoard, W&B...) have closed,
  since those are registered before user callbacks. With `exit_on_stop=False` nothing is raised and
  the script calls `callback.exit_if_stopped()` itself after `train()`. A training run that reaches
  `max_steps` returns normally and the script exits 0; so does one whose signal is only seen at
  its last step, or after it (during the final save or teardown): a finished run is not turned into
  a stopped one.
- What Hugging Face does by itself: by default nothing; SIGTERM kills the process mid-step and
  nothing is saved. With `TrainingArguments(enable_jit_checkpoint=True)` its handler lets training
  run on for 3 s, then saves `checkpoint-<step>` from the next hook it sees (possibly
  `on_pre_optimizer_step`, before that step's update; with transformers 5.23 we saw it write
  checkpoint-44 there and checkpoint-45 at the step end), stops, and `train()` returns normally: the
  script exits 0 and the daemon would read "finished". The callback therefore takes SIGTERM over
  from that handler (it stops calling it) and logs that it did.
- Under torchrun the daemon's child is torchrun: the workers save and exit 143, and torchrun itself
  exits with its own code (1 after a SIGTERM it was sent too); any exit of a trainer the daemon
  stopped counts as "stopped".
- Memory-first checkpoints (`checkpoints.memory.enabled` in the daemon's config; `memory=False` turns
  them off for this callback): each save Hugging Face decides on (its `save_steps`, the stop save) is
  written by Hugging Face's own code into a staging folder on the tmpfs next to the memory slots (the
  trainer's `_save_checkpoint` is wrapped on that instance: `args.output_dir` points at the staging
  folder for the length of that call only), and copied into a memory slot by a background thread,
  which then removes the staging folder. Training pauses for Hugging Face's save to memory, not to
  disk; the daemon writes every `persist_every`-th one (and the newest at a crash or stop) as
  `checkpoint-<step>/` in the checkpoint folder, with its checksums recorded as the sidecar manifest.
  A save that is the new best (`metric_for_best_model`) is also written to disk by that thread, durable,
  so that `best_model_checkpoint` names a folder on disk (`load_best_model_at_end` waits for it): at once
  (`checkpoints.memory.best_to_disk: every`, the default; with an improving metric that is most saves, and
  memory then helps little), at most every `best_to_disk_interval_s` (`interval`), or when training ends
  (`at_end`); a best that waits is kept as a folder on the tmpfs (a newer best replaces it) and written
  when its interval is over (by the thread of a later save) and when training ends (at the final log,
  before Hugging Face loads the best or applies save_total_limit=1, stopped or not). A save that cannot
  be staged (the tmpfs fills up mid-write, no room for it) or committed to memory is written to disk
  instead, with a warning. After a crash the restarted trainer's `resume_path()` is a verified copy of
  the newest memory state, made at memory speed, freed after the first step. Off (saves go to disk as
  before) under torchrun or when `output_dir` is not the daemon's folder. `save_total_limit` is applied
  as Hugging Face applies it, when a save is written to disk; memory saves persisted later by the
  daemon are managed by its retention tiers. A save of a name that exists on disk (a step trained
  again) replaces it as Hugging Face would, the older folder kept in the daemon's quarantine.
- Heartbeat: `state.global_step` at every step end (at most every `heartbeat_every_s` seconds,
  always on a stop), which `ckpt-daemon status` shows and `heartbeat_timeout_s` watches; the
  numbers of `on_log` (loss, learning_rate, grad_norm, epoch, eval_loss...) as lines of
  `logs/metrics.jsonl`. Only the world's process zero writes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any, Optional

from transformers import TrainerCallback

from ckpt_daemon.integrations.common import (
    ENV_CHECKPOINTS,
    BestToDisk,
    Heartbeat,
    StopRequest,
    commit_to_disk,
    daemon_choice,
    memory_region,
    memory_writer,
    release_memory_resume,
    reserve_slots,
    same_folder,
)

log = logging.getLogger("ckpt_daemon.integrations.hf")

__all__ = ["CkptDaemonCallback"]


def _is_hf_jit_handler(handler: Any) -> bool:
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("transformers.trainer_jit_checkpoint")


def _any_rank(flag: bool, device: Any) -> bool:
    """`flag` or'ed over all ranks (a no-op when not distributed)."""
    try:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return flag
        if dist.get_backend() == "nccl" and (device is None or getattr(device, "type", "") != "cuda"):
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
    except (ImportError, RuntimeError, ValueError) as exc:
        log.debug("stop flag not synchronised across ranks: %s", exc)
        return flag


class CkptDaemonCallback(TrainerCallback):
    """Resume check, save-and-exit-143 on SIGTERM, heartbeat and metrics for `transformers.Trainer`.

    Args:
        heartbeat_every_s: at most one heartbeat write per this many seconds.
        exit_on_stop: raise SystemExit(128+signal) from `on_train_end` after a stop (see the module
            docstring); False: call `exit_if_stopped()` yourself after `trainer.train()`.
        checkpoint_dir: where heartbeat.json goes (default: `$CKPT_DAEMON_CHECKPOINTS`, i.e. only
            under the daemon).
        signals: the signals that mean "save and stop".
    """

    def __init__(self, heartbeat_every_s: float = 1.0, exit_on_stop: bool = True,
                 checkpoint_dir: Optional[str | os.PathLike] = None,
                 signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), memory: Optional[bool] = None):
        self.memory = memory
        self._mem: Optional[_MemorySaves] = None
        self.heartbeat_every_s = heartbeat_every_s
        self.exit_on_stop = exit_on_stop
        self.checkpoint_dir = checkpoint_dir
        self.signals = signals
        self.stop: Optional[StopRequest] = None
        self.heartbeat: Optional[Heartbeat] = None
        self.start_step: Optional[int] = None
        self.stopped_at: Optional[int] = None  # the step a stop was acted on (and saved)
        self.saved: Optional[str] = None

    # ------------------------------------------------------------------------------ life cycle
    def on_train_begin(self, args, state, control, **kwargs):
        self.stopped_at, self.saved = None, None
        if self.stop is None or not self.stop.installed:
            self.stop = StopRequest(self.signals)
            if _is_hf_jit_handler(self.stop.previous(signal.SIGTERM)):
                self.stop.drop_previous(signal.SIGTERM)
                log.warning("ckpt-daemon: enable_jit_checkpoint is on; its SIGTERM handler is replaced by "
                            "CkptDaemonCallback, which saves at the next step end and exits 143")
        self.heartbeat = Heartbeat(self.checkpoint_dir, every_s=self.heartbeat_every_s,
                                   enabled=state.is_world_process_zero)
        self.start_step = state.global_step
        if state.is_world_process_zero:
            self._check_resume(state.global_step)
            daemon_dir = os.environ.get(ENV_CHECKPOINTS)
            if daemon_dir and args.output_dir and not same_folder(args.output_dir, daemon_dir):
                log.warning("ckpt-daemon: Trainer saves to %s but the daemon manages %s; it will neither see nor "
                            "resume from these checkpoints. Set TrainingArguments(output_dir=...) to %s.",
                            args.output_dir, daemon_dir, daemon_dir)
        self.heartbeat.beat(state.global_step, force=True, epoch=state.epoch)
        if self._mem is None and self.memory is not False and state.is_world_process_zero:
            self._mem = _MemorySaves.start(args, _calling_trainer(), explicit=bool(self.memory))
        return control

    def _check_resume(self, step: int) -> None:
        choice = daemon_choice()
        if choice is None:
            return
        path, want = choice
        if want is not None and want != step:
            log.warning("ckpt-daemon: the daemon chose to resume from %s (step %s) but training starts at step %d. "
                        "Pass trainer.train(resume_from_checkpoint=ckpt_daemon.resume_path()) so that a restart "
                        "continues where the daemon verified it can.", path or "nothing (a fresh start)", want, step)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.heartbeat is not None:
            self.heartbeat.beat(step, epoch=state.epoch)
        local = self.stop is not None and self.stop.requested
        finished = state.max_steps > 0 and step >= state.max_steps  # the loop ends and saves by itself
        if self.stopped_at is None and _any_rank(local, getattr(args, "device", None)) and not finished:
            if self.stop is not None and not self.stop.requested:
                self.stop.request(signal.SIGTERM)  # another rank got the signal
            self.stopped_at = step
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False
            self.saved = os.path.join(args.output_dir or ".", f"checkpoint-{step}")
            if self.heartbeat is not None:
                self.heartbeat.beat(step, force=True, epoch=state.epoch, saving=f"checkpoint-{step}")
            if state.is_world_process_zero:
                log.warning("ckpt-daemon: stopping at step %d; saving %s", step, self.saved)
        if self._mem is not None:
            release_memory_resume()  # the state this run resumed from is loaded by now
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:
            # Leaving the loop runs the epoch-end hooks; an epoch save strategy would write the same
            # step a second time, in place.
            control.should_save = False
            control.should_evaluate = False
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.heartbeat is not None:
            self.heartbeat.beat(state.global_step, force=self.stopped_at is not None, epoch=state.epoch)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.heartbeat is not None and logs:
            self.heartbeat.metrics(state.global_step, **logs)
        if self._mem is not None and logs and "train_runtime" in logs:
            # the log of a train() that ended (finished or stopped), just before Hugging Face loads the best and
            # applies save_total_limit=1 to the folder: the best must be on disk from here on
            self._mem.finish()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._mem is not None:
            self._mem.close()  # the last memory save is committed before the process may exit
            self._mem = None
        if self.stop is not None:
            self.stop.restore()
        if self.heartbeat is not None:
            extra = {"stopped": True} if self.stopped_at is not None else {}
            self.heartbeat.beat(state.global_step, force=True, epoch=state.epoch, **extra)
        if self.stopped_at is None:
            return control
        if state.is_world_process_zero:
            log.warning("ckpt-daemon: stopped by %s at step %d after saving %s; exiting %d (not finished)",
                        self.signal_name, self.stopped_at, self.saved, self.exit_code)
        if self.exit_on_stop:
            raise SystemExit(self.exit_code)
        return control

    # ---------------------------------------------------------------------------------- queries
    @property
    def stopped(self) -> bool:
        """True when training left its loop because of a stop signal (not because it finished)."""
        return self.stopped_at is not None

    @property
    def exit_code(self) -> Optional[int]:
        if not self.stopped:
            return None
        return (self.stop.exit_code if self.stop is not None else None) or 128 + signal.SIGTERM

    @property
    def signal_name(self) -> str:
        sig = self.stop.signal if self.stop is not None and self.stop.signal else signal.SIGTERM
        return signal.Signals(sig).name

    def exit_if_stopped(self) -> None:
        """With exit_on_stop=False: call after `trainer.train()`; exits 128+signal after a stop."""
        if self.stopped:
            sys.exit(self.exit_code)


def _same_save(a: str, b: str) -> bool:
    """Whether folder b holds the Hugging Face save that folder a holds (same trainer_state.json, which
    names its step and log history)."""
    name = "trainer_state.json"
    try:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            return fa.read(64 << 20) == fb.read(64 << 20)
    except OSError:
        return False


def _calling_trainer() -> Any:
    """The `transformers.Trainer` whose loop calls this callback (found up the call stack: Hugging Face
    hands callbacks no reference to it), or None."""
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            break
        me = frame.f_locals.get("self")
        if isinstance(me, Trainer):
            return me
        frame = frame.f_back
    return None


class _MemorySaves:
    """Hugging Face's checkpoint saves, into memory slots (see the module docstring).

    The trainer's `_save_checkpoint` is wrapped (on this instance only): for the length of that call
    `args.output_dir` is a staging folder on the tmpfs, so Hugging Face's own code writes the checkpoint
    there; the folder's files are then copied into a slot by the writer's thread. Anything that goes
    wrong while staged (the tmpfs fills up mid-write, a subfolder) makes the same save again to disk."""

    def __init__(self, region, writer, trainer, best: Optional[BestToDisk] = None):
        import threading

        self.region = region
        self.writer = writer
        self.trainer = trainer
        self.staging = os.path.join(str(region), f"staging-{os.getpid()}")
        self.warned: set[str] = set()
        self.saves = 0
        self.count = 0
        # checkpoints.memory.best_to_disk: a best that waits for its write to disk, as a folder on the tmpfs
        self.best = best or BestToDisk()
        self.held = os.path.join(self.staging, "best")
        self.pending: Optional[tuple[str, str]] = None  # (name, the checkpoint folder) of the best in self.held
        self.pending_lock = threading.Lock()
        self.original = trainer._save_checkpoint
        trainer._save_checkpoint = self._save_checkpoint
        self.original_load_best = getattr(trainer, "_load_best_model", None)
        if callable(self.original_load_best):
            trainer._load_best_model = self._load_best_model

    def _load_best_model(self, *a, **kw):
        """load_best_model_at_end: the best checkpoint's disk copy is written by the writer's thread, or waits
        (best_to_disk): wait for it, or write it now."""
        self.finish()
        return self.original_load_best(*a, **kw)

    def finish(self) -> None:
        """Training ended: the last memory save committed, and a best that waits written to disk. Never raises."""
        if self.writer is not None:
            try:
                self.writer.join()
            except Exception as exc:  # noqa: BLE001 - reported; the load finds what is on disk
                log.error("ckpt-daemon: the last memory checkpoint could not be committed (%s)", exc)
        self.flush()

    def hold(self, folder: str, name: str, real: str) -> None:
        """Keep a staged best (a folder on the tmpfs) until it is written to disk; a best that waited before
        it is no longer the best, and goes."""
        import shutil

        with self.pending_lock:
            self.pending = None
            shutil.rmtree(self.held, ignore_errors=True)
            os.makedirs(self.held, mode=0o700)
            os.rename(folder, os.path.join(self.held, name))
            self.pending = (name, real)

    def drop_held(self) -> None:
        """A newer best went to disk: the one waiting is no longer the best."""
        import shutil

        with self.pending_lock:
            if self.pending is not None:
                self.pending = None
                shutil.rmtree(self.held, ignore_errors=True)

    def flush(self) -> None:
        """Write the best that waits (if any) to disk. Never raises: a failure is reported, the memory copy
        and the daemon's persists stand."""
        import shutil

        with self.pending_lock:
            if self.pending is None:
                return
            name, real = self.pending
            folder = os.path.join(self.held, name)
            try:
                if not _same_save(folder, os.path.join(real, name)):  # the daemon may have persisted it meanwhile
                    self._to_disk(folder, name, real)
                self.best.written()
                log.info("ckpt-daemon: the best checkpoint %s written to disk (checkpoints.memory.best_to_disk: %s)",
                         name, self.best.mode)
            except Exception as exc:  # noqa: BLE001
                log.error("ckpt-daemon: the best checkpoint %s could not be written to disk (%s: %s); it is in memory "
                          "only, and on disk once the daemon persists it", name, type(exc).__name__, exc)
            self.pending = None
            shutil.rmtree(self.held, ignore_errors=True)

    @classmethod
    def start(cls, args, trainer, explicit: bool) -> "Optional[_MemorySaves]":
        region = memory_region()
        why = None
        if region is None:
            why = ("the daemon has no memory region for this run (checkpoints.memory.enabled is off, the script does "
                   "not run under the daemon, or it runs under torchrun)")
        elif trainer is None or not callable(getattr(trainer, "_save_checkpoint", None)):
            why = "the callback is not called from a transformers.Trainer it can find"
        elif not args.output_dir or not same_folder(args.output_dir, os.environ.get(ENV_CHECKPOINTS, "")):
            why = "output_dir is not the folder the daemon manages"
        if why is not None:
            if explicit or region is not None:
                log.warning("ckpt-daemon: memory checkpoints are off for this Trainer: %s; checkpoints are saved to "
                            "disk as usual", why)
            return None
        try:
            writer = memory_writer()
        except Exception as exc:  # noqa: BLE001 - memory checkpoints are an optimisation; disk saves go on
            log.warning("ckpt-daemon: memory checkpoints are off for this Trainer (%s); checkpoints are saved to disk", exc)
            return None
        best = BestToDisk.from_config()
        log.info("ckpt-daemon: Hugging Face checkpoints go to memory (%s); the daemon writes them to disk; a new best "
                 "goes to disk %s", region, {"every": "at once", "interval": f"at most every {best.interval_s} s",
                                             "at_end": "when training ends"}[best.mode])
        saves = cls(region, writer, trainer, best)
        # the slots' space and pages at the start, not inside the first saves (the optimizer exists by now)
        reserve_slots(writer, getattr(trainer, "model", None), [getattr(trainer, "optimizer", None)], "this Trainer")
        return saves

    def _need(self) -> int:
        """About what one Hugging Face checkpoint takes: weights, optimizer state, a margin."""
        n = 0
        try:
            n += sum(t.numel() * t.element_size() for t in self.trainer.model.state_dict().values())
            opt = getattr(self.trainer, "optimizer", None)
            if opt is not None:
                n += sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                         if hasattr(t, "element_size"))
        except Exception:  # noqa: BLE001 - an estimate
            pass
        return n + (n // 16) + (64 << 20)

    def _room(self) -> bool:
        from ckpt_daemon.fsutil import free_bytes

        need = self._need()
        try:
            free = free_bytes(self.region)
        except OSError:
            free = 0
        if free < need:
            self._warn("room", "ckpt-daemon: the tmpfs of the memory region has %d MiB free, a checkpoint needs about "
                       "%d MiB: this save goes to disk", free >> 20, need >> 20)
            return False
        return True

    def _save_checkpoint(self, model, trial, *a, **kw):
        """The trainer's `_save_checkpoint`, into memory when it can be."""
        import shutil

        args, state = self.trainer.args, self.trainer.state
        # a new best is named in trainer_state.json and loaded by load_best_model_at_end: it goes to disk too,
        # written by the writer's thread after its memory commit, at once or later (best_to_disk)
        best = bool(args.metric_for_best_model) and getattr(state, "best_global_step", None) == state.global_step
        if self.writer is None or trial is not None or not self._room():
            if best:
                self.drop_held()
            return self.original(model, trial, *a, **kw)
        real = args.output_dir
        self.count += 1  # a folder of its own per save: the previous one may still be copied from
        root = os.path.join(self.staging, str(self.count))
        args.output_dir = root
        try:
            self.original(model, trial, *a, **kw)
        except (OSError, RuntimeError) as exc:  # e.g. the tmpfs filled up under Hugging Face's own writing
            args.output_dir = real
            shutil.rmtree(root, ignore_errors=True)
            log.warning("ckpt-daemon: checkpoint-%d could not be staged in memory (%s: %s); saving it to disk",
                        state.global_step, type(exc).__name__, str(exc)[:200])
            if best:
                self.drop_held()
            return self.original(model, trial, *a, **kw)
        finally:
            args.output_dir = real
        name = f"checkpoint-{state.global_step}"
        folder = os.path.join(root, name)
        done = False
        try:
            bmc = state.best_model_checkpoint
            if isinstance(bmc, str) and bmc.startswith(self.staging + os.sep):
                state.best_model_checkpoint = os.path.join(real, os.path.basename(bmc))
                state.save_to_json(os.path.join(folder, "trainer_state.json"))
            now = best and self.best.now()
            if now:
                self.best.written()
            done = self._keep(folder, name, state.global_step, real, root, also_disk=now, hold=best and not now,
                              flush=not best and self.pending is not None and self.best.due())
        finally:
            if not done:
                shutil.rmtree(root, ignore_errors=True)
        return None

    def _keep(self, folder: str, name: str, step: int, real: str, root: str, also_disk: bool = False,
              hold: bool = False, flush: bool = False) -> bool:
        """Into a slot, copied by the writer's thread (the training loop waits only for Hugging Face's own
        writing); the staging folder goes once the copy is done, or to disk if it cannot be committed (or
        also_disk), or is held as the best that waits (hold). flush: write the best that waits (its interval
        is over). True if the writer's thread owns the staging folder now."""
        import shutil

        import numpy as np

        def after(committed: bool) -> None:
            try:
                if not committed:
                    log.warning("ckpt-daemon: %s could not be committed to memory; writing it to disk", name)
                if not committed or also_disk:
                    self._to_disk(folder, name, real)
                    if hold or also_disk:
                        self.drop_held()  # this best is on disk: the one before it no longer waits
                elif hold:
                    try:
                        self.hold(folder, name, real)
                    except OSError as exc:  # no room on the tmpfs to keep it aside: to disk now, as before
                        log.warning("ckpt-daemon: the best %s cannot wait in memory (%s); writing it to disk", name, exc)
                        self._to_disk(folder, name, real)
                        self.drop_held()
                if flush:
                    self.flush()
            finally:
                shutil.rmtree(root, ignore_errors=True)

        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
            if not entries or not all(e.is_file(follow_symlinks=False) for e in entries):
                raise ValueError("Hugging Face wrote subfolders or links into it, which memory slots do not hold")
            files = [(e.name, np.memmap(e.path, dtype=np.uint8, mode="r") if e.stat().st_size else b"")
                     for e in entries]
            if self.writer.save_files(step, name, "folder", files, background=True, after=after):
                self.saves += 1
                return True
            why = "both memory slots are busy"
        except Exception as exc:  # noqa: BLE001 - fall back to the disk, never lose the save
            why = f"{type(exc).__name__}: {exc}"
        log.warning("ckpt-daemon: %s could not be kept in memory (%s); writing it to disk", name, why)
        self._to_disk(folder, name, real)
        if hold or also_disk:
            self.drop_held()
        return False

    def _to_disk(self, folder: str, name: str, real: str) -> None:
        """The staged folder into the checkpoint folder, built aside and renamed into place, durable."""
        import shutil

        def fill(dest) -> None:
            for e in os.scandir(folder):
                if e.is_file(follow_symlinks=False):
                    shutil.copyfile(e.path, dest / e.name)

        if not commit_to_disk(os.path.join(real, name), fill):
            return
        limit = getattr(self.trainer.args, "save_total_limit", None)
        if limit:  # Hugging Face's own rotation, on the folders it would have written there itself
            try:
                from transformers.trainer_utils import rotate_checkpoints

                rotate_checkpoints(output_dir=real, save_total_limit=limit, use_mtime=True,
                                   best_model_checkpoint=self.trainer.state.best_model_checkpoint)
            except Exception as exc:  # noqa: BLE001 - as Hugging Face: a failed rotation is not a failed save
                log.warning("ckpt-daemon: save_total_limit not applied (%s)", exc)

    def _warn(self, key: str, msg: str, *a) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning(msg, *a)

    def close(self) -> None:
        import shutil

        for attr, mine in (("_save_checkpoint", self._save_checkpoint), ("_load_best_model", self._load_best_model)):
            if self.trainer.__dict__.get(attr) == mine:
                delattr(self.trainer, attr)  # the class's own again
        self.finish()
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as exc:  # noqa: BLE001
                log.error("ckpt-daemon: the last memory checkpoint could not be committed (%s)", exc)
            self.writer = None
        shutil.rmtree(self.staging, ignore_errors=True)
