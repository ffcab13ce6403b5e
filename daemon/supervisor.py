"""Supervisor: runs training.command as a child and keeps it running from the highest valid checkpoint.

The decisions are pure and tested without sleeping or forking: `classify` (what an exit means),
`CrashPolicy` (backoff, fallback, giving up). `Supervisor` is the process side. It runs in a thread of
its own, so that slow work (verifying a multi-GB checkpoint before a restart, waiting for a trainer's
final save) never blocks the daemon's main loop and its systemd watchdog pings.

The child gets a new session (so SIGTERM reaches torchrun's workers too), the parent-death signal
SIGTERM (if the daemon is SIGKILLed the trainer saves and exits rather than running on unsupervised),
a run token in $CKPT_DAEMON_RUN (its heartbeats carry it, whichever process of the tree writes them),
and its output goes to logs/trainer.log with the last lines kept for crash reports.

Stop versus finished: training has finished only when the trainer exits 0 on its own. An exit by a
signal the daemon did not send (e.g. 143 after saving on someone else's SIGTERM) is "stopped from
outside" and training is restarted.
"""

from __future__ import annotations

import collections
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ckpt_daemon import runtime, spare
from ckpt_daemon.fsutil import free_bytes
from ckpt_daemon.logs import get_logger
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import delete, foreign, verifyonce
from ckpt_daemon.store import resolve as rs
from daemon import alerts
from daemon.outputtail import OutputTail
from daemon.watch import writers_lookup

log = get_logger("daemon.supervisor")

# Resolved once, at import, in the daemon's single thread: the child of a multi-threaded process may
# not dlopen or take locks between fork and exec; calling an already resolved function is all it does.
try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None
_PR_SET_PDEATHSIG = 1
_SIGTERM = int(signal.SIGTERM)


def _pdeathsig() -> None:
    """Runs in the child before exec: SIGTERM if the thread that started it (the supervisor) dies."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, _SIGTERM)


# ----------------------------------------------------------------------------------- pure decisions
_STOP_SIGNALS = {int(signal.SIGTERM), int(signal.SIGINT), int(signal.SIGHUP), int(signal.SIGQUIT)}
_DISK_FULL = ("No space left on device", "ENOSPC", "Disk quota exceeded", "EDQUOT")
_OOM = ("CUDA out of memory", "OutOfMemoryError", "MemoryError", "Cannot allocate memory")


@dataclass
class Exit:
    """What a trainer's exit means."""

    kind: str  # finished|stopped|stopped_outside|disk_full|out_of_memory|heartbeat|killed|signal|error|start_failed
    description: str
    blame_checkpoint: bool  # may the checkpoint it resumed from be at fault?


def describe_rc(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    if rc > 128 and rc - 128 in _STOP_SIGNALS:
        return f"exit code {rc} ({signal.Signals(rc - 128).name} after saving)"
    return f"exit code {rc}"


def classify(rc: int, tail: list[str], stopped_by_daemon: bool, stale_heartbeat: bool = False) -> Exit:
    desc = describe_rc(rc)
    text = "\n".join(tail[-40:])
    if stopped_by_daemon:
        return Exit("stopped", desc, False)
    if stale_heartbeat:
        return Exit("heartbeat", f"{desc} (its heartbeat went stale)", False)
    if rc == 0:
        return Exit("finished", "exit code 0", False)
    sig = -rc if rc < 0 else (rc - 128 if rc > 128 else None)
    if sig in _STOP_SIGNALS:
        return Exit("stopped_outside", f"{desc}: a signal the daemon did not send", False)
    if any(s in text for s in _DISK_FULL):
        return Exit("disk_full", f"{desc}: the disk is full", False)
    if any(s in text for s in _OOM):
        return Exit("out_of_memory", f"{desc}: out of memory", False)
    if rc == -int(signal.SIGKILL):
        return Exit("killed", desc, True)
    if rc < 0:
        return Exit("signal", desc, True)
    return Exit("error", desc, True)


@dataclass
class Verdict:
    action: str  # restart | give_up | finished
    delay_s: float = 0.0
    notes: list[str] = field(default_factory=list)


class CrashPolicy:
    """Backoff (starts small, doubles, capped, reset after a healthy run), fallback to the previous
    checkpoint after repeated crashes from one checkpoint with nothing newer (only for crashes that may
    be the checkpoint's fault: not a full disk or a stop from outside), and giving up after too many
    crashes in a window."""

    def __init__(self, policy):
        self.p = policy
        self.crash_times: collections.deque[float] = collections.deque()
        self.consecutive = 0
        self.same: dict[str, int] = {}
        self.suspect: set[str] = set()
        self.restarts = 0

    def on_exit(self, now: float, returncode: int, ran_s: float, resumed_from: Optional[str],
                newest_after: Optional[str], blame: bool = True) -> Verdict:
        if returncode == 0:
            self.consecutive = 0
            return Verdict("finished", notes=["training exited 0: finished"])
        notes = []
        if ran_s >= self.p.healthy_after_s:
            self.consecutive = 0
            self.crash_times.clear()
        self.consecutive += 1
        self.crash_times.append(now)
        while self.crash_times and now - self.crash_times[0] > self.p.crash_window_s:
            self.crash_times.popleft()
        if blame and resumed_from is not None and newest_after == resumed_from:
            self.same[resumed_from] = self.same.get(resumed_from, 0) + 1
            if self.same[resumed_from] >= self.p.same_checkpoint_crashes and resumed_from not in self.suspect:
                self.suspect.add(resumed_from)
                notes.append(f"{self.same[resumed_from]} crashes from {resumed_from} without a newer checkpoint: "
                             "falling back to the previous valid checkpoint")
        elif newest_after != resumed_from:
            self.same.clear()
        if len(self.crash_times) >= self.p.max_crashes:
            return Verdict("give_up", notes=notes + [
                f"{len(self.crash_times)} crashes within {self.p.crash_window_s:.0f}s (training.restart.max_crashes "
                f"= {self.p.max_crashes})"])
        n = self.consecutive - 1  # crashes in a row before this one
        if getattr(self.p, "first_restart_immediate", False):
            delay = 0.0 if n == 0 else min(self.p.initial_backoff_s * 2 ** (n - 1), self.p.max_backoff_s)
        else:
            delay = min(self.p.initial_backoff_s * 2 ** n, self.p.max_backoff_s)
        self.restarts += 1
        return Verdict("restart", delay, notes)

    def reset_window(self) -> None:
        """After giving up, a retry starts with a clean count (but the suspects stay avoided)."""
        self.crash_times.clear()
        self.consecutive = 0
        self.same.clear()


# ----------------------------------------------------------------------------------- resume choice
def choose_resume(c: cat.Catalog, exclude: set[str], known_bad: dict[str, str],
                  verify: Callable[[cat.Entry], cat.Entry] = verifyonce.verify_and_record,  # verify once per restart
                  writer_alive: bool = False, prefix: str = "",
                  writers: Optional[Callable[[Path], list[str]]] = None) -> tuple[Optional[cat.Entry], list[str]]:
    """Highest complete checkpoint that passes full verification and is not excluded. Returns it (None
    for a fresh start) and notes on what was passed over and why.

    A checkpoint still being written is never failed: it is skipped and left where it is when our own
    trainer may still be writing it (`writer_alive`) or when a process has one of its files open for
    writing (`writers(path)` names them: another trainer, a copy, an async saver that outlived its
    trainer); the writer then finishes it in place. Everything else newer than the choice that is not
    valid (incomplete, corrupt, invalid, failing verification, or "in progress" with no writer left: a
    save that died half-way), in any layout, is moved to quarantine with its reason: a trainer that picks
    its own newest file (an HF script's get_last_checkpoint, a glob over model_step_*.pt) then finds the
    same checkpoint the daemon chose, and can write those steps again under the same names. `prefix`
    ("sft/") names checkpoints of a run in `exclude` and `known_bad`."""
    notes = []
    writers = writers or (lambda path: [])

    def set_aside(e: cat.Entry, why: str) -> None:
        if delete.quarantine(c.root, e.name, why) is not None:
            notes.append(f"{prefix}{e.name} moved to {runtime.STATE_DIR}/quarantine/ ({why})")
            foreign.forget(c.root, e.name)
        else:
            known_bad[prefix + e.name] = why

    def excluded(e: cat.Entry) -> Optional[str]:
        if prefix + e.name in exclude:
            return "the trainer kept crashing from it"
        if prefix + e.name in known_bad:
            return f"failed verification ({known_bad[prefix + e.name]})"
        return None

    def passed_over(e: cat.Entry, stage: str, why: str) -> None:
        if stage == "excluded":
            notes.append(f"{prefix}{e.name} skipped: {why}")
            return
        who = writers(e.path)
        if stage == "verification":
            if who:  # rewritten in place while we read it: a save in progress, not damage
                notes.append(f"{prefix}{e.name} skipped: being written again by {', '.join(who)}; left in place")
                return
            notes.append(f"{prefix}{e.name} skipped: failed verification ({why})")
            log.error("checkpoint failed verification; it will not be used for resume", checkpoint=prefix + e.name,
                      reason=why)
            alerts.emit("verification_failed", f"{prefix}{e.name} failed verification", why, key=prefix + e.name)
            set_aside(e, f"failed verification: {why}")
            return
        if who or (e.status == "in_progress" and writer_alive):
            notes.append(f"{prefix}{e.name} skipped: still being written"
                         + (f" by {', '.join(who)}; left in place" if who else ""))
            return
        notes.append(f"{prefix}{e.name} skipped: {e.status} ({e.reason})")
        if e.status == "in_progress":
            what = e.reason.removeprefix("being written (").removesuffix(")")
            set_aside(e, f"a save that stopped half-way, no process has it open for writing: {what}")
        elif e.status != "unreadable":
            set_aside(e, f"{e.status}: {e.reason}")

    return rs.newest_verified(c, rs.LATEST, verify=verify, exclude=excluded, on_skip=passed_over), notes


def choose_resume_all(cats: dict[str, cat.Catalog], exclude: set[str], known_bad: dict[str, str],
                      writer_alive: bool = False,
                      writers: Optional[Callable[[Path], list[str]]] = None
                      ) -> tuple[Optional[cat.Entry], str, list[str]]:
    """The resume point across runs: each run's choice, then the most recently written of them (where
    training was when it stopped). Returns (entry, its run, notes). `writers`: see choose_resume."""
    best: tuple[Optional[cat.Entry], str] = (None, "")
    notes: list[str] = []
    for run, c in cats.items():
        e, n = choose_resume(c, exclude, known_bad, writer_alive=writer_alive, prefix=f"{run}/" if run else "",
                             writers=writers)
        notes += n
        if e is not None and (best[0] is None or e.mtime > best[0].mtime):
            best = (e, run)
    return best[0], best[1], notes


# ----------------------------------------------------------------------------------- process side
RELAY = str(Path(__file__).with_name("logrelay.py"))


def _append_line(path: Path, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode("utf-8", "replace"))
        finally:
            os.close(fd)
    except OSError:
        pass  # a full disk costs a log line, nothing else


# Our packages, as `{python} -m <package>` in training.command runs them (the built-in trainer's default).
# `python -m` puts the working folder (the config's) first on sys.path, so a user's own trainer.py there
# would run instead of ours; the daemon starts ours with that entry left out: `-P` (Python 3.11+), or on
# 3.10 the same by hand, before anything else is imported, then runpy as -m does. A user's own module
# (`{python} -m mypkg.train`) keeps the working folder on its path: it may live there.
OWN_PACKAGES = frozenset({"trainer", "maintenance", "daemon", "ckpt_daemon"})
SAFE_PATH_BOOTSTRAP = ("import sys; getattr(sys.flags, 'safe_path', False) or sys.path.pop(0); import runpy; "
                       "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")


def own_module_argv(module: str, version: tuple = sys.version_info) -> list[str]:
    """Interpreter arguments that run our `module` as `-m` does, whatever the working folder holds."""
    return ["-P", "-m", module] if version >= (3, 11) else ["-c", SAFE_PATH_BOOTSTRAP, module]


def expand_command(argv: list[str], config_path: Path, resume: str) -> list[str]:
    subs = {"{python}": sys.executable, "{config}": str(config_path), "{resume}": resume}
    out = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        out.append(a)
    if len(argv) >= 3 and argv[0] in ("{python}", sys.executable) and argv[1] == "-m" and \
            argv[2].split(".")[0] in OWN_PACKAGES:
        out[1:3] = own_module_argv(out[2])
    return out


# Set by the daemon for one start (or one spare) only: never passed on from the daemon's own environment.
PER_START_ENV = frozenset({"CKPT_RESUME", "CKPT_DAEMON_RUN", "CKPT_DAEMON_MEMORY_RESUME", spare.ENV_FD})


class Supervisor:
    """The trainer's life cycle. `run(stop_event)` is the supervisor thread's loop; everything that
    changes the child happens on that thread (the parent-death signal is bound to it)."""

    def __init__(self, get_cfg: Callable, known_bad: dict[str, str], clock: Callable[[], float] = time.time,
                 echo: bool = True, on_change: Optional[Callable[[], None]] = None,
                 config_files: Optional[Callable[[], tuple[Path, Path]]] = None):
        self.get_cfg = get_cfg
        self.clock = clock
        self.known_bad = known_bad
        self.echo = echo
        self.on_change = on_change or (lambda: None)
        # (the copy of the config in force the trainer reads, the config.yaml it stands for)
        self.config_files = config_files or (lambda: (Path(get_cfg().source), Path(get_cfg().source)))
        cfg = get_cfg()
        self.policy = CrashPolicy(cfg.training.restart)
        self.state = "idle"  # idle running backoff stopping stopped finished gave_up adopted
        self.proc: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None
        self.token: Optional[str] = None
        self.started_at: Optional[float] = None
        self.resume_from: Optional[str] = None
        self.next_start: Optional[float] = None
        self.last_crash: Optional[dict] = None
        self.crashes: collections.deque[dict] = collections.deque(maxlen=20)
        self.crash_counts: collections.Counter = collections.Counter()
        self.gave_up: Optional[dict] = None
        self.tail = OutputTail(keep=40)  # the trainer's last lines, for the crash record (progress bars collapsed)
        self._reader: Optional[threading.Thread] = None
        self._relay: Optional[subprocess.Popen] = None
        self.log_path: Optional[Path] = None
        self._stale = False
        self._last_disk_check = 0.0
        self.message = ""
        self.tick = time.monotonic()
        self.lock = threading.Lock()
        self.memory = None  # daemon.memagent.MemoryAgent when checkpoints.memory.enabled (set by the daemon)
        self.spare: Optional[dict] = None  # the warm spare trainer (training.warm_spare), waiting for a restart
        self.spare_failures = 0
        self.spare_failed_key: Optional[tuple] = None
        self.spare_used = False
        # replicas: () -> restored name or None, called when no valid local checkpoint is left (set by the daemon)
        self.restore_remote: Optional[Callable[[], Optional[str]]] = None

    # -- thread -----------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        try:
            self.start()
        except Exception as exc:
            log.exception("could not start training; retrying at the next tick", error=str(exc))
        while not stop.is_set():
            self.tick = time.monotonic()
            try:
                self.poll()
            except Exception as exc:  # one bad tick must not end supervision
                log.exception("supervisor tick failed; retrying", error=str(exc))
            if self.state == "running" and self.proc is not None:
                _wait_for_exit(self.proc.pid, 0.2, stop)  # wakes as soon as the trainer exits (recovery time)
            else:
                stop.wait(0.2)
        self.stop()

    def _set(self, **kw) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, v)
        self.on_change()

    # -- start ------------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.get_cfg()
        self.policy.p = cfg.training.restart
        act = runtime.training_activity(cfg.checkpoint_dir)
        if act.active and runtime.lock_held(cfg.checkpoint_dir / runtime.STATE_DIR / runtime.TrainerLock.name):
            # A trainer from before a daemon restart still holds the lock: watch it rather than start a
            # second writer (which the lock would refuse anyway).
            self._set(state="adopted", pid=act.pid, started_at=self.clock(),
                      message=f"adopted a running trainer (pid {act.pid}) started before this daemon")
            log.warning("a trainer is already running on this checkpoint folder; adopting it", pid=act.pid)
            return
        # The breakpoint: a memory state newer than the disk is verified in memory and pinned (persisted in
        # the background), and the trainer resumes from it; otherwise from the highest valid checkpoint.
        slot = (self.memory.breakpoint("before choosing the resume point", self._avoided())
                if self.memory is not None else None)
        mem_env = {}
        if slot is not None and (slot.name in self.policy.suspect or slot.name in self.known_bad):
            log.warning("not resuming from the memory checkpoint: it is avoided after repeated crashes", step=slot.step)
            slot = None
        if slot is not None:
            # newer than any checkpoint on disk (the breakpoint checked) and verified: no disk choice to make
            chosen = slot.name
            resume = str(cfg.checkpoint_dir / chosen)
            mem_env = {"CKPT_DAEMON_MEMORY_RESUME": str(slot.step)}
            log.info("resuming from the memory checkpoint (verified in memory, persisted in the background)",
                     checkpoint=chosen)
        else:
            cats = cat.scan_runs(cfg, stats=False)
            # no trainer of ours runs now, but another process may be writing a checkpoint: never failed
            entry, run, notes = choose_resume_all(cats, self.policy.suspect, self.known_bad,
                                                  writers=writers_lookup([c.root for c in cats.values()]))
            if entry is None and self.restore_remote is not None and self.restore_remote():
                # a replaced or emptied disk: the newest verified replica was restored; resume from it
                cats = cat.scan_runs(cfg, stats=False)
                entry, run, more = choose_resume_all(cats, self.policy.suspect, self.known_bad,
                                                     writers=writers_lookup([c.root for c in cats.values()]))
                notes += more
            for n in notes:
                log.warning("resume choice", note=n)
            resume = str(entry.path) if entry else "none"
            chosen = (f"{run}/{entry.name}" if run else entry.name) if entry else None
        token = uuid.uuid4().hex
        argv, cwd, base_env = self._command(cfg, resume)
        env = {**base_env, "CKPT_RESUME": resume, "CKPT_DAEMON_RUN": token, **mem_env}
        self.log_path = cfg.log_dir / "trainer.log"
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
        launched = self._hand_to_spare(argv, cwd, base_env, env, resume)
        if launched is None:
            self._drop_spare("a trainer is started from scratch")
            try:
                launched = self._launch(argv, cwd, env, f"{' '.join(argv)} (CKPT_RESUME={resume})")
            except OSError as exc:
                self.proc, self.resume_from = None, chosen
                self.started_at = self.clock()
                self._on_exit(127, f"could not start {argv[0]!r}: {exc}. Check training.command in config.yaml.")
                return
        proc, relay = launched
        self.tail.clear()
        self._stale = False
        self._set(proc=proc, pid=proc.pid, token=token, started_at=self.clock(), state="running",
                  resume_from=chosen, gave_up=None, next_start=None,
                  message=f"training (pid {proc.pid}) from {chosen or 'scratch'}")
        self._relay = relay
        self._reader = threading.Thread(target=self._pump, args=(relay,), daemon=True, name="trainer-out")
        self._reader.start()
        log.info("started trainer", pid=self.pid, resume=resume, argv=argv, warm_spare=self.spare_used)

    def _avoided(self) -> set[str]:
        """Checkpoints not to resume from: suspects of crash loops, and ones known bad."""
        return set(self.policy.suspect) | set(self.known_bad)

    def _command(self, cfg, resume: str = "none") -> tuple[list[str], str, dict]:
        """argv, working folder and environment of a trainer, without this start's resume point and run token
        in the environment (a warm spare's command has no {resume}: the config refuses it)."""
        in_force, source = self.config_files()
        argv = expand_command(cfg.training.command, in_force, resume)
        inherited = {k: v for k, v in os.environ.items() if k not in PER_START_ENV}  # never a stale one from our own
        env = {**inherited, **cfg.training.env, "CKPT_DAEMON_CHECKPOINTS": str(cfg.checkpoint_dir),
               "CKPT_DAEMON_CONFIG": str(in_force), "CKPT_DAEMON_CONFIG_SOURCE": str(source),
               "CKPT_DAEMON_METRICS": str(cfg.log_dir / "metrics.jsonl"), "PYTHONUNBUFFERED": "1",
               **(self.memory.env() if self.memory is not None else {})}
        cwd = str(cfg.resolve_path(cfg.training.cwd)) if cfg.training.cwd else str(cfg.base_dir)
        return argv, cwd, env

    def _launch(self, argv: list[str], cwd: str, env: dict, what: str,
                pass_fds: tuple = ()) -> tuple[subprocess.Popen, subprocess.Popen]:
        """Start a trainer process (own session, parent-death signal) whose output goes through a log relay
        into logs/trainer.log. Raises OSError if it cannot be started."""
        cfg = self.get_cfg()
        # The trainer writes into a pipe drained by a relay process that outlives the daemon (see logrelay.py).
        r, w = os.pipe()
        try:
            relay = subprocess.Popen([sys.executable, "-I", "-S", RELAY, str(self.log_path), str(cfg.logging.max_bytes),
                                      str(cfg.logging.backups)], stdin=r, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(r)
        try:
            os.write(w, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} ckpt-daemon starts: {what}\n".encode())
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=w,
                                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_pdeathsig,
                                    pass_fds=pass_fds)
        except OSError:
            relay.stdout.close()
            relay.wait()
            raise
        finally:
            os.close(w)
        return proc, relay

    # -- the warm spare (ckpt_daemon/spare.py) ----------------------------------------------------
    def _maybe_spawn_spare(self, cfg, now: float) -> None:
        """Once the running trainer is past its own start (its first heartbeat, or 30 s), start a spare that
        imports torch and waits for the next restart. A spare that keeps dying is given up after 3 tries
        (until the command or its environment changes)."""
        if self.spare is not None:
            rc = self.spare["proc"].poll()
            if not cfg.training.warm_spare:
                self._drop_spare("training.warm_spare was turned off")
                return
            if rc is None:
                if not self.spare["ready"] and self._spare_ready(self.spare):
                    self._set()  # status shows it ready
                return
            self.spare_failures += 1
            log.warning("the warm spare trainer exited before it was needed", returncode=rc,
                        failures=self.spare_failures, log=str(self.log_path))
            self._drop_spare("it exited")
            if self.spare_failures >= 3:
                self.spare_failed_key = self._command(cfg)
                log.error("warm spare trainers keep exiting before they are needed (3 in a row); restarts start "
                          "cold until training.command, cwd or env changes. See logs/trainer.log for their output")
        if not cfg.training.warm_spare:
            return
        if self.spare_failures >= 3:
            if self._command(cfg) == self.spare_failed_key:
                return
            self.spare_failures = 0  # the config changed: try again
        age, seen = self.heartbeat_age(now)
        if not seen and now - (self.started_at or now) < 30:
            return
        argv, cwd, base_env = self._command(cfg)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc, relay = self._launch(argv, cwd, {**base_env, spare.ENV_FD: str(theirs.fileno())},
                                       f"a warm spare: {' '.join(argv)}", pass_fds=(theirs.fileno(),))
        except OSError as exc:
            ours.close()
            self.spare_failures += 1
            log.warning("could not start a warm spare trainer", error=str(exc))
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self.spare = {"proc": proc, "relay": relay, "sock": ours, "key": (argv, cwd, base_env), "since": self.clock(),
                      "ready": False}
        log.info("started a warm spare trainer", pid=proc.pid)

    def _spare_ready(self, sp: dict) -> bool:
        """Whether the spare said it waits (its imports done), and is not stopped (SIGSTOP, a debugger)."""
        if not sp["ready"]:
            try:
                sp["ready"] = sp["sock"].recv(64).startswith(spare.READY.strip())
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                return False
        return sp["ready"] and not _stopped(sp["proc"].pid)

    def _hand_to_spare(self, argv: list[str], cwd: str, base_env: dict, env: dict,
                       resume: str) -> Optional[tuple[subprocess.Popen, subprocess.Popen]]:
        """Hand this start to the warm spare if there is one, ready, for this very command and environment.
        The handover is written within a deadline: a spare that does not take it is dropped (start cold)."""
        self.spare_used = False
        sp = self.spare
        if sp is None or sp["proc"].poll() is not None or not self.get_cfg().training.warm_spare:
            return None
        if sp["key"] != (argv, cwd, base_env):
            log.info("the warm spare was started for another command or environment (the config changed); not used")
            return None
        if not self._spare_ready(sp):
            log.info("the warm spare is not ready (still importing, or stopped); starting a trainer from scratch")
            return None
        view = memoryview(spare.message(env))
        deadline = time.monotonic() + 5.0
        try:
            while view:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [sp["sock"]], [], left)[1]:
                    raise TimeoutError("the spare did not take its handover within 5 s")
                view = view[sp["sock"].send(view, socket.MSG_NOSIGNAL):]
        except OSError as exc:
            log.warning("could not hand the restart to the warm spare; starting a trainer from scratch", error=str(exc))
            return None
        sp["sock"].close()
        self.spare = None
        self.spare_used = True
        _append_line(self.log_path, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} ckpt-daemon hands the restart to the "
                                    f"warm spare (pid {sp['proc'].pid}, CKPT_RESUME={resume})\n")
        return sp["proc"], sp["relay"]

    def _drop_spare(self, why: str) -> None:
        """End the spare: closing its pipe makes it exit 0; killed if it does not within 5 s."""
        sp, self.spare = self.spare, None
        if sp is None:
            return
        sp["sock"].close()  # its read ends: it exits
        proc = sp["proc"]
        if _stopped(proc.pid):
            runtime.kill_tree(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            runtime.kill_tree(proc.pid, signal.SIGKILL)
            proc.wait()
        try:
            sp["relay"].stdout.close()
            sp["relay"].wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        log.info("warm spare trainer ended", pid=proc.pid, why=why)

    def _pump(self, relay: subprocess.Popen) -> None:
        # Read what comes, not lines: a progress bar redrawn with \r for hours never ends its line.
        while True:
            try:
                data = relay.stdout.read1(1 << 16)
            except (OSError, ValueError):
                data = b""
            lines = self.tail.feed(data) if data else self.tail.flush()
            if self.echo:
                for text in lines:
                    try:
                        sys.stderr.write(f"[trainer] {text}\n")
                    except (OSError, ValueError):
                        pass
            if not data:
                break
        relay.stdout.close()
        relay.wait()

    # -- tick -------------------------------------------------------------------------------------
    def poll(self) -> None:
        now = self.clock()
        cfg = self.get_cfg()
        if self.state == "running" and self.proc is not None:
            rc = self.proc.poll()
            if rc is not None:
                if self._reader:
                    self._reader.join(timeout=5)
                self._on_exit(rc)
                if self.state == "backoff" and self.next_start is not None and self.clock() >= self.next_start:
                    self.start()  # no backoff (a first crash): restart in the same tick
                return
            self._maybe_spawn_spare(cfg, now)
            rp = cfg.training.restart
            if rp.heartbeat_timeout_s:
                age, seen = self.heartbeat_age(now)
                limit = rp.heartbeat_timeout_s if seen else max(rp.heartbeat_timeout_s, rp.heartbeat_grace_s)
                if age > limit:
                    log.error("trainer heartbeat is stale; restarting it", age_s=round(age), pid=self.pid,
                              first_heartbeat_seen=seen)
                    self._stale = True
                    self._kill_group(cfg.training.stop_timeout_s)
        elif self.state == "adopted":
            if not runtime.lock_held(cfg.checkpoint_dir / runtime.STATE_DIR / runtime.TrainerLock.name):
                log.info("the adopted trainer has exited; starting training under this daemon")
                self._set(state="idle")
                self.start()
        elif self.state == "backoff" and self.next_start is not None and now >= self.next_start:
            self.start()
        elif self.state == "gave_up":
            self._maybe_retry(now, cfg)

    def heartbeat_age(self, now: float) -> tuple[float, bool]:
        """(age, seen) of this run's newest heartbeat: one written with this run's token (any process of
        the tree, e.g. torchrun's rank 0), or by the child itself or one of its descendants. Before the
        first one, the age counts from the start."""
        cfg = self.get_cfg()
        hb = runtime.read_heartbeat(cfg.checkpoint_dir) or {}
        t = hb.get("time")
        ours = (self.token is not None and hb.get("run") == self.token) or (hb.get("pid") == self.pid and self.pid)
        if not ours and isinstance(hb.get("pid"), int) and self.pid and not hb.get("run"):
            try:
                import psutil

                ours = hb["pid"] in {p.pid for p in psutil.Process(self.pid).children(recursive=True)}
            except Exception:
                ours = False
        started = self.started_at or now
        if ours and isinstance(t, (int, float)) and t >= started - 1:
            return now - t, True
        return now - started, False

    def _maybe_retry(self, now: float, cfg) -> None:
        """A give-up is not forever: retried on a timer, and at once when its cause is gone."""
        g = self.gave_up or {}
        retry_s = cfg.training.restart.give_up_retry_s
        why = None
        if g.get("kind") == "disk_full" and now - self._last_disk_check >= 5:
            self._last_disk_check = now
            need = int(cfg.disk.save_margin_mb * 2**20) + self._last_checkpoint_bytes(cfg)
            free = free_bytes(cfg.checkpoint_dir)
            if free >= need:
                why = f"disk space came back ({free / 2**20:.0f} MiB free)"
        if why is None and retry_s and now - g.get("since", now) >= retry_s:
            why = f"{retry_s:.0f}s passed since giving up (training.restart.give_up_retry_s)"
        if why:
            log.warning("retrying training after giving up", reason=why)
            self.policy.reset_window()
            self._set(gave_up=None, state="idle")
            self.start()

    @staticmethod
    def _last_checkpoint_bytes(cfg) -> int:
        newest = cat.scan_config(cfg).newest_valid()
        return newest.bytes if newest else 0

    def _on_exit(self, rc: int, why: str = "") -> None:
        now = self.clock()
        cfg = self.get_cfg()
        ran = now - (self.started_at or now)
        if getattr(self, "log_path", None) is not None:
            _append_line(self.log_path, f"--- trainer exited with {rc} after {ran:.0f}s\n")
        tail = [] if why else self.tail.last(15)  # a start that failed printed nothing: no older run's output
        slot = None
        if self.memory is not None and not why:
            # The breakpoint: the trainer is gone, so its newest memory state is verified and pinned, and goes
            # to disk in the background (the crash policy below counts it as progress; the restart resumes
            # from it).
            slot = self.memory.breakpoint(f"the trainer exited ({describe_rc(rc)})", self._avoided())
        ex = (Exit("start_failed", why, False) if why
              else classify(rc, self.tail.last(40), self.state == "stopping", self._stale))
        if ex.kind == "stopped":
            self._resolve_crash(now, f"a trainer ran {ran:.0f}s until the daemon stopped it")
            self._set(state="stopped", proc=None, message=f"stopped by the daemon ({ex.description})")
            return
        newest_after = slot.name if slot is not None else cat.newest_valid_rel(cfg)
        verdict = self.policy.on_exit(now, rc, ran, self.resume_from, newest_after, blame=ex.blame_checkpoint)
        self.proc = None
        if verdict.action != "restart":
            self._drop_spare(f"training {verdict.action.replace('_', ' ')}")
        if verdict.action == "finished":
            self._resolve_crash(now, "training finished")
            self._set(state="finished", message="training finished (the trainer exited 0)")
            if self.memory is not None:
                self.memory.remove_if_persisted("training finished")
            log.info("training finished", returncode=rc)
            alerts.emit("training_finished", "training finished", f"The trainer exited 0 after {ran:.0f}s.",
                        latest=newest_after)
            return
        crash = {"time": now, "returncode": rc, "description": ex.description, "kind": ex.kind, "ran_s": round(ran, 1),
                 "resumed_from": self.resume_from, "tail": tail, "why": why}
        self.crashes.append(crash)
        self.crash_counts[ex.kind] += 1
        self.last_crash = crash
        if ex.kind == "stopped_outside":
            log.warning("trainer stopped by a signal the daemon did not send; training is not finished, restarting it",
                        how=ex.description)
        else:
            log.error("trainer crashed", how=ex.description, kind=ex.kind, ran_s=round(ran, 1),
                      resumed_from=self.resume_from, last_output=tail[-10:] or [why])
            alerts.emit("crash", f"trainer crashed: {ex.description}", "\n".join(tail) or why, kind=ex.kind,
                        resumed_from=self.resume_from, ran_s=round(ran, 1))
        for n in verdict.notes[:-1] if verdict.action == "give_up" else verdict.notes:
            log.warning(n)
        if verdict.action == "give_up":
            retry_s = cfg.training.restart.give_up_retry_s
            cause = {"disk_full": "the disk is full", "out_of_memory": "it runs out of memory"}.get(ex.kind,
                                                                                                    "see the last crash")
            msg = (f"gave up: {verdict.notes[-1]}; the last one: {ex.description} ({cause}). "
                   + ("It retries by itself as soon as there is room again, and in any case "
                      if ex.kind == "disk_full" else "It retries by itself ")
                   + (f"in {retry_s:.0f}s (training.restart.give_up_retry_s). " if retry_s
                      else "Automatic retries are off (training.restart.give_up_retry_s: 0). ")
                   + "Fix the cause (logs/trainer.log), then `systemctl restart ckpt-daemon` to retry now.")
            self._set(state="gave_up", message=msg, gave_up={"kind": ex.kind, "since": now, "message": msg,
                                                            "retry_at": now + retry_s if retry_s else None})
            log.error("not restarting training for now", reason=msg)
            alerts.emit("gave_up", "training GAVE UP: not restarting it for now", msg, kind=ex.kind)
            return
        self._set(state="backoff", next_start=now + verdict.delay_s,
                  message=f"{'stopped from outside' if ex.kind == 'stopped_outside' else 'crashed'} ({ex.description}); "
                          f"restarting in {verdict.delay_s:.1f}s")
        log.info("restarting after backoff", delay_s=verdict.delay_s, restarts=self.policy.restarts)

    def _resolve_crash(self, now: float, how: str) -> None:
        """The last crash is history once a trainer started after it ended cleanly: status shows it as an
        earlier crash, not as what is wrong now."""
        lc = self.last_crash
        if lc is not None and not lc.get("resolved") and self.started_at is not None and self.started_at >= lc["time"]:
            self.last_crash = {**lc, "resolved": how, "resolved_at": now}

    def _crash_view(self, now: float) -> tuple[Optional[dict], int]:
        """(the last crash as status shows it, crashes within the restart policy's window). A trainer started
        after the last crash that has run longer than healthy_after_s (the policy's own rule), or that
        stopped cleanly, has ended the loop: the count is 0 and the last crash is history."""
        rp = self.get_cfg().training.restart
        lc = self.last_crash
        started = self.started_at
        healthy = (self.state in ("running", "adopted") and started is not None and now - started >= rp.healthy_after_s)
        if healthy and lc is not None and not lc.get("resolved") and started >= lc["time"]:
            # (worded and timed without `now`: an unchanged status is not rewritten)
            lc = {**lc, "resolved": f"a trainer has run longer than {rp.healthy_after_s:.0f}s "
                                    "(training.restart.healthy_after_s)", "resolved_at": started + rp.healthy_after_s}
        # a trainer started after the last crash that ran healthy, stopped cleanly or finished ended the loop
        over = healthy or (lc is not None and lc.get("resolved"))
        recent = 0 if over else sum(1 for t in tuple(self.policy.crash_times) if now - t <= rp.crash_window_s)
        return lc, recent

    # -- stop -------------------------------------------------------------------------------------
    def _kill_group(self, timeout_s: float) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.error("trainer did not exit in time; killing it", timeout_s=timeout_s)
            runtime.kill_tree(self.proc.pid, signal.SIGKILL)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def stop(self) -> None:
        """Forward SIGTERM to the trainer's process group, wait for its final save, then kill."""
        cfg = self.get_cfg()
        self._drop_spare("the daemon stops")
        if self.state == "running" and self.proc is not None:
            self._set(state="stopping")
            log.info("stopping trainer: SIGTERM, waiting for its final save", pid=self.proc.pid,
                     timeout_s=cfg.training.stop_timeout_s)
            self._kill_group(cfg.training.stop_timeout_s)
            if self._reader:
                self._reader.join(timeout=5)
            rc = self.proc.returncode
            self._on_exit(rc)
            log.info("trainer stopped", returncode=rc)
        elif self.state == "adopted" and self.pid:
            # not our child: no wait() to block on, so poll until it is gone (its final save done), then kill
            log.info("stopping the adopted trainer: SIGTERM, waiting for its final save", pid=self.pid,
                     timeout_s=cfg.training.stop_timeout_s)
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + cfg.training.stop_timeout_s
            while runtime.pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if runtime.pid_alive(self.pid):
                log.warning("the adopted trainer did not exit in time; killing it", pid=self.pid)
                runtime.kill_tree(self.pid, signal.SIGKILL)
        if self.state not in ("finished", "gave_up"):  # a finished run stays finished after the daemon stops
            self._set(state="stopped")

    def snapshot(self) -> dict:
        with self.lock:
            live = self.state in ("running", "adopted", "stopping")
            rp = self.get_cfg().training.restart
            last_crash, recent = self._crash_view(self.clock())
            return {"state": self.state, "pid": self.pid if live else None,
                    "started_at": self.started_at if live else None,
                    "resumed_from": self.resume_from, "restarts": self.policy.restarts, "last_crash": last_crash,
                    "recent_crashes": recent, "crash_window_s": rp.crash_window_s, "max_crashes": rp.max_crashes,
                    "crashes": list(self.crashes), "crash_counts": dict(self.crash_counts),
                    "next_start": self.next_start if self.state == "backoff" else None, "message": self.message,
                    "gave_up": self.gave_up, "avoided_checkpoints": sorted(self.policy.suspect), "run": self.token,
                    "warm_spare": ({"pid": sp["proc"].pid, "since": sp["since"], "ready": sp["ready"]}
                                   if (sp := self.spare) else None),
                    "warm_spare_failures": self.spare_failures,
                    "started_warm": self.spare_used}


def _stopped(pid: int) -> bool:
    """Whether a process is stopped (SIGSTOP, or traced): it would not read a handover."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


def _wait_for_exit(pid: int, timeout: float, stop: threading.Event) -> None:
    """Sleep up to `timeout`, waking at once when `pid` exits: a pidfd becomes readable then (Linux 5.3+).
    No polling loop (Popen.wait(timeout) polls every few ms, which an idle daemon should not)."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        stop.wait(timeout)
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
