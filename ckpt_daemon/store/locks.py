"""The one lock of ckpt-daemon: an flock on a regular file we create (never a symlink followed, never a
FIFO or a device opened in a lock's place), optionally with the holder's pid written in it as information
(the flock is what counts). Taken without waiting (`try_acquire`) or waiting up to a deadline
(`acquire_within`); released by closing the file. The trainer's, the daemon's, the commit lock and the
memory region's lock are all this class (see runtime.TrainerLock, runtime.DaemonLock, runtime.commit_lock,
daemon.memagent.RegionLock).

Imports nothing of ours but the errors: runtime builds its locks on it."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import Callable, Optional

from ckpt_daemon.errors import UnsafePathError

_O_LOCK = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
POLL_S = 0.02


def _not_regular(path: Path) -> Exception:
    return UnsafePathError(
        f"{path} is not a regular file (a FIFO, a device or a folder was put in its place). ckpt-daemon keeps "
        "its locks there; remove it and try again. Nothing was changed.")


def open_lock_file(path: Path, mode: int = 0o644, create: bool = True,
                   not_regular: Callable[[Path], Exception] = _not_regular) -> int:
    """An fd on the lock file `path` (created if missing, unless create=False), never through a symlink; a
    FIFO planted at its name does not hang us (O_NONBLOCK) and anything but a regular file is refused."""
    flags = (_O_LOCK if create else _O_LOCK & ~os.O_CREAT) | os.O_NONBLOCK
    fd = os.open(path, flags, mode)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise not_regular(Path(path))
    return fd


def lock_held(path: Path) -> bool:
    """Whether someone holds the lock at `path` (a missing file, a symlink or a non-file: nobody does)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _pause() -> None:
    """One wait between two tries of a held lock (a test replaces it to see that a caller waits)."""
    time.sleep(POLL_S)


class FileLock:
    """An exclusive flock on the regular file `path`. `info()` is written into the file once it is held
    (None: nothing is written); `not_regular(path)` is the error raised when something other than a
    regular file holds the lock's name. Usable as a context manager (`with FileLock(p).acquire_within(..)`)."""

    def __init__(self, path: str | os.PathLike, mode: int = 0o644,
                 info: Optional[Callable[[], str]] = lambda: f"{os.getpid()}\n",
                 not_regular: Callable[[Path], Exception] = _not_regular, create: bool = True):
        self.path = Path(path)
        self.mode = mode
        self.info = info
        self.not_regular = not_regular
        self.create = create
        self.fd: Optional[int] = None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it. False if it is held; raises OSError (or `not_regular`'s
        error) if the lock file cannot be opened."""
        fd = open_lock_file(self.path, self.mode, self.create, self.not_regular)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self._hold(fd)
        return True

    def acquire_within(self, timeout_s: float, on_timeout: Callable[[], Exception]) -> "FileLock":
        """Take the lock, waiting for its holder up to `timeout_s`; then raise `on_timeout()`. The lock
        file is opened once: its name cannot be swapped under us while we wait."""
        fd = open_lock_file(self.path, self.mode, self.create, self.not_regular)
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
                        raise on_timeout() from None
                    _pause()
        except BaseException:
            os.close(fd)
            raise
        self._hold(fd)
        return self

    def _hold(self, fd: int) -> None:
        """Keep `fd`, whose flock we now hold, and write the holder's info into it."""
        if self.info is not None:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, self.info().encode())
            except OSError:
                pass  # the pid is informational; the flock is what counts (and a full disk must not stop us)
        self.fd = fd

    def holder_pid(self) -> Optional[int]:
        """The pid the holder wrote (the first word of the file), if any."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            word = (os.read(fd, 64).decode("ascii", "replace").split() or [""])[0]
        except OSError:
            return None
        finally:
            os.close(fd)
        return int(word) if word.isascii() and word.isdigit() else None

    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> "FileLock":
        if self.fd is None and not self.try_acquire():
            raise BlockingIOError(errno.EWOULDBLOCK, f"{self.path} is held by pid {self.holder_pid() or '?'}",
                                  str(self.path))
        return self

    def __exit__(self, *exc) -> None:
        self.release()
