"""What `ckpt-daemon status` prints: a one-line verdict first, then the details. Pure: it turns the
daemon's state file (times, never ages) and `now` into text, so ages are true when they are read, also
after the daemon stopped."""

from __future__ import annotations

import datetime as dt
from typing import Optional

from ckpt_daemon.units import age, human  # noqa: F401  (also this module's API)
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
    if state == "running":
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
    latest = ck.get("latest")
    if latest:
        parts.append(f"latest {age(now - latest['mtime'])} ago" if latest.get("mtime") else f"latest {latest['name']}")
    else:
        parts.append("no checkpoint yet")
    if disk.get("free_bytes") is not None and disk.get("total_bytes"):
        parts.append(f"disk {100 * (1 - disk['free_bytes'] / disk['total_bytes']):.0f}% used")
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
    ret = s.get("retention") or {}
    if (s.get("last_cleanup") or {}).get("held"):
        parts.append(f"{s['last_cleanup']['held']} deletions HELD")
        level = max(level, "warn", key=_rank)
    elif ret.get("policy_confirmed") is False:
        parts.append("retention policy unconfirmed")
    rep = replicaview.verdict_part(s.get("replicas") or [], now)  # replicas (daemon/replicaview.py)
    if rep:
        parts.append(rep[1])
        level = max(level, rep[0], key=_rank)
    return level, " · ".join(parts)


def _rank(level: str) -> int:
    return {"ok": 0, "warn": 1, "bad": 2}[level]


def render(s: dict, alive: bool, now: float, config_error: Optional[str] = None, config_path: str = "") -> list[tuple[str, str]]:
    """[(style, line)] for the terminal; style is '' or ok/warn/bad."""
    out: list[tuple[str, str]] = []
    level, line = verdict(s, alive, now, config_error)
    out.append((level, line))
    d, t, ck = s.get("daemon", {}), s.get("training", {}), s.get("checkpoints", {})
    up = f", up {age(now - d['started'])}" if alive and d.get("started") else ""
    out.append(("" if alive else "bad", f"daemon:   {'running' if alive else 'NOT RUNNING (the last state it wrote is below)'} "
                                        f"pid {d.get('pid')}{up}"))
    if config_error:
        out.append(("warn", f"config:   {config_path or 'config.yaml'} is BROKEN; shown with the last good config. {config_error}"))
    if d.get("config_error"):
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
    if t.get("resumed_from"):
        line += f", resumed from {t['resumed_from']}"
    out.append(("", line))
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
    lc = t.get("last_crash")
    if lc:
        out.append(("warn", f"last crash: {lc['description']} after {lc['ran_s']}s, {age(now - lc['time'])} ago "
                            f"(from {lc.get('resumed_from') or 'scratch'}); its last output:"))
        for tl in (lc.get("tail") or [])[-10:]:
            out.append(("", f"    | {tl}"))
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
    disk = s.get("disk") or {}
    if disk:
        out.append(("bad" if disk.get("level") == "emergency" else ("warn" if disk.get("level") == "warning" else ""),
                    f"disk:     {human(disk.get('free_bytes', 0))} free ({disk.get('level')})"))
        if disk.get("message"):
            out.append(("bad", f"          {disk['message']}"))
    nxt = (s.get("jobs") or {}).get("next", {})
    for j in ("snapshot", "retention"):
        out.append(("", f"next {j}: {_when(nxt.get(j))}"))
    ret = s.get("retention") or {}
    if ret.get("enabled") is False:
        out.append(("warn", "retention: disabled (retention.enabled: false): nothing is deleted by the daemon"))
    elif ret.get("policy_confirmed") is False:
        out.append(("warn", "retention: the tiers in config.yaml differ from the last confirmed ones; unattended runs "
                            "delete only what the confirmed tiers also would. Review and confirm: "
                            "python -m maintenance.cleanup"))
    out += replicaview.status_lines(s.get("replicas") or [], now)  # replicas (daemon/replicaview.py)
    lcl = s.get("last_cleanup")
    if lcl:
        out.append(("", f"last cleanup: {age(now - lcl['time'])} ago ({lcl['reason']}): deleted {lcl['deleted']}, "
                        f"kept {lcl['kept']}, freed {human(lcl['freed_bytes'])}"
                        + (f", {lcl['failed']} FAILED" if lcl.get("failed") else "")
                        + (f", HELD {lcl['held']} (unconfirmed policy)" if lcl.get("held") else "")))
    return out
