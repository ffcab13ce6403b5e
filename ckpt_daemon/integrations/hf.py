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
    Heartbeat,
    StopRequest,
    daemon_choice,
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
                 signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
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
        return control

    def on_train_end(self, args, state, control, **kwargs):
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
