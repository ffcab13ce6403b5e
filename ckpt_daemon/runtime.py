"""Coordination between the trainer, cleanup and the daemon through files in the state folder
`<checkpoints.dir>/.ckpt-daemon/` (no torch, no sockets: works for any number of processes).

- daemon.lock: held (flock) by the one daemon that manages this folder; daemon.json says what it runs.
- trainer.lock: held by a running trainer for its whole life. Others test it.
- heartbeat.json: the trainer's pid, step and time, rewritten atomically every few seconds.
- commit.lock: held while a checkpoint is committed (rename + pointers) and while cleanup re-plans and
  moves its victims to the trash, so a deletion never races a commit.
- resumed_from.json: the checkpoint the trainer last resumed from (protected from deletion).
- pins/<name>: one file per pinned checkpoint, holding the reason.
- tmp/: scratch space for saves, restores and snapshots being built (store/commit.py); trash/: cleanups in
  progress; quarantine/: checkpoints that failed verification, with the reason (store/delete.py).

The locks are store/locks.py's one lock class; the commit primitive (scratch, fsync, rename under the
commit lock) is store/commit.py; quarantine, removal, the trash and its journal are store/delete.py.

The state folder is ours and nobody else's: it is created by us, a symlink or a file in its place is
refused (never followed), and every scratch entry carries a lock so that leftovers of a killed
process are told apart from live work and removed at the next start of any job.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from ckpt_daemon.errors import AlreadyRunningError, TrainingActiveError, UnsafePathError
from ckpt_daemon.fsutil import atomic_write_bytes, atomic_write_json, read_bytes_bounded, read_json_file
from ckpt_daemon.store.locks import FileLock, lock_held, open_lock_file

STATE_DIR = ".ckpt-daemon"
RUNTIME_DIR = STATE_DIR  # the name used before 0.2
PINS_DIR = "pins"
RELEASED_DIR = "released"  # epoch ends a user released with `unpin`
HEARTBEAT = "heartbeat.json"
DAEMON_RECORD = "daemon.json"

log = logging.getLogger("ckpt_daemon.runtime")


def _ensure_dir(p: Path, create: bool) -> Path:
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        if not create:
            return p
        try:
            os.mkdir(p, 0o755)
        except FileExistsError:
            pass
        st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a folder"
        raise UnsafePathError(
            f"{p} is {kind}. ckpt-daemon keeps its locks and scratch space there and never follows a link "
            "or writes through something it did not create. Move it away (it is not ckpt-daemon's) and try again; "
            "nothing was changed."
        )
    return p


def state_dir(root: str | os.PathLike, *sub: str, create: bool = True) -> Path:
    """`root/.ckpt-daemon[/sub...]`, created if missing (unless create=False); raises UnsafePathError
    if any level is a symlink or not a folder."""
    if create:
        os.makedirs(root, exist_ok=True)
    p = _ensure_dir(Path(root) / STATE_DIR, create)
    for s in sub:
        p = _ensure_dir(p / s, create)
    return p


def runtime_dir(ckpt_dir: Path, create: bool = True) -> Path:
    return state_dir(ckpt_dir, create=create)


def read_record(root: Path, name: str, limit: int = 1 << 20) -> Optional[dict]:
    """A small JSON record of the state folder, or None (missing, a symlink, malformed, too big)."""
    return read_json_file(Path(root) / STATE_DIR / name, limit)


def write_record(root: Path, name: str, obj: dict, durable: bool = True) -> bool:
    """Replace a record atomically. Bookkeeping must never stop training: a full disk or a read-only
    folder is logged (once per kind) and reported as False, never raised."""
    try:
        atomic_write_json(state_dir(root) / name, obj, durable=durable)
        return True
    except (OSError, UnsafePathError) as exc:
        _warn_once(f"record:{name}:{getattr(exc, 'errno', '')}",
                   "could not write %s in %s (%s); training goes on without it", name, root, exc)
        return False


_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


# ------------------------------------------------------------------------------------------ locks
# One lock class (store/locks.py): the trainer's, the daemon's and the commit lock are FileLocks.
def _lock_fd(path: Path) -> int:
    return open_lock_file(path)


class _FileLock(FileLock):
    name = ""

    def __init__(self, ckpt_dir: Path):
        self.root = Path(ckpt_dir)
        super().__init__(state_dir(ckpt_dir) / self.name)


class TrainerLock(_FileLock):
    """Exclusive lock a trainer holds while it runs; a second trainer on the same folder is refused."""

    name = "trainer.lock"

    def acquire(self) -> "TrainerLock":
        if not self.try_acquire():
            hb = read_heartbeat(self.root) or {}
            raise TrainingActiveError(
                f"Another trainer (pid {hb.get('pid', self.holder_pid() or '?')}) is already writing checkpoints to "
                f"{self.root}. Two writers would corrupt the run: stop the other one, or give this run its own "
                "checkpoints.dir."
            )
        return self

    def __enter__(self) -> "TrainerLock":
        return self.acquire()


class DaemonLock(_FileLock):
    """One daemon per checkpoint folder (and per logs folder): held for the daemon's whole life."""

    name = "daemon.lock"

    def __init__(self, folder: Path, what: str = "manages"):
        super().__init__(folder)
        self.what = what

    def acquire(self) -> "DaemonLock":
        if not self.try_acquire():
            rec = read_record(self.root, DAEMON_RECORD) or {}
            pid = rec.get("pid") or self.holder_pid() or "?"
            which = "checkpoints.dir" if self.what == "manages" else "logging.dir"
            raise AlreadyRunningError(
                f"Another ckpt-daemon (pid {pid}) already {self.what} {self.root}. One daemon per folder: a second "
                f"one would fight the first over the trainer, or mix their state files. Stop that one first "
                f"(systemctl stop ckpt-daemon, or kill {pid}), or give this config its own {which}."
            )
        return self

    def __enter__(self) -> "DaemonLock":
        return self.acquire()


def daemon_running(ckpt_dir: Path) -> bool:
    return lock_held(Path(ckpt_dir) / STATE_DIR / DaemonLock.name)


@contextmanager
def commit_lock(ckpt_dir: Path, timeout_s: float = 600.0) -> Iterator[None]:
    """Exclusive lock around commits and deletions in `ckpt_dir`."""
    lock = FileLock(state_dir(ckpt_dir) / "commit.lock", info=None)
    lock.acquire_within(timeout_s, lambda: TrainingActiveError(
        f"Timed out after {timeout_s:.0f}s waiting for the commit lock of {ckpt_dir}: a save or a "
        "cleanup is holding it. Try again later; nothing was changed."))
    try:
        yield
    finally:
        lock.release()


# ------------------------------------------------------------------------------------ heartbeat
@dataclass
class Activity:
    active: bool
    pid: Optional[int] = None
    step: Optional[int] = None
    heartbeat_age_s: Optional[float] = None
    saving: Optional[str] = None
    detail: str = ""
    resume_from: Optional[str] = None  # the daemon's chosen resume point, if a daemon runs


def read_heartbeat(ckpt_dir: Path) -> Optional[dict]:
    return read_record(ckpt_dir, HEARTBEAT, 64 << 10)


def write_heartbeat(ckpt_dir: Path, **fields) -> bool:
    """The trainer's sign of life. Best effort: a full disk is logged once and training goes on.
    The daemon's run token (CKPT_DAEMON_RUN) is included so that the daemon can tell its own
    trainer's heartbeat from another's, whatever pid wrote it (torchrun's rank 0 is a grandchild)."""
    rec = {"pid": os.getpid(), "time": time.time(), **fields}
    token = os.environ.get("CKPT_DAEMON_RUN")
    if token:
        rec["run"] = token
    return write_record(ckpt_dir, HEARTBEAT, rec, durable=False)


def pid_alive(pid: Any) -> bool:
    """Whether process `pid` runs. A zombie (exited, not yet reaped by its parent) does not: a trainer the
    daemon adopted is not its child, so its exit can leave one behind."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True  # no /proc to ask: the signal check above is all there is


def read_daemon_record(ckpt_dir: Path) -> Optional[dict]:
    """What the daemon managing `ckpt_dir` runs, if a daemon is alive (its lock is held)."""
    if not daemon_running(ckpt_dir):
        return None
    return read_record(ckpt_dir, DAEMON_RECORD)


def training_activity(ckpt_dir: Path, now: Optional[float] = None) -> Activity:
    """Is a trainer writing to `ckpt_dir`? From the trainer lock (the built-in trainer and
    CheckpointManager hold it), and from the daemon's record of its child (any command)."""
    now = time.time() if now is None else now
    held = lock_held(Path(ckpt_dir) / STATE_DIR / TrainerLock.name)
    hb = read_heartbeat(ckpt_dir) or {}
    age = now - hb["time"] if isinstance(hb.get("time"), (int, float)) else None
    rec = read_daemon_record(ckpt_dir) or {}
    resume = rec.get("resume_from") if isinstance(rec.get("resume_from"), str) else None
    child = rec.get("trainer_pid")
    if held:
        return Activity(True, hb.get("pid"), hb.get("step"), age, hb.get("saving"),
                        f"trainer lock held (pid {hb.get('pid', '?')}, step {hb.get('step', '?')})", resume)
    if rec and rec.get("state") in ("running", "adopted", "stopping") and pid_alive(child):
        return Activity(True, child, hb.get("step"), age, hb.get("saving"),
                        f"the daemon (pid {rec.get('pid', '?')}) runs training as pid {child}"
                        + (f", resumed from {resume}" if resume else ""), resume)
    return Activity(False, hb.get("pid"), hb.get("step"), age, None, "no trainer holds the lock"
                    + (" and the daemon runs none" if rec else " and no daemon runs"), resume)


def record_resumed_from(ckpt_dir: Path, name: Optional[str], step: Optional[int]) -> bool:
    return write_record(ckpt_dir, "resumed_from.json", {"name": name, "step": step, "time": time.time()})


def read_resumed_from(root: Path) -> Optional[str]:
    name = (read_record(root, "resumed_from.json") or {}).get("name")
    return name if isinstance(name, str) else None


# ------------------------------------------------------------------------------------------- pins
def _check_name(name: str) -> str:
    if not name or "/" in name or "\0" in name or name.startswith(".") or len(name) > 255:
        raise UnsafePathError(f"{name!r} is not a checkpoint name (a plain name inside the checkpoint folder).")
    return name


def pin(ckpt_dir: Path, name: str, reason: str = "pinned by user") -> None:
    d = state_dir(ckpt_dir, PINS_DIR)
    atomic_write_bytes(d / _check_name(name), (reason.strip()[:500] + "\n").encode())
    try:
        (state_dir(ckpt_dir, RELEASED_DIR) / name).unlink()
    except FileNotFoundError:
        pass


def release(ckpt_dir: Path, name: str) -> None:
    """Let retention delete the last checkpoint of an epoch (kept by retention.keep_epoch_ends)."""
    atomic_write_bytes(state_dir(ckpt_dir, RELEASED_DIR) / _check_name(name), b"released by user\n")


def read_released(root: Path) -> set[str]:
    try:
        with os.scandir(Path(root) / STATE_DIR / RELEASED_DIR) as it:
            return {e.name for _, e in zip(range(100_000), it)}
    except OSError:
        return set()


def unpin(ckpt_dir: Path, name: str) -> bool:
    p = state_dir(ckpt_dir, PINS_DIR) / _check_name(name)
    try:
        p.unlink()
        return True
    except FileNotFoundError:
        return False


def read_pins(root: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    d = Path(root) / STATE_DIR / PINS_DIR
    try:
        with os.scandir(d) as it:
            names = [e.name for e in it][:100_000]
    except OSError:
        return pins
    for n in names:
        try:
            text = read_bytes_bounded(d / n, 4096).decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            continue
        pins[n] = text or "pinned by user"
    return pins


# --------------------------------------------------------------------------------------- processes
def kill_tree(pid: int, sig: int) -> int:
    """Send `sig` to `pid` and all its descendants (torchrun's workers live in sessions of their own,
    so a process-group kill does not reach them). Returns how many processes were signalled."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return 0
    n = 0
    for p in procs:
        try:
            p.send_signal(sig)
            n += 1
        except psutil.NoSuchProcess:
            pass
    return n


