"""Watcher (watchdog): new or removed checkpoints, and edits of config.yaml.

A new checkpoint is verified in a background thread (checksums) and recorded; one that fails is
logged as an error and remembered, so the supervisor never chooses it. Temp folders are ignored.
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
from ckpt_daemon.logs import get_logger

log = get_logger("daemon.watch")


class _Handler(FileSystemEventHandler):
    def __init__(self, owner: "Watcher"):
        self.owner = owner

    def on_any_event(self, event: FileSystemEvent) -> None:
        for p in (getattr(event, "src_path", None), getattr(event, "dest_path", None)):
            if p:
                self.owner._path_event(os.fsdecode(p), event.event_type)


class Watcher:
    def __init__(self, get_cfg: Callable, on_config_change: Callable[[], None], config_path: Optional[Path] = None):
        self.get_cfg = get_cfg
        self.on_config_change = on_config_change
        self.config_link = Path(config_path) if config_path else None
        self.results: dict[str, tuple[str, str, float]] = {}  # name -> (status, reason, mtime checked)
        self.bad: dict[str, str] = {}  # name -> reason; shared with the supervisor
        self.q: "queue.Queue[str]" = queue.Queue()
        self.observer: Optional[Observer] = None
        self._stop = threading.Event()
        self._worker: Optional[threading.Thread] = None
        self.last_event: Optional[float] = None
        self.lock = threading.Lock()

    def start(self) -> None:
        cfg = self.get_cfg()
        self._worker = threading.Thread(target=self._verify_loop, daemon=True, name="verify")
        self._worker.start()
        self._start_observer(cfg)
        self.rescan()

    def _start_observer(self, cfg) -> None:
        obs = Observer()
        cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = cfg.checkpoint_dir
        link = self.config_link or Path(cfg.source)
        # config.yaml may be a symlink the user re-points (ln -sfn): watch the link's folder and the target's.
        self.config_names = {(link.parent, link.name), (Path(os.path.realpath(link)).parent, Path(os.path.realpath(link)).name)}
        obs.schedule(_Handler(self), str(cfg.checkpoint_dir), recursive=False)
        for d in {p for p, _ in self.config_names}:
            if d != cfg.checkpoint_dir and d.is_dir():
                obs.schedule(_Handler(self), str(d), recursive=False)
        obs.daemon = True
        obs.start()
        self.observer = obs

    def restart_observer(self) -> None:
        if self.observer:
            self.observer.stop()
        self._start_observer(self.get_cfg())

    def _path_event(self, path: str, kind: str) -> None:
        p = Path(path)
        if (p.parent, p.name) in self.config_names:
            self.on_config_change()  # only a hint: the daemon re-reads off its main loop and applies real changes only
            return
        if p.parent != self.ckpt_dir:
            return
        name = p.name
        if name.startswith((".",) + cat.TEMP_PREFIXES) or name in cat.POINTERS:
            return
        self.last_event = time.time()
        if kind == "deleted" or not p.exists():
            with self.lock:
                self.results.pop(name, None)
                self.bad.pop(name, None)
            return
        self.q.put(name)

    def rescan(self) -> int:
        """Queue every checkpoint not yet verified (or changed since); returns how many."""
        cfg = self.get_cfg()
        c = cat.scan_config(cfg, stats=False)
        n = 0
        names = {e.name for e in c.entries}
        with self.lock:
            for gone in set(self.results) - names:
                self.results.pop(gone, None)
                self.bad.pop(gone, None)
        for e in c.entries:
            r = self.results.get(e.name)
            if r is None or r[2] != e.mtime:
                self.q.put(e.name)
                n += 1
        return n

    def _verify_loop(self) -> None:
        while not self._stop.is_set():
            try:
                name = self.q.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._verify(name)
            except Exception as exc:  # never let the worker die
                log.error("verification failed unexpectedly", checkpoint=name, error=str(exc))

    def _verify(self, name: str) -> None:
        cfg = self.get_cfg()
        path = cfg.checkpoint_dir / name
        fields = cat.match_name(name, [cat.compile_pattern(p) for p in cfg.checkpoints.pattern])
        if fields is None or path.is_symlink() or not path.exists():
            return
        mtime = path.stat().st_mtime
        prev = self.results.get(name)
        if prev and prev[2] == mtime:
            return
        layout, status, reason, _ = cat.check_entry(path, verify=True)
        if layout != "native" and status == "incomplete" and time.time() - mtime < 30:
            # Other trainers write in place: give them time before judging.
            threading.Timer(5.0, self.q.put, args=(name,)).start()
            return
        with self.lock:
            self.results[name] = (status, reason, mtime)
            if status == "complete":
                self.bad.pop(name, None)
            else:
                self.bad[name] = reason
        if status == "complete":
            log.info("checkpoint verified", checkpoint=name, layout=layout)
        else:
            log.error("checkpoint failed verification: it will never be used for resume", checkpoint=name,
                      status=status, reason=reason)

    def stop(self) -> None:
        self._stop.set()
        if self.observer:
            self.observer.stop()
