"""The daemon's status, typed: the one model that the daemon writes (logs/daemon-state.json, /api/status)
and that every reader takes (`ckpt-daemon status` and its --json, the dashboard, /metrics, notifications).

Times, never ages: readers compute ages when they read. `version` says which shape a file holds: a reader
refuses a newer one with a clear message (a CLI older than the daemon that wrote it) instead of guessing.
Sections owned by one module each keep that module's shape as a mapping (`memory`: the memory agent,
`notify`: daemon/alerts.py, `jobs`: daemon/jobs.py, `replicas`: daemon/replicate.py, read by
daemon/replicaview.py); everything two readers or more look at is a typed field here.

The file is untrusted like every file: `parse` bounds and checks it, and a damaged one is a
StatusUnreadable with its reason, never an exception from deep inside a printer.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

STATUS_VERSION = 1


class StatusUnreadable(ValueError):
    """logs/daemon-state.json cannot be used: damaged, or written by a newer ckpt-daemon."""


class _Section(BaseModel):
    # a field this version does not know (a newer daemon's) passes through to --json; readers use the typed ones
    model_config = ConfigDict(extra="allow")


Num = Optional[float]


class CheckpointRef(_Section):
    name: str
    step: Optional[int] = None
    mtime: Num = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    layout: str = "native"


class RunCheckpoints(_Section):
    count: int = 0
    valid: int = 0
    latest: Optional[CheckpointRef] = None
    best: Optional[CheckpointRef] = None


class Checkpoints(RunCheckpoints):
    dir: str = ""
    failed_verification: dict[str, str] = Field(default_factory=dict)
    in_progress: list[str] = Field(default_factory=list)
    quarantined: int = 0
    runs: dict[str, RunCheckpoints] = Field(default_factory=dict)


class DaemonInfo(_Section):
    pid: Optional[int] = None
    started: Num = None
    config: str = ""
    config_loaded_at: Num = None
    config_error: Optional[str] = None
    config_pending: Optional[str] = None


class Crash(_Section):
    time: Num = None
    description: Optional[str] = None
    ran_s: Num = None
    resumed_from: Optional[str] = None
    resolved: Optional[str] = None
    tail: Optional[list[Any]] = None


class Training(_Section):
    state: str = "?"
    pid: Optional[int] = None
    started_at: Num = None
    step: Optional[int] = None
    steps_per_s: Num = None
    heartbeat_time: Num = None
    resumed_from: Optional[str] = None
    restarts: int = 0
    last_crash: Optional[Crash] = None
    recent_crashes: Optional[int] = None
    crash_window_s: Num = None
    max_crashes: Optional[int] = None
    crashes: list[Any] = Field(default_factory=list)
    crash_counts: dict[str, int] = Field(default_factory=dict)
    next_start: Num = None
    message: Optional[str] = None
    gave_up: Optional[dict[str, Any]] = None  # kind, since, message while the daemon has given up
    avoided_checkpoints: list[str] = Field(default_factory=list)
    run: Optional[str] = None
    warm_spare: Optional[dict[str, Any]] = None
    warm_spare_failures: int = 0
    started_warm: Any = None
    metrics: dict[str, Any] = Field(default_factory=dict)  # name -> {"value", "step"}: the trainer's own lines
    metrics_time: Num = None
    # where the trainer computes, from its heartbeat (ckpt_daemon.device.heartbeat_device; readers check it again)
    device: Optional[dict[str, Any]] = None


class Retention(_Section):
    enabled: bool = True
    policy_confirmed: Optional[bool] = None


class Disk(_Section):
    free_bytes: Optional[int] = None
    total_bytes: Optional[int] = None
    used_bytes: Optional[int] = None
    reserved_bytes: Optional[int] = None
    used_percent: Optional[int] = None  # as `df` shows it (rounded up): used / (used + available)
    used_ratio: Num = None
    mount: Optional[str] = None
    level: Optional[str] = None  # ok | warning | emergency
    checked: Num = None
    message: Optional[str] = None


class Cleanup(_Section):
    time: Num = None
    reason: str = ""
    deleted: int = 0
    failed: int = 0
    freed_bytes: int = 0
    kept: int = 0
    held: int = 0
    policy_confirmed: Optional[bool] = None


class Status(_Section):
    version: int = STATUS_VERSION
    written: Num = None
    daemon: DaemonInfo = Field(default_factory=DaemonInfo)
    training: Training = Field(default_factory=Training)
    checkpoints: Checkpoints = Field(default_factory=Checkpoints)
    retention: Retention = Field(default_factory=Retention)
    disk: Disk = Field(default_factory=Disk)
    jobs: dict[str, Any] = Field(default_factory=dict)  # daemon/jobs.py: next run times, history
    last_cleanup: Optional[Cleanup] = None
    memory: Optional[dict[str, Any]] = None  # the memory agent's snapshot; None when memory checkpoints are off
    notify: Optional[dict[str, Any]] = None  # daemon/alerts.py: targets and what waits (None: notifications off)
    replicas: list[dict[str, Any]] = Field(default_factory=list)  # daemon/replicate.py, one per target

    def to_json(self) -> dict:
        """The mapping written to daemon-state.json and served at /api/status (the same fields)."""
        return self.model_dump(mode="python")


def int_or_none(v: Any) -> Optional[int]:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def num_or_none(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def parse(raw: Any, where: str = "logs/daemon-state.json") -> Status:
    """The Status a file (or /api/status) holds. Raises StatusUnreadable, one paragraph, naming cause and fix."""
    if not isinstance(raw, dict):
        raise StatusUnreadable(f"{where} does not hold a status (not a JSON object); the daemon rewrites it within a "
                               "second while it runs: start it, or delete the file.")
    version = raw.get("version", STATUS_VERSION)  # files of the version before this field were of this shape
    if not isinstance(version, int) or isinstance(version, bool):
        raise StatusUnreadable(f"{where} has a status version {str(version)[:20]!r} that is not a number; the daemon "
                               "rewrites the file within a second while it runs: start it, or delete the file.")
    if version > STATUS_VERSION:
        raise StatusUnreadable(f"{where} was written by a newer ckpt-daemon (status version {version}; this one reads "
                               f"up to {STATUS_VERSION}): run the `ckpt-daemon` of the installation the daemon runs "
                               "from, or restart the daemon with this one.")
    try:
        return Status.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        at = ".".join(str(p) for p in first.get("loc", ())) or "(top)"
        raise StatusUnreadable(f"{where} is damaged ({exc.error_count()} problem(s); the first at {at[:80]}: "
                               f"{str(first.get('msg'))[:120]}); the daemon rewrites it within a second while it "
                               "runs: start it, or delete the file.") from None


def as_status(s: Any) -> Status:
    """`s` if it is a Status, else the Status the mapping holds (a file's content, a test's dict)."""
    return s if isinstance(s, Status) else parse(s if s is not None else {})
