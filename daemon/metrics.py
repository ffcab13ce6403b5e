"""Prometheus metrics of the daemon: a custom collector built, at each scrape, from the status the
main loop last computed (`Daemon.status()`, times not ages) and the cached inventory (catalog and
retention plan per run, snapshots; see dashboard.Inventory). A scrape therefore never scans the
checkpoint folder and never waits for the main loop.

Served at /metrics by daemon/http.py, and written as `ckpt_daemon.prom` for node_exporter's textfile
collector when `http.textfile` is set (the same exposition, written atomically).

Names follow Prometheus conventions: `ckpt_daemon_` prefix, base units (`_seconds`, `_bytes`),
`_total` for counters, `_timestamp_seconds` for Unix times. Runs are labelled run="" for
checkpoints.dir itself and run="<name>" for each of checkpoints.runs.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Callable, Iterator, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from ckpt_daemon.device import heartbeat_device
from daemon import replicaview
from daemon.dashboard import InventoryView
from daemon.statusdoc import RunCheckpoints, Status, Training, as_status

TRAINING_STATES = ("idle", "running", "adopted", "stopping", "backoff", "gave_up", "stopped", "finished")
DISK_LEVELS = {"ok": 0, "warning": 1, "emergency": 2}
CONTENT_TYPE = CONTENT_TYPE_LATEST


def _num(v) -> Optional[float]:
    if isinstance(v, bool):
        return float(v)
    return float(v) if isinstance(v, (int, float)) else None


def _iso_ts(v) -> Optional[float]:
    if not isinstance(v, str):
        return None
    try:
        t = dt.datetime.fromisoformat(v)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp()


class DaemonCollector(Collector):
    """Builds every family from `get_status()` (a Daemon.status() dict) and `get_inventory()`."""

    def __init__(self, get_status: Callable[[], dict], get_inventory: Callable[[], Optional[InventoryView]],
                 clock: Callable[[], float] = time.time):
        self.get_status, self.get_inventory, self.clock = get_status, get_inventory, clock

    def describe(self) -> list:
        return []  # families depend on the data; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        s = as_status(self.get_status())
        inv = self.get_inventory()
        now = self.clock()
        yield from self._daemon(s)
        yield from self._training(s)
        yield from self._memory(s)
        yield from self._checkpoints(s, inv, now)
        yield from self._retention(s, inv)
        yield from self._snapshots(inv, now)
        yield from self._disk(s)
        yield from self._jobs(s)
        yield from replicaview.metric_families(s.replicas, now)  # replicas (daemon/replicaview.py)
        if inv is not None:
            yield GaugeMetricFamily("ckpt_daemon_inventory_timestamp_seconds",
                                    "When the catalog and retention plan behind these metrics were taken (rebuilt at most "
                                    "every 30 s).", value=inv.time)
            yield GaugeMetricFamily("ckpt_daemon_inventory_duration_seconds",
                                    "How long taking the catalog and retention plan took.", value=inv.duration_s)

    # ---------------------------------------------------------------------------- families
    def _daemon(self, s: Status) -> Iterator[Metric]:
        d = s.daemon
        if d.started is not None:
            yield GaugeMetricFamily("ckpt_daemon_start_time_seconds", "When the daemon started (Unix time).",
                                    value=d.started)
        yield GaugeMetricFamily(
            "ckpt_daemon_config_error",
            "1 if the config in force is not config.yaml as it is on disk: the last edit was rejected or is held "
            "until a restart (ckpt-daemon status says why).",
            value=1 if (d.config_error or d.config_pending) else 0)

    def _training(self, s: Status) -> Iterator[Metric]:
        t = s.training
        state = t.state
        yield GaugeMetricFamily("ckpt_daemon_training_up", "1 if the trainer process is running (started or adopted).",
                                value=1 if state in ("running", "adopted") else 0)
        g = GaugeMetricFamily("ckpt_daemon_training_state", "The trainer's state: 1 for the current one.",
                              labels=["state"])
        for st in sorted(set(TRAINING_STATES) | ({state} if isinstance(state, str) else set())):
            g.add_metric([st], 1 if st == state else 0)
        yield g
        yield CounterMetricFamily("ckpt_daemon_training_restarts", "Restarts of the trainer after a crash since the "
                                  "daemon started.", value=t.restarts)
        c = CounterMetricFamily("ckpt_daemon_training_crashes", "Trainer exits that were not a finish, by kind "
                                "(signal, error, out_of_memory, disk_full, heartbeat, ...), since the daemon started.",
                                labels=["kind"])
        for kind, n in sorted(t.crash_counts.items()):
            c.add_metric([str(kind)], n)
        yield c
        for key, name, help_ in (
                ("step", "ckpt_daemon_training_step", "The trainer's current step (from its heartbeat)."),
                ("steps_per_s", "ckpt_daemon_training_steps_per_second", "Training speed over the last minute."),
                ("heartbeat_time", "ckpt_daemon_training_heartbeat_timestamp_seconds", "The trainer's last heartbeat."),
        ):
            if getattr(t, key) is not None:
                yield GaugeMetricFamily(name, help_, value=getattr(t, key))
        yield from self._device(t.device)
        if t.last_crash is not None and t.last_crash.time is not None:
            yield GaugeMetricFamily("ckpt_daemon_training_last_crash_timestamp_seconds",
                                    "When the trainer last crashed.",
                                    value=t.last_crash.time)
        if t.recent_crashes is not None:
            yield GaugeMetricFamily("ckpt_daemon_training_recent_crashes",
                                    "Crashes within the restart policy's window (training.restart.crash_window_s); 2 or "
                                    "more is a crash loop. 0 once a trainer has run healthy_after_s.",
                                    value=t.recent_crashes)
        yield from self._train_metrics(t)

    @staticmethod
    def _device(raw) -> Iterator[Metric]:
        """Where the trainer computes and its device's memory (from its heartbeat)."""
        dev = heartbeat_device(raw)
        if not dev:
            return
        info = GaugeMetricFamily("ckpt_daemon_training_device_info", "The trainer's device (1 for the current one): "
                                 "cpu or cuda:<i>, its name and the autocast precision.",
                                 labels=["device", "name", "precision"])
        info.add_metric([dev["device"], dev.get("name", ""), dev.get("precision", "")], 1)
        yield info
        mem = dev.get("memory") or {}
        if mem:
            g = GaugeMetricFamily("ckpt_daemon_training_device_memory_bytes",
                                  "The trainer's device memory: allocated and reserved by torch, and the GPU's total; "
                                  "on a CPU the trainer's resident memory (rss).", labels=["kind"])
            for kind, v in sorted(mem.items()):
                g.add_metric([kind], v)
            yield g

    @staticmethod
    def _train_metrics(t: Training) -> Iterator[Metric]:
        """The trainer's newest metrics (logs/metrics.jsonl): loss, the validation metric, the learning rate..."""
        metrics = t.metrics
        if not metrics:
            return
        value = GaugeMetricFamily("ckpt_daemon_training_metric",
                                  "The newest value of each metric the trainer logs (loss, val_loss, eval_loss, lr, ...), "
                                  "by name.", labels=["name"])
        step = GaugeMetricFamily("ckpt_daemon_training_metric_step", "The step at which that value was logged.",
                                 labels=["name"])
        for name, m in sorted(metrics.items()):
            if not isinstance(m, dict) or _num(m.get("value")) is None:
                continue
            value.add_metric([str(name)], m["value"])
            if _num(m.get("step")) is not None:
                step.add_metric([str(name)], m["step"])
        yield from (value, step)
        if t.metrics_time is not None:
            yield GaugeMetricFamily("ckpt_daemon_training_metrics_timestamp_seconds",
                                    "When the trainer logged its newest metrics line.", value=t.metrics_time)

    def _memory(self, s: Status) -> Iterator[Metric]:
        mem = s.memory
        if not isinstance(mem, dict):
            return  # memory checkpoints are off
        yield GaugeMetricFamily("ckpt_daemon_memory_active", "1 if memory checkpoints are on and working (0: off "
                                "because of a problem; ckpt-daemon status says which).",
                                value=1 if mem.get("active") else 0)
        newest = mem.get("newest") or {}
        for key, name, help_ in (
                ("step", "ckpt_daemon_memory_slot_step", "Step of the newest memory checkpoint (slot)."),
                ("bytes", "ckpt_daemon_memory_slot_bytes", "Size of the newest memory checkpoint."),
                ("time", "ckpt_daemon_memory_slot_timestamp_seconds", "When the newest memory checkpoint was written."),
        ):
            if _num(newest.get(key)) is not None:
                yield GaugeMetricFamily(name, help_, value=newest[key])
        last = mem.get("last_persist") or {}
        if _num(last.get("step")) is not None:
            yield GaugeMetricFamily("ckpt_daemon_memory_persisted_step", "Step of the memory checkpoint the daemon "
                                    "persisted (wrote to the checkpoint folder) last.", value=last["step"])
            if _num(newest.get("step")) is not None:
                yield GaugeMetricFamily("ckpt_daemon_memory_unpersisted_steps",
                                        "Steps of the newest memory checkpoint beyond the last one persisted: what only "
                                        "memory holds.", value=max(0, newest["step"] - last["step"]))
        if _num(last.get("seconds")) is not None:
            yield GaugeMetricFamily("ckpt_daemon_memory_last_persist_duration_seconds",
                                    "How long the last persist took.",
                                    value=last["seconds"])
        if _num(last.get("time")) is not None:
            yield GaugeMetricFamily("ckpt_daemon_memory_last_persist_timestamp_seconds", "When the last persist ended.",
                                    value=last["time"])
        yield CounterMetricFamily("ckpt_daemon_memory_persists",
                                  "Memory checkpoints persisted since the daemon started.",
                                  value=_num(mem.get("persisted")) or 0)
        yield GaugeMetricFamily("ckpt_daemon_memory_pinned_slots", "Memory checkpoints verified and pinned at a "
                                "breakpoint, waiting to be persisted.", value=len(mem.get("pinned_steps") or []))
        yield GaugeMetricFamily("ckpt_daemon_memory_persisting", "1 while a memory checkpoint is being persisted.",
                                value=1 if mem.get("persisting") is not None else 0)

    def _checkpoints(self, s: Status, inv: Optional[InventoryView], now: float) -> Iterator[Metric]:
        ck = s.checkpoints
        per_run: dict[str, RunCheckpoints] = {"": ck, **ck.runs}
        ts = GaugeMetricFamily("ckpt_daemon_checkpoint_last_timestamp_seconds",
                               "Modification time of the newest valid checkpoint.", labels=["run"])
        age = GaugeMetricFamily("ckpt_daemon_checkpoint_last_age_seconds",
                                "Age of the newest valid checkpoint at the time of the scrape.", labels=["run"])
        step = GaugeMetricFamily("ckpt_daemon_checkpoint_last_step", "Step of the newest valid checkpoint.",
                                 labels=["run"])
        size = GaugeMetricFamily("ckpt_daemon_checkpoint_last_size_bytes",
                                 "Bytes on disk of the newest valid checkpoint.", labels=["run"])
        best = GaugeMetricFamily("ckpt_daemon_checkpoint_best_step", "Step of the best checkpoint.", labels=["run"])
        for run, v in sorted(per_run.items()):
            latest = v.latest
            if latest is not None and latest.mtime is not None:
                ts.add_metric([run], latest.mtime)
                age.add_metric([run], max(0.0, now - latest.mtime))
            if latest is not None and latest.step is not None:
                step.add_metric([run], latest.step)
            if v.best is not None and v.best.step is not None:
                best.add_metric([run], v.best.step)
            rv = inv.runs.get(run) if inv else None
            if latest is not None and rv is not None and rv.report is not None and latest.name in rv.report.entries:
                size.add_metric([run], rv.report.entries[latest.name].bytes)
        yield from (ts, age, step, size, best)
        counts = GaugeMetricFamily("ckpt_daemon_checkpoints",
                                   "Numbered checkpoints by status (complete, incomplete, corrupt, invalid, "
                                   "unreadable, in_progress).", labels=["run", "status"])
        if inv is not None:
            for run, rv in sorted(inv.runs.items()):
                entries = rv.report.entries.values() if rv.report is not None else (rv.catalog.entries if rv.catalog else [])
                by: dict[str, int] = {}
                for e in entries:
                    by[e.status] = by.get(e.status, 0) + 1
                for st in sorted(set(by) | {"complete"}):
                    counts.add_metric([run, st], by.get(st, 0))
        else:
            for run, v in sorted(per_run.items()):
                counts.add_metric([run, "complete"], v.valid)
        yield counts
        yield GaugeMetricFamily("ckpt_daemon_verification_failures",
                                "Checkpoints that failed verification and are still in the folder.",
                                value=len(ck.failed_verification))
        yield GaugeMetricFamily("ckpt_daemon_quarantined_checkpoints",
                                "Checkpoints moved to .ckpt-daemon/quarantine/ after failing verification (kept, never "
                                "deleted).", value=ck.quarantined)

    def _retention(self, s: Status, inv: Optional[InventoryView]) -> Iterator[Metric]:
        ret = s.retention
        yield GaugeMetricFamily("ckpt_daemon_retention_enabled", "1 if the scheduled retention runs.",
                                value=1 if ret.enabled else 0)
        if ret.policy_confirmed is not None:
            yield GaugeMetricFamily(
                "ckpt_daemon_retention_policy_confirmed",
                "1 if the tiers in config.yaml are the last ones a person confirmed; 0: unattended runs delete only "
                "what the confirmed tiers also would.", value=1 if ret.policy_confirmed else 0)
        lc = s.last_cleanup
        if lc is not None:
            yield GaugeMetricFamily("ckpt_daemon_last_cleanup_timestamp_seconds", "When retention last ran.",
                                    value=lc.time)
            yield GaugeMetricFamily("ckpt_daemon_last_cleanup_freed_bytes", "Bytes the last retention run freed.",
                                    value=lc.freed_bytes)
        if inv is None:
            return
        count = GaugeMetricFamily("ckpt_daemon_retention_tier_checkpoints",
                                  "Checkpoints per retention tier (tier=\"none\": beyond the last tier, or not complete).",
                                  labels=["run", "tier"])
        size = GaugeMetricFamily("ckpt_daemon_retention_tier_bytes", "Bytes on disk per retention tier.",
                                 labels=["run", "tier"])
        planned = GaugeMetricFamily("ckpt_daemon_retention_planned_deletions",
                                    "Checkpoints the next unattended retention run would delete.", labels=["run"])
        planned_bytes = GaugeMetricFamily("ckpt_daemon_retention_planned_free_bytes",
                                          "Bytes the next unattended retention run would free (hard links into "
                                          "snapshots free nothing).", labels=["run"])
        held = GaugeMetricFamily("ckpt_daemon_retention_held_deletions",
                                 "Deletions held because the tiers were edited and nobody confirmed them yet (run "
                                 "`python -m maintenance.cleanup` to review).", labels=["run"])
        for run, rv in sorted(inv.runs.items()):
            r = rv.report
            if r is None:
                continue
            n_tiers = len(r.tiers)
            by_count = {str(i): 0 for i in range(1, n_tiers + 1)}
            by_bytes = dict.fromkeys(by_count, 0)
            by_count["none"] = by_bytes["none"] = 0
            for d in r.decisions:
                key = str(d.tier) if d.tier is not None else "none"
                e = r.entries.get(d.name)
                by_count[key] = by_count.get(key, 0) + 1
                by_bytes[key] = by_bytes.get(key, 0) + (e.bytes if e is not None else 0)
            for key in by_count:
                count.add_metric([run, key], by_count[key])
                size.add_metric([run, key], by_bytes[key])
            victims = [d for d in r.decisions if not d.keep]
            planned.add_metric([run], len(victims))
            planned_bytes.add_metric([run],
                                     sum(r.entries[d.name].freeable_bytes for d in victims if d.name in r.entries))
            held.add_metric([run], len(r.held))
        yield from (count, size, planned, planned_bytes, held)

    def _snapshots(self, inv: Optional[InventoryView], now: float) -> Iterator[Metric]:
        if inv is None:
            return
        yield GaugeMetricFamily("ckpt_daemon_snapshots", "Snapshots in snapshots.dir.", value=len(inv.snapshots))
        if inv.snapshots:
            newest = inv.snapshots[0]
            t = _iso_ts(newest.get("created")) or newest.get("time")
            if t is not None:
                yield GaugeMetricFamily("ckpt_daemon_snapshot_last_timestamp_seconds", "When the newest snapshot was "
                                        "taken.", value=t)
                yield GaugeMetricFamily("ckpt_daemon_snapshot_last_age_seconds", "Age of the newest snapshot at the "
                                        "time of the scrape.", value=max(0.0, now - t))

    def _disk(self, s: Status) -> Iterator[Metric]:
        disk = s.disk
        for key, name, help_ in (
                ("free_bytes", "ckpt_daemon_disk_free_bytes", "Bytes a trainer may still write on the filesystem of "
                 "checkpoints.dir (df's Available)."),
                ("total_bytes", "ckpt_daemon_disk_total_bytes", "Size of the filesystem of checkpoints.dir."),
                ("used_bytes", "ckpt_daemon_disk_used_bytes", "Bytes in use on that filesystem (df's Used)."),
                ("reserved_bytes", "ckpt_daemon_disk_reserved_bytes", "Bytes reserved for root: neither used nor "
                 "available."),
                ("used_ratio", "ckpt_daemon_disk_used_ratio", "Share of the filesystem in use as df shows it: used / "
                 "(used + available), the blocks reserved for root left out."),
                ("checked", "ckpt_daemon_disk_checked_timestamp_seconds", "When the disk job last measured."),
        ):
            if getattr(disk, key) is not None:
                yield GaugeMetricFamily(name, help_, value=getattr(disk, key))
        if disk.mount is not None:
            info = GaugeMetricFamily("ckpt_daemon_disk_info", "The filesystem these disk figures are of: its mount "
                                     "point.", labels=["mountpoint"])
            info.add_metric([disk.mount], 1)
            yield info
        if disk.level in DISK_LEVELS:
            yield GaugeMetricFamily("ckpt_daemon_disk_level", "0: ok, 1: below disk.warn_free_gb, 2: below "
                                    "disk.emergency_free_gb.", value=DISK_LEVELS[disk.level])

    def _jobs(self, s: Status) -> Iterator[Metric]:
        jobs = s.jobs
        hist = jobs.get("history") or {}
        dur = GaugeMetricFamily("ckpt_daemon_job_last_duration_seconds", "How long the job's last run took.",
                                labels=["job"])
        ok_ts = GaugeMetricFamily("ckpt_daemon_job_last_success_timestamp_seconds", "When the job last succeeded.",
                                  labels=["job"])
        res = GaugeMetricFamily("ckpt_daemon_job_last_result", "1 if the job's last run succeeded, 0 if it failed.",
                                labels=["job"])
        runs = CounterMetricFamily("ckpt_daemon_job_runs", "Runs of the job (snapshot and retention: ever; the "
                                   "others: since the daemon started).", labels=["job"])
        nxt = GaugeMetricFamily("ckpt_daemon_job_next_run_timestamp_seconds", "When the job runs next.",
                                labels=["job"])
        for job, h in sorted(hist.items()):
            if not isinstance(h, dict):
                continue
            if _num(h.get("last_duration_s")) is not None:
                dur.add_metric([job], h["last_duration_s"])
            if _num(h.get("last_success")) is not None:
                ok_ts.add_metric([job], h["last_success"])
            if h.get("last_result") in ("ok", "error"):
                res.add_metric([job], 1 if h["last_result"] == "ok" else 0)
            if _num(h.get("runs")) is not None:
                runs.add_metric([job], h["runs"])
        for job, when in sorted((jobs.get("next") or {}).items()):
            t = _iso_ts(when)
            if t is not None:
                nxt.add_metric([job], t)
        yield from (dur, ok_ts, res, runs, nxt)


def make_registry(collector: DaemonCollector, process: bool = False) -> CollectorRegistry:
    """A registry of our own (never the global one): the collector, plus the daemon's process metrics
    (RSS, CPU, open fds) when served over HTTP. The textfile leaves those out: node_exporter would show
    them as if they were the node's."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    if process:
        from prometheus_client import ProcessCollector

        ProcessCollector(registry=reg)
    return reg


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def write_textfile(folder, registry: CollectorRegistry) -> None:
    """`ckpt_daemon.prom` in `folder`, replaced atomically (a temp file node_exporter ignores, then rename)."""
    from pathlib import Path

    from ckpt_daemon.fsutil import atomic_write_bytes

    atomic_write_bytes(Path(folder) / "ckpt_daemon.prom", exposition(registry), mode=0o644, durable=False)
