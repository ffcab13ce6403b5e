"""What `ckpt-daemon status` prints: a one-line verdict first, then the details. Pure: it turns the
daemon's state file (times, never ages) and `now` into text, so ages are true when they are read, also
after the daemon stopped."""

from __future__ import annotations

import datetime as dt
from typing import Optional

from ckpt_daemon.device import describe as describe_device, heartbeat_device
from ckpt_daemon.units import age, human  # noqa: F401  (also this module's API)
from ckpt_daemon.termtext import inert
from daemon import replicaview


def _when(iso: Optional[str]) -> str:
    if not iso:
        return "not scheduled"
    try:
        t = dt.datetime.fromisoformat(iso)
        return t.strftime("%a %Y-%m-%d %H:%M %Z").strip()
    except ValueError:
        return iso


def verdict(s: dict, alive: bool, now: float, config_error: Optional[str] = None) -> tuple[str, str]:
    """(level, line): level is ok | warn | bad; the line is what an operator wants at a glance."""
    t, ck, disk = s.get("training", {}), s.get("checkpoints", {}), s.get("disk") or {}
    parts, level = [], "ok"
    if not alive:
        parts.append("daemon NOT RUNNING")
        level = "bad"
    state = t.get("state", "?")
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
    if t.get("step") is not None:
        parts.append(f"step {t['step']}")
    if t.get("steps_per_s"):
        parts.append(f"{t['steps_per_s']:.1f} steps/s")
    loss = ((t.get("metrics") or {}).get("loss") or {}).get("value")
    if isinstance(loss, (int, float)) and state in ("running", "adopted"):
        parts.append(f"loss {loss:.4g}")
    latest = ck.get("latest")
    if latest:
        parts.append(f"latest {age(now - latest['mtime'])} ago" if latest.get("mtime") else f"latest {latest['name']}")
    else:
        parts.append("no checkpoint yet")
    if isinstance(disk.get("used_percent"), (int, float)):
        parts.append(f"disk {disk['used_percent']:.0f}% used" + (f" on {disk['mount']}" if disk.get("mount") else ""))
    elif disk.get("free_bytes") is not None:
        parts.append(f"disk {human(disk['free_bytes'])} free")
    if disk.get("level") == "emergency":
        level = "bad"
    elif disk.get("level") == "warning":
        level = max(level, "warn", key=_rank)
    nxt = (s.get("jobs") or {}).get("next") or {}
    if nxt.get("snapshot"):
        try:
            parts.append(f"next snapshot {dt.datetime.fromisoformat(nxt['snapshot']).strftime('%H:%M')}")
        except ValueError:
            pass
    if config_error or (s.get("daemon") or {}).get("config_error") or (s.get("daemon") or {}).get("config_pending"):
        parts.append("CONFIG NOT IN FORCE")
        level = max(level, "warn", key=_rank)
    if ck.get("failed_verification"):
        parts.append(f"{len(ck['failed_verification'])} FAILED VERIFICATION")
        level = max(level, "warn", key=_rank)
    if any(t.get("state") in ("failing", "unusable") for t in (s.get("notify") or {}).get("targets") or []):
        parts.append("notifications FAILING")  # the alerts of this run may not reach anyone
        level = max(level, "warn", key=_rank)
    ret = s.get("retention") or {}
    if ret.get("policy_confirmed") is False:
        # held deletions matter only while the policy is unconfirmed: once a person confirmed it (cleanup -y),
        # the next unattended run applies it
        if (s.get("last_cleanup") or {}).get("held"):
            parts.append(f"{s['last_cleanup']['held']} deletions HELD")
            level = max(level, "warn", key=_rank)
        else:
            parts.append("retention policy unconfirmed")
    rep = replicaview.verdict_part(s.get("replicas") or [], now)  # replicas (daemon/replicaview.py)
    if rep:
        parts.append(rep[1])
        level = max(level, rep[0], key=_rank)
    return level, " · ".join(parts)


def _rank(level: str) -> int:
    return {"ok": 0, "warn": 1, "bad": 2}[level]


def _crash_loop(t: dict) -> str:
    """'N crashes in 60 min' when the trainer crashed at least twice within the restart policy's window."""
    n, window = t.get("recent_crashes"), t.get("crash_window_s")
    if not isinstance(n, int) or n < 2:
        return ""
    return f"{n} crashes in {age(window) if isinstance(window, (int, float)) else 'the window'}"


def render(s: dict, alive: bool, now: float, config_error: Optional[str] = None,
           config_path: str = "") -> list[tuple[str, str]]:
    """[(style, line)] for the terminal; style is '' or ok/warn/bad."""
    out: list[tuple[str, str]] = []
    level, line = verdict(s, alive, now, config_error)
    out.append((level, line))
    d, t, ck = s.get("daemon", {}), s.get("training", {}), s.get("checkpoints", {})
    up = f", up {age(now - d['started'])}" if alive and d.get("started") else ""
    out.append(("" if alive else "bad",
                f"daemon:   {'running' if alive else 'NOT RUNNING (the last state it wrote is below)'} "
                                        f"pid {d.get('pid')}{up}"))
    if config_error:
        # The file as it is now; its problem is printed once, as the warning above these lines (on stderr), not
        # again here, nor what the daemon said of the same edit.
        also = " The daemon rejected the edit too and runs the last good config." if d.get("config_error") else ""
        out.append(("warn", f"config:   {config_path or 'config.yaml'} is BROKEN (the problem is printed above); shown "
                            f"with the last good config.{also}"))
    elif d.get("config_error"):
        out.append(("warn", f"config:   LAST EDIT REJECTED, the daemon runs the config in force: {d['config_error']}"))
    if d.get("config_pending"):
        out.append(("warn", f"config:   EDIT HELD UNTIL RESTART: {d['config_pending']}"))
    line = f"training: {t.get('state')}"
    if t.get("pid"):
        line += f" pid {t['pid']}"
    if t.get("started_at") and t.get("state") in ("running", "adopted"):
        line += f", up {age(now - t['started_at'])}"
    if t.get("step") is not None:
        line += f", step {t['step']}"
    if t.get("heartbeat_time"):
        line += f", heartbeat {age(now - t['heartbeat_time'])} ago"
    line += f", restarts {t.get('restarts', 0)}"
    loop = _crash_loop(t)
    if loop:
        line += f", {loop}" + (f" (gives up at {t['max_crashes']})" if t.get("max_crashes") and t.get("state") != "gave_up" else "")
    if t.get("resumed_from"):
        line += f", resumed from {t['resumed_from']}"
    out.append(("bad" if loop else "", line))
    dev = heartbeat_device(t.get("device"))  # the state file is read back: checked again
    if dev:
        out.append(("", f"device:   {describe_device(dev)}"))
    if t.get("message"):
        out.append(("bad" if t.get("state") == "gave_up" else "", f"          {t['message']}"))
    if t.get("next_start"):
        out.append(("", f"          next start in {age(t['next_start'] - now)}"))
    if (t.get("warm_spare_failures") or 0) >= 3:
        out.append(("warn", "          warm spare: off after 3 spares exited early (see logs/trainer.log)"))
    ws = t.get("warm_spare")
    if isinstance(ws, dict) and isinstance(ws.get("since"), (int, float)):
        state = "ready: a restart is handed to it" if ws.get("ready") else "still importing"
        out.append(("", f"          warm spare: pid {ws.get('pid')}, waiting for {age(now - ws['since'])} ({state})"))
    metrics = t.get("metrics") or {}
    if metrics:
        shown = []
        for name, m in list(metrics.items())[:12]:
            if isinstance(m, dict) and isinstance(m.get("value"), (int, float)):
                shown.append(f"{inert(str(name))[:64]} {m['value']:.4g}" + (f" (step {m['step']})" if m.get("step") is not None else ""))
        if shown:
            out.append(("", f"metrics:  {', '.join(shown)}"))
    lc = t.get("last_crash")
    if lc and lc.get("resolved"):  # history: a trainer started after it ran fine
        out.append(("", f"earlier crash: {lc['description']} after {lc['ran_s']}s, {age(now - lc['time'])} ago; "
                        f"since then {lc['resolved']}"))
    elif lc:
        out.append(("warn", f"last crash: {lc['description']} after {lc['ran_s']}s, {age(now - lc['time'])} ago "
                            f"(from {lc.get('resumed_from') or 'scratch'}); its last output:"))
        for tl in (lc.get("tail") or [])[-10:]:
            out.append(("", f"    | {inert(str(tl))}"))
    for which in ("latest", "best"):
        e = ck.get(which)
        if e:
            m = " ".join(f"{k}={v:.4g}" for k, v in (e.get("metrics") or {}).items())
            old = f", {age(now - e['mtime'])} old" if e.get("mtime") else ""
            out.append(("", f"{which + ':':9} {e['name']} (step {e['step']}{old}) {m}".rstrip()))
        else:
            out.append(("", f"{which + ':':9} none"))
    out.append(("", f"checkpoints: {ck.get('count', 0)} in {ck.get('dir')}, {ck.get('valid', 0)} valid"
                    + (f", {ck['quarantined']} in quarantine" if ck.get("quarantined") else "")))
    for n, why in (ck.get("failed_verification") or {}).items():
        out.append(("bad", f"  FAILED VERIFICATION: {n}: {why}"))
    mem = s.get("memory")
    if isinstance(mem, dict):
        out.extend(_memory_lines(mem, now))
    disk = s.get("disk") or {}
    if disk:
        if isinstance(disk.get("used_percent"), (int, float)):  # as `df` shows it
            used = (f"{disk['used_percent']:.0f}% used of {human(disk.get('total_bytes') or 0)}"
                    + (f" on {disk['mount']}" if disk.get("mount") else "")
                    + (f" ({human(disk['reserved_bytes'])} more reserved for root)" if disk.get("reserved_bytes") else "")
                    + ", ")
        else:
            used = ""
        out.append(("bad" if disk.get("level") == "emergency" else ("warn" if disk.get("level") == "warning" else ""),
                    f"disk:     {used}{human(disk.get('free_bytes', 0))} free ({disk.get('level')})"))
        if disk.get("message"):
            out.append(("bad", f"          {disk['message']}"))
    for t in (s.get("notify") or {}).get("targets") or []:  # labels only: a URL is a secret
        if t.get("state") in ("failing", "unusable"):
            since = f" for {age(now - t['failing_since'])}" if t.get("failing_since") else ""
            out.append(("warn", f"notify:   {t.get('target')} FAILING{since} ({t.get('failed', 0)} not delivered): "
                                f"{t.get('last_error')}"))
    nxt = (s.get("jobs") or {}).get("next", {})
    for j in ("snapshot", "retention"):
        out.append(("", f"next {j}: {_when(nxt.get(j))}"))
    ret = s.get("retention") or {}
    if ret.get("enabled") is False:
        out.append(("warn", "retention: disabled (retention.enabled: false): nothing is deleted by the daemon"))
    elif ret.get("policy_confirmed") is False:
        out.append(("warn", "retention: settings in config.yaml that decide what is deleted differ from the last "
                            "confirmed ones; unattended runs delete only what the confirmed settings also would. "
                            "Review and confirm: python -m maintenance.cleanup"))
    out += replicaview.status_lines(s.get("replicas") or [], now)  # replicas (daemon/replicaview.py)
    lcl = s.get("last_cleanup")
    if lcl:
        held = ""
        if lcl.get("held"):
            held = (f", HELD {lcl['held']} (unconfirmed policy)" if ret.get("policy_confirmed") is not True else
                    f", held {lcl['held']} under the policy then unconfirmed (confirmed since: the next run applies it)")
        out.append(("", f"last cleanup: {age(now - lcl['time'])} ago ({lcl['reason']}): deleted {lcl['deleted']}, "
                        f"kept {lcl['kept']}, freed {human(lcl['freed_bytes'])}"
                        + (f", {lcl['failed']} FAILED" if lcl.get("failed") else "") + held))
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
