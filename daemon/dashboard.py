"""What the dashboard page and the Prometheus metrics show, gathered off the daemon's main loop.

- `Inventory`: the catalog of every run with its retention plan (what the next unattended cleanup
  would delete, and why) and the snapshots. Scanning and planning read the whole checkpoint folder, so
  the result is cached and rebuilt at most every `ttl_s` (30 s) by the observer thread; a request only
  ever reads the last result.
- `LossCurve`: loss and val_loss from logs/metrics.jsonl, which grows by a line per step (100 MB after
  a long run). It is read incrementally, and a large file's past is sampled at evenly spaced offsets, so
  a request never reads more than what was appended since the last one; the curve is downsampled to a
  bounded number of points.
- `DiskHistory`: a bounded ring of disk samples, kept in logs/disk-history.jsonl (itself bounded).
- `build_dashboard`: the JSON the page draws, from all of the above. Pure: no clock, no disk.

Every name and string shown comes from untrusted places (file names, checkpoint metadata, trainer
output); this module passes them on as data, and the page only ever sets them as text.
"""

from __future__ import annotations

import collections
import json
import math
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ckpt_daemon.config import Config
from ckpt_daemon.fsutil import atomic_write_bytes, read_json_file
from ckpt_daemon.logs import get_logger
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import resolve as rs

log = get_logger("daemon.dashboard")

MAX_SNAPSHOTS = 400  # the newest ones read for the page (snapshot retention keeps far fewer)
MAX_CHECKPOINTS_SHOWN = 20_000  # per run; the page says how many were left out
MAX_CRASHES_SHOWN = 10


# ------------------------------------------------------------------------------------ inventory
@dataclass
class RunView:
    run: str
    catalog: Optional[cat.Catalog]
    report: Any  # maintenance.cleanup.Report, or None when planning failed
    error: Optional[str] = None


@dataclass
class InventoryView:
    time: float  # wall clock when it was taken
    duration_s: float
    runs: dict[str, RunView]
    snapshots: list[dict]
    error: Optional[str] = None


def read_snapshots(root: Path, limit: int = MAX_SNAPSHOTS) -> list[dict]:
    """The snapshots in `root`, newest first: [{name, date, created, checkpoints: [{run, name, step, roles}]}]."""
    from maintenance.snapshot import SNAPSHOT_MANIFEST, list_snapshots

    out = []
    for name, date in sorted(list_snapshots(root), key=lambda x: x[1], reverse=True)[:limit]:
        m = read_json_file(root / name / SNAPSHOT_MANIFEST, 16 << 20) or {}
        cks = []
        for c in (m.get("checkpoints") or [])[:64]:
            if isinstance(c, dict) and isinstance(c.get("name"), str):
                cks.append({"run": c.get("run") if isinstance(c.get("run"), str) else "", "name": c["name"],
                            "step": c.get("step") if _is_int(c.get("step")) else None,
                            "roles": [r for r in (c.get("roles") or []) if isinstance(r, str)][:4]})
        created = m.get("created") if isinstance(m.get("created"), str) else None
        try:
            mtime = (root / name).stat().st_mtime
        except OSError:
            mtime = None
        out.append({"name": name, "date": date.isoformat(), "created": created, "time": mtime,
                    "added_bytes": m.get("added_bytes") if _is_int(m.get("added_bytes")) else None,
                    "checkpoints": cks})
    return out


def take_inventory(cfg: Config, extra_protected: Optional[dict[str, str]] = None) -> InventoryView:
    """Scan every run and plan retention as the daemon's next unattended run would (held deletions
    included). Never raises: a failing run or step is reported in the view."""
    from maintenance.cleanup import build_report

    t0 = time.monotonic()
    now = time.time()
    runs: dict[str, RunView] = {}
    error = None
    try:
        cats = cat.scan_runs(cfg, stats=False)  # pointers and what is ignored; bytes come with the plan's scan
    except Exception as exc:  # an unreadable folder: say so, keep serving
        cats, error = {}, f"could not scan {cfg.checkpoint_dir}: {exc}"
    for run, c in cats.items():
        try:
            r = build_report(cfg, "dry run", extra_protected=extra_protected, unattended=True, run=run)
            runs[run] = RunView(run, c, r)
        except Exception as exc:
            runs[run] = RunView(run, c, None, f"could not plan retention: {type(exc).__name__}: {exc}")
    try:
        snaps = read_snapshots(cfg.snapshot_dir)
    except Exception as exc:
        snaps, error = [], error or f"could not read the snapshots in {cfg.snapshot_dir}: {exc}"
    return InventoryView(now, round(time.monotonic() - t0, 3), runs, snaps, error)


class Inventory:
    """The last InventoryView, rebuilt by `refresh_if_stale` at most every `ttl_s`."""

    def __init__(self, get_cfg: Callable[[], Config], extra_protected: Callable[[], dict[str, str]],
                 ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.get_cfg, self.extra_protected, self.ttl_s, self.clock = get_cfg, extra_protected, ttl_s, clock
        self.view: Optional[InventoryView] = None
        self._taken_at: Optional[float] = None
        self._lock = threading.Lock()
        self.ready = threading.Event()

    def stale(self) -> bool:
        return self._taken_at is None or self.clock() - self._taken_at >= self.ttl_s

    def refresh_if_stale(self) -> bool:
        """Rebuild if older than ttl_s; a second caller during a rebuild does not wait. True if rebuilt."""
        if not self.stale() or not self._lock.acquire(blocking=False):
            return False
        try:
            if not self.stale():
                return False
            try:
                extra = self.extra_protected()
            except Exception:
                extra = {}
            self.view = take_inventory(self.get_cfg(), extra)
            return True
        except Exception as exc:  # never: take_inventory reports; but an observer must not die of it
            log.exception("could not take the inventory for the dashboard", error=str(exc))
            return False
        finally:
            self._taken_at = self.clock()
            self.ready.set()
            self._lock.release()

    def get(self, wait_s: float = 0.0) -> Optional[InventoryView]:
        if self.view is None and wait_s > 0:
            self.ready.wait(wait_s)
        return self.view


# ------------------------------------------------------------------------------------ loss curve
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


class Series:
    """(step, value) points, bounded: past `limit` points every other one is dropped and only every
    `stride`-th new point is kept from then on. A step that goes back (a resumed run logs the steps
    after its checkpoint again) replaces what was logged from there on."""

    def __init__(self, limit: int):
        self.limit = limit
        self.points: list[tuple[int, float]] = []
        self.stride = 1
        self._seen = 0
        self.newest: Optional[tuple[int, float]] = None  # always shown, whatever the stride skipped

    def shown(self) -> list[list]:
        out = [list(p) for p in self.points]
        if self.newest is not None and (not out or out[-1][0] < self.newest[0]):
            out.append(list(self.newest))
        return out

    def truncate(self, step: int) -> None:
        """Forget the points at `step` and after."""
        while self.points and self.points[-1][0] >= step:
            self.points.pop()
        if self.newest is not None and self.newest[0] >= step:
            self.newest = None

    def add(self, step: int, value: float) -> None:
        if self.points and step <= self.points[-1][0]:
            self.truncate(step)
        self.newest = (step, value)
        self._seen += 1
        if self._seen % self.stride and self.points:
            return
        self.points.append((step, value))
        if len(self.points) > self.limit:
            self.points = self.points[::2]
            self.stride *= 2


class LossCurve:
    """loss and val_loss by step from a metrics.jsonl that only grows (or is rotated away)."""

    MAX_LINE = 64 << 10  # a longer line is skipped
    SAMPLE_ABOVE = 16 << 20  # a file larger than this: its past is sampled, the last part read in full
    TAIL = 8 << 20
    SAMPLES = 600
    SAMPLE_BLOCK = 16 << 10
    MAX_READ = 32 << 20  # per call: a fast writer can never make one request read without end

    def __init__(self, path: Path, points: int = 2000):
        self.path = Path(path)
        self.n_points = points
        self._lock = threading.Lock()
        self._reset(None)

    def _reset(self, ident) -> None:
        self.loss, self.val = Series(self.n_points), Series(self.n_points // 2)
        self.offset = 0
        self.ident = ident
        self.lines = 0
        self.last_step: Optional[int] = None
        self.skipped_bytes = 0

    def _feed(self, line: bytes) -> None:
        if not line.strip() or len(line) > self.MAX_LINE:
            return
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            return
        if not isinstance(rec, dict) or not _is_int(rec.get("step")):
            return
        step = rec["step"]
        self.lines += 1
        if self.last_step is not None and step < self.last_step:  # a resumed run: what follows replaces
            self.loss.truncate(step)
            self.val.truncate(step)
        self.last_step = step
        loss = _num(rec.get("loss"))
        if loss is not None:
            self.loss.add(step, loss)
        val = _num(rec.get("val_loss"))
        if val is not None:
            self.val.add(step, val)

    def _feed_block(self, data: bytes, partial_head: bool) -> bytes:
        """Feed the complete lines of `data`; returns the unfinished last line."""
        lines = data.split(b"\n")
        if partial_head and lines:
            lines = lines[1:]
        for line in lines[:-1]:
            self._feed(line)
        return lines[-1] if lines else b""

    def update(self) -> None:
        with self._lock:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                self._reset(None)
                return
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return
                ident = (st.st_dev, st.st_ino)
                if ident != self.ident or st.st_size < self.offset:
                    self._reset(ident)  # rotated or truncated: read afresh
                    if st.st_size > self.SAMPLE_ABOVE:
                        self._sample_past(fd, st.st_size - self.TAIL)
                        self.offset = st.st_size - self.TAIL
                        self._skip_to_line(fd)
                end = min(st.st_size, self.offset + self.MAX_READ)
                pos = self.offset
                rest = b""
                while pos < end:
                    chunk = os.pread(fd, min(1 << 20, end - pos), pos)
                    if not chunk:
                        break
                    pos += len(chunk)
                    rest = self._feed_block(rest + chunk, False)
                    if len(rest) > self.MAX_LINE:
                        rest = b""  # an endless line: dropped
                # an unfinished last line is read again next time
                self.offset = pos - len(rest)
            finally:
                os.close(fd)

    def _skip_to_line(self, fd: int) -> None:
        head = os.pread(fd, self.MAX_LINE, self.offset)
        nl = head.find(b"\n")
        self.offset += nl + 1 if nl >= 0 else len(head)

    def _sample_past(self, fd: int, upto: int) -> None:
        n = self.SAMPLES
        for i in range(n):
            pos = upto * i // n
            block = os.pread(fd, min(self.SAMPLE_BLOCK, max(0, upto - pos)), pos)
            self._feed_block(block, partial_head=pos > 0)
        self.skipped_bytes = upto

    def to_json(self) -> dict:
        with self._lock:
            return {"loss": self.loss.shown(), "val_loss": self.val.shown(),
                    "sampled_past": self.skipped_bytes > 0}


# ------------------------------------------------------------------------------------ disk history
class DiskHistory:
    """Disk samples {t, free (available), total, used? (as df), ckpt?}: a ring of `keep` in memory, appended to a JSON-lines file
    that is rewritten with the ring alone whenever it holds twice as many lines."""

    FILE = "disk-history.jsonl"

    def __init__(self, log_dir: Path, keep: int = 10_000):
        self.path = Path(log_dir) / self.FILE
        self.keep = keep
        self.samples: collections.deque = collections.deque(maxlen=keep)
        self._lines = 0
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                limit = self.keep * 200
                if size > limit:
                    f.seek(size - limit)
                    f.readline()
                data = f.read(limit)
        except OSError:
            return
        for line in data.splitlines():
            try:
                s = json.loads(line)
            except ValueError:
                continue
            if isinstance(s, dict) and _num(s.get("t")) is not None and _is_int(s.get("free")):
                self.samples.append({k: s[k] for k in ("t", "free", "total", "used", "ckpt") if k in s})
                self._lines += 1

    def add(self, sample: dict) -> None:
        with self._lock:
            self.samples.append(sample)
            line = json.dumps(sample, separators=(",", ":")) + "\n"
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if self._lines + 1 > 2 * self.keep:
                    data = "".join(json.dumps(s, separators=(",", ":")) + "\n" for s in self.samples)
                    atomic_write_bytes(self.path, data.encode(), durable=False)
                    self._lines = len(self.samples)
                else:
                    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                    try:
                        os.write(fd, line.encode())
                    finally:
                        os.close(fd)
                    self._lines += 1
            except OSError as exc:  # bookkeeping: a full disk is exactly when this may fail
                log.debug("could not record a disk sample", error=str(exc))

    def recent(self, points: int = 600) -> list[dict]:
        with self._lock:
            s = list(self.samples)
        if len(s) <= points:
            return s
        step = len(s) / points
        out = [s[int(i * step)] for i in range(points)]
        if out[-1] is not s[-1]:
            out[-1] = s[-1]
        return out


# ------------------------------------------------------------------------------------ the page's data
def _run_json(rv: RunView, snap_index: dict[tuple[str, str], dict], max_shown: int) -> dict:
    c, r = rv.catalog, rv.report
    decisions = {d.name: d for d in (r.decisions if r is not None else [])}
    held = set(r.held) if r is not None else set()
    entries = r.entries if r is not None else ({e.name: e for e in c.entries} if c else {})
    named = rs.roles(c) if c else {}
    latest, best = named.get(rs.LATEST), named.get(rs.BEST)
    resumed = c.resumed_from if c else None
    items = []
    for e in sorted(entries.values(), key=lambda e: (e.step, e.version, e.name)):
        d = decisions.get(e.name)
        items.append({
            "name": e.name, "step": e.step, "status": e.status, "reason": e.reason, "layout": e.layout,
            "bytes": e.bytes, "freeable": e.freeable_bytes, "mtime": e.mtime, "epoch": e.epoch,
            "epoch_end": e.epoch_end, "pin": e.pin, "metrics": e.metrics,
            "tier": d.tier if d else None, "keep": d.keep if d else True,
            "reasons": list(d.reasons) if d else [], "held": e.name in held,
            "latest": e.name == latest, "best": e.name == best, "resumed_from": e.name == resumed,
            "snapshots": (snap_index.get((rv.run, e.name)) or {}).get("snapshots", []),
        })
    shown = items[-max_shown:]
    # tier bands: the step range each tier covers (tiers cover the newest checkpoints first)
    bands: dict[int, list[int]] = {}
    for it in items:
        if it["tier"] is not None:
            b = bands.setdefault(it["tier"], [it["step"], it["step"], 0])
            b[0], b[1], b[2] = min(b[0], it["step"]), max(b[1], it["step"]), b[2] + 1
    tiers = r.tiers if r is not None else []
    to_delete = [it for it in items if not it["keep"]]
    # checkpoints that now exist only in snapshots (deleted from the folder): marked on the timeline too
    in_snaps_only = sorted(({"name": n, "step": v["step"], "snapshots": v["snapshots"]}
                            for (run, n), v in snap_index.items()
                            if run == rv.run and n not in entries and v["step"] is not None), key=lambda x: x["step"])
    return {
        "run": rv.run, "error": rv.error,
        "tiers": [{"tier": i, "description": tiers[i - 1] if 0 < i <= len(tiers) else f"tier {i}",
                   "from_step": b[0], "to_step": b[1], "count": b[2]} for i, b in sorted(bands.items())],
        "checkpoints": shown, "left_out": len(items) - len(shown), "count": len(items),
        "valid": sum(1 for it in items if it["status"] == "complete"),
        "latest": latest, "best": best, "resumed_from": resumed,
        "planned_deletions": len(to_delete), "planned_free_bytes": sum(it["freeable"] for it in to_delete),
        "held": sorted(held), "policy": r.policy if r is not None else {},
        "training_active": r.activity.active if r is not None else None,
        "training_detail": r.activity.detail if r is not None else None,
        "in_progress": [p.name for p in (c.in_progress if c else [])][:100],
        "ignored": [{"name": n, "why": why} for n, why in (c.ignored if c else [])][:100],
        "in_snapshots_only": in_snaps_only[:500],
    }


def _snapshot_index(snapshots: list[dict]) -> dict[tuple[str, str], dict]:
    """(run, checkpoint name) -> {step, snapshots: [names]}."""
    idx: dict[tuple[str, str], dict] = {}
    for s in snapshots:
        for c in s["checkpoints"]:
            rec = idx.setdefault((c["run"], c["name"]), {"step": c.get("step"), "snapshots": []})
            rec["snapshots"].append(s["name"])
    return idx


def build_dashboard(status: Any, inv: Optional[InventoryView], disk: list[dict], curve: dict, now: float,
                    alive: bool = True, max_shown: int = MAX_CHECKPOINTS_SHOWN) -> dict:
    """Everything the page draws, as JSON-ready data, from the status (a Status, or the mapping a file
    holds). Pure."""
    from daemon.statusdoc import as_status
    from daemon.statusview import verdict

    st = as_status(status)
    level, line = verdict(st, alive, now)
    status = st.to_json()
    t = dict(status["training"])
    crashes = list(t.pop("crashes", None) or [])[-MAX_CRASHES_SHOWN:][::-1]
    jobs_hist = (status.get("jobs") or {}).get("history") or {}
    jobs_next = (status.get("jobs") or {}).get("next") or {}
    jobs = []
    for name in sorted(set(jobs_hist) | set(jobs_next)):
        h = jobs_hist.get(name) or {}
        jobs.append({"job": name, "next": jobs_next.get(name), "last_attempt": h.get("last_attempt"),
                     "last_success": h.get("last_success"), "last_result": h.get("last_result"),
                     "last_duration_s": h.get("last_duration_s"), "last_message": h.get("last_message"),
                     "runs": h.get("runs")})
    runs, snapshots = [], []
    if inv is not None:
        idx = _snapshot_index(inv.snapshots)
        runs = [_run_json(rv, idx, max_shown) for rv in inv.runs.values()]
        snapshots = inv.snapshots[:60]
    ck = status.get("checkpoints") or {}
    return {
        "now": now,
        "verdict": {"level": level, "line": line},
        "daemon": status.get("daemon") or {},
        "training": t,
        "crashes": crashes,
        "jobs": jobs,
        "disk": {"now": status.get("disk") or {}, "history": disk},
        "checkpoints": {"count": ck.get("count"), "valid": ck.get("valid"), "latest": ck.get("latest"),
                        "best": ck.get("best"), "failed_verification": ck.get("failed_verification") or {},
                        "quarantined": ck.get("quarantined"), "dir": ck.get("dir")},
        "retention": status.get("retention") or {},
        "last_cleanup": status.get("last_cleanup"),
        "memory": status.get("memory"),
        "inventory": {"time": inv.time if inv else None, "duration_s": inv.duration_s if inv else None,
                      "error": inv.error if inv else "not taken yet"},
        "runs": runs,
        "snapshots": snapshots,
        "curve": curve,
        "replicas": status.get("replicas") or [],
    }
