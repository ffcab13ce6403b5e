"""Notifications to a person (notify: in config.yaml), sent through apprise: a crash loop, a crash, a
disk emergency, deletions held by the retention guard, a checkpoint failing verification, a new best,
training finished. (Not to be confused with daemon/notify.py, which speaks systemd's sd_notify.)

The rest of the daemon calls one function where an event happens:

    alerts.emit("gave_up", "training gave up", message, key=None, **fields)

It never blocks and never raises: the alert is filed under its event and the call returns. ONE sender
thread does the sending, so a slow or dead target (a mail server that times out) delays only other
notifications, never supervision. What waits is bounded by construction: at most one pending alert per
event (a newer one takes its place and the count of those it stands for goes up), so a storm of
hundreds of crashes is one notification now and one "+N more" later, never a queue that grows.

Rate limit: at most one notification per event per notify.min_interval_s; what came in between is
counted and named in the next one ("+12 more: ..."). A target that fails is logged once, and once
again when it works again; status shows its state. URLs are secrets: logs and status show their
label (scheme and server) only. apprise is imported by the sender thread, and only when notify.urls
has a URL (ckpt_daemon/alerturl.py).
"""

from __future__ import annotations

import collections
import hashlib
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ckpt_daemon import alerturl
from ckpt_daemon.logs import get_logger

log = get_logger("daemon.alerts")

MAX_TITLE_CHARS = 200
MAX_BODY_CHARS = 4000
MAX_FIELD_CHARS = 500
MAX_KEYS = 1024  # alerts sent once per key (a checkpoint that failed verification): the keys remembered
NAMED_IN_SUMMARY = 5  # titles of held-back alerts named in the next notification
# What the reader can do, added to each notification of the event (the call sites say what happened).
REMEDY = {
    "crash": "The daemon restarts it from the newest verified checkpoint; logs/trainer.log has its whole output. "
             "Its last lines are above.",
    "verification_failed": "It is never resumed from: the daemon moves it to checkpoints/.ckpt-daemon/quarantine/ "
                           "(kept, with its reason) when it next chooses a resume point. `ckpt-daemon list --verify` "
                           "checks every checkpoint.",
    "deletions_held": "The retention tiers in config.yaml differ from the last confirmed ones and would delete these "
                      "checkpoints; they are kept until a person confirms. Review with "
                      "`python -m maintenance.cleanup --dry-run`, then confirm with `python -m maintenance.cleanup`, "
                      "or undo the edit of retention.tiers.",
    "new_best": "Retention and snapshots keep it; `python -m maintenance.consolidate --from best` exports it.",
    "replica_lag": "Uploads go on by themselves once the target answers; `ckpt-daemon status` shows the last error "
                   "(unreachable, refused credentials, a full bucket...) and what is pending.",
}
# apprise's kinds: how a service colours or files the notification
KIND = {"gave_up": "failure", "crash": "warning", "training_finished": "success", "new_best": "success",
        "verification_failed": "failure", "disk_emergency": "failure", "deletions_held": "warning",
        "replica_lag": "failure"}


@dataclass
class _Pending:
    """The alerts of one event not sent yet: the latest one, and how many it stands for."""

    title: str
    body: str
    fields: dict
    count: int = 1
    since: float = 0.0  # wall time of the first of them
    titles: collections.deque = field(default_factory=lambda: collections.deque(maxlen=NAMED_IN_SUMMARY))


@dataclass
class _Target:
    url: str  # the secret: never logged, never in status
    label: str
    plugin: Any
    unusable: Optional[str] = None
    events: Optional[tuple] = None  # None: notify.events
    ok: Optional[bool] = None  # None: nothing sent yet
    sent: int = 0
    failed: int = 0
    failing_since: Optional[float] = None
    last_error: Optional[str] = None


class Alerts:
    def __init__(self, get_cfg: Callable, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.get_cfg = get_cfg
        self.clock = clock
        self.wall = wall
        self.host = socket.gethostname()[:64]
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending: dict[str, _Pending] = {}
        self._last_sent: dict[str, float] = {}  # event -> clock() of its last notification
        self._last_sent_wall: dict[str, float] = {}
        self._held_back: collections.Counter = collections.Counter()  # alerts folded into a later one, per event
        self._keys: collections.OrderedDict = collections.OrderedDict()
        self._targets: list[_Target] = []
        self._wanted: Optional[list] = None
        self._best: dict[str, Optional[str]] = {}
        self._mode_warned = False
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------------------------ the API
    def emit(self, event: str, title: str, body: str = "", key: Optional[str] = None, **fields: Any) -> bool:
        """File an alert; True if it will be sent (now or folded into a later one). Never blocks on I/O."""
        n = self.get_cfg().notify
        if not n.urls or not any(event in (t.events if t.events is not None else n.events) for t in n.urls):
            return False
        with self._lock:
            if key is not None:
                seen = (event, hashlib.blake2b(str(key).encode("utf-8", "replace"), digest_size=16).digest())
                if seen in self._keys:
                    return False  # already told (a checkpoint that failed verification is told once)
                self._keys[seen] = None
                if len(self._keys) > MAX_KEYS:
                    self._keys.popitem(last=False)
            title = _clip(str(title), MAX_TITLE_CHARS)
            body = _clip(str(body), MAX_BODY_CHARS)
            fields = {str(name)[:64]: _clip(str(v), MAX_FIELD_CHARS) for name, v in list(fields.items())[:20]
                      if v is not None}
            p = self._pending.get(event)
            if p is None:
                p = self._pending[event] = _Pending(title, body, fields, since=self.wall())
            else:
                p.titles.append(p.title)
                p.title, p.body, p.fields, p.count = title, body, fields, p.count + 1
        self._wake.set()
        return True

    def note_best(self, status: Any) -> None:
        """Called with each status the daemon computes: a best checkpoint other than the one seen before is
        a new best. The first status only sets what was there (a daemon start is no new best)."""
        from daemon.statusdoc import as_status

        ck = as_status(status).checkpoints
        bests = {"": ck.best, **{r: v.best for r, v in ck.runs.items()}}
        for run, b in bests.items():
            name = b.name if b is not None else None
            first = run not in self._best
            prev = self._best.get(run)
            if name is None:
                self._best.setdefault(run, None)  # gone (quarantined, deleted): the next one is new
                continue
            self._best[run] = name
            if first or name == prev:
                continue
            metric = self.get_cfg().trainer.best_metric
            metrics = {k: v for k, v in b.metrics.items() if isinstance(v, (int, float))}
            if metric in metrics:  # else what the trainer recorded (eval_loss under Hugging Face), a few of them
                metrics = {metric: metrics[metric]}
            shown = f"{run}/{name}" if run else name
            what = (" (" + ", ".join(f"{k} {v:.6g}" for k, v in list(metrics.items())[:3]) + ")") if metrics else ""
            self.emit("new_best", f"new best checkpoint: {shown}{what}",
                      f"{shown} (step {b.step}) is the new best checkpoint{what}; the previous best was "
                      f"{prev or 'none'}.", checkpoint=shown, step=b.step)

    def snapshot(self) -> dict:
        """For status: every target by its label (never its URL), and what waits."""
        with self._lock:
            return {
                "targets": [{"target": t.label, "events": list(t.events) if t.events is not None else None,
                             "state": ("unusable" if t.unusable else "untried" if t.ok is None
                                       else "ok" if t.ok else "failing"),
                             "sent": t.sent, "failed": t.failed, "failing_since": t.failing_since,
                             "last_error": t.unusable or t.last_error} for t in self._targets],
                "pending": {e: p.count for e, p in self._pending.items()},
                "held_back": dict(self._held_back),
                "last_sent": dict(self._last_sent_wall),
            }

    # ------------------------------------------------------------------------------------ the thread
    def start(self) -> "Alerts":
        self._thread = threading.Thread(target=self._run, daemon=True, name="alerts")
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Send what waits (rate limit or not), for at most `timeout` seconds, then return."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def poke(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                cfg = self.get_cfg()
                self._sync_targets(cfg)
                wait = self._send_due(cfg, stopping)
            except Exception as exc:  # never let the thread die: the next alert tries again
                log.exception("notifications: unexpected error; going on", error=str(exc))
                wait = 5.0
            if stopping:
                return
            self._wake.wait(wait)

    def _send_due(self, cfg, stopping: bool) -> float:
        """Send every event whose interval has passed (all of them when stopping); returns how long to wait."""
        interval = cfg.notify.min_interval_s
        now = self.clock()
        with self._lock:
            due = [e for e in self._pending
                   if stopping or e not in self._last_sent or now - self._last_sent[e] >= interval]
            batch = [(e, self._pending.pop(e)) for e in due]
            for e, p in batch:
                self._last_sent[e] = now
                self._last_sent_wall[e] = self.wall()
                self._held_back[e] += p.count - 1
            waits = [self._last_sent[e] + interval - now for e in self._pending]
        for event, p in batch:
            self._deliver(cfg, event, p)
        # Idle: a look every 5 s, so that targets edited into config.yaml show in status soon (a hot reload).
        return min(5.0, max(0.05, min(waits))) if waits else 5.0

    def _deliver(self, cfg, event: str, p: _Pending) -> None:
        title = f"ckpt-daemon on {self.host}: {p.title}" + (f" (+{p.count - 1} more)" if p.count > 1 else "")
        lines = [x for x in (p.body, REMEDY.get(event)) if x]
        if p.count > 1:
            named = "; ".join(p.titles)
            lines.append(f"{p.count - 1} earlier {event} alert(s) since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(p.since))} were held back by "
                         f"notify.min_interval_s ({cfg.notify.min_interval_s:g} s); the latest is above."
                         + (f" The last of them: {named}." if named else ""))
        if p.fields:
            lines.append("\n".join(f"{k}: {v}" for k, v in p.fields.items()))
        lines.append(f"event: {event}\nhost: {self.host}\ncheckpoints: {cfg.checkpoint_dir}\nconfig: {cfg.source}")
        body = "\n\n".join(lines)
        for t in list(self._targets):
            if event not in (t.events if t.events is not None else cfg.notify.events) or t.unusable:
                continue
            ok, why = alerturl.send(t.plugin, t.url, title, body, KIND.get(event, "info"))
            with self._lock:
                was = t.ok
                t.ok = ok
                if ok:
                    t.sent += 1
                    t.failing_since, t.last_error = None, None
                else:
                    t.failed += 1
                    t.last_error = why
                    if was is not False:
                        t.failing_since = self.wall()
            if ok and was is False:
                log.info("notification target works again", target=t.label, alert=event)
            elif not ok and was is not False:
                # Once per failure, not per notification: a dead target must not flood the log.
                log.warning("notification target failed; the daemon goes on, and says so again only when it works "
                            "again (status shows it meanwhile)", target=t.label, alert=event, reason=why)

    def _sync_targets(self, cfg) -> None:
        """Build the targets of notify.urls when they change (hot reload); loading a URL imports apprise."""
        wanted = [(t.url.get_secret_value(),
                   tuple(t.events) if t.events is not None else None) for t in cfg.notify.urls]
        if wanted == self._wanted:
            return
        old = {t.url: t for t in self._targets}
        new = []
        for url, events in wanted:
            t = old.get(url)
            if t is None:
                plugin, label, why = alerturl.load(url)
                t = _Target(url=url, label=label, plugin=plugin, unusable=why)
                if why:  # the config check loads it too, so only a changed apprise gets here
                    log.error("a notification URL cannot be used; the others are", target=label, reason=why)
            t.events = events
            new.append(t)
        with self._lock:
            self._targets, self._wanted = new, wanted
        if new:
            log.info("notifications go to", targets=[t.label for t in new])
            self._check_mode(cfg)

    def _check_mode(self, cfg) -> None:
        """URLs are secrets: say so once if config.yaml, which holds them, is readable by every user."""
        if self._mode_warned or cfg.source is None:
            return
        try:
            mode = os.stat(cfg.source).st_mode
        except OSError:
            return
        if mode & stat.S_IROTH:
            self._mode_warned = True
            log.warning("config.yaml holds notification URLs (their credentials) and every user can read it; "
                        "`chmod 600` it (the daemon runs as its owner)", config=str(cfg.source))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------- one per process
_active: Optional[Alerts] = None


def start(get_cfg: Callable) -> Alerts:
    """Started by the daemon; until then (and in tools and tests without a daemon) emit() does nothing."""
    global _active
    _active = Alerts(get_cfg).start()
    return _active


def stop(timeout: float = 5.0) -> None:
    global _active
    a, _active = _active, None
    if a is not None:
        a.stop(timeout)


def emit(event: str, title: str, body: str = "", key: Optional[str] = None, **fields: Any) -> bool:
    """File an alert with the daemon's sender (see the module's doc). Never raises, never blocks."""
    a = _active
    if a is None:
        return False
    try:
        return a.emit(event, title, body, key=key, **fields)
    except Exception as exc:  # an alert must never break what it reports on
        log.warning("notifications: could not file an alert", alert=event, error=str(exc))
        return False


def note_best(status: Any) -> None:
    a = _active
    if a is not None:
        try:
            a.note_best(status)
        except Exception as exc:
            log.warning("notifications: could not check for a new best", error=str(exc))


def snapshot() -> Optional[dict]:
    a = _active
    return a.snapshot() if a is not None else None
