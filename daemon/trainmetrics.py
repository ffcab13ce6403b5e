"""The trainer's newest metrics (loss, the validation metric, learning rate...), for `status`, the
dashboard and /metrics.

Every trainer under the daemon appends `{"step": ..., "<name>": <number>, ..., "time": ...}` lines to
logs/metrics.jsonl ($CKPT_DAEMON_METRICS: the built-in trainer, the Hugging Face and Lightning callbacks,
`Heartbeat.metrics` in a plain script). This keeps, per name, the value of the newest line that has it,
with that line's step and time: a validation metric logged every few hundred steps is still known
between its lines.

The file grows by a line per step and is untrusted like every file: only what was appended since the
last call is read, never more than `MAX_READ` per call (a file that grew more since is read from its last
`TAIL` bytes), lines longer than `MAX_LINE` are skipped, at most `MAX_NAMES` names are kept, each a plain
name of at most 64 characters, and only finite numbers count.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import threading
from pathlib import Path
from typing import Any, Optional

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,63}\Z")
_NOT_METRICS = frozenset({"step", "time"})


class NewestMetrics:
    MAX_LINE = 64 << 10
    TAIL = 1 << 20
    MAX_READ = 4 << 20
    MAX_NAMES = 32

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._reset(None)

    def _reset(self, ident) -> None:
        self.ident = ident
        self.offset = 0
        self.values: dict[str, dict[str, Any]] = {}
        self.newest_time: Optional[float] = None

    def _feed(self, line: bytes) -> None:
        if not line.strip() or len(line) > self.MAX_LINE:
            return
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            return
        if not isinstance(rec, dict):
            return
        step = rec.get("step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else None
        t = rec.get("time")
        t = float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) else None
        if t is not None:
            self.newest_time = t
        for name, v in rec.items():
            if name in _NOT_METRICS or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not isinstance(name, str) or not _NAME.match(name) or not math.isfinite(v):
                continue
            if name not in self.values and len(self.values) >= self.MAX_NAMES:
                continue
            self.values[name] = {"value": float(v), "step": step, "time": t}

    def update(self) -> dict:
        """Read what was appended since the last call; returns `snapshot()`. Never raises."""
        with self._lock:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                return self._snapshot()  # not written yet, or rotated away: the values known stay
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return self._snapshot()
                ident = (st.st_dev, st.st_ino)
                if ident != self.ident or st.st_size < self.offset:
                    # a new file (rotated, or a new run's) or one truncated: its newest lines replace ours
                    self._reset(ident)
                if st.st_size - self.offset > self.MAX_READ:
                    self.offset = st.st_size - self.TAIL  # more than a call may read: its newest part
                    head = os.pread(fd, self.MAX_LINE, self.offset)
                    nl = head.find(b"\n")
                    self.offset += nl + 1 if nl >= 0 else len(head)
                data = os.pread(fd, max(0, st.st_size - self.offset), self.offset) if st.st_size > self.offset else b""
            except OSError:
                return self._snapshot()
            finally:
                os.close(fd)
            end = data.rfind(b"\n")
            if end >= 0:  # an unfinished last line is read again next time
                for line in data[:end].split(b"\n"):
                    self._feed(line)
                self.offset += end + 1
            return self._snapshot()

    def _snapshot(self) -> dict:
        return {"values": {k: dict(v) for k, v in self.values.items()}, "time": self.newest_time}
