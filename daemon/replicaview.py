"""How the replicas' state shows in `status`, the verdict line and /metrics. Pure: it turns the
`replicas` list of the daemon's state (times, never ages) and `now` into text and metric families."""

from __future__ import annotations

from typing import Iterator, Optional

from ckpt_daemon.units import age, human


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def behind_s(r: dict, now: float) -> float:
    t = _num(r.get("behind_since"))
    return max(0.0, now - t) if t is not None else 0.0


def late(r: dict, now: float) -> bool:
    """Whether the replica is behind beyond its within_s (the lag alert)."""
    w = _num(r.get("within_s"))
    return w is not None and behind_s(r, now) > w


def verdict_part(replicas: list[dict], now: float) -> Optional[tuple[str, str]]:
    """(level, text) for the verdict line, or None when every replica is up to date."""
    bad = [r for r in replicas if late(r, now)]
    if bad:
        worst = max(bad, key=lambda r: behind_s(r, now))
        return "warn", f"replica BEHIND {age(behind_s(worst, now))}"
    if any(r.get("last_error") for r in replicas):
        return "warn", "replica error"
    return None


def status_lines(replicas: list[dict], now: float) -> list[tuple[str, str]]:
    out = []
    for r in replicas:
        if not isinstance(r, dict):
            continue
        newest = r.get("newest") or {}
        line = f"replica:  {r.get('url')}: {r.get('replicas', 0)} replicas"
        if newest:
            line += f", newest {newest.get('name')} (step {newest.get('step')}"
            line += f", {age(now - newest['created'])} old)" if _num(newest.get("created")) else ")"
        b = behind_s(r, now)
        if b:
            line += (f"; BEHIND by {r.get('lag_steps', 0)} steps, {age(b)} ({human(r.get('bytes_pending') or 0)} pending)")
        else:
            line += "; up to date"
        if _num(r.get("last_success")):
            line += f"; last success {age(now - r['last_success'])} ago"
        out.append(("warn" if late(r, now) or r.get("last_error") else "", line))
        up = r.get("uploading")
        if isinstance(up, dict):
            out.append(("", f"          uploading {up.get('name')}: {human(up.get('done') or 0)} of {human(up.get('total') or 0)}"))
        if r.get("state") == "restoring":
            out.append(("warn", "          restoring the newest replica before training starts"))
        le = r.get("last_error")
        if isinstance(le, dict):
            out.append(("warn", f"          last error ({age(now - le['time']) if _num(le.get('time')) else '?'} ago): "
                                f"{le.get('message')}"))
        for name, why in (r.get("damaged") or {}).items():
            out.append(("bad", f"          DAMAGED replica {name}: {why}"))
        if r.get("held"):
            out.append(("warn", f"          {len(r['held'])} replica deletion(s) HELD (edited replica retention not "
                                "confirmed: python -m maintenance.cleanup)"))
        rs = r.get("restored")
        if isinstance(rs, dict):
            out.append(("warn", f"          restored {rs.get('name')} from it at start ({age(now - rs['time'])} ago), "
                                "the local folder had no valid checkpoint"))
    return out


def metric_families(replicas: list[dict], now: float) -> Iterator:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    lag_s = GaugeMetricFamily("ckpt_daemon_replica_lag_seconds", "How long the replica has been missing a checkpoint "
                              "it should hold (0: up to date).", labels=["replica"])
    lag_steps = GaugeMetricFamily("ckpt_daemon_replica_lag_steps", "Steps between the newest checkpoint the replica "
                                  "should hold and its newest replica.", labels=["replica"])
    pending = GaugeMetricFamily("ckpt_daemon_replica_pending_bytes", "Bytes of checkpoints waiting to be replicated.",
                                labels=["replica"])
    behind = GaugeMetricFamily("ckpt_daemon_replica_behind", "1 if the lag is beyond the replica's within_s.",
                               labels=["replica"])
    count = GaugeMetricFamily("ckpt_daemon_replica_checkpoints", "Complete replicas on the target.", labels=["replica"])
    ok = GaugeMetricFamily("ckpt_daemon_replica_last_success_timestamp_seconds", "When the replica's last pass "
                           "succeeded.", labels=["replica"])
    err = GaugeMetricFamily("ckpt_daemon_replica_error", "1 if the replica's last pass failed (status says why).",
                            labels=["replica"])
    damaged = GaugeMetricFamily("ckpt_daemon_replica_damaged", "Replicas that fail verification on the target.",
                                labels=["replica"])
    sent = CounterMetricFamily("ckpt_daemon_replica_uploaded_bytes", "Bytes uploaded since the daemon started.",
                               labels=["replica"])
    for r in replicas:
        if not isinstance(r, dict) or not isinstance(r.get("url"), str):
            continue
        u = [r["url"]]
        lag_s.add_metric(u, behind_s(r, now))
        lag_steps.add_metric(u, _num(r.get("lag_steps")) or 0)
        pending.add_metric(u, _num(r.get("bytes_pending")) or 0)
        behind.add_metric(u, 1 if late(r, now) else 0)
        count.add_metric(u, _num(r.get("replicas")) or 0)
        if _num(r.get("last_success")) is not None:
            ok.add_metric(u, r["last_success"])
        err.add_metric(u, 1 if r.get("last_error") else 0)
        damaged.add_metric(u, len(r.get("damaged") or {}))
        sent.add_metric(u, _num(r.get("uploaded_bytes")) or 0)
    yield from (lag_s, lag_steps, pending, behind, count, ok, err, damaged, sent)
