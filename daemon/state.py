"""The daemon's state file (logs/daemon-state.json): what `ckpt-daemon status` shows, rewritten
atomically so a reader never sees half of it; and the job history used to catch up missed runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from ckpt_daemon.fsutil import atomic_write_json, read_json_file

STATE_FILE = "daemon-state.json"
JOBS_FILE = "jobs-state.json"


def state_path(log_dir: Path) -> Path:
    return Path(log_dir) / STATE_FILE


def read_state(log_dir: Path) -> Optional[dict]:
    return read_json_file(state_path(log_dir), 16 << 20)


def write_state(log_dir: Path, state: dict) -> None:
    atomic_write_json(state_path(log_dir), state, mode=0o644, durable=False)  # a status, rewritten often: no fsync


class JobHistory:
    """Last successful run of each scheduled job, persisted (APScheduler's memory store forgets)."""

    def __init__(self, log_dir: Path, now: Optional[float] = None):
        self.path = Path(log_dir) / JOBS_FILE
        # Untrusted like every file: a malformed history is started afresh (a missed run is then not caught
        # up once, which is the lesser evil), never a daemon that cannot start.
        self.data: dict[str, Any] = read_json_file(self.path, 1 << 20) or {}
        jobs = self.data.get("jobs")
        if not isinstance(jobs, dict) or not all(isinstance(v, dict) for v in jobs.values()):
            self.data["jobs"] = {}
        if not isinstance(self.data.get("created"), (int, float)):
            self.data.pop("created", None)
        if "created" not in self.data:
            # First start ever: nothing was missed before this moment.
            self.data["created"] = time.time() if now is None else now
            self._save()

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, self.data)
        except OSError:
            pass  # a full disk: the history is kept in memory and written at the next run that can

    def job(self, name: str) -> dict:
        return self.data.setdefault("jobs", {}).setdefault(name, {})

    def last_success(self, name: str) -> float:
        v = self.job(name).get("last_success")
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float(self.data["created"])

    def record(self, name: str, ok: bool, when: float, message: str, duration_s: float = 0.0,
               persist: bool = True) -> None:
        j = self.job(name)
        j["last_attempt"] = when
        j["last_result"] = "ok" if ok else "error"
        j["last_message"] = message[:2000]
        j["last_duration_s"] = round(duration_s, 3)
        j["runs"] = int(j.get("runs", 0)) + 1
        if ok:
            j["last_success"] = when
        if persist:
            self._save()
