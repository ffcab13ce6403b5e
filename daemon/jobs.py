"""Scheduled jobs: daily snapshot, weekly retention, disk check, periodic rescan (APScheduler 3.x).

A job that fails is logged and tried again at its next time; none can kill the daemon. Never two runs
of one job at once (max_instances=1 and a lock per job, also taken by catch-up and emergency runs);
snapshot and retention never overlap (one maintenance lock). A run that was due while the daemon was
down is done once at start, from the persisted history of last successful runs.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import zoneinfo
from typing import Callable, Optional

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from ckpt_daemon.config import Config
from ckpt_daemon.cron import next_fire_times, validate_cron
from ckpt_daemon.logs import get_logger
from daemon.state import JobHistory

log = get_logger("daemon.jobs")


class CronsimTrigger(BaseTrigger):
    """An APScheduler 3.x trigger that fires when cron would: the times come from cronsim
    (ckpt_daemon.cron), so weekday 0 and 7 are Sunday, ranges, steps and names mean what crontab(5)
    says, and a day matching day-of-month OR weekday fires when both are restricted. APScheduler's own
    CronTrigger numbers weekdays from Monday and ANDs the two day fields."""

    __slots__ = ("expr", "tz")

    def __init__(self, expr: str, tz: str):
        zoneinfo.ZoneInfo(tz)  # an unknown zone fails here, not at the first fire time
        self.expr, self.tz = validate_cron(expr), tz

    def get_next_fire_time(self, previous_fire_time: Optional[dt.datetime], now: dt.datetime) -> Optional[dt.datetime]:
        # Strictly after the previous fire time, so a time never fires twice (even if the clock went back).
        start = now if previous_fire_time is None else previous_fire_time + dt.timedelta(microseconds=1)
        return first_fire_at_or_after(self.expr, self.tz, start)

    def __str__(self) -> str:
        return f"cron[{self.expr}, {self.tz}]"

    def __repr__(self) -> str:
        return f"<CronsimTrigger ({self.expr!r}, timezone={self.tz!r})>"


def first_fire_at_or_after(expr: str, tz: str, start: dt.datetime) -> Optional[dt.datetime]:
    times = next_fire_times(expr, tz, start.astimezone(dt.timezone.utc) - dt.timedelta(microseconds=1), 1)
    return times[0] if times else None


def missed(expr: str, tz: str, last_success: float, now: float) -> Optional[dt.datetime]:
    """The first fire time after `last_success` if it is already past `now` (a missed run), else None."""
    after = dt.datetime.fromtimestamp(last_success, dt.timezone.utc) + dt.timedelta(seconds=1)
    nxt = first_fire_at_or_after(expr, tz, after)
    return nxt if nxt is not None and nxt.timestamp() <= now else None


class Jobs:
    def __init__(self, get_cfg: Callable[[], Config], history: JobHistory, funcs: dict[str, Callable[[], str]],
                 clock: Callable[[], float] = time.time):
        self.get_cfg = get_cfg
        self.history = history
        self.funcs = funcs  # name -> callable returning a one-line result message
        self.clock = clock
        self.locks = {name: threading.Lock() for name in funcs}
        self.maintenance_lock = threading.Lock()
        self.sched: Optional[BackgroundScheduler] = None
        self.hist_lock = threading.Lock()

    # ------------------------------------------------------------------------------------ running
    def run_job(self, name: str, reason: str = "scheduled") -> Optional[bool]:
        """Run `name` now unless it is already running. Returns True/False for success, None if skipped."""
        lock = self.locks[name]
        if not lock.acquire(blocking=False):
            log.info("job already running; this run is skipped", job=name, reason=reason)
            return None
        try:
            heavy = name in ("snapshot", "retention")
            if heavy:
                self.maintenance_lock.acquire()
            t0 = self.clock()
            try:
                msg = self.funcs[name]() or ""
                ok = True
                quiet = name in ("rescan", "disk") and reason == "scheduled"
                (log.debug if quiet else log.info)("job done", job=name, reason=reason, result=msg,
                                                   duration_s=round(self.clock() - t0, 2))
            except Exception as exc:  # a job must never kill the daemon
                ok, msg = False, f"{type(exc).__name__}: {exc}"
                log.error("job failed; it will run again at its next time", job=name, reason=reason, error=msg)
            finally:
                if heavy:
                    self.maintenance_lock.release()
            with self.hist_lock:  # every job's last result and duration (status, metrics); missed runs use the cron jobs'
                self.history.record(name, ok, t0, msg, duration_s=self.clock() - t0,
                                    persist=name in ("snapshot", "retention"))
            return ok
        finally:
            lock.release()

    # ------------------------------------------------------------------------------------ schedule
    def start(self) -> None:
        cfg = self.get_cfg()
        self.sched = BackgroundScheduler(timezone=zoneinfo.ZoneInfo(cfg.timezone),
                                         job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 600})
        self._add_jobs(cfg)
        self.sched.start()

    def _add_jobs(self, cfg: Config) -> None:
        s = self.sched
        tz = cfg.timezone
        if cfg.snapshots.enabled and "snapshot" in self.funcs:
            s.add_job(self.run_job, CronsimTrigger(cfg.snapshots.schedule, tz), args=["snapshot"], id="snapshot",
                      replace_existing=True)
        if cfg.retention.enabled and "retention" in self.funcs:
            s.add_job(self.run_job, CronsimTrigger(cfg.retention.schedule, tz), args=["retention"], id="retention",
                      replace_existing=True)
        if "disk" in self.funcs:
            s.add_job(self.run_job, IntervalTrigger(seconds=cfg.disk.check_interval_s), args=["disk"], id="disk",
                      replace_existing=True)
        if "rescan" in self.funcs:
            s.add_job(self.run_job, IntervalTrigger(seconds=30), args=["rescan"], id="rescan", replace_existing=True)

    def reschedule(self) -> None:
        if self.sched is None:
            return
        for job in self.sched.get_jobs():
            job.remove()
        self._add_jobs(self.get_cfg())

    def catch_up(self) -> list[str]:
        """Run once, now, each cron job whose time came while the daemon was down."""
        cfg = self.get_cfg()
        now = self.clock()
        ran = []
        for name, enabled, expr in (("snapshot", cfg.snapshots.enabled, cfg.snapshots.schedule),
                                    ("retention", cfg.retention.enabled, cfg.retention.schedule)):
            if not enabled or name not in self.funcs:
                continue
            due = missed(expr, cfg.timezone, self.history.last_success(name), now)
            if due is not None:
                log.info("catching up a run missed while the daemon was down", job=name, was_due=due.isoformat())
                threading.Thread(target=self.run_job, args=(name, f"catch-up of {due.isoformat()}"), daemon=True,
                                 name=f"catchup-{name}").start()
                ran.append(name)
        return ran

    def next_times(self) -> dict[str, Optional[str]]:
        out = {}
        if self.sched is None:
            return out
        for job in self.sched.get_jobs():
            nxt = getattr(job, "next_run_time", None)
            out[job.id] = nxt.isoformat() if nxt else None
        return out

    def shutdown(self) -> None:
        if self.sched is not None:
            self.sched.shutdown(wait=False)
