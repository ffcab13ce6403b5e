"""What `ckpt-daemon status` prints: a one-line verdict first, then the details. Pure: it turns the
daemon's state file (times, never ages) and `now` into text, so ages are true when they are read, also
after the daemon stopped."""

from __future__ import annotations

import datetime as dt
from typing import Optional

from ckpt_daemon.device import describe as describe_device
from ckpt_daemon.device import heartbeat_device
from ckpt_daemon.termtext import inert
from ckpt_daemon.units import age, human  # noqa: F401  (also this module's API)
from daemon import replicaview
from daemon.statusdoc import Status, Training, as_status


def _when(iso: Optional[str]) -> str:
    if not iso:
        return "not scheduled"
    try:
        t = dt.datetime.fromisoformat(iso)
        return t.strftime("%a %Y-%m-%d %H:%M %Z").strip()
    except ValueError:
        return iso


def verdict(s: Status | dict, alive: bool, now: float, config_error: Optional[str] = None) -> tuple[str, str]:
    """(level, line): level is ok | warn | bad; the line is what an operator wants at a glance."""
    s = as_status(s)
    t, ck, disk = s.training, s.checkpoints, s.disk
    parts, level = [], "ok"
    if not alive:
        parts.append("daemon NOT RUNNING")
        level = "bad"
    state = t.state
    loop = _crash_loop(t)
    if loop and state != "gave_up":
        # Several crashes within the restart policy's window: not OK, whatever this moment's state (a trainer
        # that dies at every start is "running" for most of each cycle).
        parts.append(f"training CRASH LOOP ({loop})")
        level = "bad"
    elif state == "running":
        parts.append("training OK")
    elif state in ("gave_up", "backoff"):
        parts.append("training GAVE UP" if state == "gave_up" else "training restarting")
        level = "bad" if state == "gave_up" else max(level, "warn", key=_rank)
    else:
        parts.append(f"training {state}")
        if state not in ("finished", "stopped", "adopted"):
            level = max(level, "warn", key=_rank)
    if t.step is not None:
        parts.append(f"step {t.step}")
    if t.steps_per_s:
        parts.append(f"{t.steps_per_s:.1f} steps/s")
    loss = (t.metrics.get("loss") or {}).get("value") if isinstance(t.metrics.get("loss"), dict) else None
    if isinstance(loss, (int, float)) and state in ("running", "adopted"):
        parts.append(f"loss {loss:.4g}")
    latest = ck.latest
    if latest:
        parts.append(f"latest {age(now - latest.mtime)} ago" if latest.mtime else f"latest {latest.name}")
    else:
        parts.append("no checkpoint yet")
    if disk.used_percent is not None:
        parts.append(f"disk {disk.used_percent:.0f}% used" + (f" on {disk.mount}" if disk.mount else ""))
    elif disk.free_bytes is not None:
        parts.append(f"disk {human(disk.free_bytes)} free")
    if disk.level == "emergency":
        level = "bad"
    elif disk.level == "warning":
        level = max(level, "warn", key=_rank)
    nxt = s.jobs.get("next") or {}
    if isinstance(nxt, dict) and nxt.get("snapshot"):
        try:
            parts.append(f"next snapshot {dt.datetime.fromisoformat(nxt['snapshot']).strftime('%H:%M')}")
        except ValueError:
            pass
    if config_error or s.daemon.config_error or s.daemon.config_pending:
        parts.append("CONFIG NOT IN FORCE")
        level = max(level, "warn", key=_rank)
    if ck.failed_verification:
        parts.append(f"{len(ck.failed_verification)} FAILED VERIFICATION")
        level = max(level, "warn", key=_rank)
    if any(isinstance(n, dict) and n.get("state") in ("failing", "unusable") for n in (s.notify or {}).get("targets") or []):
        parts.append("notifications FAILING")  # the alerts of this run may not reach anyone
        level = max(level, "warn", key=_rank)
    if s.retention.policy_confirmed is False:
        # held deletions matter only while the policy is unconfirmed: once a person confirmed it (cleanup -y),
        # the next unattended run applies it
        if s.last_cleanup and s.last_cleanup.held:
            parts.append(f"{s.last_cleanup.held} deletions HELD")
            level = max(level, "warn", key=_rank)
        else:
            parts.append("retention policy unconfirmed")
    rep = replicaview.verdict_part(s.replicas, now)  # replicas (daemon/replicaview.py)
    if rep:
        parts.append(rep[1])
        level = max(level, rep[0], key=_rank)
    return level, " · ".join(parts)


def _rank(level: str) -> int:
    return {"ok": 0, "warn": 1, "bad": 2}[level]


def _crash_loop(t: Training) -> str:
    """'N crashes in 60 min' when the trainer crashed at least twice within the restart policy's window."""
    n, window = t.recent_crashes, t.crash_window_s
    if n is None or n < 2:
        return ""
    return f"{n} crashes in {age(window) if window is not None else 'the window'}"


def render(s: Status | dict, alive: bool, now: float, config_error: Optional[str] = None,
           config_path: str = "") -> list[tuple[str, str]]:
    """[(style, line)] for the terminal; style is '' or ok/warn/bad."""
    s = as_status(s)
    out: list[tuple[str, str]] = []
    level, line = verdict(s, alive, now, config_error)
    out.append((level, line))
    d, t, ck = s.daemon, s.training, s.checkpoints
    up = f", up {age(now - d.started)}" if alive and d.started else ""
    out.append(("" if alive else "bad",
                f"daemon:   {'running' if alive else 'NOT RUNNING (the last state it wrote is below)'} "
                                        f"pid {d.pid}{up}"))
    if config_error:
        # The file as it is now; its problem is printed once, as the warning above these lines (on stderr), not
        # again here, nor what the daemon said of the same edit.
        also = " The daemon rejected the edit too and runs the last good config." if d.config_error else ""
        out.append(("warn", f"config:   {config_path or 'config.yaml'} is BROKEN (the problem is printed above); shown "
                            f"with the last good config.{also}"))
    elif d.config_error:
        out.append(("warn", f"config:   LAST EDIT REJECTED, the daemon runs the config in force: {d.config_error}"))
    if d.config_pending:
        out.append(("warn", f"config:   EDIT HELD UNTIL RESTART: {d.config_pending}"))
    line = f"training: {t.state}"
    if t.pid:
        line += f" pid {t.pid}"
    if t.started_at and t.state in ("running", "adopted"):
        line += f", up {age(now - t.started_at)}"
    if t.step is not None:
        line += f", step {t.step}"
    if t.heartbeat_time:
        line += f", heartbeat {age(now - t.heartbeat_time)} ago"
    line += f", restarts {t.restarts}"
    loop = _crash_loop(t)
    if loop:
        line += f", {loop}" + (f" (gives up at {t.max_crashes})" if t.max_crashes and t.state != "gave_up" else "")
    if t.resumed_from:
        line += f", resumed from {t.resumed_from}"
    out.append(("bad" if loop else "", line))
    dev = heartbeat_device(t.device)  # the state file is read back: checked again
    if dev:
        out.append(("", f"device:   {describe_device(dev)}"))
    if t.message:
        out.append(("bad" if t.state == "gave_up" else "", f"          {t.message}"))
    if t.next_start:
        out.append(("", f"          next start in {age(t.next_start - now)}"))
    if t.warm_spare_failures >= 3:
        out.append(("warn", "          warm spare: off after 3 spares exited early (see logs/trainer.log)"))
    ws = t.warm_spare
    if isinstance(ws, dict) and isinstance(ws.get("since"), (int, float)):
        state = "ready: a restart is handed to it" if ws.get("ready") else "still importing"
        out.append(("", f"          warm spare: pid {ws.get('pid')}, waiting for {age(now - ws['since'])} ({state})"))
    metrics = t.metrics
    if metrics:
        shown = []
        for name, m in list(metrics.items())[:12]:
            if isinstance(m, dict) and isinstance(m.get("value"), (int, float)):
                shown.append(f"{inert(str(name))[:64]} {m['value']:.4g}" + (f" (step {m['step']})" if m.get("step") is not None else ""))
        if shown:
            out.append(("", f"metrics:  {', '.join(shown)}"))
    lc = t.last_crash
    ago = f"{age(now - lc.time)} ago" if lc and lc.time is not None else "some time ago"
    if lc and lc.resolved:  # history: a trainer started after it ran fine
        out.append(("", f"earlier crash: {lc.description} after {lc.ran_s}s, {ago}; since then {lc.resolved}"))
    elif lc:
        out.append(("warn", f"last crash: {lc.description} after {lc.ran_s}s, {ago} "
                            f"(from {lc.resumed_from or 'scratch'}); its last output:"))
        for tl in lc.tail[-10:]:
            out.append(("", f"    | {inert(str(tl))}"))
    for which, e in (("latest", ck.latest), ("best", ck.best)):
        if e:
            m = " ".join(f"{k}={v:.4g}" for k, v in e.metrics.items() if isinstance(v, (int, float)))
            old = f", {age(now - e.mtime)} old" if e.mtime else ""
            out.append(("", f"{which + ':':9} {e.name} (step {e.step}{old}) {m}".rstrip()))
        else:
            out.append(("", f"{which + ':':9} none"))
    out.append(("", f"checkpoints: {ck.count} in {ck.dir}, {ck.valid} valid"
                    + (f", {ck.quarantined} in quarantine" if ck.quarantined else "")))
    for n, why in ck.failed_verification.items():
        out.append(("bad", f"  FAILED VERIFICATION: {n}: {why}"))
    if s.memory is not None:
        out.extend(_memory_lines(s.memory, now))
    disk = s.disk
    if disk.free_bytes is not None or disk.level:
        if disk.used_percent is not None:  # as `df` shows it
            used = (f"{disk.used_percent:.0f}% used of {human(disk.total_bytes or 0)}"
                    + (f" on {disk.mount}" if disk.mount else "")
                    + (f" ({human(disk.reserved_bytes)} more reserved for root)" if disk.reserved_bytes else "")
                    + ", ")
        else:
            used = ""
        out.append(("bad" if disk.level == "emergency" else ("warn" if disk.level == "warning" else ""),
                    f"disk:     {used}{human(disk.free_bytes or 0)} free ({disk.level})"))
        if disk.message:
            out.append(("bad", f"          {disk.message}"))
    for t in (s.notify or {}).get("targets") or []:  # labels only: a URL is a secret
        if isinstance(t, dict) and t.get("state") in ("failing", "unusable"):
            since = f" for {age(now - t['failing_since'])}" if t.get("failing_since") else ""
            out.append(("warn", f"notify:   {t.get('target')} FAILING{since} ({t.get('failed', 0)} not delivered): "
                                f"{t.get('last_error')}"))
    nxt = s.jobs.get("next") if isinstance(s.jobs.get("next"), dict) else {}
    for j in ("snapshot", "retention"):
        out.append(("", f"next {j}: {_when(nxt.get(j))}"))
    ret = s.retention
    if ret.enabled is False:
        out.append(("warn", "retention: disabled (retention.enabled: false): nothing is deleted by the daemon"))
    elif ret.policy_confirmed is False:
        out.append(("warn", "retention: settings in config.yaml that decide what is deleted differ from the last "
                            "confirmed ones; unattended runs delete only what the confirmed settings also would. "
                            "Review and confirm: python -m maintenance.cleanup"))
    out += replicaview.status_lines(s.replicas, now)  # replicas (daemon/replicaview.py)
    lcl = s.last_cleanup
    if lcl:
        held = ""
        if lcl.held:
            held = (f", HELD {lcl.held} (unconfirmed policy)" if ret.policy_confirmed is not True else
                    f", held {lcl.held} under the policy then unconfirmed (confirmed since: the next run applies it)")
        out.append(("", f"last cleanup: {age(now - lcl.time)} ago ({lcl.reason}): deleted {lcl.deleted}, "
                        f"kept {lcl.kept}, freed {human(lcl.freed_bytes)}"
                        + (f", {lcl.failed} FAILED" if lcl.failed else "") + held))
    return out


def _memory_lines(mem: dict, now: float) -> list[tuple[str, str]]:
    """The memory checkpoints' state: the newest slot, what of it is on disk, what is pinned."""
    if mem.get("error"):
        return [("warn", f"memory:   OFF: {mem['error']}")]
    newest, last = mem.get("newest") or {}, mem.get("last_persist") or {}
    if not mem.get("active"):
        parts = ["closed (the daemon stopped)"]
    elif newest.get("step") is not None:
        when = f", {age(now - newest['time'])} old" if isinstance(newest.get("time"), (int, float)) else ""
        parts = [f"newest slot step {newest['step']} ({human(newest.get('bytes') or 0)}{when})"]
    else:
        parts = ["no memory checkpoint yet"]
    if last.get("step") is not None:
        took = f", the last took {last['seconds']:.2f}s" if isinstance(last.get("seconds"), (int, float)) else ""
        parts.append(f"persisted up to step {last['step']} ({mem.get('persisted', 0)} persists{took})")
    else:
        parts.append("none persisted by this daemon yet")
    if mem.get("persisting") is not None:
        parts.append(f"persisting step {mem['persisting']} now")
    pinned = mem.get("pinned_steps") or []
    if mem.get("active"):
        parts.append(f"pinned: step {', '.join(map(str, pinned))}" if pinned else "nothing pinned")
    return [("", "memory:   " + "; ".join(parts))]
