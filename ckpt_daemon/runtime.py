"""Coordination between the trainer, cleanup and the daemon through files in
`<checkpoints.dir>/.ckpt-daemon/` (no torch, no sockets: works for any number of processes).

- trainer.lock: held (flock, exclusive) by a running trainer for its whole life. Others test it.
- heartbeat.json: the trainer's pid, step and time, rewritten atomically every few seconds.
- commit.lock: held exclusively while a checkpoint is committed (rename + pointers) and while cleanup
  re-plans and moves its victims to the trash, so a deletion never races a commit.
- resumed_from.json: the checkpoint the trainer last resumed from (protected from deletion).
- pins/<name>: one file per pinned checkpoint, holding the reason.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ckpt_daemon.catalog import PINS_DIR, RUNTIME_DIR
from ckpt_daemon.errors import TrainingActiveError
from ckpt_daemon.fsutil import atomic_write_json

HEARTBEAT = "heartbeat.json"


def runtime_dir(ckpt_dir: Path, create: bool = True) -> Path:
    d = Path(ckpt_dir) / RUNTIME_DIR
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


class TrainerLock:
    """Exclusive lock a trainer holds while it runs; a second trainer on the same folder is refused."""

    def __init__(self, ckpt_dir: Path):
        self.path = runtime_dir(ckpt_dir) / "trainer.lock"
        self.fd: Optional[int] = None

    def acquire(self) -> "TrainerLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                hb = read_heartbeat(self.path.parent.parent) or {}
                raise TrainingActiveError(
                    f"Another trainer (pid {hb.get('pid', '?')}) is already writing checkpoints to "
                    f"{self.path.parent.parent}. Two writers would corrupt the run: stop the other one, or give "
                    "this run its own checkpoints.dir."
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> "TrainerLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class Activity:
    active: bool
    pid: Optional[int] = None
    step: Optional[int] = None
    heartbeat_age_s: Optional[float] = None
    saving: Optional[str] = None
    detail: str = ""


def read_heartbeat(ckpt_dir: Path) -> Optional[dict]:
    try:
        return json.loads((Path(ckpt_dir) / RUNTIME_DIR / HEARTBEAT).read_text())
    except (OSError, ValueError):
        return None


def write_heartbeat(ckpt_dir: Path, **fields) -> None:
    atomic_write_json(runtime_dir(ckpt_dir) / HEARTBEAT, {"pid": os.getpid(), "time": time.time(), **fields})


def lock_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def training_activity(ckpt_dir: Path, now: Optional[float] = None) -> Activity:
    """Is a trainer writing to `ckpt_dir`? From its lock (authoritative) and its heartbeat."""
    now = time.time() if now is None else now
    held = lock_held(Path(ckpt_dir) / RUNTIME_DIR / "trainer.lock")
    hb = read_heartbeat(ckpt_dir) or {}
    age = now - hb["time"] if isinstance(hb.get("time"), (int, float)) else None
    if held:
        return Activity(True, hb.get("pid"), hb.get("step"), age, hb.get("saving"),
                        f"trainer lock held (pid {hb.get('pid', '?')}, step {hb.get('step', '?')})")
    return Activity(False, hb.get("pid"), hb.get("step"), age, None, "no trainer holds the lock")


@contextmanager
def commit_lock(ckpt_dir: Path, timeout_s: float = 600.0) -> Iterator[None]:
    """Exclusive lock around commits and deletions in `ckpt_dir`."""
    fd = os.open(runtime_dir(ckpt_dir) / "commit.lock", os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() > deadline:
                    raise TrainingActiveError(
                        f"Timed out after {timeout_s:.0f}s waiting for the commit lock of {ckpt_dir}: a save or a "
                        "cleanup is holding it. Try again later; nothing was changed."
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def record_resumed_from(ckpt_dir: Path, name: Optional[str], step: Optional[int]) -> None:
    atomic_write_json(runtime_dir(ckpt_dir) / "resumed_from.json", {"name": name, "step": step, "time": time.time()})


def pin(ckpt_dir: Path, name: str, reason: str = "pinned by user") -> None:
    d = runtime_dir(ckpt_dir) / PINS_DIR
    d.mkdir(exist_ok=True)
    from ckpt_daemon.fsutil import atomic_write_bytes

    atomic_write_bytes(d / name, (reason.strip() + "\n").encode())


def unpin(ckpt_dir: Path, name: str) -> bool:
    p = runtime_dir(ckpt_dir) / PINS_DIR / name
    try:
        p.unlink()
        return True
    except FileNotFoundError:
        return False


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


def quarantine(ckpt_dir: Path, name: str, reason: str) -> Optional[Path]:
    """Move a checkpoint that failed verification out of the catalog into .ckpt-daemon/quarantine/,
    with a note of why. Nothing is deleted (the evidence stays for the user), it can never be chosen
    for resume again, and a resumed trainer can write that step afresh."""
    from ckpt_daemon.fsutil import atomic_write_bytes, fsync_dir

    src = Path(ckpt_dir) / name
    if src.is_symlink() or not src.exists():
        return None
    qdir = runtime_dir(ckpt_dir) / "quarantine"
    qdir.mkdir(exist_ok=True)
    dst = qdir / f"{name}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}"
    with commit_lock(ckpt_dir):
        if not src.exists():
            return None
        os.rename(src, dst)
        fsync_dir(ckpt_dir)
    atomic_write_bytes(qdir / f"{dst.name}.reason", (reason.strip() + "\n").encode())
    return dst
