"""The daemon: one foreground process (`ckpt-daemon run`) that never imports torch.

Main thread: a 0.25 s tick that polls the supervisor, applies config reloads, pings the systemd
watchdog and rewrites the state file. Background: APScheduler's job threads, watchdog's observer and
the verification worker. SIGTERM/SIGINT stop it cleanly (the trainer gets SIGTERM and time for its
final save); SIGHUP reloads config.yaml.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Optional

from daemon import state as st
from daemon.jobs import Jobs
from daemon.notify import Notifier
from daemon.supervisor import Supervisor
from daemon.watch import Watcher
from ckpt_daemon import catalog as cat
from maintenance import cleanup, snapshot
from ckpt_daemon.config import Config, diff_configs, load_config, parse_config
from ckpt_daemon.errors import ConfigError
from ckpt_daemon.fsutil import atomic_write_bytes, free_bytes
from ckpt_daemon.logs import get_logger, setup_logging

log = get_logger("daemon")

LAST_GOOD = "config.last-good.yaml"


def _guess_log_dir(config_path: Path) -> Path:
    """Where the last good config copy lives when config.yaml itself does not validate: its
    logging.dir if the YAML still says one, else the default `logs` beside it."""
    import yaml

    base = config_path.parent
    try:
        raw = yaml.safe_load(config_path.read_text())
        d = Path(raw["logging"]["dir"]).expanduser()
        return d if d.is_absolute() else base / d
    except Exception:
        return base / "logs"


def read_config(config_path: Path) -> tuple[Config, str]:
    """Validate config.yaml from one read of its text; raise ConfigError (the precise message) on any problem."""
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        load_config(config_path)  # raises the ConfigError that names the cause
        raise ConfigError(f"{config_path} changed while it was being read; it will be read again at the next change.") from None
    return parse_config(text, config_path), text


def load_with_fallback(config_path: Path) -> tuple[Config, Optional[str]]:
    """Load config.yaml; if it does not validate, run on the last config that did (kept by every
    successful load), so a bad edit followed by a daemon restart still never stops the daemon."""
    try:
        cfg, text = read_config(config_path)
    except ConfigError as exc:
        copy = _guess_log_dir(config_path) / LAST_GOOD
        if not copy.is_file():
            raise ConfigError(f"{exc} (No last good config was found to fall back to, so the daemon cannot start.)") from None
        return parse_config(copy.read_text(encoding="utf-8"), config_path), str(exc)
    save_last_good(cfg, text)
    return cfg, None


def save_last_good(cfg: Config, text: str) -> None:
    try:
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cfg.log_dir / LAST_GOOD, text.encode("utf-8"), mode=0o644)
    except OSError as exc:
        log.warning("could not keep a copy of the last good config", error=str(exc))


class Daemon:
    def __init__(self, config_path: Path, echo_trainer: bool = True):
        self.config_path = Path(config_path).resolve()
        # An invalid file at start falls back to the last good config (errors only if there is none).
        self.cfg, self.config_error = load_with_fallback(self.config_path)
        self.cfg_lock = threading.Lock()
        self.config_loaded_at = time.time()
        self._config_mtime = self._mtime()
        self._reload_due: Optional[float] = None
        self.stop_requested = threading.Event()
        self.started = time.time()
        self.notifier = Notifier()
        self.disk: dict = {}
        self.last_cleanup: Optional[dict] = None
        self.echo_trainer = echo_trainer

    def get_cfg(self) -> Config:
        with self.cfg_lock:
            return self.cfg

    def _mtime(self) -> Optional[float]:
        try:
            s = self.config_path.stat()
            return s.st_mtime_ns
        except OSError:
            return None

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
        r = cleanup.run_cleanup(cfg, dry_run=False, confirm=lambda r: True, extra_protected=self._protected_extra())
        self.last_cleanup = {"time": time.time(), "reason": reason, "deleted": len(r.deleted), "failed": len(r.failed),
                             "freed_bytes": r.freed_bytes, "kept": sum(d.keep for d in r.decisions)}
        return f"deleted {len(r.deleted)}, kept {self.last_cleanup['kept']}, freed {cleanup.human(r.freed_bytes)}" + (
            f", {len(r.failed)} failed" if r.failed else "")

    def job_disk(self) -> str:
        cfg = self.get_cfg()
        free = free_bytes(cfg.checkpoint_dir)
        gb = free / 2**30
        level = "ok"
        if gb < cfg.disk.emergency_free_gb:
            level = "emergency"
        elif gb < cfg.disk.warn_free_gb:
            level = "warning"
        self.disk = {"free_bytes": free, "level": level, "checked": time.time()}
        if level == "warning":
            log.warning("free disk space is low", free_gib=round(gb, 2), warn_free_gb=cfg.disk.warn_free_gb)
        elif level == "emergency":
            log.error("free disk space below the emergency threshold: running retention now",
                      free_gib=round(gb, 2), emergency_free_gb=cfg.disk.emergency_free_gb)
            ok = self.jobs.run_job("retention", reason=f"disk emergency: {gb:.2f} GiB free < {cfg.disk.emergency_free_gb} GiB")
            after = free_bytes(cfg.checkpoint_dir) / 2**30
            self.disk["free_bytes"] = int(after * 2**30)
            if after < cfg.disk.emergency_free_gb:
                log.error("still below the emergency threshold after retention: the remaining checkpoints are "
                          "protected or kept by the tiers, and are never deleted to make room. Free space by hand "
                          "or loosen retention.tiers.", free_gib=round(after, 2), retention_ran=ok)
        return f"{gb:.2f} GiB free ({level})"

    def job_rescan(self) -> str:
        n = self.watcher.rescan()
        return f"{n} checkpoint(s) queued for verification"

    # ------------------------------------------------------------------------------------ reload
    def request_reload(self) -> None:
        self._reload_due = time.monotonic() + 0.3  # debounce editors' write+rename bursts

    def reload(self) -> bool:
        try:
            new, text = read_config(self.config_path)
        except ConfigError as exc:
            self.config_error = str(exc)
            log.error("config.yaml edit rejected; the last good config stays in force", error=str(exc))
            self.notifier.status("config.yaml edit rejected; running with the last good config")
            return False
        save_last_good(new, text)
        return self._apply(new)

    def _apply(self, new: Config) -> bool:
        old = self.get_cfg()
        changes = diff_configs(old, new)
        self.config_error = None
        if not changes:
            return True
        with self.cfg_lock:
            self.cfg = new
        self.config_loaded_at = time.time()
        log.info("config.yaml reloaded", changes=changes)
        if any(c.startswith(("snapshots.", "retention.", "disk.", "timezone")) for c in changes):
            self.jobs.reschedule()
        if any(c.startswith("checkpoints.dir") or c.startswith("logging.dir") for c in changes):
            self.watcher.restart_observer()
        if any(c.startswith("training.") for c in changes):
            log.info("training settings changed; they take effect at the trainer's next (re)start")
        return True

    # ------------------------------------------------------------------------------------ status
    def _catalog(self, cfg: Config) -> cat.Catalog:
        """The catalog for status, rescanned only when the folder changed (its mtime moves whenever a
        checkpoint is added, renamed or removed) or every 30 s, so an idle daemon stays idle."""
        try:
            key = (str(cfg.checkpoint_dir), cfg.checkpoint_dir.stat().st_mtime_ns)
        except OSError:
            key = (str(cfg.checkpoint_dir), None)
        cached = getattr(self, "_cat_cache", None)
        if cached and cached[0] == key and time.monotonic() - cached[1] < 30:
            return cached[2]
        c = cat.scan_config(cfg, stats=False)
        self._cat_cache = (key, time.monotonic(), c)
        return c

    def status(self) -> dict:
        cfg = self.get_cfg()
        c = self._catalog(cfg)
        now = time.time()

        def desc(e):
            if e is None:
                return None
            return {"name": e.name, "step": e.step, "age_s": round(now - e.mtime, 1), "metrics": e.metrics}

        from ckpt_daemon.runtime import read_heartbeat

        hb = read_heartbeat(cfg.checkpoint_dir) or {}
        training = self.supervisor.snapshot()
        if hb and hb.get("pid") == training.get("pid"):
            training["step"] = hb.get("step")
            if "resumed_from" in hb:  # what the trainer really loaded (it may have fallen back further)
                training["resumed_from"] = hb["resumed_from"]
            training["heartbeat_age_s"] = round(now - hb.get("time", now), 1)
        return {
            "daemon": {"pid": os.getpid(), "started": self.started, "uptime_s": round(now - self.started, 1),
                       "config": str(self.config_path), "config_loaded_at": self.config_loaded_at,
                       "config_error": self.config_error, "updated": now},
            "training": training,
            "checkpoints": {"dir": str(cfg.checkpoint_dir), "count": len(c.entries), "valid": len(c.valid()),
                            "latest": desc(c.newest_valid()), "best": desc(c.pointer("best")),
                            "failed_verification": dict(self.watcher.bad), "in_progress": [p.name for p in c.in_progress]},
            "disk": self.disk,
            "jobs": {"next": self.jobs.next_times(), "history": self.jobs.history.data.get("jobs", {})},
            "last_cleanup": self.last_cleanup,
        }

    def write_status(self) -> None:
        try:
            s = self.status()
            st.write_state(self.get_cfg().log_dir, s)
            t = s["training"]
            self.notifier.status(f"training {t['state']}" + (f" step {t.get('step')}" if t.get("step") else "")
                                 + (f", latest {s['checkpoints']['latest']['name']}" if s["checkpoints"]["latest"] else ""))
        except Exception as exc:
            log.error("could not write the state file", error=str(exc))

    # ------------------------------------------------------------------------------------ main
    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self.request_reload()
            return
        if not self.stop_requested.is_set():
            log.info("stop requested", signal=signal.Signals(signum).name)
        self.stop_requested.set()

    def run(self) -> int:
        cfg = self.cfg
        os.umask(0o022)
        setup_logging(cfg.logging.level, cfg.log_dir / "daemon.log", cfg.logging.max_bytes, cfg.logging.backups)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        log.info("ckpt-daemon starting", config=str(self.config_path), checkpoints=str(cfg.checkpoint_dir), pid=os.getpid())
        if self.config_error:
            log.error("config.yaml does not validate; running with the last good config until it is fixed",
                      error=self.config_error)
        cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.watcher = Watcher(self.get_cfg, self.request_reload)
        self.supervisor = Supervisor(self.get_cfg, self.watcher.bad, echo=self.echo_trainer)
        history = st.JobHistory(cfg.log_dir)
        self.jobs = Jobs(self.get_cfg, history, {"snapshot": self.job_snapshot, "retention": self.job_retention,
                                                 "disk": self.job_disk, "rescan": self.job_rescan})
        self.watcher.start()
        self.jobs.start()
        self.jobs.run_job("disk", reason="startup")
        self.jobs.catch_up()
        self.supervisor.start()
        self.notifier.ready("ckpt-daemon up")
        last_ping = last_state = 0.0
        try:
            while not self.stop_requested.is_set():
                now = time.monotonic()
                try:
                    self.supervisor.poll()
                    m = self._mtime()
                    if m != self._config_mtime:
                        self._config_mtime = m
                        self.request_reload()
                    if self._reload_due is not None and now >= self._reload_due:
                        self._reload_due = None
                        self.reload()
                except Exception as exc:  # one bad tick must not end supervision; the next tick retries
                    log.exception("daemon tick failed; retrying", error=str(exc))
                if self.notifier.watchdog_interval_s and now - last_ping >= self.notifier.watchdog_interval_s:
                    self.notifier.watchdog()
                    last_ping = now
                if now - last_state >= 1.0:
                    self.write_status()
                    last_state = now
                self.stop_requested.wait(0.25)
        finally:
            self.notifier.stopping()
            log.info("ckpt-daemon stopping")
            self.supervisor.stop()
            self.jobs.shutdown()
            self.watcher.stop()
            self.write_status()
            log.info("ckpt-daemon stopped")
        return 0
