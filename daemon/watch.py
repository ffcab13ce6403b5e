"""Watcher (watchdog): new or removed checkpoints, and edits of config.yaml.

A new native checkpoint is verified in a background thread (checksums). A checkpoint another trainer
writes (Hugging Face, Lightning, torch.save files) is left alone while it is being written: once none
of its files (nor the folder itself: an empty new folder is a save that has just begun) changed for
`checkpoints.settle_s` and no process has one open, it is checked and its checksums are recorded in a
sidecar manifest, so that later damage anywhere in it is caught. A save that never finished is
reported once (a warning: the daemon sets it aside by itself), never taken for one still being
written; damage and unreadable files are errors, for a person to look at. The resume choice verifies
again in any case.

The daemon's own work never feeds back into it: only events that change a checkpoint are asked for
(never the open/close-without-write events its own verification reads produce), and every path has at
most one pending check, kept in one table and run by one worker thread. Events for a path that already
waits do nothing, so a file written in a million small writes costs one check per `settle_s`; the
table is bounded (a path beyond `MAX_PENDING` waits for the periodic rescan), and so is the daemon's
thread count, whatever the folder does.

Events can be lost (inotify queue overflow, network filesystems): the daemon's periodic rescan calls
`rescan()` to catch up. It only lists the folder (names and times); checking happens on the worker,
so a scheduled job never waits on a hostile file.
"""

from __future__ import annotations

import heapq
import os
import stat
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from ckpt_daemon.logs import get_logger
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import foreign, names
from daemon import alerts

log = get_logger("daemon.watch")

# What the kernel is asked to report (the inotify mask): a name appearing, going or moving, and a file
# closed after writing. Not opened / closed_no_write (our own reads make those), and not every single
# write (IN_MODIFY: a save makes thousands): a save still open is found in progress by its check, which
# looks again after settle_s; a change without a close (a truncate) is found by the periodic rescan.
CHANGE_EVENTS = (FileCreatedEvent, DirCreatedEvent, FileMovedEvent, DirMovedEvent, FileDeletedEvent,
                 DirDeletedEvent, FileClosedEvent)
_CHANGE_KINDS = frozenset([*(e.event_type for e in CHANGE_EVENTS), FileModifiedEvent.event_type])
DEBOUNCE_S = 0.5  # a burst of events for one path (a save's many writes) is looked at once, after it
MAX_PENDING = 10_000  # paths waiting for a check; beyond, the periodic rescan picks them up
OPEN_FILES_TTL_S = 1.0  # one look at every process's open files serves all checks of that second


class _Handler(FileSystemEventHandler):
    def __init__(self, owner: "Watcher"):
        self.owner = owner

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _CHANGE_KINDS:
            return  # a read (ours or anyone's) changes nothing
        for p in (getattr(event, "src_path", None), getattr(event, "dest_path", None)):
            if p:
                self.owner._path_event(os.fsdecode(p), event.event_type)


def open_for_writing(prefixes: list[str]) -> dict[str, str]:
    """Every file under one of `prefixes` that a process (ours excepted) has open for writing:
    path -> "pid N (name)". Readers (a backup, a trainer loading) do not count. One pass over the
    processes, however many checkpoints ask."""
    import psutil

    me = os.getpid()
    out: dict[str, str] = {}
    for proc in psutil.process_iter(["pid", "name"]):
        if proc.pid == me:
            continue
        try:
            for f in proc.open_files():
                if getattr(f, "mode", "w") == "r":
                    continue
                if any(f.path == p or f.path.startswith(p + os.sep) for p in prefixes):
                    out.setdefault(f.path, f"pid {proc.pid} ({proc.info['name']})")
        except (psutil.Error, OSError):
            continue
    return out


def writers_of(path: Path, opened: dict[str, str]) -> list[str]:
    """The processes (from `open_for_writing`) writing `path` or a file under it."""
    p = str(path)
    return sorted({who for f, who in opened.items() if f == p or f.startswith(p + os.sep)})


def writers_lookup(roots: list[Path]) -> Callable[[Path], list[str]]:
    """`path -> processes writing it`, looking at the processes once, on the first question."""
    seen: list[dict[str, str]] = []

    def writers(path: Path) -> list[str]:
        if not seen:
            seen.append(open_for_writing([str(r) for r in roots]))
        return writers_of(path, seen[0])

    return writers


class Watcher:
    def __init__(self, get_cfg: Callable, on_config_change: Callable[[], None], config_path: Optional[Path] = None):
        self.get_cfg = get_cfg
        self.on_config_change = on_config_change
        self.config_link = Path(config_path) if config_path else None
        self.results: dict[str, tuple[str, str, float]] = {}  # "run/name" -> (status, reason, mtime checked)
        self.bad: dict[str, str] = {}  # "run/name" -> reason; shown in status
        self.observer: Optional[Observer] = None
        self._stop = threading.Event()
        self._worker: Optional[threading.Thread] = None
        # The one table of pending checks: (run, name) -> when (monotonic), and a heap of the same (entries
        # whose time no longer matches the table are stale and skipped).
        self._due: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []
        self._cond = threading.Condition()
        self.dropped = 0  # events not queued because MAX_PENDING paths were waiting (rescan catches up)
        self._opened: tuple[float, dict[str, str]] = (-1e9, {})  # (when, open_for_writing) seen last
        self._rx: Optional[tuple[list, list]] = None  # (checkpoints.pattern, compiled) of the config in force
        self.roots: dict[Path, str] = {}
        self.config_names: set[tuple[Path, str]] = set()
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
                # the filter is applied by the kernel (the inotify mask): reads make no events at all
                obs.schedule(_Handler(self), str(d), recursive=False, event_filter=list(CHANGE_EVENTS))
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
        if name.startswith((".",) + names.TEMP_PREFIXES) or name in names.POINTERS:
            return
        if names.match_name(name, self._patterns()) is None:
            return
        self.last_event = time.time()
        if kind == "deleted" or not os.path.lexists(p):
            with self.lock:
                self.results.pop(self.key(run, name), None)
                self.bad.pop(self.key(run, name), None)
            with self._cond:
                self._due.pop((run, name), None)
            return
        self._schedule(run, name, time.monotonic() + DEBOUNCE_S)

    def _patterns(self) -> list:
        pats = self.get_cfg().checkpoints.pattern
        cached = self._rx
        if cached is None or cached[0] != pats:
            cached = (list(pats), [names.compile_pattern(x) for x in pats])
            self._rx = cached
        return cached[1]

    def _schedule(self, run: str, name: str, at: float, replace: bool = False) -> bool:
        """Check (run, name) at monotonic time `at`. A path already waiting keeps its time unless `replace`
        (the worker rescheduling a path it just checked). Returns whether it is now in the table."""
        k = (run, name)
        with self._cond:
            cur = self._due.get(k)
            if cur is not None and not replace:
                return True
            if cur is None and len(self._due) >= MAX_PENDING:
                self.dropped += 1
                return False
            self._due[k] = at
            heapq.heappush(self._heap, (at, k))
            if len(self._heap) > 4 * len(self._due) + 1024:  # drop the stale entries now and then
                self._heap = [(t, x) for t, x in self._heap if self._due.get(x) == t]
                heapq.heapify(self._heap)
            self._cond.notify()
        return True

    def pending(self) -> int:
        with self._cond:
            return len(self._due)

    def _queue(self, run: str, name: str) -> None:
        self._schedule(run, name, time.monotonic())

    def _later(self, run: str, name: str, delay: float) -> None:
        self._schedule(run, name, time.monotonic() + max(0.5, delay), replace=True)

    def rescan(self) -> int:
        """Queue every checkpoint not yet checked, or changed since; returns how many. Lists names and
        times only: the checks themselves run on the worker."""
        cfg = self.get_cfg()
        rxs = self._patterns()
        n = 0
        seen = set()
        for root, run in self._run_roots(cfg).items():
            try:
                with os.scandir(root) as it:
                    listing = [(d.name, d.stat(follow_symlinks=False)) for d in it
                               if not d.name.startswith((".",) + names.TEMP_PREFIXES) and d.name not in names.POINTERS
                               and names.match_name(d.name, rxs) is not None]
            except OSError:
                continue
            for name, st in listing:
                if stat.S_ISLNK(st.st_mode):
                    continue
                k = self.key(run, name)
                seen.add(k)
                r = self.results.get(k)
                mtime = st.st_mtime
                if stat.S_ISDIR(st.st_mode) and r is not None:
                    try:
                        mtime = max(mtime, foreign.newest_mtime(foreign.entry_files(root / name)))
                    except (OSError, ValueError):
                        pass
                if r is None or r[2] != mtime:
                    if self._schedule(run, name, time.monotonic()):
                        n += 1
        with self.lock:
            for gone in set(self.results) - seen:
                self.results.pop(gone, None)
                self.bad.pop(gone, None)
        return n

    def _next(self) -> Optional[tuple[str, str]]:
        """The next path whose time has come (waits for it); None when stopping."""
        with self._cond:
            while not self._stop.is_set():
                now = time.monotonic()
                while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # stale
                if self._heap and self._heap[0][0] <= now:
                    at, k = heapq.heappop(self._heap)
                    del self._due[k]
                    return k
                self._cond.wait(min(self._heap[0][0] - now, 1.0) if self._heap else 1.0)
        return None

    def _verify_loop(self) -> None:
        while not self._stop.is_set():
            k = self._next()
            if k is None:
                return
            try:
                self._verify(*k)
            except Exception as exc:  # never let the worker die
                log.error("verification failed unexpectedly", checkpoint=self.key(*k), error=str(exc))

    def _writers(self, path: Path) -> list[str]:
        now = time.monotonic()
        t, opened = self._opened
        if now - t > OPEN_FILES_TTL_S:
            opened = open_for_writing([str(r) for r in self.roots])
            self._opened = (now, opened)
        return writers_of(path, opened)

    def _verify(self, run: str, name: str) -> None:
        cfg = self.get_cfg()
        root = cfg.checkpoint_dir / run if run else cfg.checkpoint_dir
        path = root / name
        fields = names.match_name(name, self._patterns())
        if fields is None:
            return
        try:
            est = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(est.st_mode):
            return
        k = self.key(run, name)
        try:
            files = foreign.entry_files(path)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self._report(k, "unreadable", f"cannot be read ({str(exc)[:120]})", est.st_mtime, "file")
            return
        # The folder's own time counts: an empty new folder (Hugging Face's first mkdir) is a save just begun.
        mtime = max(est.st_mtime, foreign.newest_mtime(files))
        prev = self.results.get(k)
        if prev and prev[2] == mtime:
            return
        try:
            sc = foreign.read_sidecar(root, name)
        except foreign.SidecarDamaged as exc:  # the record of its bytes is lost: never recorded afresh
            self._report(k, exc.status, str(exc), mtime, "hf" if stat.S_ISDIR(est.st_mode) else "file")
            return
        if sc is not None:
            res, why = foreign.compare(sc, path, files, verify=True)
            if res in ("stale", "resaved"):  # the name holds a new save of that step: judged afresh
                foreign.forget(root, name)
                sc = None
            else:
                layout, reason, meta = sc.get("layout", "file"), why, {}
                status = "complete" if res == "ok" else "corrupt"
        if sc is None:
            layout, status, reason, meta = cat.check_entry(path, verify=True, step=fields["step"])
        if layout != "native" and sc is None:
            age = time.time() - mtime
            if age < cfg.checkpoints.settle_s:
                self._later(run, name, cfg.checkpoints.settle_s - age + 0.5)  # being written: judge it later
                return
            if self._writers(path):  # a writer still has it open: in progress, whatever it looks like now
                self._later(run, name, cfg.checkpoints.settle_s)
                return
            if status == "complete":
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
        self._report(k, status, reason, mtime, layout)

    def _report(self, k: str, status: str, reason: str, mtime: float, layout: str) -> None:
        with self.lock:
            self.results[k] = (status, reason, mtime)
            if status == "complete":
                self.bad.pop(k, None)
            else:
                self.bad[k] = reason
        if status == "complete":
            if layout == "native":
                log.info("checkpoint verified", checkpoint=k, layout=layout)
        elif status in ("corrupt", "unreadable"):
            # damage after it was written, or files we may not read: a person has to look
            log.error("checkpoint failed verification: it will never be used for resume", checkpoint=k,
                      status=status, reason=reason)
            alerts.emit("verification_failed", f"{k} failed verification", f"{status}: {reason}", key=k)
        else:
            # a save that never finished, or not a checkpoint at all: the resume choice sets it aside
            log.warning("checkpoint is not usable: it will never be used for resume", checkpoint=k,
                        status=status, reason=reason)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self.observer:
            self.observer.stop()
