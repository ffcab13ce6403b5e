"""The pieces every training script needs to cooperate with the daemon, whatever trains it.

- `resume_path()`: where to resume from. Under the daemon, the checkpoint it chose and verified
  (`$CKPT_RESUME`); otherwise the newest checkpoint that passes verification, or None.
- `StopRequest`: SIGTERM/SIGINT handlers that only record the signal, so that the training loop can
  finish its step, save, and exit 128+signal (143 for SIGTERM). Exit 0 means "finished" to the
  daemon: a stopped trainer must never exit 0.
- `Heartbeat`: rate-limited `heartbeat.json` (the step the daemon shows; with `heartbeat_timeout_s`
  a stale one gets the trainer restarted) and lines in `logs/metrics.jsonl`.

No torch import here (nor in anything this module imports): the daemon imports the package.

    ckpt = torch.load(p, weights_only=True) if (p := ckpt_daemon.resume_path()) else None
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

log = logging.getLogger("ckpt_daemon.integrations")

#: Names recognised when no config says otherwise: native and Hugging Face folders, Lightning's
#: default `{epoch}-{step}` file names (with ModelCheckpoint's `-v1` version suffix), and the
#: single-file names people write with `torch.save`.
DEFAULT_PATTERNS: tuple[str, ...] = (
    "checkpoint-{step}",
    "epoch={epoch}-step={step}.ckpt",
    "epoch={epoch}-step={step}-v{version}.ckpt",
    "step={step}.ckpt",
    "model_step_{step}.pt",
    "rolling_step_{step}.pt",
)

ENV_RESUME = "CKPT_RESUME"
ENV_RUN = "CKPT_DAEMON_RUN"
ENV_CHECKPOINTS = "CKPT_DAEMON_CHECKPOINTS"
ENV_CONFIG = "CKPT_DAEMON_CONFIG"
ENV_METRICS = "CKPT_DAEMON_METRICS"
ENV_MEMORY = "CKPT_DAEMON_MEMORY"  # the memory region, when checkpoints.memory.enabled
ENV_MEMORY_RESUME = "CKPT_DAEMON_MEMORY_RESUME"  # the step of the memory state this restart resumes from
#: How long `resume_path` waits for the daemon's persist of a memory state it could not copy out itself.
MEMORY_PERSIST_WAIT_S = 300.0
_SCAN_WORDS = ("latest", "auto")  # CKPT_RESUME values that mean "look for it" rather than a path


# ----------------------------------------------------------------------------------- where things are
def under_daemon() -> bool:
    """True when this process was started by ckpt-daemon (it hands every trainer a run token)."""
    return bool(os.environ.get(ENV_RUN))


def _config(path: Optional[str | os.PathLike] = None):
    """The ckpt-daemon config this run belongs to, or None. `$CKPT_DAEMON_CONFIG` (a broken one is
    reported), else `./config.yaml` when it is a ckpt-daemon config (any other file of that name,
    Hydra's for instance, is silently not ours)."""
    from ckpt_daemon.config import load_config
    from ckpt_daemon.errors import ConfigError

    explicit = path or os.environ.get(ENV_CONFIG)
    candidate = Path(explicit) if explicit else Path.cwd() / "config.yaml"
    if not explicit and not candidate.is_file():
        return None
    try:
        return load_config(candidate)
    except ConfigError as exc:
        if explicit:
            warnings.warn(f"ckpt-daemon: ignoring the config {candidate}: {exc}", RuntimeWarning, stacklevel=3)
        else:
            log.debug("./config.yaml is not a ckpt-daemon config (%s)", exc)
        return None


def checkpoint_dir(default: Optional[str | os.PathLike] = None) -> Optional[Path]:
    """The folder the daemon manages: `$CKPT_DAEMON_CHECKPOINTS` under the daemon, else the
    `checkpoints.dir` of the ckpt-daemon config (`$CKPT_DAEMON_CONFIG` or `./config.yaml`), else
    `default`. Point your trainer's output there (HF `output_dir`, Lightning `ModelCheckpoint(dirpath)`)
    so that the daemon sees, verifies and resumes from what it writes."""
    env = os.environ.get(ENV_CHECKPOINTS)
    if env:
        return Path(env)
    cfg = _config()
    if cfg is not None:
        return cfg.checkpoint_dir
    return Path(default) if default is not None else None


def _patterns(patterns: Optional[Iterable[str]], cfg) -> list[str]:
    if patterns is not None:
        return [patterns] if isinstance(patterns, str) else list(patterns)
    if cfg is not None:
        return list(dict.fromkeys([*cfg.checkpoints.pattern, *DEFAULT_PATTERNS]))
    return list(DEFAULT_PATTERNS)


def newest_valid(root: str | os.PathLike, patterns: Iterable[str]) -> Optional[Path]:
    """The newest checkpoint under `root` that passes full verification (checksums, zip CRCs).

    Same answer as `scan(root, patterns, verify=True).newest_valid()`, but only the candidates from
    the newest down are checksummed, until one passes: a folder of a hundred multi-GB checkpoints
    is not read end to end at every start."""
    from ckpt_daemon.store import catalog, resolve

    def warn(entry, stage: str, why: str) -> None:
        if stage == "verification":
            warnings.warn(f"ckpt-daemon: skipping {entry.name}: {why}", RuntimeWarning, stacklevel=4)

    c = catalog.scan(Path(root), list(patterns), verify=False, stats=False)
    best = resolve.newest_verified(c, resolve.LATEST, verify=catalog.verify_entry, on_skip=warn)
    return best.path if best is not None else None


def resume_path(checkpoint_dir: Optional[str | os.PathLike] = None,
                patterns: Optional[Iterable[str]] = None) -> Optional[str]:
    """Where this run should resume from, or None for a fresh start.

    Under the daemon (`$CKPT_RESUME` set) that is the checkpoint the daemon chose and verified (None
    for `none`); it is only checked to still exist. If it vanished since, the folder is scanned
    instead, with a warning. Without the daemon, `checkpoint_dir` (default: `$CKPT_DAEMON_CHECKPOINTS`,
    else the config's `checkpoints.dir`) is scanned and the newest checkpoint that passes
    verification is returned; its names are matched with `patterns` (default: the config's patterns
    plus `DEFAULT_PATTERNS`).
    """
    env = os.environ.get(ENV_RESUME, "").strip()
    vanished: Optional[str] = None
    if env:
        if env.lower() == "none":
            return None
        if os.path.exists(env):
            return env
        from_memory = _memory_resume(env)
        if from_memory is not None:
            return from_memory
        if env.lower() not in _SCAN_WORDS:  # "latest"/"auto": a request to look, not a path
            vanished = env
    cfg = None if patterns is not None and checkpoint_dir is not None else _config()
    if checkpoint_dir is not None:
        root: Optional[Path] = Path(checkpoint_dir)
    elif os.environ.get(ENV_CHECKPOINTS):
        root = Path(os.environ[ENV_CHECKPOINTS])
    else:
        root = cfg.checkpoint_dir if cfg is not None else None
    found = newest_valid(root, _patterns(patterns, cfg)) if root is not None else None
    if vanished:
        warnings.warn(
            f"ckpt-daemon: the checkpoint chosen for resume ({vanished}) no longer exists (deleted or moved after "
            f"it was chosen); resuming from {found if found else 'scratch'} instead, the newest valid checkpoint "
            f"in {root}.", RuntimeWarning, stacklevel=2)
    return str(found) if found is not None else None


# ---------------------------------------------------------------------------- memory checkpoints
def memory_region() -> Optional[Path]:
    """The daemon's memory region when memory-first checkpoints are on (`checkpoints.memory.enabled`:
    the daemon sets `$CKPT_DAEMON_MEMORY`) and this process may write it: a single-process run (memory
    checkpoints are not offered under torchrun/DDP yet). None otherwise."""
    region = os.environ.get(ENV_MEMORY)
    if not region or not os.environ.get(ENV_CHECKPOINTS):
        return None
    ws = os.environ.get("WORLD_SIZE", "1")
    if ws.isdigit() and int(ws) > 1:
        return None
    return Path(region)


def memory_writer():
    """A `memsave.MemoryWriter` on the daemon's region for the daemon's checkpoint folder (bounded by the
    config's `checkpoints.memory.max_gb`), or None when memory checkpoints are off (`memory_region`).
    Imports torch: for trainers only."""
    region = memory_region()
    if region is None:
        return None
    from ckpt_daemon.memsave import MemoryWriter

    cfg = _config()
    max_bytes = int(cfg.checkpoints.memory.max_gb * 2**30) if cfg is not None else None
    return MemoryWriter(region, Path(os.environ[ENV_CHECKPOINTS]), max_bytes)


def reserve_slots(writer, model, optimizers=None, what: str = "this trainer") -> bool:
    """Reserve `writer`'s memory slots now, at the start of training, for a checkpoint of `model` and
    `optimizers` (estimated, the optimizer state still to be created included): their space and pages are
    paid on the writer's thread while training starts, not inside the first memory saves (the first save
    waits for it). Never raises: memory checkpoints are an optimisation; a reservation that fails (the
    region cannot hold two copies) is reported by the first memory save, which then goes to disk as before.
    These saves copy host bytes (the framework's own save moved the tensors off the device), so the slots
    are not registered as pinned memory. Imports torch: for trainers only."""
    if writer is None or model is None:
        return False
    try:
        from ckpt_daemon import devio

        est = devio.estimate_state_bytes(model, list(optimizers or []))
        writer.reserve_in_background(est + est // 64)  # + the framework's own files and pickle framing
        return True
    except Exception as exc:  # noqa: BLE001 - the first save reserves them instead, as before
        log.warning("ckpt-daemon: the memory slots of %s could not be reserved at start (%s: %s); the first memory "
                    "save reserves them", what, type(exc).__name__, str(exc)[:200])
        return False


def memory_settings():
    """`checkpoints.memory` of this run's config (`$CKPT_DAEMON_CONFIG`, else ./config.yaml), or the defaults."""
    from ckpt_daemon.config import MemoryConfig

    cfg = _config()
    return cfg.checkpoints.memory if cfg is not None else MemoryConfig()


class BestToDisk:
    """When a new best checkpoint, saved to memory, is written to disk as well (`checkpoints.memory.best_to_disk`):
    "every" at once; "interval" at once when the last best written is best_to_disk_interval_s old (the first
    one always), else it waits until that is so (a newer best replaces it); "at_end" only when training ends.
    The integrations hold what waits and write it when `due()` (at a later save) and at the end; the clock is
    passed in for tests."""

    def __init__(self, mode: str = "every", interval_s: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.mode = mode
        self.interval_s = interval_s
        self.clock = clock
        self.last: Optional[float] = None  # when a best was last written to disk

    @classmethod
    def from_config(cls) -> "BestToDisk":
        mc = memory_settings()
        return cls(mc.best_to_disk, mc.best_to_disk_interval_s)

    def now(self) -> bool:
        """Whether a new best goes to disk at once."""
        return self.mode == "every" or self.due()

    def due(self) -> bool:
        """Whether a best that waits is written now (before the end of training)."""
        if self.mode != "interval":
            return False
        return self.last is None or self.clock() - self.last >= (self.interval_s or 0)

    def written(self) -> None:
        self.last = self.clock()


def resume_copy_dir(region: Optional[Path] = None) -> Optional[Path]:
    region = region or memory_region() or (Path(os.environ[ENV_MEMORY]) if os.environ.get(ENV_MEMORY) else None)
    return region / f"resume-{os.getpid()}" if region is not None else None


def release_memory_resume() -> None:
    """Free the copy `resume_path` made of a memory checkpoint, once the trainer has loaded it (the
    integrations call this after their first training step). Never raises."""
    import shutil

    d = resume_copy_dir()
    if d is not None and os.path.isdir(d) and not os.path.islink(d):
        shutil.rmtree(d, ignore_errors=True)


REPLACED_WHY = "an older save of this name, replaced by the trainer's new save of it"


def set_aside(path: str | os.PathLike, why: str) -> bool:
    """Move an older checkpoint of the same name out of the way of a new save (the trainer saves that
    name again: a step trained again after a fallback, a second run in the same folder), into the
    daemon's quarantine with `why`: nothing is deleted, and the name then holds the new save, as the
    trainer's own writer would overwrite it. True if the name is free now. Never raises."""
    from ckpt_daemon.store import delete

    p = Path(path)
    if not os.path.lexists(p):
        return True
    try:
        if p.is_symlink():
            os.unlink(p)
        else:
            delete.quarantine(p.parent, p.name, why)
    except (OSError, ValueError) as exc:
        log.error("ckpt-daemon: cannot move the older %s out of the way (%s)", p, exc)
    return not os.path.lexists(p)


def commit_to_disk(dest: str | os.PathLike, fill: Callable[[Path], Any], single_file: bool = False) -> bool:
    """Write a trainer's checkpoint to disk, whole or not at all: `fill(path)` writes the folder's files
    into `path` (or, with single_file, the file `path`) in the checkpoint folder's scratch space (which
    the daemon clears if this process dies mid-write); then it is committed as every checkpoint is
    (store/commit.py: every file fsynced, renamed into place as `dest` under the commit lock). An older
    entry of that name is set aside under the same lock: the trainers overwrite it, we keep it in
    quarantine. True if `dest` is the new checkpoint now."""
    from ckpt_daemon.store.commit import Scratch

    dest = Path(dest)
    with Scratch(dest.parent, dest.name) as scratch:
        built = scratch.path / dest.name if single_file else scratch.path
        fill(built)
        try:
            scratch.commit(dest, entry=built, replace=REPLACED_WHY)
        except FileExistsError:
            return False  # the older entry could not be moved out of the way (logged)
    return True


def _memory_resume(env: str, wait_s: Optional[float] = None) -> Optional[str]:
    """The daemon restarts this trainer from a memory state it verified (`$CKPT_DAEMON_MEMORY_RESUME`) and
    persists as `$CKPT_RESUME` in the background: copy that state out of memory as files (a loader reads
    them at once), or, where that cannot be done (no room on the tmpfs, the slot changed), wait for the
    persist. None when this is not such a restart, or the checkpoint never appears."""
    raw = os.environ.get(ENV_MEMORY_RESUME, "")
    region = os.environ.get(ENV_MEMORY)
    if not region or not re.fullmatch(r"[0-9]{1,19}", raw):
        return None
    from ckpt_daemon import memory as mem
    from ckpt_daemon.errors import CkptError
    from ckpt_daemon.fsutil import free_bytes

    step, name, ckdir = int(raw), os.path.basename(env), Path(os.path.dirname(env))
    try:
        mem.private_dir(Path(region))
    except (OSError, CkptError) as exc:
        warnings.warn(f"ckpt-daemon: not reading the memory region: {exc}", RuntimeWarning, stacklevel=3)
        return None
    good, _ = mem.Region(region).slots()
    info = next((s for s in good if s.step == step and s.name == name and s.boot_id == mem.boot_id()
                 and os.path.abspath(s.ckpt_dir) == os.path.abspath(ckdir)), None)
    if info is None:
        # the daemon pins the slot it chose until it is on disk: gone means on disk already, or not ours
        return env if os.path.exists(env) else None
    if info.layout == "native":
        return env  # CheckpointManager(memory=True).load(path) reads a native memory state itself, in place
    dest = resume_copy_dir(Path(region))
    try:
        if free_bytes(Path(region)) < info.nbytes + (64 << 20):
            raise OSError(f"the tmpfs has no room for a copy of {info.nbytes} bytes")
        out = mem.materialize(info, ckdir, dest)
        log.info("ckpt-daemon: resuming from the memory checkpoint %s (copied out of memory to %s)", name, out)
        return str(out)
    except (OSError, ValueError) as exc:
        why = str(exc)
    deadline = time.monotonic() + (MEMORY_PERSIST_WAIT_S if wait_s is None else wait_s)
    log.warning("ckpt-daemon: the memory checkpoint %s cannot be read from memory (%s); waiting for the daemon to "
                "write it to disk", name, why)
    while time.monotonic() < deadline:
        if os.path.exists(env):
            return env
        time.sleep(0.2)
    return None


def daemon_choice(patterns: Optional[Iterable[str]] = None) -> Optional[tuple[Optional[str], Optional[int]]]:
    """What the daemon (or `$CKPT_RESUME`) asked this run to resume from, as (path, step):
    (None, 0) for a fresh start, None when `$CKPT_RESUME` is not set (nothing to compare with).
    The step is None when it cannot be told."""
    env = os.environ.get(ENV_RESUME, "").strip()
    if not env or env.lower() in _SCAN_WORDS:
        return None
    if env.lower() == "none":
        return None, 0
    return env, step_of(env, patterns)


def step_of(path: str | os.PathLike, patterns: Optional[Iterable[str]] = None) -> Optional[int]:
    """The training step a checkpoint is at: `trainer_state.json` of a Hugging Face folder, else the
    `{step}` field of its name."""
    from ckpt_daemon.fsutil import read_json_file
    from ckpt_daemon.store.names import compile_pattern, match_name, step_in_name

    p = Path(path)
    state = read_json_file(p / "trainer_state.json", 64 << 20) if p.is_dir() else None
    gs = (state or {}).get("global_step")
    if isinstance(gs, int) and not isinstance(gs, bool) and gs >= 0:
        return gs
    pats = list(patterns) if patterns is not None else list(DEFAULT_PATTERNS)
    fields = match_name(p.name, [compile_pattern(x) for x in pats])
    if fields and "step" in fields:
        return fields["step"]
    return step_in_name(p.name)


def global_rank() -> int:
    """This process's rank under torchrun / SLURM / Lightning's launchers (0 when not distributed)."""
    for var in ("RANK", "SLURM_PROCID", "GLOBAL_RANK"):
        v = os.environ.get(var, "")
        if v.isdigit():
            return int(v)
    return 0


def same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------- signals
_PASSIVE = (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler, None)


class StopRequest:
    """Record SIGTERM/SIGINT instead of dying, so that the loop can save and exit 128+signal.

        stop = StopRequest()
        for step in ...:
            train_step()
            if stop.requested:
                save(step)
                stop.exit()          # sys.exit(143) after SIGTERM, 130 after Ctrl+C

    A handler that was installed before (a Python function, e.g. Lightning's) is kept and called
    after recording; SIG_DFL, SIG_IGN and Python's KeyboardInterrupt handler are not (they would kill
    the process or raise mid-step). A second Ctrl+C aborts at once (KeyboardInterrupt), for the human
    at the terminal who does not want to wait for the save. Handlers can only be installed from the
    main thread; elsewhere this warns and records nothing (`installed` is False).
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT), install: bool = True,
                 on_signal: Optional[Callable[[int], None]] = None):
        self.signals = tuple(signals)
        self.signal: Optional[int] = None
        self.count = 0
        self.on_signal = on_signal
        self._previous: dict[int, Any] = {}
        self._chain: dict[int, Any] = {}
        self.installed = False
        if install:
            self.install()

    def install(self) -> "StopRequest":
        if self.installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("ckpt-daemon: StopRequest can only install signal handlers from the main thread; "
                          "SIGTERM will not be turned into a final save.", RuntimeWarning, stacklevel=2)
            return self
        for s in self.signals:
            prev = signal.getsignal(s)
            signal.signal(s, self._handle)
            self._previous[s] = prev
            self._chain[s] = prev if callable(prev) and prev not in _PASSIVE else None
        self.installed = True
        return self

    def drop_previous(self, signum: int) -> Any:
        """Stop calling the handler that was there before for `signum` (returns it)."""
        return self._chain.pop(signum, None)

    def previous(self, signum: int) -> Any:
        return self._previous.get(signum)

    def restore(self) -> None:
        """Put the previous handlers back, where ours is still the one installed."""
        if not self.installed or threading.current_thread() is not threading.main_thread():
            return
        for s, prev in self._previous.items():
            if signal.getsignal(s) == self._handle:
                signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self.installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if signum == signal.SIGINT and self.signal == signal.SIGINT and self.count > 1:
            self.restore()
            raise KeyboardInterrupt("second Ctrl+C: aborting without waiting for the final save")
        if self.signal is None:
            self.signal = signum
            log.warning("ckpt-daemon: received %s; finishing this step, saving, then exiting %d%s",
                        signal.Signals(signum).name, 128 + signum,
                        " (Ctrl+C again to abort without saving)" if signum == signal.SIGINT else "")
            if self.on_signal is not None:
                self.on_signal(signum)
        prev = self._chain.get(signum)
        if prev is not None:
            prev(signum, frame)

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as if `signum` had arrived (another rank saw it, or a test)."""
        if self.signal is None:
            self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> Optional[int]:
        """128+signal once a stop was requested (143 for SIGTERM, 130 for SIGINT), else None."""
        return 128 + int(self.signal) if self.signal is not None else None

    def exit(self) -> None:
        """`sys.exit(exit_code)`. Only after a stop was requested: exiting 0 would tell the daemon that
        training finished."""
        if self.signal is None:
            raise RuntimeError("StopRequest.exit() was called but no stop was requested; exit 0 yourself when "
                               "training is finished, or let the error through.")
        sys.exit(self.exit_code)

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()


# --------------------------------------------------------------------------------------- heartbeat
def _plain(v: Any) -> Any:
    """A JSON-able scalar from what training loops log (floats, ints, 0-d tensors, numpy scalars)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    item = getattr(v, "item", None)
    if callable(item):
        try:
            return _plain(item())
        except (ValueError, RuntimeError, TypeError):
            return None
    try:
        return _plain(float(v))
    except (TypeError, ValueError):
        return str(v)[:200]


class Heartbeat:
    """The trainer's sign of life for the daemon, and its metrics lines.

    `beat(step, **fields)` rewrites `<checkpoints>/.ckpt-daemon/heartbeat.json` at most every
    `every_s` seconds (or at once with force=True); `metrics(step, **values)` appends
    `{"step": step, **values, "time": ...}` to `$CKPT_DAEMON_METRICS` (logs/metrics.jsonl). Both are
    best effort and never raise: a full disk must not stop training. Only global rank 0 writes
    (set `enabled` to override). Without a folder (no argument, not under the daemon) beats are
    no-ops, and without a metrics path so are metrics.
    """

    def __init__(self, checkpoint_dir: Optional[str | os.PathLike] = None, every_s: float = 1.0,
                 metrics_path: Optional[str | os.PathLike] = None, enabled: Optional[bool] = None,
                 clock: Callable[[], float] = time.monotonic):
        env_dir = os.environ.get(ENV_CHECKPOINTS)
        self.dir = Path(checkpoint_dir) if checkpoint_dir is not None else (Path(env_dir) if env_dir else None)
        env_metrics = os.environ.get(ENV_METRICS)
        self.metrics_path = Path(metrics_path) if metrics_path is not None else (
            Path(env_metrics) if env_metrics else None)
        self.every_s = float(every_s)
        self.enabled = (global_rank() == 0) if enabled is None else bool(enabled)
        self._clock = clock
        self._last: Optional[float] = None
        self.last_step: Optional[int] = None
        self._metrics_warned = False

    def beat(self, step: Optional[int], force: bool = False, **fields: Any) -> bool:
        """Write the heartbeat if `every_s` has passed since the last one (or `force`). True if written."""
        if not self.enabled or self.dir is None:
            return False
        now = self._clock()
        if not force and self._last is not None and now - self._last < self.every_s:
            return False
        self._last = now
        self.last_step = step
        try:
            from ckpt_daemon.runtime import write_heartbeat

            return bool(write_heartbeat(self.dir, step=step, **{k: _plain(v) for k, v in fields.items()}))
        except Exception as exc:  # noqa: BLE001 - bookkeeping never stops training
            log.debug("heartbeat not written: %s", exc)
            return False

    def metrics(self, step: Optional[int], **values: Any) -> bool:
        """Append one metrics line. True if written."""
        if not self.enabled or self.metrics_path is None:
            return False
        rec = {"step": step, **{k: _plain(v) for k, v in values.items()}, "time": time.time()}
        try:
            from ckpt_daemon.logs import append_jsonl

            append_jsonl(self.metrics_path, rec)
            return True
        except Exception as exc:  # noqa: BLE001
            if not self._metrics_warned:
                self._metrics_warned = True
                log.warning("ckpt-daemon: cannot append to %s (%s); training goes on without metrics lines",
                            self.metrics_path, exc)
            return False
