"""python -m daemon.logrelay LOGFILE MAX_BYTES BACKUPS: the trainer's output, relayed.

The trainer's stdout and stderr are a pipe to this small process, not to the daemon: it appends every
byte to logs/trainer.log (rotated by size) and forwards it to the daemon on its own stdout. If the
daemon dies, the relay keeps draining the pipe, so a trainer that prints while it makes its final save
never dies of a broken pipe; if the disk is full, output is dropped, never the trainer. It ends when
the trainer's output ends (every process of its tree has exited). No torch, no imports beyond os.
"""

from __future__ import annotations

import os
import signal
import sys


class Log:
    def __init__(self, path: str, max_bytes: int, backups: int):
        self.path, self.max_bytes, self.backups = path, max(1024, max_bytes), max(0, min(backups, 100))
        self.fd = -1
        self.size = 0
        self._open()

    def _open(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self.size = os.fstat(self.fd).st_size
        except OSError:
            self.fd = -1

    def write(self, data: bytes) -> None:
        if self.fd < 0:
            self._open()
            if self.fd < 0:
                return
        try:
            if self.size + len(data) > self.max_bytes and self.size > 0:
                self._rotate()
            os.write(self.fd, data)
            self.size += len(data)
        except OSError:
            pass  # a full disk costs log lines, never the trainer

    def _rotate(self) -> None:
        os.close(self.fd)
        self.fd = -1
        for i in range(self.backups - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i + 1}")
        if self.backups:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)
        self._open()


def main(argv: list[str]) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # it ends when the trainer's output ends, not before
    log = Log(argv[0], int(argv[1]), int(argv[2]))
    forward = True
    while True:
        try:
            data = os.read(0, 1 << 16)
        except InterruptedError:
            continue
        if not data:
            return 0
        log.write(data)
        if forward:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(1, view):]
            except OSError:
                forward = False  # the daemon is gone: keep logging and draining


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
