"""The daemon: one foreground process (`ckpt-daemon run`) that never imports torch.

Threads: the main loop (a 0.25 s tick: applies config reloads, writes the state file when it changed,
pings the systemd watchdog), the supervisor (the trainer's life cycle, see supervisor.py), a config
reader (reading and validating config.yaml never runs on the main loop), APScheduler's job threads,
watchdog's observer and the verification worker. The watchdog ping means "the main loop and the
supervisor are alive"; nothing slow runs on the main loop.

One daemon per checkpoint folder: `.ckpt-daemon/daemon.lock` is held for the daemon's whole life, and
`.ckpt-daemon/daemon.json` says what it runs (read by `python -m maintenance.cleanup` to protect the
checkpoint training resumed from, whatever the training command is).

SIGTERM/SIGINT stop it cleanly (the trainer gets SIGTERM and time for its final save); SIGHUP re-reads
config.yaml.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import signal
import threading
import time
from pathlib import Path
from typing import Optional

from ckpt_daemon import configfile, runtime
from ckpt_daemon.config import Config, diff_configs, parse_config
from ckpt_daemon.device import heartbeat_device
from ckpt_daemon.errors import ConfigError
from ckpt_daemon.fsutil import disk_usage
from ckpt_daemon.logs import get_logger, setup_logging
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import delete
from ckpt_daemon.store import resolve as rs
from daemon import alerts, configwatch
from daemon import state as st
from daemon import statusdoc as sd
from daemon.jobs import Jobs
from daemon.notify import Notifier
from daemon.statusdoc import Status
from daemon.supervisor import Supervisor
from daemon.trainmetrics import NewestMetrics
from daemon.watch import Watcher
from maintenance import cleanup, snapshot

log = get_logger("daemon")


class Daemon:
    def __init__(self, config_path: Path, echo_trainer: bool = True):
        # Not resolved: a config.yaml that is a symlink is re-read through the link, so `ln -sfn` works.
        self.config_path = Path(os.path.abspath(config_path))
        loaded = configwatch.load_with_fallback(self.config_path)  # a broken file at start: the last good copy
        self.cfg: Config = loaded.cfg
        self.config_text = loaded.text
        self.config_error: Optional[str] = loaded.error
        self.config_pending: Optional[str] = None  # a valid edit held until restart (a folder moved)
        self.config_notes = loaded.notes
        self._seen_digest = configfile.text_digest(loaded.text) if loaded.error is None else None
        self.cfg_lock = threading.Lock()
        self.config_loaded_at = time.time()
        self._config_key = configwatch.config_key(self.config_path)
        self._reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="config-read")
        self._pending_read: Optional[concurrent.futures.Future] = None
        self._reload_due: Optional[float] = None
        self._force_reload = False
        self.stop_requested = threading.Event()
        self.started = time.time()
        self.notifier = Notifier()
        self.disk: dict = {}
        self.last_cleanup: Optional[dict] = None
        self.echo_trainer = echo_trainer
        self._state_dirty = threading.Event()
        self._last_state: Optional[Status] = None
        self._hb_samples: collections.deque = collections.deque(maxlen=600)
        self._train_metrics = NewestMetrics(self.cfg.log_dir / "metrics.jsonl")
        self._last_write = 0.0

    def get_cfg(self) -> Config:
        with self.cfg_lock:
            return self.cfg

    # ------------------------------------------------------------------------------------ jobs
    def job_snapshot(self) -> str:
        return snapshot.run_snapshot_job(self.get_cfg())

    def _protected_extra(self) -> dict[str, str]:
        extra = {}
        if self.supervisor.resume_from:
            extra[self.supervisor.resume_from] = "the daemon resumed training from it"
        return extra

    def job_retention(self, reason: str = "weekly schedule") -> str:
        cfg = self.get_cfg()
        r = cleanup.run_cleanup(cfg, dry_run=False, confirm=lambda r: True, extra_protected=self._protected_extra(),
                                unattended=True)
        self.last_cleanup = {"time": time.time(), "reason": reason, "deleted": len(r.deleted), "failed": len(r.failed),
                             "freed_bytes": r.freed_bytes, "kept": sum(d.keep for d in r.decisions),
                             "held": len(r.held), "policy_confirmed": r.policy.get("confirmed")}
        self._state_dirty.set()
        if r.held:
            log.warning("retention held deletions under an unconfirmed policy", held=len(r.held),
                        remedy="run `python -m maintenance.cleanup` to review and confirm the new tiers")
            alerts.emit("deletions_held", f"retention held {len(r.held)} deletion(s) (unconfirmed policy)",
                        "Kept: " + ", ".join(r.held), key=",".join(r.held))
        return f"deleted {len(r.deleted)}, kept {self.last_cleanup['kept']}, freed {cleanup.human(r.freed_bytes)}" + (
            f", {len(r.failed)} failed" if r.failed else "") + (f", held {len(r.held)} (unconfirmed policy)" if r.held else "")

    def job_disk(self) -> str:
        cfg = self.get_cfg()
        try:
            now_resolves = cfg.resolve_path(cfg.checkpoints.dir)
        except ValueError:
            now_resolves = cfg.checkpoint_dir
        if now_resolves != cfg.checkpoint_dir and not self.config_pending:
            # a symlink in the path was re-pointed: the daemon (and its trainer) stay where they were
            self.config_pending = (f"checkpoints.dir {cfg.checkpoints.dir} now leads to {now_resolves}, no longer to "
                                   f"{cfg.checkpoint_dir} (a symlink was re-pointed). The daemon and its trainer keep "
                                   "using the folder they started with; restart the daemon to move.")
            log.error("checkpoints.dir was re-pointed under the running daemon", now=str(now_resolves),
                      kept=str(cfg.checkpoint_dir))
        usage = disk_usage(cfg.checkpoint_dir)
        free = usage.avail
        gb = free / 2**30
        level = "ok"
        if gb < cfg.disk.emergency_free_gb:
            level = "emergency"
        elif gb < cfg.disk.warn_free_gb:
            level = "warning"
        message = None
        if level == "warning":
            log.warning("free disk space is low", free_gib=round(gb, 2), warn_free_gb=cfg.disk.warn_free_gb)
        elif level == "emergency" and not cfg.retention.enabled:
            # Disabled means disabled: nothing is deleted, but nobody may miss it.
            message = (f"DISK EMERGENCY: {gb:.2f} GiB free, below disk.emergency_free_gb ({cfg.disk.emergency_free_gb}); "
                       "retention is disabled (retention.enabled: false), so nothing is deleted. Free space by hand, or "
                       "run `python -m maintenance.cleanup` to apply the tiers once.")
            log.error(message)
        elif level == "emergency":
            log.error("free disk space below the emergency threshold: running retention now",
                      free_gib=round(gb, 2), emergency_free_gb=cfg.disk.emergency_free_gb)
            ok = self.jobs.run_job("retention",
                                   reason=f"disk emergency: {gb:.2f} GiB free < {cfg.disk.emergency_free_gb} GiB")
            usage = disk_usage(cfg.checkpoint_dir)
            after = usage.avail / 2**30
            free = usage.avail
            if after < cfg.disk.emergency_free_gb:
                message = (f"DISK EMERGENCY: still {after:.2f} GiB free after retention; the remaining checkpoints are "
                           "protected or kept by the tiers and are never deleted to make room. Free space by hand or "
                           "loosen retention.tiers.")
                log.error(message, retention_ran=ok)
        if message:
            alerts.emit("disk_emergency", f"DISK EMERGENCY: {free / 2**30:.2f} GiB free", message)
        # What `df` shows (the share used leaves out the blocks reserved for root), and for which filesystem:
        # status, its JSON, the dashboard and /metrics all read these.
        self.disk = {"free_bytes": free, "total_bytes": usage.total, "used_bytes": usage.used,
                     "reserved_bytes": usage.reserved, "used_percent": usage.used_percent,
                     "used_ratio": round(usage.used_ratio, 6), "mount": usage.mount,
                     "level": level, "checked": time.time(), "message": message}
        self._state_dirty.set()
        return f"{gb:.2f} GiB free ({level})"

    def job_rescan(self) -> str:
        n = self.watcher.rescan()
        return f"{n} checkpoint(s) queued for verification"

    # ------------------------------------------------------------------------------------ reload
    def request_reload(self, force: bool = False) -> None:
        self._force_reload = self._force_reload or force
        self._reload_due = time.monotonic() + 0.3  # debounce editors' write+rename bursts

    def _read_config(self) -> tuple[Optional[str], str, Optional[Config], Optional[str]]:
        """Off the main loop: read and validate config.yaml. Returns (digest of the text, text, config, error)."""
        try:
            text = configfile.read_config_text(self.config_path)
        except ConfigError as exc:
            return None, "", None, str(exc)
        digest = configfile.text_digest(text)
        try:
            cfg = parse_config(text, self.config_path)
        except ConfigError as exc:
            return digest, text, None, str(exc)
        lost = configfile.lost_sections(text, self.config_text)
        if lost:
            return digest, text, None, configfile.lost_sections_error(self.config_path, lost)
        return digest, text, cfg, None

    def _poll_reload(self, now: float) -> None:
        key = configwatch.config_key(self.config_path)
        if key != self._config_key:
            self._config_key = key
            self.request_reload()
        if self._pending_read is None and self._reload_due is not None and now >= self._reload_due:
            self._reload_due = None
            self._pending_read = self._reader.submit(self._read_config)
        if self._pending_read is not None and self._pending_read.done():
            fut, self._pending_read = self._pending_read, None
            force, self._force_reload = self._force_reload, False
            self._apply_read(*fut.result(), force=force)

    def _apply_read(self, digest: Optional[str], text: str, new: Optional[Config], error: Optional[str],
                    force: bool = False) -> None:
        if digest is not None and digest == self._seen_digest and not force:
            log.debug("config.yaml re-read: the same text as before, nothing to do")
            return  # a touch, a rewrite with no change: nothing to say or do
        if error is not None and error == self.config_error and not force:
            log.debug("config.yaml re-read: the same problem as before, already reported")
            return
        self._seen_digest = digest
        if error is not None:
            self.config_error = error
            log.error("config.yaml edit rejected; the config in force stays", error=error)
            self.notifier.status("config.yaml edit rejected; running with the last good config")
            self._state_dirty.set()
            return
        old = self.get_cfg()
        moved = configwatch.folder_changes(old, new)
        if moved:
            self.config_pending = (
                f"config.yaml moves {'; '.join(moved)}. A folder never moves under a running daemon (it would "
                "silently start a new run from step 0, or leave the old checkpoints unmanaged), so this edit is held "
                "and nothing of it is in force: restart the daemon (systemctl restart ckpt-daemon) to use it, or "
                "undo the change.")
            self.config_error = None
            log.error("config.yaml edit held until the daemon restarts", reason=self.config_pending)
            self._state_dirty.set()
            return
        self.config_error = self.config_pending = None
        self.config_text = text
        err = configwatch.save_last_good(new, text, self.config_path)  # only ever a config put in force
        if err:
            log.warning("could not keep a copy of the last good config", error=err)
        self._apply(old, new)
        self._state_dirty.set()

    def _apply(self, old: Config, new: Config) -> None:
        changes = diff_configs(old, new)
        with self.cfg_lock:
            self.cfg = new
        if not changes:
            log.info("config.yaml re-read: no change in effect")
            return
        self.config_loaded_at = time.time()
        log.info("config.yaml reloaded", changes=changes)
        if any(c.startswith(("snapshots.", "retention.", "disk.", "timezone")) for c in changes):
            self.jobs.reschedule()
        if any(c.startswith("training.") for c in changes):
            log.info("training settings changed; they take effect at the trainer's next (re)start")
        if any(c.startswith("replicas") for c in changes) and getattr(self, "replicator", None) is not None:
            self.replicator.sync()

    # ------------------------------------------------------------------------------------ status
    def _catalogs(self, cfg: Config) -> dict[str, cat.Catalog]:
        """The catalogs for status, rescanned only when a run's folder changed (its mtime moves whenever
        a checkpoint is added, renamed or removed) or every 30 s, so an idle daemon stays idle."""
        key = [str(cfg.checkpoint_dir)]
        for run in ("", *cfg.checkpoints.runs):
            try:
                key.append((cfg.checkpoint_dir / run).stat().st_mtime_ns)
            except OSError:
                key.append(None)
        cached = getattr(self, "_cat_cache", None)
        if cached and cached[0] == key and time.monotonic() - cached[1] < 30:
            return cached[2]
        cats = cat.scan_runs(cfg, stats=False)
        self._cat_cache = (key, time.monotonic(), cats)
        return cats

    def status(self) -> Status:
        """What `ckpt-daemon status` shows (daemon/statusdoc.py). Holds times, not ages: readers compute ages
        when they read."""
        cfg = self.get_cfg()
        cats = self._catalogs(cfg)
        c = cats[""]

        def desc(e):
            if e is None:
                return None
            return sd.CheckpointRef(name=e.name, step=e.step, mtime=e.mtime, metrics=e.metrics, layout=e.layout)

        hb = runtime.read_heartbeat(cfg.checkpoint_dir) or {}
        training = self.supervisor.snapshot()
        if hb and (hb.get("run") == training.get("run") or hb.get("pid") == training.get("pid")) and training.get("pid"):
            # the heartbeat is the trainer's file: only values of the right type are shown
            training["step"] = sd.int_or_none(hb.get("step"))
            training["steps_per_s"] = self._rate(hb)
            if isinstance(hb.get("resumed_from"), str):  # what the trainer really loaded (it may have fallen back)
                training["resumed_from"] = hb["resumed_from"][:4096]
            training["heartbeat_time"] = sd.num_or_none(hb.get("time"))
            dev = heartbeat_device(hb.get("device"))  # where it trains and that device's memory, as it reports them
            if dev:
                training["device"] = dev
        newest = self._train_metrics.update()  # the trainer's metrics lines: loss, validation metric, ...
        if newest["values"]:
            training["metrics"] = newest["values"]
            training["metrics_time"] = newest["time"]
        return Status(
            daemon=sd.DaemonInfo(pid=os.getpid(), started=self.started, config=str(self.config_path),
                                 config_loaded_at=self.config_loaded_at, config_error=self.config_error,
                                 config_pending=self.config_pending),
            training=sd.Training.model_validate(training),
            checkpoints=sd.Checkpoints(
                dir=str(cfg.checkpoint_dir), count=len(c.entries), valid=len(c.valid()),
                latest=desc(rs.named_or_none(c, rs.LATEST)), best=desc(rs.named_or_none(c, rs.BEST)),
                failed_verification=dict(self.watcher.bad),
                in_progress=[p.name for p in c.in_progress], quarantined=len(delete.quarantined(cfg.checkpoint_dir)),
                runs={run: sd.RunCheckpoints(count=len(rc.entries), valid=len(rc.valid()),
                                             latest=desc(rs.named_or_none(rc, rs.LATEST)),
                                             best=desc(rs.named_or_none(rc, rs.BEST)))
                      for run, rc in cats.items() if run}),
            retention=sd.Retention(enabled=cfg.retention.enabled, policy_confirmed=cleanup.policy_confirmed(cfg)),
            disk=sd.Disk.model_validate(self.disk or {}),
            jobs={"next": self.jobs.next_times(), "history": self.jobs.history.data.get("jobs", {})},
            last_cleanup=sd.Cleanup.model_validate(self.last_cleanup) if self.last_cleanup else None,
            memory=self._memory_status(),
            notify=alerts.snapshot(),
            replicas=self.replicator.snapshot() if getattr(self, "replicator", None) is not None else [],
        )

    def _memory_status(self) -> Optional[dict]:
        """What the memory agent records (None when memory checkpoints are off): its newest slot, what it
        persisted last, and the steps pinned at a breakpoint (verified, waiting to be written to disk)."""
        m = getattr(self, "memory", None)
        if m is None:
            return None
        try:
            snap = m.snapshot()
            with m.pin_lock:
                pinned = sorted({p.info.step for p, _ in [*m.queue, *m.inflight]})
        except Exception as exc:  # a region that cannot be read: said in status, never a status that fails
            return {"enabled": True, "active": False, "error": f"the memory region cannot be read: {exc}"}
        return {**snap, "pinned_steps": pinned}

    def _rate(self, hb: dict) -> Optional[float]:
        """Steps per second over the last minute of heartbeats (None until two differ)."""
        step, t = hb.get("step"), hb.get("time")
        if not isinstance(step, int) or not isinstance(t, (int, float)):
            return None
        samples = self._hb_samples
        if not samples or samples[-1] != (t, step):
            if samples and step < samples[-1][1]:
                samples.clear()  # a restart went back to an earlier step
            samples.append((t, step))
        while len(samples) > 2 and t - samples[0][0] > 60:
            samples.popleft()
        (t0, s0), (t1, s1) = samples[0], samples[-1]
        return round((s1 - s0) / (t1 - t0), 3) if t1 > t0 and s1 >= s0 else None

    def write_status(self, force: bool = False) -> None:
        """Rewrite the state file when what it says changed (an idle daemon writes nothing)."""
        try:
            s = self.status()
            alerts.note_best(s)  # a best other than the last one seen: a new best
            now = time.time()
            if s == self._last_state and not force and now - self._last_write < 30:
                return  # unchanged: rewritten only as a sign of life, twice a minute
            self._last_state, self._last_write = s, now
            st.write_state(self.get_cfg().log_dir, s.model_copy(update={"written": now}).to_json())
            t = s.training
            self.notifier.status(f"training {t.state}" + (f" step {t.step}" if t.step else "")
                                 + (f", latest {s.checkpoints.latest.name}" if s.checkpoints.latest else ""))
        except Exception as exc:
            log.error("could not write the state file", error=str(exc))

    def _write_record(self) -> None:
        """`.ckpt-daemon/daemon.json`: what this daemon runs, for cleanup and the other tools."""
        sup = getattr(self, "supervisor", None)
        snap = sup.snapshot() if sup else {}
        runtime.write_record(self.get_cfg().checkpoint_dir, runtime.DAEMON_RECORD, {
            "pid": os.getpid(), "started": self.started, "config": str(self.config_path),
            "state": snap.get("state"), "trainer_pid": snap.get("pid"), "run": snap.get("run"),
            "resume_from": snap.get("resumed_from"), "updated": time.time()})
        self._state_dirty.set()

    # ------------------------------------------------------------------------------------ main
    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self.request_reload(force=True)
            return
        self.stop_requested.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # first: a stop during start-up is a clean stop
            signal.signal(sig, self._on_signal)
        if hasattr(signal, "SIGPIPE"):  # a peer that drops a connection (an S3 server, a browser) is an EPIPE, not our end
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        cfg = self.cfg
        os.umask(0o022)
        setup_logging(cfg.logging.level, cfg.log_dir / "daemon.log", cfg.logging.max_bytes, cfg.logging.backups)
        cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        lock = runtime.DaemonLock(cfg.checkpoint_dir).acquire()  # one daemon per folder (AlreadyRunningError)
        try:
            # ...and per logs folder: two daemons there would mix their state files and last good configs
            log_lock = (runtime.DaemonLock(cfg.log_dir, what="writes its logs and state to").acquire()
                        if cfg.log_dir != cfg.checkpoint_dir else None)
        except BaseException:
            lock.release()
            raise
        try:
            return self._run(cfg)
        finally:
            if log_lock:
                log_lock.release()
            lock.release()

    def _run(self, cfg: Config) -> int:
        log.info("ckpt-daemon starting", config=str(self.config_path), checkpoints=str(cfg.checkpoint_dir),
                 pid=os.getpid())
        if self.config_error:
            log.error("config.yaml is not in force; running with the last good config until it is fixed",
                      error=self.config_error)
        else:
            configwatch.save_last_good(cfg, self.config_text, self.config_path)
        for note in self.config_notes:
            log.warning("config.yaml changed a folder while the daemon was down", change=note)
        self.watcher = Watcher(self.get_cfg, self.request_reload, self.config_path)
        # The trainer reads the config in force (a held or rejected edit never reaches it), resolving its
        # relative folders as config.yaml does.
        # (the watcher's findings are for status only: the resume choice verifies afresh, so a save judged
        # while it was still being written is never held against it)
        self.supervisor = Supervisor(self.get_cfg, {}, echo=self.echo_trainer, on_change=self._write_record,
                                     config_files=lambda: (self.get_cfg().log_dir / configfile.LAST_GOOD,
                                                           self.config_path))
        self.memory = None
        if cfg.checkpoints.memory.enabled:  # memory-first checkpoints (ckpt_daemon/memory.py)
            from daemon.memagent import MemoryAgent

            self.memory = MemoryAgent(self.get_cfg, log)
            if self.memory.start():  # adopts (persists) what a daemon that died left in the region
                self.supervisor.memory = self.memory
                threading.Thread(target=self.memory.run, args=(self.stop_requested,), daemon=True,
                                 name="memory-persist").start()
        # --- replicas (daemon/replicate.py): a low-priority thread per target; the supervisor restores the newest
        # replica before starting training when no valid local checkpoint is left. boto3 loads only for s3:// ones.
        from daemon.replicate import Replicator

        self.replicator = Replicator(self.get_cfg, self.stop_requested, on_change=self._state_dirty.set)
        self.supervisor.restore_remote = self.replicator.restore_newest
        self.replicator.sync()
        # --- end of the replicas block
        self._write_record()
        alerts.start(self.get_cfg)  # notify: (its own thread; nothing when notify.urls is empty)
        history = st.JobHistory(cfg.log_dir)
        self.jobs = Jobs(self.get_cfg, history, {"snapshot": self.job_snapshot, "retention": self.job_retention,
                                                 "disk": self.job_disk, "rescan": self.job_rescan})
        self.watcher.start()
        self.jobs.start()
        threading.Thread(target=self._startup_jobs, daemon=True, name="startup").start()
        # --- HTTP dashboard, /metrics, the node_exporter textfile and the disk history (daemon/http.py).
        # One thread of its own (it starts and stops the server as the http section says, hot reloads
        # included); it only reads what the main loop computed, and nothing it does can stop the daemon.
        self.web = None
        try:
            from daemon.http import Observer

            self.web = Observer(self)
            self.web.start()
        except Exception as exc:
            log.exception("the dashboard and metrics could not start; the daemon goes on without them", error=str(exc))
        # --- end of the HTTP block
        sup_thread = threading.Thread(target=self.supervisor.run, args=(self.stop_requested,), name="supervisor")
        sup_thread.start()
        self.notifier.ready("ckpt-daemon up")
        last_ping = last_state = 0.0
        try:
            while not self.stop_requested.is_set():
                now = time.monotonic()
                try:
                    self._poll_reload(now)
                except Exception as exc:  # one bad tick must not end supervision; the next tick retries
                    log.exception("daemon tick failed; retrying", error=str(exc))
                interval = self.notifier.watchdog_interval_s
                if interval and now - last_ping >= interval and sup_thread.is_alive():
                    self.notifier.watchdog()
                    last_ping = now
                if now - last_state >= 1.0:
                    self.write_status()
                    last_state = now
                self.stop_requested.wait(0.25)
            log.info("stop requested")
            self.notifier.stopping()
            # The supervisor stops the trainer (SIGTERM, its final save); keep pinging while it does.
            while sup_thread.is_alive():
                sup_thread.join(timeout=1.0)
                if self.notifier.watchdog_interval_s:
                    self.notifier.watchdog()
        finally:
            log.info("ckpt-daemon stopping")
            if getattr(self, "web", None) is not None:  # the HTTP block above: stop listening first
                self.web.stop()
            self.jobs.shutdown()
            if getattr(self, "replicator", None) is not None:
                self.replicator.stop()  # transfers stop at their next part; an interrupted upload resumes next time
            if getattr(self, "memory", None) is not None:
                self.memory.close()  # the trainer has stopped: persist what is newer than the disk, empty the region
            self.watcher.stop()
            alerts.stop()  # sends what waits, for at most 5 s
            self._reader.shutdown(wait=False, cancel_futures=True)
            self._write_record()
            self.write_status(force=True)
            log.info("ckpt-daemon stopped")
        return 0

    def _startup_jobs(self) -> None:
        try:
            lines = cleanup.finish_leftovers(self.get_cfg())
            for line in lines:
                log.warning("finished a leftover of an interrupted run", what=line)
        except Exception as exc:
            log.error("could not finish the leftovers of interrupted runs", error=str(exc))
        self.jobs.run_job("disk", reason="startup")
        due = self.jobs.catch_up()
        log.info("startup jobs done", caught_up=due)
