"""Watcher (watchdog): new or removed checkpoints, and edits of config.yaml.

A new native checkpoint is verified in a background thread (checksums). A checkpoint another trainer
writes (Hugging Face, Lightning, torch.save files) is left alone while it is being written: once none
of its files changed for `checkpoints.settle_s` and no process has one open, it is checked and its
checksums are recorded in a sidecar manifest, so that later damage anywhere in it is caught. A save
that never finished is reported once, never taken for one still being written. Failures are logged
and shown in `status`; the resume choice verifies again in any case.

Events can be lost (inotify queue overflow, network filesystems): the daemon's periodic rescan calls
`rescan()` to catch up.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from ckpt_daemon import catalog as cat
from ckpt_daemon import foreign
from ckpt_daemon.logs import get_logger
from daemon import alerts

log = get_logger("daemon.watch")


class _Handler(FileSystemEventHandler):
    def __init__(self, owner: "Watcher"):
        self.owner = owner

    def on_any_event(self, event: FileSystemEvent) -> None:
        for p in (getattr(event, "src_path", None), getattr(event, "dest_path", None)):
            if p:
                self.owner._path_event(os.fsdecode(p), event.event_type)


def files_open_under(path: Path) -> list[str]:
    """Processes that have a file under `path` open (a writer we do not know about)."""
    import psutil

    prefix = str(path)
    out = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            for f in proc.open_files():
                if f.path == prefix or f.path.startswith(prefix + os.sep):
                    out.append(f"pid {proc.pid} ({proc.info['name']})")
                    break
        except (psutil.Error, OSError):
            continue
    return out


class Watcher:
    def __init__(self, get_cfg: Callable, on_config_change: Callable[[], None], config_path: Optional[Path] = None):
        self.get_cfg = get_cfg
        self.on_config_change = on_config_change
        self.config_link = Path(config_path) if config_path else None
        self.results: dict[str, tuple[str, str, float]] = {}  # "run/name" -> (status, reason, mtime checked)
        self.bad: dict[str, str] = {}  # "run/name" -> reason; shown in status
        self.q: "queue.Queue[tuple[str, str]]" = queue.Queue()
        self.observer: Optional[Observer] = None
        self._stop = threading.Event()
        self._worker: Optional[threading.Thread] = None
        self._pending: set[tuple[str, str]] = set()
        self.last_event: Optional[float] = None
        self.lock = threading.Lock()

    def start(self) -> None:
        cfg = self.get_cfg()
        self._worker = threading.Thread(target=self._verify_loop, daemon=True, name="verify")
        self._worker.start()
        self._start_observer(cfg)
        self.rescan()

    def _run_roots(self, cfg) -> dict[Path, str]:
        return {(cfg.checkpoint_dir / r if r else cfg.checkpoint_dir): r for r in ("", *cfg.checkpoints.runs)}

    def _start_observer(self, cfg) -> None:
        obs = Observer()
        cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.roots = self._run_roots(cfg)
        link = self.config_link or Path(cfg.source)
        # config.yaml may be a symlink the user re-points (ln -sfn): watch the link's folder and the target's.
        real = Path(os.path.realpath(link))
        self.config_names = {(link.parent, link.name), (real.parent, real.name)}
        watched = set()
        for d in [*self.roots, *(p for p, _ in self.config_names)]:
            if d not in watched and d.is_dir():
                obs.schedule(_Handler(self), str(d), recursive=False)
                watched.add(d)
        obs.daemon = True
        obs.start()
        self.observer = obs

    def restart_observer(self) -> None:
        if self.observer:
            self.observer.stop()
        self._start_observer(self.get_cfg())

    @staticmethod
    def key(run: str, name: str) -> str:
        return f"{run}/{name}" if run else name

    def _path_event(self, path: str, kind: str) -> None:
        p = Path(path)
        if (p.parent, p.name) in self.config_names:
            self.on_config_change()  # only a hint: the daemon re-reads off its main loop and applies real changes only
            return
        run = self.roots.get(p.parent)
        if run is None:
            return
        name = p.name
        if name.startswith((".",) + cat.TEMP_PREFIXES) or name in cat.POINTERS:
            return
        self.last_event = time.time()
        if kind == "deleted" or not p.exists():
            with self.lock:
                self.results.pop(self.key(run, name), None)
                self.bad.pop(self.key(run, name), None)
            return
        self._queue(run, name)

    def _queue(self, run: str, name: str) -> None:
        with self.lock:
            if (run, name) in self._pending:
                return
            self._pending.add((run, name))
        self.q.put((run, name))

    def _later(self, run: str, name: str, delay: float) -> None:
        t = threading.Timer(max(0.5, delay), self._queue, args=(run, name))
        t.daemon = True
        t.start()

    def rescan(self) -> int:
        """Queue every checkpoint not yet verified (or changed since); returns how many."""
        cfg = self.get_cfg()
        n = 0
        seen = set()
        for run, c in cat.scan_runs(cfg, stats=False).items():
            for e in c.entries:
                k = self.key(run, e.name)
                seen.add(k)
                r = self.results.get(k)
                if r is None or r[2] != e.mtime:
                    self._queue(run, e.name)
                    n += 1
        with self.lock:
            for gone in set(self.results) - seen:
                self.results.pop(gone, None)
                self.bad.pop(gone, None)
        return n

    def _verify_loop(self) -> None:
        while not self._stop.is_set():
            try:
                run, name = self.q.get(timeout=0.5)
            except queue.Empty:
                continue
            with self.lock:
                self._pending.discard((run, name))
            try:
                self._verify(run, name)
            except Exception as exc:  # never let the worker die
                log.error("verification failed unexpectedly", checkpoint=self.key(run, name), error=str(exc))

    def _verify(self, run: str, name: str) -> None:
        cfg = self.get_cfg()
        root = cfg.checkpoint_dir / run if run else cfg.checkpoint_dir
        path = root / name
        fields = cat.match_name(name, [cat.compile_pattern(p) for p in cfg.checkpoints.pattern])
        if fields is None or path.is_symlink() or not path.exists():
            return
        k = self.key(run, name)
        files = foreign.entry_files(path)
        mtime = foreign.newest_mtime(files)
        prev = self.results.get(k)
        if prev and prev[2] == mtime:
            return
        sc = foreign.read_sidecar(root, name)
        if sc is not None:
            res, why = foreign.compare(sc, path, files, verify=True)
            if res in ("stale", "resaved"):  # the name holds a new save of that step: judged afresh
                foreign.forget(root, name)
                sc = None
            else:
                layout, status, reason, meta = sc.get("layout", "file"), ("complete" if res == "ok" else "corrupt"), why, {}
        if sc is None:
            layout, status, reason, meta = cat.check_entry(path, verify=True, step=fields["step"])
        if layout != "native" and sc is None:
            age = time.time() - mtime
            if age < cfg.checkpoints.settle_s:
                self._later(run, name, cfg.checkpoints.settle_s - age + 0.5)  # being written: judge it later
                return
            if status == "complete":
                writers = files_open_under(path)
                if writers:
                    self._later(run, name, cfg.checkpoints.settle_s)
                    return
                try:
                    foreign.record(root, name, path, layout, fields["step"], meta)
                except foreign.NotSettled:
                    self._later(run, name, cfg.checkpoints.settle_s)
                    return
                except (OSError, ValueError) as exc:
                    status, reason = "unreadable", f"its checksums could not be recorded ({exc})"
                else:
                    log.info("checkpoint recorded: its checksums are kept, later damage will be caught",
                             checkpoint=k, layout=layout)
        with self.lock:
            self.results[k] = (status, reason, mtime)
            if status == "complete":
                self.bad.pop(k, None)
            else:
                self.bad[k] = reason
        if status == "complete":
            if layout == "native":
                log.info("checkpoint verified", checkpoint=k, layout=layout)
        else:
            log.error("checkpoint failed verification: it will never be used for resume", checkpoint=k,
                      status=status, reason=reason)
            alerts.emit("verification_failed", f"{k} failed verification", f"{status}: {reason}", key=k)

    def stop(self) -> None:
        self._stop.set()
        if self.observer:
            self.observer.stop()
