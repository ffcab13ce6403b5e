"""Supervisor: runs training.command as a child and keeps it running from the highest valid checkpoint.

The crash policy (`CrashPolicy`) is pure: time is passed in, so its decisions are tested without
sleeping or forking. `Supervisor` is the process side: a new process group per trainer (so SIGTERM
reaches torchrun's workers too), the parent-death signal set to SIGTERM (if the daemon is SIGKILLed the
trainer saves and exits rather than running on unsupervised), output to logs/trainer.log with the
last lines kept for crash reports.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ckpt_daemon import catalog as cat
from ckpt_daemon import runtime
from ckpt_daemon.logs import get_logger

log = get_logger("daemon.supervisor")


# ----------------------------------------------------------------------------------- pure policy
@dataclass
class Verdict:
    action: str  # restart | give_up | finished
    delay_s: float = 0.0
    notes: list[str] = field(default_factory=list)


class CrashPolicy:
    """Backoff (starts small, doubles, capped, reset after a healthy run), fallback to the previous
    checkpoint after repeated crashes from one checkpoint with nothing newer, and giving up after too
    many crashes in a window."""

    def __init__(self, policy):
        self.p = policy
        self.crash_times: collections.deque[float] = collections.deque()
        self.consecutive = 0
        self.same: dict[str, int] = {}
        self.suspect: set[str] = set()
        self.restarts = 0

    def on_exit(self, now: float, returncode: int, ran_s: float, resumed_from: Optional[str],
                newest_after: Optional[str]) -> Verdict:
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
        if resumed_from is not None and newest_after == resumed_from:
            self.same[resumed_from] = self.same.get(resumed_from, 0) + 1
            if self.same[resumed_from] >= self.p.same_checkpoint_crashes and resumed_from not in self.suspect:
                self.suspect.add(resumed_from)
                notes.append(f"{self.same[resumed_from]} crashes from {resumed_from} without a newer checkpoint: "
                             "falling back to the previous valid checkpoint")
        else:
            self.same.clear()
        if len(self.crash_times) >= self.p.max_crashes:
            return Verdict("give_up", notes=notes + [
                f"{len(self.crash_times)} crashes within {self.p.crash_window_s:.0f}s (training.restart.max_crashes "
                f"= {self.p.max_crashes}): not restarting. Fix the cause (see logs/trainer.log), then restart the daemon."])
        delay = min(self.p.initial_backoff_s * 2 ** (self.consecutive - 1), self.p.max_backoff_s)
        self.restarts += 1
        return Verdict("restart", delay, notes)


# ----------------------------------------------------------------------------------- resume choice
def choose_resume(c: cat.Catalog, exclude: set[str], known_bad: dict[str, str],
                  verify: Callable[[cat.Entry], cat.Entry] = cat.verify_entry) -> tuple[Optional[cat.Entry], list[str]]:
    """Highest complete checkpoint that passes full verification and is not excluded. Returns it (None
    for a fresh start) and notes on what was passed over and why."""
    notes = []
    for e in sorted(c.entries, key=lambda e: e.step, reverse=True):
        if not e.valid:
            notes.append(f"{e.name} skipped: {e.status} ({e.reason})")
            continue
        if e.name in exclude:
            notes.append(f"{e.name} skipped: the trainer kept crashing from it")
            continue
        if e.name in known_bad:
            notes.append(f"{e.name} skipped: failed verification ({known_bad[e.name]})")
            continue
        v = verify(e)
        if not v.valid:
            notes.append(f"{e.name} skipped: failed verification ({v.reason})")
            log.error("checkpoint failed verification; it will not be used for resume", checkpoint=e.name, reason=v.reason)
            if e.layout == "native" and runtime.quarantine(c.root, e.name, v.reason) is not None:
                notes.append(f"{e.name} moved to {cat.RUNTIME_DIR}/quarantine/ so the resumed run can write that step again")
            else:
                known_bad[e.name] = v.reason
            continue
        return v, notes
    return None, notes


# ----------------------------------------------------------------------------------- process side
class RotatingWriter:
    def __init__(self, path: Path, max_bytes: int, backups: int):
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "ab")

    def write(self, data: bytes) -> None:
        if self.f.tell() + len(data) > self.max_bytes and self.f.tell() > 0:
            self.f.close()
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            if self.backups:
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            else:
                self.path.unlink(missing_ok=True)
            self.f = open(self.path, "ab")
        self.f.write(data)
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _pdeathsig() -> None:
    """Runs in the child before exec: new process group (session), and SIGTERM if the daemon dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def expand_command(argv: list[str], config_path: Path, resume: str) -> list[str]:
    subs = {"{python}": sys.executable, "{config}": str(config_path), "{resume}": resume}
    out = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        out.append(a)
    return out


class Supervisor:
    def __init__(self, get_cfg: Callable, known_bad: dict[str, str], clock: Callable[[], float] = time.time,
                 echo: bool = True):
        self.get_cfg = get_cfg
        self.clock = clock
        self.known_bad = known_bad
        self.echo = echo
        cfg = get_cfg()
        self.policy = CrashPolicy(cfg.training.restart)
        self.state = "idle"  # idle running backoff stopping stopped finished gave_up adopted
        self.proc: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None
        self.started_at: Optional[float] = None
        self.resume_from: Optional[str] = None
        self.next_start: Optional[float] = None
        self.last_crash: Optional[dict] = None
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._reader: Optional[threading.Thread] = None
        self._writer: Optional[RotatingWriter] = None
        self.message = ""

    # -- start ------------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.get_cfg()
        self.policy.p = cfg.training.restart
        act = runtime.training_activity(cfg.checkpoint_dir)
        if act.active:
            # A trainer from before a daemon restart still holds the lock: watch it rather than start a
            # second writer (which the lock would refuse anyway).
            self.state, self.pid, self.started_at = "adopted", act.pid, self.clock()
            self.message = f"adopted a running trainer (pid {act.pid}) started before this daemon"
            log.warning("a trainer is already running on this checkpoint folder; adopting it", pid=act.pid)
            return
        c = cat.scan_config(cfg, stats=False)
        entry, notes = choose_resume(c, self.policy.suspect, self.known_bad)
        for n in notes:
            log.warning("resume choice", note=n)
        resume = str(entry.path) if entry else "none"
        self.resume_from = entry.name if entry else None
        argv = expand_command(cfg.training.command, cfg.source, resume)
        env = {**os.environ, **cfg.training.env, "CKPT_RESUME": resume, "PYTHONUNBUFFERED": "1"}
        cwd = str(cfg.resolve_path(cfg.training.cwd)) if cfg.training.cwd else str(cfg.base_dir)
        self._writer = RotatingWriter(cfg.log_dir / "trainer.log", cfg.logging.max_bytes, cfg.logging.backups)
        self._writer.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} ckpt-daemon starts: {' '.join(argv)} "
                           f"(CKPT_RESUME={resume})\n".encode())
        try:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_pdeathsig)
        except OSError as exc:
            self.proc = None
            self._on_exit(127, f"could not start {argv[0]!r}: {exc}. Check training.command in config.yaml.")
            return
        self.pid = self.proc.pid
        self.started_at = self.clock()
        self.state = "running"
        self.message = f"training (pid {self.pid}) from {self.resume_from or 'scratch'}"
        self.tail.clear()
        self._reader = threading.Thread(target=self._pump, args=(self.proc, self._writer), daemon=True, name="trainer-out")
        self._reader.start()
        log.info("started trainer", pid=self.pid, resume=resume, argv=argv)

    def _pump(self, proc: subprocess.Popen, writer: RotatingWriter) -> None:
        for line in iter(proc.stdout.readline, b""):
            writer.write(line)
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.tail.append(text)
            if self.echo:
                sys.stderr.write(f"[trainer] {text}\n")
        proc.stdout.close()

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
                return
            hb_timeout = cfg.training.restart.heartbeat_timeout_s
            if hb_timeout and now - (self.started_at or now) > hb_timeout:
                hb = runtime.read_heartbeat(cfg.checkpoint_dir) or {}
                age = now - float(hb.get("time", 0)) if hb.get("pid") == self.pid else now - (self.started_at or now)
                if age > hb_timeout:
                    log.error("trainer heartbeat is stale; restarting it", age_s=round(age), pid=self.pid)
                    self._kill_group(cfg.training.stop_timeout_s)
        elif self.state == "adopted":
            if not runtime.training_activity(cfg.checkpoint_dir).active:
                log.info("the adopted trainer has exited; starting training under this daemon")
                self.state = "idle"
                self.start()
        elif self.state == "backoff" and self.next_start is not None and now >= self.next_start:
            self.start()

    def _on_exit(self, rc: int, why: str = "") -> None:
        now = self.clock()
        cfg = self.get_cfg()
        ran = now - (self.started_at or now)
        if self._writer:
            self._writer.write(f"--- trainer exited with {rc} after {ran:.0f}s\n".encode())
            self._writer.close()
            self._writer = None
        if self.state == "stopping":
            self.state = "stopped"
            return
        c = cat.scan_config(cfg, stats=False)
        newest = c.newest_valid()
        verdict = self.policy.on_exit(now, rc, ran, self.resume_from, newest.name if newest else None)
        self.proc = None
        if verdict.action == "finished":
            self.state = "finished"
            self.message = "training finished (exit 0)"
            log.info("training finished", returncode=rc)
            return
        desc = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        self.last_crash = {"time": now, "returncode": rc, "description": desc, "ran_s": round(ran, 1),
                           "resumed_from": self.resume_from, "tail": list(self.tail)[-15:], "why": why}
        log.error("trainer crashed", how=desc, ran_s=round(ran, 1), resumed_from=self.resume_from,
                  last_output="\n".join(list(self.tail)[-15:]) or why)
        for n in verdict.notes:
            log.warning(n)
        if verdict.action == "give_up":
            self.state = "gave_up"
            self.message = verdict.notes[-1]
            log.error("not restarting training", reason=verdict.notes[-1])
            return
        self.state = "backoff"
        self.next_start = now + verdict.delay_s
        self.message = f"crashed ({desc}); restarting in {verdict.delay_s:.0f}s"
        log.info("restarting after backoff", delay_s=verdict.delay_s, restarts=self.policy.restarts)

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
        if self.state == "running" and self.proc is not None:
            self.state = "stopping"
            log.info("stopping trainer: SIGTERM, waiting for its final save", pid=self.proc.pid,
                     timeout_s=cfg.training.stop_timeout_s)
            self._kill_group(cfg.training.stop_timeout_s)
            if self._reader:
                self._reader.join(timeout=5)
            rc = self.proc.returncode
            self._on_exit(rc)
            log.info("trainer stopped", returncode=rc)
        elif self.state == "adopted" and self.pid:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.state = "stopped"

    def snapshot(self) -> dict:
        now = self.clock()
        return {"state": self.state, "pid": self.pid if self.state in ("running", "adopted", "stopping") else None,
                "started_at": self.started_at, "uptime_s": round(now - self.started_at, 1) if self.started_at and self.state in ("running", "adopted") else None,
                "resumed_from": self.resume_from, "restarts": self.policy.restarts, "last_crash": self.last_crash,
                "next_start": self.next_start if self.state == "backoff" else None, "message": self.message,
                "avoided_checkpoints": sorted(self.policy.suspect)}
